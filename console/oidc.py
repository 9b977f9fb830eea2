"""Sign-in through an identity provider: OpenID Connect authorization code
flow with PKCE (authlib), when `console.oidc.issuer` is set."""

from __future__ import annotations

from starlette.routing import BaseRoute

from triplane.runtime.config import ConsoleOidcConfig


class Oidc:
    def __init__(self, config: ConsoleOidcConfig, public_url: str) -> None:
        self.config = config
        self.public_url = public_url.rstrip("/")

    def routes(self) -> list[BaseRoute]:
        return []

    async def close(self) -> None:
        return None
