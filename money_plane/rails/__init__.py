"""Payout rails: one interface (`base.Rail`), adapters over HTTP to a bank
endpoint (`adapters`: instant, ACH, SEPA, card/wallet). See README "Rails and
the sandbox bank"."""
