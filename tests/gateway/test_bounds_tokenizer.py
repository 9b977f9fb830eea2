"""The tokenizer keeps per-tenant keys derived, a bounded number of them
(gateway.pii.MAX_TENANT_KEYS): made-up tenant ids cost a derivation, not
memory, and a token never changes because its key was dropped."""

from __future__ import annotations

from gateway import pii


def test_per_tenant_keys_are_bounded_and_tokens_stay_the_same() -> None:
    tokenizer = pii.Tokenizer(b"k" * 32, "tok_")
    first = tokenizer.token("tenant-0", "email", "someone@example.com")
    for index in range(pii.MAX_TENANT_KEYS + 500):
        tokenizer.token(f"invented-{index}", "email", "someone@example.com")
    assert len(tokenizer._tenant_keys) <= pii.MAX_TENANT_KEYS
    assert tokenizer.token("tenant-0", "email", "someone@example.com") == first
