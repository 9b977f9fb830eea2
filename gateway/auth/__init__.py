"""Partner credentials at the gateway: API keys and OAuth2 JWTs that carry
the tenant, per-method scopes, per-credential rate limits, and the
ApiKeyService that manages the keys (gateway/auth/setup.py assembles them)."""
