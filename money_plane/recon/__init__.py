"""Reconciliation: bank statements matched to expected payments and the
ledger as they arrive; breaks classified, owned, aged and resolved
(README, money plane, "Reconciliation")."""
