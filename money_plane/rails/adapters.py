"""Rail adapters over HTTP to a bank endpoint (the sandbox bank locally).

- `instant` (RTP / FedNow style): a `pacs.008.001.08` per payout; back, a
  `pacs.002` at once (ACSC settled, RJCT failed with its ISO reason) and
  `pacs.004` returns.
- `ach`: NACHA files of the queued entries (`flush`), same-day windows; back,
  `camt.054` bookings (settled) and NACHA return files (R01, R03, ...).
- `sepa` (SCT): `pain.001.001.09` files of the queued transfers (`flush`);
  back, `pacs.002` RJCT (failed), `camt.054` bookings (settled), `pacs.004`
  returns.
- `card` (card / wallet push): a JSON call naming the vault token; back, JSON
  statuses.

The bank endpoint's paths (`POST /v1/<rail>/...` to send, `GET
/v1/outbox/<rail>?after=N` for what it sent back) are the sandbox bank's
(triplane_sim/sandbox_bank); a real bank connection is another adapter
behind the same `Rail` interface.

Where a rail's answer names only the payment's references, the adapter maps
them back to the payout through `Correlations` (end-to-end id or trace number
-> tenant and payout). The money plane serves them from its database
(money_plane/rails/store.py `StoreCorrelations`, shared by every replica and
kept across restarts); `MemoryCorrelations` keeps them in this process, for
unit tests and one-off tools only.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import aiohttp

from money_plane.formats._common import refuse
from money_plane.formats.beneficiary import (
    AccountType,
    IbanAccount,
    UsBankAccount,
    iban_account,
    us_bank_account,
)
from money_plane.formats.camt import read_camt
from money_plane.formats.iso20022_in import (
    ACCEPTED,
    REJECTED,
    read_pacs002,
    read_pacs004,
)
from money_plane.formats.iso20022_out import CreditTransfer, Party, write_pacs008, write_pain001
from money_plane.formats.nacha import (
    SAME_DAY_LIMIT_MINOR,
    AchBatch,
    AchEntry,
    SecCode,
    read_ach_returns,
    write_nacha,
)
from money_plane.formats.statement import EntryStatus, Sign
from money_plane.payouts.domain import adapter_of
from money_plane.rails.base import (
    Capabilities,
    Cutoff,
    Outcome,
    OutcomeSink,
    RailOutcome,
    RailReceipt,
    Submission,
    check_submission,
)
from triplane.runtime.clock import Clock, SystemClock
from triplane.runtime.config import RailsConfig
from triplane.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable

# Published per-payment limits (issue 14): RTP and FedNow $10M, same-day ACH
# $1M (NACHA); SEPA's scheme maximum is the pain.001 writer's.
INSTANT_LIMIT_MINOR = 1_000_000_000
ACH_LIMIT_MINOR = 9_999_999_999
SEPA_LIMIT_MINOR = 99_999_999_999
CARD_LIMIT_MINOR = 5_000_000


@dataclass(frozen=True, slots=True)
class Correlation:
    tenant_id: str
    payout_id: str
    end_to_end_id: str
    amount_minor: int


class Correlations(Protocol):
    async def remember(self, key: str, value: Correlation) -> None: ...
    async def recall(self, key: str) -> Correlation | None: ...


@dataclass
class MemoryCorrelations:
    """In this process only: unit tests (the served path uses the store's)."""

    entries: dict[str, Correlation] = field(default_factory=dict)

    async def remember(self, key: str, value: Correlation) -> None:
        self.entries[key] = value

    async def recall(self, key: str) -> Correlation | None:
        return self.entries.get(key)


def _utc(clock: Clock) -> dt.datetime:
    return dt.datetime.fromtimestamp(clock.now_us() / 1_000_000, tz=dt.UTC)


def _uetr(end_to_end_id: str) -> str:
    """A UUID v4 form derived from the end-to-end id: the same on a resubmission."""
    h = bytearray(hashlib.sha256(end_to_end_id.encode()).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x40
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def _msg_id(prefix: str, seed: str) -> str:
    return prefix + hashlib.sha256(seed.encode()).hexdigest()[:24].upper()


class HttpRail:
    """What every adapter shares: the HTTP client, capabilities checks, the
    outbox cursor, correlations and delivery to an outcome sink."""

    name = "rail"

    def __init__(
        self,
        config: RailsConfig,
        *,
        url: str = "",
        clock: Clock | None = None,
        correlations: Correlations | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.config = config
        self.url = (url or getattr(config, f"{self.name}_url", "") or config.bank_url).rstrip("/")
        self.clock: Clock = clock or SystemClock()
        self.correlations: Correlations = correlations or MemoryCorrelations()
        self._session = session
        self._own_session = session is None
        self.cursor = 0
        self.holidays = frozenset(dt.date.fromisoformat(d) for d in config.holidays)

    @property
    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    async def submit(self, submission: Submission) -> RailReceipt:
        raise NotImplementedError

    # ---- HTTP ----

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def aclose(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()

    async def _call(
        self, method: str, path: str, *, data: bytes | None = None, content_type: str = ""
    ) -> bytes:
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            async with self._client().request(
                method, f"{self.url}{path}", data=data, headers=headers
            ) as resp:
                body = await resp.read()
                if resp.status >= 500:
                    raise Unavailable(
                        "BANK_UNAVAILABLE", f"{self.name} bank answered {resp.status}", "rail"
                    )
                if resp.status >= 400:
                    try:
                        err = json.loads(body)
                    except ValueError:
                        err = {}
                    raise InvalidArgument(
                        str(err.get("reason", "BANK_REFUSED")),
                        f"the {self.name} bank refused it: {err.get('message', resp.status)}",
                        str(err.get("field", "submission")),
                    )
                return body
        except aiohttp.ClientError as exc:
            raise Unavailable(
                "BANK_UNAVAILABLE", f"{self.name} bank unreachable: {type(exc).__name__}", "rail"
            ) from exc

    # ---- outcomes ----

    async def _fetch(self) -> list[tuple[int, list[RailOutcome]]]:
        body = await self._call("GET", f"/v1/outbox/{self.name}?after={self.cursor}")
        feed = json.loads(body)
        return [
            (
                int(m["seq"]),
                await self._resolve(self._read(str(m["kind"]), base64.b64decode(m["body"]))),
            )
            for m in feed["messages"]
        ]

    async def _resolve(self, found: list[RailOutcome]) -> list[RailOutcome]:
        """The outcomes whose reference (`key`) names a payout of ours, with
        its tenant and payout filled in; the others (another sender's, or
        forgotten) are left to reconciliation, which sees every booking."""
        out = []
        for o in found:
            c = await self.correlations.recall(o.key)
            if c is not None:
                out.append(
                    replace(
                        o,
                        tenant_id=c.tenant_id,
                        payout_id=c.payout_id,
                        end_to_end_id=c.end_to_end_id,
                    )
                )
        return out

    async def poll(self) -> list[RailOutcome]:
        """The outcomes in the bank's messages since the last poll (the
        cursor moves past them: use `deliver` to move it only once recorded)."""
        outcomes: list[RailOutcome] = []
        for seq, found in await self._fetch():
            outcomes.extend(found)
            self.cursor = max(self.cursor, seq)
        return outcomes

    def _read(self, kind: str, data: bytes) -> list[RailOutcome]:
        if kind == "pacs.002":
            return self._from_pacs002(data)
        if kind == "pacs.004":
            return self._from_pacs004(data)
        if kind == "camt.054":
            return self._from_camt054(data)
        if kind == "nacha_returns":
            return self._from_ach_returns(data)
        if kind == "card_status":
            return self._from_card_status(data)
        return []

    def _outcome(
        self,
        key: str,
        outcome: Outcome,
        reason_code: str = "",
        reason: str = "",
        reference: str = "",
        amount_minor: int | None = None,
    ) -> RailOutcome | None:
        """An outcome by the bank's reference `key`, resolved to its payout
        by `_resolve`."""
        if not key:
            return None
        return RailOutcome(
            rail=self.name,
            tenant_id="",
            payout_id="",
            end_to_end_id="",
            key=key,
            outcome=outcome,
            reason_code=reason_code,
            reason=reason,
            rail_reference=reference,
            amount_minor=amount_minor,
        )

    def _from_pacs002(self, data: bytes) -> list[RailOutcome]:
        report = read_pacs002(data)
        out = []
        for tx in report.transactions:
            if tx.status in REJECTED:
                kind = Outcome.FAILED
            elif tx.status in ("ACSC", "ACCC") and self.name == "instant":
                kind = Outcome.SETTLED
            else:
                continue  # accepted for processing: the booking says settled
            o = self._outcome(
                tx.original_end_to_end_id,
                kind,
                tx.reason_code,
                "; ".join(tx.additional_info),
                report.message_id,
            )
            if o is not None:
                out.append(o)
        return out

    def _from_pacs004(self, data: bytes) -> list[RailOutcome]:
        ret = read_pacs004(data)
        out = []
        for tx in ret.transactions:
            o = self._outcome(
                tx.original_end_to_end_id,
                Outcome.RETURNED,
                tx.reason_code,
                "; ".join(tx.additional_info),
                tx.return_id or ret.message_id,
                tx.returned_minor,
            )
            if o is not None:
                out.append(o)
        return out

    def _from_camt054(self, data: bytes) -> list[RailOutcome]:
        out = []
        for line in read_camt(data).lines:
            if line.status is not EntryStatus.BOOKED or line.sign is not Sign.DEBIT:
                continue
            for detail in line.details:
                e2e = detail.references.end_to_end_id
                amount = detail.amount_minor if len(line.details) > 1 else line.amount_minor
                o = self._outcome(
                    e2e, Outcome.SETTLED, reference=line.account_servicer_ref, amount_minor=amount
                )
                if o is not None:
                    out.append(o)
        return out

    def _from_ach_returns(self, data: bytes) -> list[RailOutcome]:
        out = []
        for r in read_ach_returns(data):
            o = self._outcome(
                r.original_trace,
                Outcome.RETURNED,
                r.reason_code,
                r.reason,
                r.trace_number,
                r.amount_minor,
            )
            if o is not None:
                out.append(o)
        return out

    def _from_card_status(self, data: bytes) -> list[RailOutcome]:
        status = json.loads(data)
        kinds = {"settled": Outcome.SETTLED, "failed": Outcome.FAILED, "returned": Outcome.RETURNED}
        kind = kinds.get(str(status.get("status")))
        if kind is None:
            return []
        o = self._outcome(
            str(status["reference"]),
            kind,
            str(status.get("reason_code", "")),
            str(status.get("reason", "")),
            str(status.get("id", "")),
        )
        return [o] if o is not None else []

    async def deliver(self, sink: OutcomeSink) -> list[RailOutcome]:
        """Polls and hands every outcome to `sink` (which posts each once),
        moving the cursor past a message only when all its outcomes are
        recorded: a sink that fails (unavailable) gets them again on the next
        call. An outcome the payout's state has moved past (the settlement
        reported again after the return: FAILED_PRECONDITION) is stale, and
        skipped."""
        delivered: list[RailOutcome] = []
        for seq, found in await self._fetch():
            for o in found:
                try:
                    await sink.record_outcome(
                        o.tenant_id,
                        o.payout_id,
                        int(o.outcome),
                        reason_code=o.reason_code,
                        reason=o.reason,
                        rail_reference=o.rail_reference,
                    )
                except FailedPrecondition:
                    continue
                delivered.append(o)
            self.cursor = max(self.cursor, seq)
        return delivered

    async def _remember(self, key: str, sub: Submission) -> None:
        await self.correlations.remember(
            key, Correlation(sub.tenant_id, sub.payout_id, sub.end_to_end_id, sub.amount_minor)
        )


# --------------------------------------------------------------------- instant


class InstantRail(HttpRail):
    """RTP / FedNow style: one pacs.008 per payout, answered by a pacs.002."""

    name = "instant"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            rail=self.name,
            currencies=frozenset({"USD"}),
            max_amount_minor=INSTANT_LIMIT_MINOR,
            beneficiary_kinds=frozenset({"us_bank"}),
            holidays=self.holidays,
            fixed_cost_minor=45,
            countries=frozenset({"US", ""}),
        )

    def _debtor(self) -> Party:
        account = us_bank_account(
            self.config.debtor_routing_number, self.config.debtor_account_number, field="debtor"
        )
        return Party(self.config.debtor_name, account)

    async def submit(self, submission: Submission) -> RailReceipt:
        check_submission(self.capabilities, submission)
        creditor = us_bank_account(
            submission.routing_number,
            submission.account_number,
            submission.account_type or AccountType.CHECKING,
            field="submission",
        )
        now = _utc(self.clock)
        message_id = _msg_id("TPI", submission.end_to_end_id)
        xml = write_pacs008(
            [
                CreditTransfer(
                    end_to_end_id=submission.end_to_end_id,
                    amount_minor=submission.amount_minor,
                    currency=submission.currency,
                    creditor=Party(submission.holder_name, creditor),
                    instruction_id=submission.end_to_end_id,
                    transaction_id=submission.end_to_end_id,
                    uetr=_uetr(submission.end_to_end_id),
                    remittance=submission.description[:140],
                )
            ],
            message_id=message_id,
            created_at=now,
            settlement_date=now.date(),
            debtor=self._debtor(),
            clearing_system="FDN",
            instructing_agent=self.config.debtor_routing_number,
            instructed_agent=creditor.routing_number,
        )
        await self._remember(submission.end_to_end_id, submission)
        body = await self._call(
            "POST", "/v1/instant/pacs008", data=xml, content_type="application/xml"
        )
        report = read_pacs002(body)
        tx = next(
            (
                t
                for t in report.transactions
                if t.original_end_to_end_id == submission.end_to_end_id
            ),
            None,
        )
        status = tx.status if tx is not None else report.group_status
        reason = tx.reason_code if tx is not None else report.group_reason_code
        if status in REJECTED:
            state = "failed"
        elif status in ("ACSC", "ACCC"):
            state = "settled"
        elif status in ACCEPTED:
            state = "accepted"
        else:
            state = "pending"
        return RailReceipt(self.name, message_id, submission.end_to_end_id, state, reason)


# ------------------------------------------------------------------------- ACH


@dataclass
class _Queued:
    sub: Submission
    entry: AchEntry


class AchRail(HttpRail):
    """NACHA files. `submit` queues an entry (its trace number is its
    reference); `flush` writes every queued entry into one file (same-day
    when a same-day window is still open and every entry fits the same-day
    limit, else next business day) and sends it."""

    name = "ach"
    SAME_DAY_CUTOFFS = (
        Cutoff(dt.time(10, 30)),  # settles 13:00 ET
        Cutoff(dt.time(14, 45)),  # 17:00
        Cutoff(dt.time(16, 45)),  # 18:00
    )
    _WINDOW_OF = {dt.time(10, 30): "1300", dt.time(14, 45): "1700", dt.time(16, 45): "1800"}

    def __init__(self, config: RailsConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.queue: list[_Queued] = []
        # Trace sequences: unique per ODFI and day; a restart starts after
        # the second of the day it restarted at (a payout store counter is
        # the durable form).
        self._sequence = (self.clock.now_us() // 1_000_000) % 86_400 * 100

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            rail=self.name,
            currencies=frozenset({"USD"}),
            max_amount_minor=ACH_LIMIT_MINOR,
            beneficiary_kinds=frozenset({"us_bank"}),
            cutoffs=(*self.SAME_DAY_CUTOFFS, Cutoff(dt.time(20, 0))),
            holidays=self.holidays,
            calendar="FED",
            fixed_cost_minor=5,
            countries=frozenset({"US", ""}),
        )

    async def submit(self, submission: Submission) -> RailReceipt:
        check_submission(self.capabilities, submission)
        for queued in self.queue:
            if queued.sub.end_to_end_id == submission.end_to_end_id:
                raise refuse("DUPLICATE_SUBMISSION", "already queued", "submission.end_to_end_id")
        entry = self.entry_for(submission)
        self.queue.append(_Queued(submission, entry))
        await self._remember(submission.end_to_end_id, submission)
        return RailReceipt(self.name, "", submission.end_to_end_id, "queued")

    def entry_for(self, submission: Submission) -> AchEntry:
        """The payout's NACHA entry (INVALID_ARGUMENT naming the field when
        the rail cannot carry it)."""
        check_submission(self.capabilities, submission)
        account = us_bank_account(
            submission.routing_number,
            submission.account_number,
            submission.account_type or AccountType.CHECKING,
            field="submission",
        )
        return AchEntry(
            account=account,
            amount_minor=submission.amount_minor,
            name=submission.holder_name,
            identification=submission.end_to_end_id[-15:],
            payment_info=f"E2E {submission.end_to_end_id}",
        )

    def _window(self, now: dt.datetime) -> str | None:
        close = self.capabilities.next_window(now)
        if close is None or close.date() != now.astimezone(close.tzinfo).date():
            return None
        return self._WINDOW_OF.get(close.timetz().replace(tzinfo=None))

    def _next_business_day(self, day: dt.date) -> dt.date:
        day += dt.timedelta(days=1)
        while not self.capabilities.is_business_day(day):
            day += dt.timedelta(days=1)
        return day

    async def flush(self) -> list[RailReceipt]:
        """Sends the queued entries as one NACHA file; the receipts carry the
        trace numbers (the reference the return file names)."""
        if not self.queue:
            return []
        queued, self.queue = self.queue, []
        first = self._sequence + 1
        self._sequence += len(queued)
        try:
            return await self.send_file([q.sub for q in queued], first)
        except (InvalidArgument, Unavailable):
            self.queue = queued + self.queue  # sent again by the next flush
            raise

    async def send_file(self, subs: Sequence[Submission], first_sequence: int) -> list[RailReceipt]:
        """One NACHA file of `subs`, trace sequences from `first_sequence`
        (the caller keeps them unique per day: the money plane allocates
        them in its database, so a file sent again after a crash carries the
        same trace numbers, and the bank books each end-to-end id once)."""
        queued = [_Queued(sub, self.entry_for(sub)) for sub in subs]
        if not queued:
            return []
        now = _utc(self.clock)
        window = self._window(now)
        same_day = (
            window is not None
            and all(q.entry.amount_minor <= SAME_DAY_LIMIT_MINOR for q in queued)
            and now.date().weekday() < 5
        )
        effective = now.date() if same_day else self._next_business_day(now.date())
        written = write_nacha(
            [
                AchBatch(
                    sec_code=SecCode.CCD,
                    company_name=self.config.ach_company_name,
                    company_id=self.config.ach_company_id,
                    entry_description="PAYOUT",
                    effective_date=effective,
                    entries=tuple(q.entry for q in queued),
                    same_day=same_day,
                    same_day_window=window or "1300",
                )
            ],
            immediate_destination=self.config.debtor_routing_number,
            immediate_origin=self.config.ach_company_id,
            odfi_routing=self.config.debtor_routing_number,
            created_at=now,
            first_trace_sequence=first_sequence,
        )
        for q, trace in zip(queued, written.trace_numbers, strict=True):
            await self._remember(trace, q.sub)
        await self._call("POST", "/v1/ach/files", data=written.data, content_type="text/plain")
        return [
            RailReceipt(self.name, trace, q.sub.end_to_end_id, "accepted")
            for q, trace in zip(queued, written.trace_numbers, strict=True)
        ]


# ------------------------------------------------------------------------ SEPA


class SepaRail(HttpRail):
    """SEPA credit transfer: queued transfers sent as one pain.001.001.09 per
    `flush` (execution date: today before the cut-off on a TARGET business
    day, else the next one)."""

    name = "sepa"

    def __init__(self, config: RailsConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.queue: list[tuple[Submission, CreditTransfer]] = []

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            rail=self.name,
            currencies=frozenset({"EUR"}),
            max_amount_minor=SEPA_LIMIT_MINOR,
            beneficiary_kinds=frozenset({"iban"}),
            cutoffs=(Cutoff(dt.time(15, 0), "Europe/Berlin"),),
            holidays=self.holidays,
            calendar="TARGET",
            fixed_cost_minor=20,
        )

    async def submit(self, submission: Submission) -> RailReceipt:
        check_submission(self.capabilities, submission)
        if any(s.end_to_end_id == submission.end_to_end_id for s, _ in self.queue):
            raise refuse("DUPLICATE_SUBMISSION", "already queued", "submission.end_to_end_id")
        transfer = self.transfer_for(submission)
        self.queue.append((submission, transfer))
        await self._remember(submission.end_to_end_id, submission)
        return RailReceipt(self.name, "", submission.end_to_end_id, "queued")

    def transfer_for(self, submission: Submission) -> CreditTransfer:
        check_submission(self.capabilities, submission)
        creditor: IbanAccount = iban_account(submission.iban, submission.bic, field="submission")
        return CreditTransfer(
            end_to_end_id=submission.end_to_end_id,
            amount_minor=submission.amount_minor,
            currency=submission.currency,
            creditor=Party(submission.holder_name, creditor),
            instruction_id=submission.end_to_end_id,
            remittance=submission.description[:140],
        )

    async def flush(self) -> list[RailReceipt]:
        if not self.queue:
            return []
        queued, self.queue = self.queue, []
        try:
            return await self.send_file([sub for sub, _ in queued])
        except (InvalidArgument, Unavailable):
            self.queue = queued + self.queue
            raise

    async def send_file(self, subs: Sequence[Submission]) -> list[RailReceipt]:
        """One pain.001 of `subs` (its message id follows from their
        end-to-end ids: the same file sent again is the same message)."""
        queued = [(sub, self.transfer_for(sub)) for sub in subs]
        if not queued:
            return []
        now = _utc(self.clock)
        close = self.capabilities.next_window(now)
        execution = close.date() if close is not None else now.date()
        ids = ",".join(s.end_to_end_id for s, _ in queued)
        message_id = _msg_id("TPS", ids)
        debtor = Party(
            self.config.debtor_name,
            iban_account(self.config.debtor_iban, self.config.debtor_bic, field="debtor"),
        )
        xml = write_pain001(
            [t for _, t in queued],
            message_id=message_id,
            payment_info_id=message_id,
            created_at=now,
            execution_date=execution,
            debtor=debtor,
            initiating_party=self.config.debtor_name,
        )
        await self._call("POST", "/v1/sepa/pain001", data=xml, content_type="application/xml")
        return [RailReceipt(self.name, message_id, s.end_to_end_id, "accepted") for s, _ in queued]


# ------------------------------------------------------------------------ card


class CardRail(HttpRail):
    """Card / wallet push payouts: a token call (the vault token, never a PAN)."""

    name = "card"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            rail=self.name,
            currencies=frozenset({"USD", "EUR", "GBP"}),
            max_amount_minor=CARD_LIMIT_MINOR,
            beneficiary_kinds=frozenset({"card", "wallet"}),
            holidays=self.holidays,
            fixed_cost_minor=25,
            cost_bps=15.0,
        )

    async def submit(self, submission: Submission) -> RailReceipt:
        check_submission(self.capabilities, submission)
        if not submission.token:
            raise refuse("FIELD_REQUIRED", "submission.token is required", "submission.token")
        await self._remember(submission.end_to_end_id, submission)
        body = await self._call(
            "POST",
            "/v1/card/payouts",
            data=json.dumps(
                {
                    "reference": submission.end_to_end_id,
                    "kind": submission.beneficiary_kind,
                    "token": submission.token,
                    "amount_minor": submission.amount_minor,
                    "currency": submission.currency,
                }
            ).encode(),
            content_type="application/json",
        )
        status = json.loads(body)
        state = {"settled": "settled", "failed": "failed"}.get(str(status["status"]), "accepted")
        return RailReceipt(
            self.name,
            str(status["id"]),
            submission.end_to_end_id,
            state,
            str(status.get("reason_code", "")),
        )


def build_rails(
    config: RailsConfig,
    *,
    clock: Clock | None = None,
    correlations: Correlations | None = None,
) -> dict[str, HttpRail]:
    """Every adapter, by name, sharing one correlation map."""
    shared = correlations or MemoryCorrelations()
    rails: Sequence[HttpRail] = (
        InstantRail(config, clock=clock, correlations=shared),
        AchRail(config, clock=clock, correlations=shared),
        SepaRail(config, clock=clock, correlations=shared),
        CardRail(config, clock=clock, correlations=shared),
    )
    return {r.name: r for r in rails}


# The policy's routing methods (policy_plane PAYMENT_METHODS) and the rails
# that carry each, first choice first.
RAILS_FOR_METHOD: dict[str, tuple[str, ...]] = {
    "instant_payment": ("instant", "sepa"),
    "bank_transfer": ("ach", "sepa"),
    "card": ("card",),
    "wallet": ("card",),
}
# The rails the policy routes payouts among (RailOption.rail) and the
# method each carries; ach_same_day is the ACH adapter before a same-day
# cut-off (payouts.domain.ADAPTER_OF_RAIL).
RAIL_METHOD = {
    "instant": "instant_payment",
    "ach_same_day": "bank_transfer",
    "ach": "bank_transfer",
    "sepa": "bank_transfer",
    "card": "card",
}
# NACHA's same-day entry fee on top of an ACH entry's.
SAME_DAY_FEE_MINOR = 5


@dataclass(frozen=True, slots=True)
class RailOption:
    """What one rail offers one payout now: the policy's routing input
    (policy_plane RailFacts; the wire's triplane.common.v1.RailOption)."""

    rail: str
    method: str
    reachable: bool
    unreachable_because: str  # currency | beneficiary_kind | country | ""
    max_amount_minor: int
    window_open: bool
    cutoff_at_us: int  # the cut-off a payment handed over now makes; 0: always open
    cost_minor: int


def rail_capabilities(config: RailsConfig) -> dict[str, Capabilities]:
    """Every rail the policy routes among, by its routing name: each
    adapter's capabilities, and same-day ACH as the ACH adapter's same-day
    windows, limit and fee (no I/O: nothing is sent)."""
    rails = build_rails(config)
    found = {name: rail.capabilities for name, rail in rails.items()}
    ach = found.get("ach")
    if ach is not None:
        found["ach_same_day"] = replace(
            ach,
            rail="ach_same_day",
            max_amount_minor=SAME_DAY_LIMIT_MINOR,
            cutoffs=AchRail.SAME_DAY_CUTOFFS,
            fixed_cost_minor=ach.fixed_cost_minor + SAME_DAY_FEE_MINOR,
        )
    order = ("instant", "ach_same_day", "ach", "sepa", "card")
    return {name: found[name] for name in order if name in found}


def rail_options(
    capabilities: dict[str, Capabilities],
    *,
    currency: str,
    amount_minor: int,
    beneficiary_kind: str,
    country: str,
    now_us: int,
) -> list[RailOption]:
    """What each rail offers a payout of `amount_minor` to this beneficiary
    at `now_us` (the money plane's clock): reach, limit, window, cost."""
    at = dt.datetime.fromtimestamp(now_us / 1_000_000, tz=dt.UTC)
    out = []
    for name, caps in capabilities.items():
        because = ""
        if currency not in caps.currencies:
            because = "currency"
        elif beneficiary_kind not in caps.beneficiary_kinds:
            because = "beneficiary_kind"
        elif caps.countries and country not in caps.countries:
            because = "country"
        close = caps.next_window(at)
        window_open = close is None or close.date() == at.astimezone(close.tzinfo).date()
        out.append(
            RailOption(
                rail=name,
                method=RAIL_METHOD.get(name, name),
                reachable=not because,
                unreachable_because=because,
                max_amount_minor=caps.max_amount_minor,
                window_open=window_open,
                cutoff_at_us=0 if close is None else int(close.timestamp() * 1_000_000),
                cost_minor=caps.cost_minor(amount_minor),
            )
        )
    return out


def select_rail(rails: dict[str, HttpRail], method: str, submission: Submission) -> HttpRail:
    """The adapter for the policy's routing choice (`RailSubmission.rail`: a
    method, or the rail the decision chose: that rail's adapter alone) that
    can carry this payout; FAILED_PRECONDITION
    NO_RAIL_REACHES naming `rail` when none can (policy routed it to a
    method no configured rail serves for this beneficiary)."""
    for name in RAILS_FOR_METHOD.get(method, (adapter_of(method),)):
        rail = rails.get(name)
        if rail is not None and rail.capabilities.reaches(submission):
            return rail
    raise FailedPrecondition(
        "NO_RAIL_REACHES",
        f"no rail for {method!r} carries this payout "
        f"({submission.currency}, {submission.beneficiary_kind})",
        "rail",
    )


class PayoutsRail:
    """The payouts package's `Rail` (submit -> the rail's reference): hands
    `Payouts.hand_to_rail` one adapter."""

    def __init__(self, rail: HttpRail) -> None:
        self.rail = rail

    async def submit(self, submission: Submission) -> str:
        receipt = await self.rail.submit(submission)
        return receipt.reference or receipt.end_to_end_id


__all__ = [
    "AchRail",
    "CardRail",
    "Correlation",
    "HttpRail",
    "InstantRail",
    "MemoryCorrelations",
    "PayoutsRail",
    "RailOption",
    "SepaRail",
    "UsBankAccount",
    "build_rails",
    "rail_capabilities",
    "rail_options",
    "select_rail",
]
