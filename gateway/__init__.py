"""The gateway: the public API that orchestrates the three planes."""
