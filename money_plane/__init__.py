"""The money plane: Triplane's double-entry ledger, the only writer of balances."""
