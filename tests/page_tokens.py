"""Page tokens a list must refuse: every other list's, earlier releases'
formats, and garbage. Shared by the tests that call each plane's list RPCs
through its real server."""

from __future__ import annotations

import base64

from ai_plane.codec import MODEL_VERSIONS_PAGE
from gateway.codec import DEAD_LETTERS_PAGE
from money_plane.codec import POSTINGS_PAGE
from policy_plane.codec import BUNDLES_PAGE, CASES_PAGE, OFFERS_PAGE
from triplane.runtime import codec as wire

# Every list the planes serve, with a position of the shape it issues.
POSITIONS: dict[str, tuple[int | str, ...]] = {
    POSTINGS_PAGE: (1,),
    BUNDLES_PAGE: (1,),
    OFFERS_PAGE: ("cashback_grocery",),
    CASES_PAGE: ("case_1",),
    MODEL_VERSIONS_PAGE: (1,),
    DEAD_LETTERS_PAGE: (1_767_225_600_000_000, "dlv_1"),
}


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


# The four formats of earlier releases (money's p1:<sequence>, the AI plane's
# v1:<offset>, the policy plane's bare offset or id, the gateway's time:id),
# and text that is no token at all.
GARBLED = [
    _b64("p1:1"),
    _b64("v1:1"),
    _b64("1"),
    _b64("cashback_grocery"),
    _b64("1767225600000000:dlv_1").rstrip("="),
    "not-a-token",
    "!!",
    "A" * (wire.MAX_PAGE_TOKEN_CHARS + 1),
]


def refused_tokens(kind: str) -> dict[str, str]:
    """label -> a token list `kind` must refuse as PAGE_TOKEN_INVALID."""
    tokens = {
        f"{other} token": wire.encode_page_token(other, position)
        for other, position in POSITIONS.items()
        if other != kind
    }
    tokens.update({f"garbled {i}": token for i, token in enumerate(GARBLED)})
    # Its own kind, in a shape it never issues.
    own = POSITIONS[kind]
    tokens["own kind, another shape"] = wire.encode_page_token(kind, (*own, 1))
    return tokens
