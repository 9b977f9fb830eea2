"""Ledger storage behind one interface: SQLite (embedded) and PostgreSQL."""

from money_plane.store.base import LedgerStore, OutboxRow, PostingRow, StoreConflict

__all__ = ["LedgerStore", "OutboxRow", "PostingRow", "StoreConflict"]
