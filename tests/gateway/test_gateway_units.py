"""Unit and property tests of the gateway's pure parts: arbitration, PII
tokenization and the remembered answers of mutating RPCs (no planes needed)."""

from __future__ import annotations

import collections
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import arbitration
from gateway.arbitration import Candidate
from gateway.idempotency import IdempotencyStore, check_same, first_difference, flatten
from gateway.nba import EXPOSURE_EVENT
from gateway.pii import Tokenizer, normalize
from tests.money_plane.money_helpers import stream_messages
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.runtime import bus
from triplane.runtime.bus import OutgoingEvent, subject_for
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import (
    GatewayArbitrationConfig,
    GatewayIdempotencyConfig,
    OfferLeverConfig,
    load_config,
)
from triplane.runtime.errors import AlreadyExists, ResourceExhausted
from triplane.runtime.outbox import OutboxRelay, RelaySettings

# ---------------------------------------------------------------- arbitration


def _config(share: float, levers: list[OfferLeverConfig] | None = None) -> GatewayArbitrationConfig:
    return GatewayArbitrationConfig(
        default_value_minor=1000, exploration_share=share, levers=levers or [], surfaces=[]
    )


candidates_strategy = st.lists(
    st.builds(
        Candidate,
        offer_id=st.text("abcdefgh", min_size=1, max_size=6),
        value_minor=st.integers(0, 100_000),
        propensity=st.floats(0.0, 1.0),
        bandit_probability=st.floats(0.0, 1.0),
    ),
    min_size=1,
    max_size=6,
    unique_by=lambda c: c.offer_id,
)


@settings(max_examples=200, deadline=None)
@given(
    candidates=candidates_strategy,
    share=st.floats(0.0, 1.0),
    seed=st.text(min_size=1, max_size=20),
)
def test_choice_probability_is_the_logged_mixture(
    candidates: list[Candidate], share: float, seed: str
) -> None:
    config = _config(share)
    choice = arbitration.choose(config, candidates, "checkout", 1.0, seed)
    bandit = arbitration.bandit_distribution(candidates)
    winner = choice.ranked[0].candidate.offer_id

    def p(offer_id: str) -> float:
        return (1.0 - share) * (offer_id == winner) + share * bandit[offer_id]

    # The distribution the logged probabilities come from sums to one ...
    assert sum(p(c.offer_id) for c in candidates) == pytest.approx(1.0)
    # ... the chosen action's logged probability is its share of it, never 0
    # (an action shown with probability 0 would break off-policy evaluation) ...
    assert choice.probability == pytest.approx(p(choice.chosen.candidate.offer_id))
    assert choice.probability > 0
    # ... the ranking is by score, ties by offer id, and a retry is identical.
    keys = [(-s.score, s.candidate.offer_id) for s in choice.ranked]
    assert keys == sorted(keys)
    assert arbitration.choose(config, list(reversed(candidates)), "checkout", 1.0, seed) == choice


def test_levers_and_context_weight_change_the_winner() -> None:
    cheap = Candidate("cashback", value_minor=500, propensity=0.5, bandit_probability=0.5)
    rich = Candidate("bnpl", value_minor=1000, propensity=0.4, bandit_probability=0.5)
    assert (
        arbitration.choose(_config(0.0), [cheap, rich], "checkout", 1.0, "s").chosen.candidate
        == rich
    )
    boosted = _config(0.0, [OfferLeverConfig("cashback", 1.0, {"checkout": 3.0})])
    assert (
        arbitration.choose(boosted, [cheap, rich], "checkout", 1.0, "s").chosen.candidate == cheap
    )
    # The surface multiplier applies only on its surface.
    assert arbitration.choose(boosted, [cheap, rich], "app_home", 1.0, "s").chosen.candidate == rich
    # An offer without a value still competes at the default value.
    free = Candidate("savings", value_minor=0, propensity=0.9, bandit_probability=0.0)
    ranked = arbitration.score_all(_config(0.0), [free], "checkout", 2.0)
    assert ranked[0].score == pytest.approx(0.9 * 1000 * 2.0)


def test_exploration_frequency_follows_the_bandit() -> None:
    share = 0.2
    candidates = [
        Candidate("a", 1000, 0.9, 0.1),
        Candidate("b", 1000, 0.1, 0.3),
        Candidate("c", 1000, 0.1, 0.6),
    ]
    shown = collections.Counter(
        arbitration.choose(
            _config(share), candidates, "checkout", 1.0, f"decision-{i}"
        ).chosen.candidate.offer_id
        for i in range(20_000)
    )
    expected = {"a": 0.8 + 0.2 * 0.1, "b": 0.2 * 0.3, "c": 0.2 * 0.6}
    for offer_id, probability in expected.items():
        assert shown[offer_id] / 20_000 == pytest.approx(probability, abs=0.012)


# ---------------------------------------------------------------- PII tokens

SECRET = b"s" * 32


def test_tokens_are_deterministic_per_tenant_and_normalized() -> None:
    tokenizer = Tokenizer(SECRET, "tok_")
    email = tokenizer.token("t1", "email", "Ada@Example.com ")
    assert email == tokenizer.token("t1", "email", "ada@example.com")
    assert email != tokenizer.token("t2", "email", "ada@example.com")
    assert email != Tokenizer(b"x" * 32, "tok_").token("t1", "email", "ada@example.com")
    assert email.startswith("tok_email_") and "ada" not in email
    assert tokenizer.token("t1", "pan", "4111 1111 1111 1111") == tokenizer.token(
        "t1", "pan", "4111111111111111"
    )
    assert tokenizer.token("t1", "name", "") == ""
    assert normalize("phone", "+1 (415) 555-0100") == "14155550100"
    assert normalize("name", "  Ada   LOVELACE ") == "ada lovelace"


def test_scrub_replaces_pii_and_keeps_the_rest() -> None:
    tokenizer = Tokenizer(SECRET, "tok_")
    scrubbed = tokenizer.scrub(
        "t1",
        {
            "card": "4111 1111 1111 1111",
            "contact": "ada@example.com",
            "phone": "+44 20 7946 0958",
            "basket": "3 items",
            "order": "ord_1234",
        },
    )
    assert scrubbed["basket"] == "3 items" and scrubbed["order"] == "ord_1234"
    for field in ("card", "contact", "phone"):
        assert tokenizer.is_token(scrubbed[field]), field
    text = " ".join(scrubbed.values())
    for clear in ("4111", "ada@", "7946"):
        assert clear not in text


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_distinct_values_get_distinct_tokens(a: str, b: str) -> None:
    tokenizer = Tokenizer(SECRET, "tok_")
    if normalize("name", a) != normalize("name", b):
        assert tokenizer.token("t", "name", a) != tokenizer.token("t", "name", b)


# ---------------------------------------------------------------- remembered answers


def _authorize(amount: int = 500, **attributes: str) -> gw.AuthorizePaymentRequest:
    return gw.AuthorizePaymentRequest(
        tenant_id="t1",
        idempotency_key="k1",
        account_id="acct",
        credit_account_id="merchant",
        amount=types_pb2.Money(amount_minor=amount, currency="USD"),
        attributes=attributes,
    )


def test_flatten_names_the_first_differing_field() -> None:
    skip = frozenset({"idempotency_key"})
    base = flatten(_authorize(500, basket="3"), skip)
    assert "idempotency_key" not in base
    assert first_difference(base, flatten(_authorize(500, basket="3"), skip)) == ""
    assert first_difference(base, flatten(_authorize(600, basket="3"), skip)) == (
        "amount.amount_minor"
    )
    assert first_difference(base, flatten(_authorize(500, basket="4"), skip)) == (
        "attributes[basket]"
    )
    assert first_difference(base, flatten(_authorize(500), skip)) == "attributes[basket]"


def _store(tmp_path: Path, memory_entries: int = 1000, max_pending: int = 1000) -> IdempotencyStore:
    config = GatewayIdempotencyConfig(
        sqlite_path="gateway.sqlite",
        memory_entries=memory_entries,
        retention_s=3600,
        flush_interval_ms=1.0,
        max_pending_writes=max_pending,
    )
    return IdempotencyStore(config, tmp_path / "gateway.sqlite", ManualClock())


async def test_answers_survive_a_restart_and_eviction(tmp_path: Path) -> None:
    store = _store(tmp_path, memory_entries=2)
    await store.start()
    try:
        for index in range(5):
            store.put("t1\x1fAuthorizePayment", f"k{index}", {"amount": str(index)}, b"%d" % index)
        # Evicted from the bounded memory map before any flush: still found.
        found = await store.get("t1\x1fAuthorizePayment", "k0")
        assert found is not None and found.body == b"0"
        await store.flush()
        found = await store.get("t1\x1fAuthorizePayment", "k1")
        assert found is not None and found.fields == {"amount": "1"}
    finally:
        await store.stop()
    reopened = _store(tmp_path)
    await reopened.start()
    try:
        for index in range(5):
            found = await reopened.get("t1\x1fAuthorizePayment", f"k{index}")
            assert found is not None and found.body == b"%d" % index
        assert await reopened.get("t2\x1fAuthorizePayment", "k0") is None
        with pytest.raises(AlreadyExists) as raised:
            remembered = await reopened.get("t1\x1fAuthorizePayment", "k3")
            assert remembered is not None
            check_same(remembered, {"amount": "4"})
        assert raised.value.field == "amount"
    finally:
        await reopened.stop()


async def test_a_full_write_queue_refuses_instead_of_forgetting(tmp_path: Path) -> None:
    store = _store(tmp_path, max_pending=2)
    await store.start()
    try:
        # No await between puts: the flusher cannot run, so the queue fills.
        store.put("s", "a", {}, b"a")
        store.put("s", "b", {}, b"b")
        with pytest.raises(ResourceExhausted):
            store.put("s", "c", {}, b"c")
        assert await store.get("s", "c") is None
        await store.flush()
        store.put("s", "c", {}, b"c")
        assert (await store.get("s", "c")) is not None
    finally:
        await store.stop()


# ---------------------------------------------------------------- the gateway's outbox


def _events(tenant: str, count: int, start: int = 0) -> list[OutgoingEvent]:
    return [
        OutgoingEvent(f"{tenant}-ev-{i}", subject_for(EXPOSURE_EVENT, tenant), b"payload-%d" % i)
        for i in range(start, start + count)
    ]


async def test_events_commit_with_answers_and_survive_a_restart(tmp_path: Path) -> None:
    store = _store(tmp_path)
    await store.start()
    try:
        store.put("t1\x1fDecideNextAction", "k1", {}, b"answer")
        store.add_events(_events("t1", 3))
        assert store.unsent(10) == []  # nothing before the commit
        await store.flush()
        # A retried flow adds the same events again: each is kept once.
        store.add_events(_events("t1", 4))
        await store.flush()
    finally:
        await store.stop()
    reopened = _store(tmp_path)
    await reopened.start()
    try:
        unsent = reopened.unsent(10)
        assert [e.event_id for e in unsent] == [f"t1-ev-{i}" for i in range(4)]
        assert unsent[2].data == b"payload-2"
        reopened.mark_sent(["t1-ev-0", "t1-ev-1"], now_us=1)
        assert [e.event_id for e in reopened.unsent(10)] == ["t1-ev-2", "t1-ev-3"]
        assert reopened.unsent_count() == 2
        assert reopened.delete_sent_before(2) == 2
        assert reopened.unsent_count() == 2
    finally:
        await reopened.stop()


@pytest.mark.nats
async def test_events_queued_while_nats_is_away_are_published_once(
    tmp_path: Path, nats_url: str
) -> None:
    """Events committed while no relay runs (NATS away) reach JetStream once the
    relay runs; a relay that re-publishes (marks lost) stores nothing twice."""
    tenant = f"gwout{uuid.uuid4().hex[:8]}"
    store = _store(tmp_path)
    await store.start()
    config = load_config(environ={}, overrides={"nats": {"url": nats_url}})
    client = await bus.connect(config.nats, "test-gateway-outbox")
    try:
        js = client.jetstream()
        store.add_events(_events(tenant, 30))
        await store.flush()
        relay = OutboxRelay(
            store,
            config.nats,
            RelaySettings(
                streams=["TRIPLANE_GATEWAY"],
                batch_size=8,
                idle_poll_s=0.02,
                backoff_initial_s=0.05,
                backoff_max_s=0.5,
            ),
            ManualClock(),
            client_name="test-gateway-relay",
        )
        await bus.ensure_streams(js, config.nats, ["TRIPLANE_GATEWAY"])
        while (await relay.relay_once(js))[1]:
            pass
        assert store.unsent_count() == 0 and relay.published == 30
        # As if the relay died between JetStream's ack and the marks.
        assert store._relay_db is not None
        store._relay_db.execute("UPDATE outbox SET sent_at_us = NULL")
        store.add_events(_events(tenant, 10, start=30))
        await store.flush()
        while (await relay.relay_once(js))[1]:
            pass
        messages = await stream_messages(nats_url, f"triplane.gateway.{tenant}.>", 40)
        assert sorted(msg_id for msg_id, _ in messages) == sorted(
            f"{tenant}-ev-{i}" for i in range(40)
        )
    finally:
        await client.close()
        await store.stop()
