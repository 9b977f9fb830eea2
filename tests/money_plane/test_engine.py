"""The engine alone, in memory: splits and refund proration (no database)."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from money_helpers import bps_leg, fixed_leg

from money_plane.domain import (
    AccountState,
    Command,
    Constraint,
    Entry,
    Kind,
    Leg,
    Outcome,
    Side,
    account_key,
)
from money_plane.engine import Engine, Job, View

TENANT = "acme"
NOW_US = 1_790_000_000_000_000


def _view(*account_ids: str) -> View:
    view = View()
    for account_id in account_ids:
        state = AccountState(
            tenant_id=TENANT,
            account_id=account_id,
            currency="USD",
            kind=2,
            constraint=int(Constraint.NONE),
            overdraft_limit_minor=0,
            metadata={},
            created_at_us=0,
        )
        view.accounts[account_key(TENANT, account_id)] = state
    return view


def _run(view: View, *commands: Command, atomic: bool = False) -> list[Outcome]:
    engine = Engine(view, NOW_US, 3600)
    return engine.run_job(
        Job(
            tenant_id=TENANT,
            commands=list(commands),
            atomic=atomic,
            fields=[f"t[{i}]" for i in range(len(commands))],
        )
    )


def _transfer(key: str, amount: int, splits: list[Leg]) -> Command:
    return Command(
        tenant_id=TENANT,
        idempotency_key=key,
        kind=Kind.TRANSFER,
        debit_account_id="payer",
        credit_account_id="merchant",
        amount_minor=amount,
        currency="USD",
        splits=splits,
    )


def _refund(key: str, entry_id: str, amount: int) -> Command:
    return Command(
        tenant_id=TENANT,
        idempotency_key=key,
        kind=Kind.REFUND,
        entry_id=entry_id,
        amount_minor=amount,
        currency="USD",
    )


def _sides(entry: Entry) -> tuple[int, int]:
    debits = sum(p.amount_minor for p in entry.postings if p.side == Side.DEBIT)
    credits = sum(p.amount_minor for p in entry.postings if p.side == Side.CREDIT)
    return debits, credits


split_sets = st.lists(
    st.one_of(
        st.integers(1, 3_000).map(lambda b: ("bps", b)),
        st.integers(1, 500).map(lambda a: ("fixed", a)),
    ),
    min_size=1,
    max_size=4,
)


def _legs_total(amount: int, legs: list[Leg]) -> int:
    """What the split legs take of `amount` (fixed amounts, basis points rounded down)."""
    return sum(leg.amount_minor or amount * leg.basis_points // 10_000 for leg in legs)


def _legs(shape: list[tuple[str, int]]) -> list[Leg]:
    return [
        bps_leg(f"party{i}", value) if kind == "bps" else fixed_leg(f"party{i}", value)
        for i, (kind, value) in enumerate(shape)
    ]


@settings(max_examples=150)
@given(amount=st.integers(1, 10**12), shape=split_sets)
def test_split_entry_balances_and_remainder_gets_the_residue(
    amount: int, shape: list[tuple[str, int]]
) -> None:
    view = _view("payer", "merchant", *(f"party{i}" for i in range(len(shape))))
    legs = _legs(shape)
    [outcome] = _run(view, _transfer("k", amount, legs))
    if _legs_total(amount, legs) > amount:
        # The only refusal possible here: legs adding up to more than the amount.
        assert outcome.error is not None and outcome.error.reason == "SPLITS_EXCEED_AMOUNT"
        assert all(a.counters() == (0, 0, 0, 0) for a in view.accounts.values())
        return
    assert outcome.error is None, outcome.error
    entry = outcome.entry
    assert entry is not None
    assert _sides(entry) == (amount, amount)
    credited = {p.account_id: p.amount_minor for p in entry.postings if p.side == Side.CREDIT}
    for i, leg in enumerate(legs):
        expected = leg.amount_minor or amount * leg.basis_points // 10_000
        assert credited.get(f"party{i}", 0) == expected
    expected_remainder = amount - sum(
        leg.amount_minor or amount * leg.basis_points // 10_000 for leg in legs
    )
    assert credited.get("merchant", 0) == expected_remainder
    # Counters follow the postings.
    assert view.accounts[account_key(TENANT, "payer")].debits_posted == amount
    assert sum(a.credits_posted for a in view.accounts.values()) == amount


@settings(max_examples=150)
@given(
    amount=st.integers(1, 10**9),
    shape=split_sets,
    cuts=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=8),
)
def test_refunds_prorate_never_exceed_and_the_last_is_exact(
    amount: int, shape: list[tuple[str, int]], cuts: list[float]
) -> None:
    legs = _legs(shape)
    assume(_legs_total(amount, legs) <= amount)  # a payment that goes through
    view = _view("payer", "merchant", *(f"party{i}" for i in range(len(shape))))
    [outcome] = _run(view, _transfer("pay", amount, legs))
    assert outcome.entry is not None, outcome.error
    original = outcome.entry
    reversed_by_account: dict[tuple[str, int], int] = {}
    refunded = 0
    for n, cut in enumerate(cuts):
        left = amount - refunded
        part = max(1, min(left, int(left * cut)))
        last = n == len(cuts) - 1
        if last:
            part = left
        [result] = _run(view, _refund(f"r{n}", original.entry_id, part))
        assert result.error is None, result.error
        refund = result.entry
        assert refund is not None
        assert refund.refers_to_entry_id == original.entry_id
        assert _sides(refund) == (part, part)
        for posting in refund.postings:
            key = (posting.account_id, posting.side)
            reversed_by_account[key] = reversed_by_account.get(key, 0) + posting.amount_minor
        refunded += part
        if refunded == amount:
            break
    # Never beyond a posting: each reversal is within the original posting,
    # on the opposite side; and the full refund reverses every posting exactly.
    originals = {(p.account_id, p.side): p.amount_minor for p in original.postings}
    for (account_id, side), total in reversed_by_account.items():
        opposite = Side.DEBIT if side == Side.CREDIT else Side.CREDIT
        assert total <= originals[(account_id, opposite)]
    assert refunded == amount
    for (account_id, side), total in originals.items():
        opposite = Side.DEBIT if side == Side.CREDIT else Side.CREDIT
        assert reversed_by_account.get((account_id, opposite), 0) == total
    for state in view.accounts.values():
        assert state.debits_posted == state.credits_posted, state
    # And once fully refunded, nothing more can go.
    [again] = _run(view, _refund("more", original.entry_id, 1))
    assert again.error is not None and again.error.reason == "ENTRY_FULLY_REFUNDED"


def test_refund_beyond_what_is_left_is_refused_and_changes_nothing() -> None:
    view = _view("payer", "merchant", "party0")
    [paid] = _run(view, _transfer("pay", 1000, [bps_leg("party0", 300)]))
    assert paid.entry is not None
    [first] = _run(view, _refund("r1", paid.entry.entry_id, 600))
    assert first.error is None
    before = {k: a.counters() for k, a in view.accounts.items()}
    [second] = _run(view, _refund("r2", paid.entry.entry_id, 401))
    assert second.error is not None
    assert (second.error.reason, second.error.field) == (
        "REFUND_EXCEEDS_ENTRY",
        "t[0].amount.amount_minor",
    )
    assert {k: a.counters() for k, a in view.accounts.items()} == before


def test_atomic_job_undoes_every_earlier_step_in_memory() -> None:
    view = _view("payer", "merchant")
    view.accounts[account_key(TENANT, "payer")].constraint = int(
        Constraint.DEBITS_MUST_NOT_EXCEED_CREDITS
    )
    view.accounts[account_key(TENANT, "payer")].credits_posted = 100
    outcomes = _run(view, _transfer("a", 60, []), _transfer("b", 60, []), atomic=True)
    assert [o.error.reason if o.error else "" for o in outcomes] == [
        "LINKED_TRANSFER_FAILED",
        "INSUFFICIENT_FUNDS",
    ]
    assert view.accounts[account_key(TENANT, "payer")].counters() == (0, 100, 0, 0)
    assert view.accounts[account_key(TENANT, "merchant")].counters() == (0, 0, 0, 0)
