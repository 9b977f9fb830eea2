"""A tenant's own offers, ids the simulator never heard of, are ranked on
their catalog entries: the policy plane keeps each offer's attributes and
returns them with the eligible offers, the gateway passes them to Rank
(product, value, attributes), and the propensity model sees the entry, never
the id."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from ai_plane.features import (
    EntityRef,
    keys_for,
    propensity_context,
    stored_features,
)
from gateway.codec import product_name
from policy_plane.app import PolicyPlane, build_plane
from tests.tls_helpers import dev_certificates
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.common.v1 import types_pb2
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import load_config
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import channel_for
from triplane_sim import synth
from triplane_sim.demo_world import product_enum

TENANT = "acme-own"
CUSTOMER = "c-own"
# 2026-06-01T12:00:00Z: midday, outside every quiet hour.
MIDDAY_US = 1_780_315_200_000_000
# The tenant's own offers: two copy a synthetic offer's entry under a new id,
# one describes something else.
OWN_OFFERS = {
    "acme_groceries_back": synth.CATALOG["cashback_grocery"],
    "acme_points_plus": synth.CATALOG["loyalty_boost"],
    "acme_credit_boost": synth.CATALOG["credit_line_increase"],
}


def _offer(offer_id: str, entry: synth.OfferEntry, **changes: object) -> policy_pb2.Offer:
    fields: dict[str, object] = dict(
        tenant_id=TENANT,
        offer_id=offer_id,
        product=product_enum(entry.product),
        title=offer_id,
        value=types_pb2.Money(amount_minor=entry.value_minor, currency="USD"),
        topic=policy_pb2.TOPIC_MARKETING,
        channels=[policy_pb2.CHANNEL_IN_APP],
        attributes=dict(entry.attributes),
    )
    fields.update(changes)
    return policy_pb2.Offer(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def offers(tmp_path: Path) -> AsyncIterator[policy_pb2_grpc.OfferServiceStub]:
    """A real policy plane (SQLite, no NATS) holding the tenant's catalog:
    its own offers and one the simulator knows, a customer who consented."""
    dev_certificates(tmp_path)
    config = load_config(
        environ={},
        overrides={"runtime": {"state_dir": str(tmp_path)}, "nats": {"url": ""}},
    )
    plane: PolicyPlane = build_plane(config, ManualClock(MIDDAY_US), listen="127.0.0.1:0")
    port = await plane.start()
    try:
        async with channel_for(config, f"127.0.0.1:{port}") as channel:
            policy = policy_pb2_grpc.PolicyServiceStub(channel)
            await policy.CreateTenant(policy_pb2.CreateTenantRequest(tenant_id=TENANT))
            await policy_pb2_grpc.ConsentServiceStub(channel).SetConsent(
                policy_pb2.SetConsentRequest(
                    tenant_id=TENANT,
                    customer_id=CUSTOMER,
                    consent=policy_pb2.Consent(
                        channel=policy_pb2.CHANNEL_IN_APP,
                        topic=policy_pb2.TOPIC_MARKETING,
                        status=policy_pb2.CONSENT_STATUS_GRANTED,
                        lawful_basis=policy_pb2.LAWFUL_BASIS_CONSENT,
                    ),
                )
            )
            stub = policy_pb2_grpc.OfferServiceStub(channel)
            catalog = {**OWN_OFFERS, "cashback_grocery": synth.CATALOG["cashback_grocery"]}
            for offer_id, entry in catalog.items():
                await stub.PutOffer(policy_pb2.PutOfferRequest(offer=_offer(offer_id, entry)))
            yield stub
    finally:
        await plane.stop()


async def test_the_catalog_keeps_attributes_and_refuses_unbounded_ones(
    offers: policy_pb2_grpc.OfferServiceStub,
) -> None:
    got = await offers.GetOffer(
        policy_pb2.GetOfferRequest(tenant_id=TENANT, offer_id="acme_credit_boost")
    )
    assert dict(got.offer.attributes) == synth.CATALOG["credit_line_increase"].attributes
    entry = synth.CATALOG["cashback_grocery"]
    refused = [
        (
            {"attributes": {f"k{i}": "v" for i in range(17)}},
            ("OFFER_ATTRIBUTES_TOO_MANY", "offer.attributes"),
        ),
        (
            {"attributes": {"bad key": "v"}},
            ("OFFER_ATTRIBUTE_KEY_INVALID", "offer.attributes[bad key]"),
        ),
        ({"attributes": {"category": "x" * 129}}, ("FIELD_TOO_LONG", "offer.attributes[category]")),
    ]
    for changes, expected in refused:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await offers.PutOffer(
                policy_pb2.PutOfferRequest(offer=_offer("acme_bad", entry, **changes))
            )
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert parse_rpc_error(caught.value) == expected
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await offers.GetOffer(policy_pb2.GetOfferRequest(tenant_id=TENANT, offer_id="acme_bad"))
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND


async def test_own_offers_are_ranked_on_their_catalog_entries(
    offers: policy_pb2_grpc.OfferServiceStub, scoring: ai_pb2_grpc.ScoringServiceStub
) -> None:
    eligible = await offers.GetEligibleOffers(
        policy_pb2.GetEligibleOffersRequest(tenant_id=TENANT, customer_id=CUSTOMER, region="US")
    )
    assert {o.offer_id for o in eligible.eligible} == {*OWN_OFFERS, "cashback_grocery"}
    for offer in eligible.eligible:
        entry = OWN_OFFERS.get(offer.offer_id, synth.CATALOG["cashback_grocery"])
        assert product_name(offer.product) == entry.product
        assert dict(offer.attributes) == entry.attributes
    # What gateway.nba sends: each eligible offer with its catalog entry.
    request = pb.RankRequest(
        tenant_id=TENANT,
        account_id="acct-own-1",
        candidates=[
            pb.OfferCandidate(
                offer_id=o.offer_id,
                value=o.value,
                product=product_name(o.product),
                attributes=o.attributes,
            )
            for o in eligible.eligible
        ],
        channel=pb.CHANNEL_IN_APP,
        hour_of_day=12,
    )
    ranked = await scoring.Rank(request, timeout=5)
    assert ranked.model_ref.source in ("triton", "in_process"), ranked.model_ref
    propensity = {o.offer_id: o.propensity for o in ranked.offers}
    # An unknown id whose entry equals a known offer's gets that offer's
    # propensity: the id is not an input.
    assert propensity["acme_groceries_back"] == propensity["cashback_grocery"]
    # Different entries, different propensities, ordered as the world's hidden
    # truth orders them for this customer (no history, in app, noon).
    assert len({propensity[o] for o in OWN_OFFERS}) == len(OWN_OFFERS)
    empty = stored_features([{}] * len(keys_for(EntityRef(TENANT, "acct-own-1"), "t", 0)))
    context = propensity_context(pb.CHANNEL_IN_APP, 12, empty)
    truth = {o: synth.true_propensity(entry, context) for o, entry in OWN_OFFERS.items()}
    assert sorted(OWN_OFFERS, key=propensity.__getitem__) == sorted(
        OWN_OFFERS, key=truth.__getitem__
    )
    assert all(0.0 < p < 1.0 and math.isfinite(p) for p in propensity.values())
