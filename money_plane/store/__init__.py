"""Ledger storage behind one interface: SQLite (embedded) and PostgreSQL."""

from money_plane.store.base import LedgerStore, PostingRow, StoreConflict

__all__ = ["LedgerStore", "PostingRow", "StoreConflict"]
