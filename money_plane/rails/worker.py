"""The rail worker: payouts leave the ledger and their outcomes come back.

Three units, each claimed so that with replicas any one may run the worker
and none is done twice (money_plane/rails/store.py):

- hand-off: approved payouts to the rail the policy routed them to
  (`select_rail`), through `Payouts.hand_to_rail` (approved -> submitted).
  Instant and card payouts go to the bank at once; ACH and SEPA ones are
  queued in the database for the next file. One replica at a time (a lease).
- flush: before each ACH / SEPA cut-off (the rail's capabilities: windows
  and business-day calendar) the queued entries go out as one file, claimed
  in a transaction so two replicas never send one entry twice.
- delivery: each rail's outcomes (status reports, bookings, returns) read
  from the bank after the rail's stored cursor and recorded through
  `Payouts.record_outcome` (each ledger effect posts once); the cursor moves
  only past what was recorded. One replica per rail at a time (a lease).
  A failure before settlement with a re-routable reason
  (rails.reroute_reasons), or a rail's refusal at hand-off for one, sends
  the payout back to approved on its decision's next alternate rail
  (`Payouts.reroute`) instead of failing it: no reversal, no second debit.

Time comes from the plane's Clock (cut-offs, leases); the loop's intervals
are rails.worker (README "Rails and the sandbox bank").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import uuid
from collections.abc import Callable
from typing import TypeVar

from money_plane.ledger import Ledger
from money_plane.payouts.domain import RailSubmission, adapter_of
from money_plane.payouts.service import Payouts
from money_plane.rails import store as rows
from money_plane.rails.adapters import (
    AchRail,
    Correlation,
    HttpRail,
    SepaRail,
    build_rails,
    select_rail,
)
from money_plane.rails.base import Outcome
from triplane.runtime.clock import Clock
from triplane.runtime.config import RailsConfig
from triplane.runtime.errors import TriplaneError, Unavailable
from triplane.runtime.tasks import every

log = logging.getLogger("triplane.money.rails")
T = TypeVar("T")
QUEUED_RAILS = ("ach", "sepa")


class StoreCorrelations:
    """Correlations in the ledger's database (`rail_refs`): every replica
    resolves what any replica sent, across restarts."""

    def __init__(self, ledger: Ledger, clock: Clock) -> None:
        self._ledger = ledger
        self._store = ledger.store
        self._clock = clock

    async def remember(self, key: str, value: Correlation) -> None:
        ref = rows.Ref(value.tenant_id, value.payout_id, value.end_to_end_id, value.amount_minor)
        now_us = self._clock.now_us()
        await self._ledger.run_on_writer(lambda: rows.remember(self._store, key, "", ref, now_us))

    async def recall(self, key: str) -> Correlation | None:
        found = await self._ledger.run_on_writer(lambda: rows.recall(self._store, key))
        if found is None:
            return None
        return Correlation(
            found.tenant_id, found.payout_id, found.end_to_end_id, found.amount_minor
        )


class RoutedRail:
    """The payouts package's `Rail` for one hand-off: the adapter the
    policy's routing choice names; ACH and SEPA entries are queued in the
    database (checked first: a payout the rail cannot carry is refused
    here, not at the cut-off)."""

    def __init__(self, worker: RailWorker) -> None:
        self._worker = worker

    async def submit(self, submission: RailSubmission) -> str:
        w = self._worker
        rail = select_rail(w.rails, submission.rail, submission)
        if isinstance(rail, AchRail):
            rail.entry_for(submission)
        elif isinstance(rail, SepaRail):
            rail.transfer_for(submission)
        else:
            receipt = await rail.submit(submission)
            return receipt.reference or receipt.end_to_end_id
        ref = rows.Ref(
            submission.tenant_id,
            submission.payout_id,
            submission.end_to_end_id,
            submission.amount_minor,
        )
        now_us = w.clock.now_us()
        await w.ledger.run_on_writer(lambda: rows.enqueue(w.store, rail.name, ref, now_us))
        return submission.end_to_end_id


_REROUTABLE_OUTCOMES = (int(Outcome.FAILED), int(Outcome.RETURNED))


class ReroutingSink:
    """Where one rail's outcomes go: a failure before settlement whose reason
    is in rails.reroute_reasons moves the payout to its next alternate rail
    (`Payouts.reroute`: no reversal, its debit stays in flight); everything
    else, and a failure with no alternate left, is recorded as it is."""

    def __init__(self, payouts: Payouts, config: RailsConfig, rail: str) -> None:
        self._payouts = payouts
        self._reasons = frozenset(config.reroute_reasons)
        self._max_attempts = config.max_attempts
        self._rail = rail

    async def record_outcome(
        self,
        tenant_id: str,
        payout_id: str,
        outcome: int,
        *,
        reason_code: str = "",
        reason: str = "",
        rail_reference: str = "",
    ) -> object:
        if outcome in _REROUTABLE_OUTCOMES and reason_code in self._reasons:
            moved = await self._payouts.reroute(
                tenant_id,
                payout_id,
                from_rail=self._rail,
                reason_code=reason_code,
                reason=reason,
                max_attempts=self._max_attempts,
            )
            if moved is not None:
                return moved
        return await self._payouts.record_outcome(
            tenant_id,
            payout_id,
            outcome,
            reason_code=reason_code,
            reason=reason,
            rail_reference=rail_reference,
        )


class RailWorker:
    def __init__(
        self,
        payouts: Payouts,
        config: RailsConfig,
        clock: Clock,
        rails: dict[str, HttpRail] | None = None,
    ) -> None:
        self.payouts = payouts
        self.ledger = payouts.ledger
        self.store = payouts.ledger.store
        self.config = config
        self.clock = clock
        self.rails = rails or build_rails(
            config, clock=clock, correlations=StoreCorrelations(self.ledger, clock)
        )
        self.owner = uuid.uuid4().hex
        self._w = config.worker
        self._down: set[str] = set()

    async def start(self) -> None:
        await self.ledger.run_on_writer(lambda: rows.create_schema(self.store))

    async def aclose(self) -> None:
        for rail in self.rails.values():
            await rail.aclose()

    def _lease_until(self) -> int:
        return self.clock.now_us() + int(self._w.lease_s * 1_000_000)

    async def _db(self, fn: Callable[[], T]) -> T:
        return await self.ledger.run_on_writer(fn)

    # ---- hand-off ----

    async def hand_off(self) -> int:
        """Hands approved payouts to their rails; returns how many went."""
        name = "handoff"
        now_us = self.clock.now_us()
        until = self._lease_until()
        if (
            await self._db(lambda: rows.take_lease(self.store, name, self.owner, now_us, until))
            is None
        ):
            return 0
        handed = 0
        try:
            batch = self._w.batch
            found = await self._db(lambda: rows.approved_payouts(self.store, batch))
            routed = RoutedRail(self)
            for tenant_id, payout_id in found:
                try:
                    await self.payouts.hand_to_rail(tenant_id, payout_id, routed)
                    handed += 1
                except Unavailable as error:
                    log.warning("hand-off of %s/%s waits: %s", tenant_id, payout_id, error.message)
                except TriplaneError as error:
                    # No rail reaches it, a rail or the bank refused its
                    # details, its beneficiary is gone: recorded, not retried.
                    if error.reason == "PAYOUT_STATE_CONFLICT":
                        continue  # moved on meanwhile (an outcome recorded)
                    if await self._reroute_refused(tenant_id, payout_id, error):
                        continue  # on its next alternate rail: handed over next pass
                    log.warning(
                        "payout %s/%s cannot go to a rail (%s: %s): left approved",
                        tenant_id,
                        payout_id,
                        error.reason,
                        error.message,
                    )
                    reason = f"{error.reason}: {error.message}"
                    at = self.clock.now_us()
                    await self._db(
                        functools.partial(rows.refuse, self.store, tenant_id, payout_id, reason, at)
                    )
        finally:
            await self._db(lambda: rows.end_lease(self.store, name, self.owner))
        return handed

    async def _reroute_refused(self, tenant_id: str, payout_id: str, error: TriplaneError) -> bool:
        """A rail refused the payout at hand-off for a re-routable reason
        (it cannot carry it): to its next alternate rail, if it has one."""
        if error.reason not in self.config.reroute_reasons:
            return False
        payout = await self.payouts.get_payout(tenant_id, payout_id)
        moved = await self.payouts.reroute(
            tenant_id,
            payout_id,
            from_rail=adapter_of(payout.rail),
            reason_code=error.reason,
            reason=error.message[:200],
            max_attempts=self.config.max_attempts,
        )
        return moved is not None

    # ---- files ----

    def flush_due(self, rail: HttpRail) -> bool:
        """Whether the rail's next cut-off is within rails.worker.flush_lead_s."""
        now_us = self.clock.now_us()
        close = rail.capabilities.next_window(_aware(now_us))
        if close is None:
            return True
        return now_us >= int(close.timestamp() * 1_000_000) - int(self._w.flush_lead_s * 1_000_000)

    async def flush_if_due(self) -> int:
        sent = 0
        for name in QUEUED_RAILS:
            rail = self.rails.get(name)
            if rail is not None and self.flush_due(rail):
                sent += await self.flush(name)
        return sent

    async def flush(self, name: str) -> int:
        """Sends the rail's queued entries as files now (claimed: another
        replica flushing at once sends other entries, never these);
        returns how many entries the bank took."""
        rail = self.rails[name]
        sent = 0
        while True:
            file_id = uuid.uuid4().hex
            now_us = self.clock.now_us()
            until = self._lease_until()
            file_id, entries = await self._db(
                functools.partial(
                    rows.claim_file, self.store, name, file_id, now_us, until, self._w.file_batch
                )
            )
            if not entries:
                return sent
            try:
                subs = [await self._submission(e.tenant_id, e.payout_id) for e in entries]
                if isinstance(rail, AchRail):
                    await rail.send_file(subs, entries[0].trace_seq)
                elif isinstance(rail, SepaRail):
                    await rail.send_file(subs)
            except TriplaneError as error:
                await self._db(functools.partial(rows.release_file, self.store, name, file_id))
                log.warning(
                    "%s file of %d entries not sent (%s: %s): sent again next flush",
                    name,
                    len(entries),
                    error.reason,
                    error.message,
                )
                return sent
            done_us = self.clock.now_us()
            await self._db(functools.partial(rows.file_sent, self.store, name, file_id, done_us))
            sent += len(entries)
            log.info("%s file %s sent: %d entries", name, file_id, len(entries))

    async def _submission(self, tenant_id: str, payout_id: str) -> RailSubmission:
        return await self.payouts.submission(tenant_id, payout_id)

    # ---- outcomes ----

    async def deliver(self) -> int:
        """Every rail's new outcomes recorded; returns how many."""
        delivered = 0
        for name, rail in self.rails.items():
            lease = f"deliver/{name}"
            now_us = self.clock.now_us()
            until = self._lease_until()
            cursor = await self._db(
                functools.partial(rows.take_lease, self.store, lease, self.owner, now_us, until)
            )
            if cursor is None:
                continue
            rail.cursor = cursor
            try:
                delivered += len(await rail.deliver(ReroutingSink(self.payouts, self.config, name)))
                self._down.discard(name)
            except TriplaneError as error:
                if name not in self._down:  # once per outage, not every pass
                    log.warning("%s outcomes wait: %s: %s", name, error.reason, error.message)
                self._down.add(name)
            finally:
                moved = rail.cursor
                await self._db(
                    functools.partial(rows.end_lease, self.store, lease, self.owner, moved)
                )
        return delivered

    # ---- the loops ----

    async def run(self) -> None:
        w = self._w
        await asyncio.gather(
            every(w.handoff_interval_s, self.hand_off, "rail hand-off"),
            every(w.flush_check_interval_s, self.flush_if_due, "rail flush"),
            every(w.deliver_interval_s, self.deliver, "rail delivery"),
        )


def _aware(now_us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(now_us / 1_000_000, tz=dt.UTC)
