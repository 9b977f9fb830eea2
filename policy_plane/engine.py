"""The policy plane's domain facade: decisions, bundles, log, replay, cases,
consent and offers. It knows nothing of gRPC; the servicer maps protobuf to
these calls and the error interceptor maps its exceptions to statuses.

Blocking store calls run in worker threads so the event loop keeps serving;
evaluation itself is pure CPU and runs inline (about 0.1-0.3 ms).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from prometheus_client import Counter, Gauge, Histogram

from policy_plane import adjustments, validate
from policy_plane import cases as cases_mod
from policy_plane.bundles_registry import BundleRegistry
from policy_plane.cases import CaseDesk, EventEncoder
from policy_plane.consent import ConsentBook
from policy_plane.decision_log import (
    DecisionLog,
    LogKeys,
    VerifyResult,
    chain_for_writer,
    verify_all,
    verify_chain,
)
from policy_plane.evaluation import CompiledBundle
from policy_plane.model import (
    ADJUSTMENT_MOVEMENT,
    Decision,
    DecisionRecord,
    EvaluationInput,
    FiredRule,
    Outcome,
    ReviewApproval,
    ShadowResult,
    Verdict,
    canonical_encoder,
    movement_of,
    record_decoder,
)
from policy_plane.offers import OfferCatalog
from policy_plane.pii import DecisionSealer
from policy_plane.profiles import CustomerProfile, ProfileBook, ProfileChange, account_age_days
from policy_plane.replay import (
    ReplayParallelism,
    ReplayReport,
    ReplayWindow,
    default_workers,
    replay_window,
)
from policy_plane.store import LogRow, PolicyStore
from triplane.runtime.clock import Clock
from triplane.runtime.config import ConfigError, PolicyConfig
from triplane.runtime.deadline import Deadline
from triplane.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from triplane.runtime.tokens import TokenSigner

log = logging.getLogger("policy_plane.engine")
LABELS = ("legitimate", "fraud", "chargeback")
# The movements whose review case, approved, issues a decision token: a
# payout, and a reconciliation adjustment (which another operator than the
# one who asked for it must approve).
PAYOUT_MOVEMENT = "payout"
TOKEN_ON_APPROVAL = frozenset({PAYOUT_MOVEMENT, ADJUSTMENT_MOVEMENT})
# The rule a reviewer's approval is logged as having fired.
REVIEW_RULE = "case_review"
_T = TypeVar("_T")

# Served on policy.metrics_listen with RED per RPC (triplane/runtime/metrics.py).
DECISIONS = Counter("triplane_policy_decisions", "Decisions made", ["outcome"])
SHADOW_DECISIONS = Counter("triplane_policy_shadow_decisions", "Decisions also made in shadow")
SHADOW_AGREEMENTS = Counter("triplane_policy_shadow_agreements", "Shadow decisions that agreed")
# The decision-log lag: a decision is answered only once its record is
# written, so how many wait for the log writer, and how long each waited, is
# how far the log lags the decisions (bound: decision_log.max_queue_records).
DECISION_LOG_WAITING = Gauge(
    "triplane_policy_decision_log_waiting_records",
    "Decisions queued for or being written by the decision-log writer",
)
DECISION_LOG_APPEND_SECONDS = Histogram(
    "triplane_policy_decision_log_append_seconds",
    "Time from queueing a decision for the log to its record written",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


@dataclass
class ShadowStats:
    bundle_version: str = ""
    decisions: int = 0
    agreements: int = 0

    @property
    def agreement_rate(self) -> float:
        return self.agreements / self.decisions if self.decisions else 0.0


@dataclass(frozen=True, slots=True)
class PolicyMetrics:
    decisions_total: int
    live_bundle_version: str
    shadow: ShadowStats
    overrule: cases_mod.OverruleStats


def request_hash(inp: EvaluationInput) -> str:
    return hashlib.sha256(canonical_encoder.encode(inp)).hexdigest()


def first_difference(old: object, new: object, path: str = "") -> str:
    """Dotted path of the first field that differs between two structures."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return ""
    return path if old != new else ""


class PolicyEngine:
    def __init__(
        self,
        config: PolicyConfig,
        store: PolicyStore,
        signer: TokenSigner,
        log_keys: LogKeys,
        clock: Clock,
        encode_event: EventEncoder,
        sealer: DecisionSealer,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        # The names kept in the decision log are sealed (policy_plane/pii.py).
        self.sealer = sealer
        self._signer = signer
        self.log_keys = log_keys
        self.bundles = BundleRegistry(store, config, clock)
        self.log = DecisionLog(
            store,
            log_keys,
            _writer_chain(config),
            config.decision_log.max_batch_records,
            config.decision_log.max_wait_ms,
            config.decision_log.max_queue_records,
            config.decision_log.write_retry,
            sealer,
        )
        self.consent = ConsentBook(
            store, config.consent, config.limits.max_contact_history_per_customer, clock
        )
        self.offers = OfferCatalog(
            store,
            self.consent,
            clock,
            config.limits.max_offers_per_tenant,
            config.limits.max_offer_channels,
            config.consent.vulnerable_blocked_products,
            config.limits.max_offer_attributes,
            config.limits.max_offer_attribute_length,
        )
        self.cases = CaseDesk(store, clock, encode_event, config.limits.max_note_length)
        self.profiles = ProfileBook(store, clock, config.limits)
        self.shadow_stats = ShadowStats()
        self._tenants: set[str] = set()
        # Called after a case event was written to the outbox (wakes the relay).
        self.case_event_hooks: list[Callable[[], None]] = []

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self.log.start()

    def _load(self) -> None:
        self._tenants = set(self.store.tenant_ids())
        self.bundles.start()

    async def stop(self) -> None:
        await self.log.stop()

    async def read(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Runs a call that reads the store: inline where a read is local
        (SQLite), in a worker thread where it is a round trip (PostgreSQL)."""
        if self.store.db.reads_are_local:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    def case_event_written(self) -> None:
        for hook in self.case_event_hooks:
            hook()

    # ------------------------------------------------------------ tenants
    async def create_tenant(self, tenant_id: str, display_name: str) -> tuple[str, int]:
        validate.check_tenant_id(tenant_id)
        validate.check_text(display_name, "display_name", self.config.limits.max_string_length)
        result = await asyncio.to_thread(
            self.store.create_tenant, tenant_id, display_name, self.clock.now_us()
        )
        self._tenants.add(tenant_id)
        return result

    def require_tenant(self, tenant_id: str, prefix: str = "") -> None:
        """A known tenant; `prefix` names the message holding the field
        (`offer` for `offer.tenant_id`), so the error names the caller's field."""
        field = f"{prefix}.tenant_id" if prefix else "tenant_id"
        validate.check_tenant_id(tenant_id, field)
        if tenant_id not in self._tenants:
            # Made through another replica since this one started: one
            # primary-key read, then known here too (only stored tenants are).
            if not self.store.tenant_exists(tenant_id):
                raise NotFound("TENANT_NOT_FOUND", f"no tenant {tenant_id!r}", field)
            self._tenants.add(tenant_id)

    def check_customer(self, tenant_id: str, customer_id: str, prefix: str = "") -> None:
        self.require_tenant(tenant_id, prefix)
        field = f"{prefix}.customer_id" if prefix else "customer_id"
        validate.check_id(customer_id, field, self.config.limits)

    # ------------------------------------------------------------ decisions
    async def evaluate(
        self, inp: EvaluationInput, deadline: Deadline | None = None
    ) -> tuple[Decision, bool]:
        """Decides, logs, and returns (decision, replayed).

        `deadline` (rule 7: the caller's, capped by policy.budget_ms) is
        checked before deciding, before queueing for the log and when the log
        writer takes the decision; past it the answer is DEADLINE_EXCEEDED
        and nothing is logged (a retry with the same key decides afresh)."""
        validate.check_evaluation(inp, self.config.limits)
        return await self._decide(inp, deadline)

    async def decide_adjustment(
        self, request: adjustments.AdjustmentRequest, deadline: Deadline | None = None
    ) -> tuple[Decision, bool]:
        """Decides an operator's write-off or reversal of a reconciliation
        break like any payment (policy_plane/adjustments.py): logged, signed,
        replayable; an allow's token is for exactly the ledger's transfer, a
        review opens a case another operator must approve."""
        inp = adjustments.evaluation_input(request, self.config.limits)
        return await self._decide(inp, deadline)

    async def _decide(
        self, inp: EvaluationInput, deadline: Deadline | None
    ) -> tuple[Decision, bool]:
        self.require_tenant(inp.tenant_id)
        if deadline is not None:
            deadline.check("deciding; nothing was logged")
        # What a caller declares of its customer is not an input: the facts
        # come from the profile, read below and logged with the decision.
        inp = without_declared_facts(inp)
        # Names enter the fingerprint as keyed hashes: the column must not
        # let anyone try names against it.
        fingerprint = request_hash(self.sealer.blinded(inp))
        profile = await self.profiles.for_decision(inp.tenant_id, inp.payment.customer_id)
        now_us = self.clock.now_us()
        decided_at_us = inp.snapshot.decided_at_us or now_us
        stamped = msgspec.structs.replace(
            inp,
            snapshot=msgspec.structs.replace(
                inp.snapshot, decided_at_us=decided_at_us, **profile_facts(profile, decided_at_us)
            ),
        )
        live, shadow = self.bundles.live, self.bundles.shadow
        assert live is not None, "the engine starts with a live bundle"
        verdict = live.evaluate(stamped)
        record = self._record(
            stamped, live, verdict, self._shadow(shadow, stamped, verdict), now_us
        )
        case = None
        if verdict.outcome_enum in (Outcome.REVIEW, Outcome.HOLD):
            suggestion = cases_mod.model_suggestion(record, live.decline_suggestion_score)
            case = cases_mod.new_case(record, suggestion, now_us)
        if deadline is not None:
            deadline.check("logging the decision; nothing was logged")
        with DECISION_LOG_WAITING.track_inprogress(), DECISION_LOG_APPEND_SECONDS.time():
            result = await self.log.append(record, fingerprint, now_us, case, deadline)
        if result.existing:
            return self._previous(result.row, inp, fingerprint), True
        self._count(record)
        return Decision(record=record, chain_id=result.row.chain_id, sequence=result.row.seq), False

    def _record(
        self,
        inp: EvaluationInput,
        bundle: CompiledBundle,
        verdict: Verdict,
        shadow: ShadowResult | None,
        now_us: int,
    ) -> DecisionRecord:
        decision_id = uuid.uuid4().hex
        token, expires_at_s, token_id, token_key_id = "", 0, "", ""
        if verdict.outcome_enum == Outcome.ALLOW:
            # Issued at this plane's clock: the decision time a caller may
            # give (what the rules see) cannot stretch the token's life.
            token, claims = self._signer.issue(
                movement_of(inp),
                decision_id=decision_id,
                issued_at_s=now_us // 1_000_000,
                ttl_s=self.config.token_ttl_s,
                payment_kind=inp.payment.kind,
                policy_version=bundle.version,
            )
            expires_at_s, token_id = claims.expires_at_s, claims.token_id
            token_key_id = self._signer.key_id
        case_id = ""
        if verdict.outcome_enum in (Outcome.REVIEW, Outcome.HOLD):
            case_id = cases_mod.case_id_for(decision_id)
        return DecisionRecord(
            decision_id=decision_id,
            bundle_version=bundle.version,
            input=inp,
            verdict=verdict,
            token=token,
            token_expires_at_s=expires_at_s,
            case_id=case_id,
            shadow=shadow,
            token_id=token_id,
            token_key_id=token_key_id,
        )

    def _shadow(
        self, shadow: CompiledBundle | None, inp: EvaluationInput, live: Verdict
    ) -> ShadowResult | None:
        """The candidate's verdict, logged beside the live one, never enforced."""
        if shadow is None:
            return None
        try:
            verdict = shadow.evaluate(inp)
        except Exception:
            log.exception("shadow bundle %s failed", shadow.version)
            return None
        agreed = (verdict.outcome, verdict.reason_codes) == (live.outcome, live.reason_codes)
        return ShadowResult(
            bundle_version=shadow.version,
            outcome=verdict.outcome,
            reason_codes=verdict.reason_codes,
            agreed=agreed,
        )

    def _count(self, record: DecisionRecord) -> None:
        DECISIONS.labels(record.verdict.outcome).inc()
        shadow = record.shadow
        if shadow is None:
            return
        if shadow.bundle_version != self.shadow_stats.bundle_version:
            self.shadow_stats = ShadowStats(bundle_version=shadow.bundle_version)
        self.shadow_stats.decisions += 1
        self.shadow_stats.agreements += shadow.agreed
        SHADOW_DECISIONS.inc()
        SHADOW_AGREEMENTS.inc(shadow.agreed)

    def _previous(self, row: LogRow, inp: EvaluationInput, fingerprint: str) -> Decision:
        record = self.sealer.open(record_decoder.decode(row.body))
        if row.request_hash != fingerprint:
            # The fingerprint covers the request as sent; a retry may omit the
            # decision time the plane stamped, or send the one it stamped.
            # Either is the same request: only a field that differs refuses.
            old = msgspec.to_builtins(record.input)
            new = msgspec.to_builtins(inp)
            if not inp.snapshot.decided_at_us:
                new["snapshot"]["decided_at_us"] = old["snapshot"]["decided_at_us"]
            # The profile's facts are what the plane read then, not the caller's.
            for name in _PROFILE_FACTS:
                new["snapshot"][name] = old["snapshot"][name]
            where = first_difference(old, new)
            if where:
                raise AlreadyExists(
                    "IDEMPOTENCY_KEY_REUSED",
                    f"idempotency key already used for another request ({where} differs)",
                    _proto_path(where),
                )
        return Decision(record=record, chain_id=row.chain_id, sequence=row.seq)

    async def get_decision(
        self, tenant_id: str, decision_id: str, idempotency_key: str = ""
    ) -> Decision:
        """A logged decision by its id, or by the idempotency key of the
        Evaluate call that made it (exactly one of the two)."""
        self.require_tenant(tenant_id)
        if decision_id and idempotency_key:
            raise InvalidArgument(
                "DECISION_SELECTOR_AMBIGUOUS",
                "give decision_id or idempotency_key, not both",
                "idempotency_key",
            )
        if idempotency_key:
            validate.check_id(idempotency_key, "idempotency_key", self.config.limits)
            row = await asyncio.to_thread(
                self.store.get_decision_by_key, tenant_id, idempotency_key
            )
            if row is None:
                raise NotFound(
                    "DECISION_NOT_FOUND",
                    f"no decision under idempotency key {idempotency_key!r}",
                    "idempotency_key",
                )
        else:
            validate.check_id(decision_id, "decision_id", self.config.limits)
            row = await asyncio.to_thread(self.store.get_decision, decision_id)
        if row is None or row.tenant_id != tenant_id:
            raise NotFound("DECISION_NOT_FOUND", f"no decision {decision_id!r}", "decision_id")
        return Decision(
            record=self.sealer.open(record_decoder.decode(row.body)),
            chain_id=row.chain_id,
            sequence=row.seq,
        )

    # ------------------------------------------------------------ review cases
    async def claim_case(self, tenant_id: str, case_id: str, reviewer: str) -> cases_mod.CaseBody:
        """Claims an open case for `reviewer`; the operator who asked for an
        adjustment may not claim its case (nor leave it locked to no one
        who could approve it)."""
        self.require_tenant(tenant_id)
        case = await asyncio.to_thread(self.cases.get, tenant_id, case_id)
        reviewed = (await self.get_decision(tenant_id, case.decision_id)).record
        _check_four_eyes(reviewed, reviewer)
        return await asyncio.to_thread(self.cases.claim, tenant_id, case_id, reviewer)

    async def resolve_case(
        self, tenant_id: str, case_id: str, reviewer: str, resolution: str, note: str
    ) -> cases_mod.CaseBody:
        """Resolves a claimed case. Approving a payout's case first logs the
        approval's decision (with the payout's token), then writes the case
        and its event: a crash between the two leaves the case claimed, and
        resolving it again finds the logged approval (its key is the case's)."""
        self.require_tenant(tenant_id)
        case = await asyncio.to_thread(
            self.cases.check_resolution, tenant_id, case_id, reviewer, resolution, note
        )
        if case.status == "resolved":
            return case
        reviewed = (await self.get_decision(tenant_id, case.decision_id)).record
        movement = reviewed.input.payment.movement
        if resolution == "approve":
            _check_four_eyes(reviewed, reviewer)
        event = cases_mod.ReviewedMovement(movement, reviewed.input.idempotency_key)
        approval_id = ""
        if resolution == "decline" and movement in TOKEN_ON_APPROVAL:
            # An approval logged already (resolving approve crashed before the
            # case was written, or is under way elsewhere) has its token: the
            # case is approve's to finish, not decline's.
            key = cases_mod.approval_key(case_id)
            if await asyncio.to_thread(self.store.get_decision_by_key, tenant_id, key):
                raise FailedPrecondition(
                    "CASE_APPROVAL_LOGGED",
                    "an approval of this case is logged; resolve it approve",
                    "resolution",
                )
        if resolution == "approve" and movement in TOKEN_ON_APPROVAL:
            approval = await self._approval(reviewed, case_id, reviewer)
            event = cases_mod.ReviewedMovement(
                movement, reviewed.input.idempotency_key, approval.token
            )
            approval_id = approval.decision_id
        resolved = await asyncio.to_thread(
            self.cases.resolve,
            tenant_id,
            case_id,
            reviewer,
            resolution,
            note,
            event,
            approval_id,
        )
        self.case_event_written()
        return resolved

    async def _approval(
        self, reviewed: DecisionRecord, case_id: str, reviewer: str
    ) -> DecisionRecord:
        """The decision a reviewer's approval makes: logged like any, under
        its own id and the key `review:<case_id>`, allowing exactly the
        movement the reviewed decision named (its key included). Already
        logged (resolved again, or on another replica): that one."""
        now_us = self.clock.now_us()
        decision_id = uuid.uuid4().hex
        token, claims = self._signer.issue(
            movement_of(reviewed.input),
            decision_id=decision_id,
            issued_at_s=now_us // 1_000_000,
            ttl_s=self.config.token_ttl_s,
            payment_kind=reviewed.input.payment.kind,
            policy_version=reviewed.bundle_version,
        )
        inp = msgspec.structs.replace(
            reviewed.input, idempotency_key=cases_mod.approval_key(case_id)
        )
        verdict = Verdict(
            outcome=Outcome.ALLOW.label,
            fired=[
                FiredRule(
                    rule_id=REVIEW_RULE,
                    outcome=Outcome.ALLOW.label,
                    reason_code="CASE_APPROVED",
                    reason=f"approved in review ({case_id})",
                )
            ],
            obligations=[],
            route=reviewed.verdict.route,
            screening=reviewed.verdict.screening,
        )
        record = DecisionRecord(
            decision_id=decision_id,
            bundle_version=reviewed.bundle_version,
            input=inp,
            verdict=verdict,
            token=token,
            token_expires_at_s=claims.expires_at_s,
            case_id=case_id,
            token_id=claims.token_id,
            token_key_id=self._signer.key_id,
            review=ReviewApproval(
                reviewed_decision_id=reviewed.decision_id,
                reviewer=reviewer,
                # The key the reviewed decision's token would have bound (an
                # adjustment's is the ledger's, not its request's).
                idempotency_key=movement_of(reviewed.input).idempotency_key,
            ),
        )
        fingerprint = request_hash(self.sealer.blinded(inp))
        with DECISION_LOG_WAITING.track_inprogress(), DECISION_LOG_APPEND_SECONDS.time():
            result = await self.log.append(record, fingerprint, now_us, None, None)
        if result.existing:
            return self.sealer.open(record_decoder.decode(result.row.body))
        self._count(record)
        return record

    # ------------------------------------------------------------ customer profiles
    async def put_customer_profile(
        self, profile: CustomerProfile, change_id: str, actor: str
    ) -> tuple[CustomerProfile, bool, bool]:
        """(profile in force, replayed, applied); see profiles.ProfileBook.put."""
        self.require_tenant(profile.tenant_id, "profile")
        return await asyncio.to_thread(self.profiles.put, profile, change_id, actor)

    async def get_customer_profile(
        self, tenant_id: str, customer_id: str
    ) -> tuple[CustomerProfile, list[ProfileChange]]:
        self.require_tenant(tenant_id)
        return await asyncio.to_thread(self.profiles.get, tenant_id, customer_id)

    async def label_decision(self, tenant_id: str, decision_id: str, label: str) -> None:
        if label not in LABELS:
            raise InvalidArgument("LABEL_INVALID", f"label is one of {', '.join(LABELS)}", "label")
        await self.get_decision(tenant_id, decision_id)
        await asyncio.to_thread(
            self.store.put_label, tenant_id, decision_id, label, self.clock.now_us()
        )

    # ------------------------------------------------------------ log and replay
    async def replay(self, window: ReplayWindow, bundle_version: str) -> ReplayReport:
        self.require_tenant(window.tenant_id)
        if window.account_id:
            validate.check_id(window.account_id, "account_id", self.config.limits)
        if window.end_us and window.start_us > window.end_us:
            raise InvalidArgument("WINDOW_INVALID", "start_time is after end_time", "start_time")
        cap = self.config.limits.max_replay_decisions
        if window.max_decisions < 0 or window.max_decisions > cap:
            raise InvalidArgument("REPLAY_TOO_LARGE", f"max_decisions is 0..{cap}", "max_decisions")
        if bundle_version:
            await asyncio.to_thread(self.bundles.resolve, bundle_version)
        bounded = ReplayWindow(
            window.tenant_id,
            window.account_id,
            window.start_us,
            window.end_us or 2**62,
            window.max_decisions or cap,
        )
        log_config = self.config.decision_log
        return await asyncio.to_thread(
            replay_window,
            self.store,
            self.bundles.resolve,
            bounded,
            bundle_version,
            log_config.replay_page_records,
            self.config.limits.max_changed_decisions_listed,
            ReplayParallelism(
                default_workers(log_config.replay_workers),
                log_config.replay_parallel_min_decisions,
            ),
            sealer=self.sealer,
        )

    async def verify_log(self, chain_id: str = "") -> VerifyResult:
        """One chain, or (no chain_id) every chain in the store together:
        each replica's, and those written before replicas had their own."""
        page = self.config.decision_log.replay_page_records
        if not chain_id:
            return await asyncio.to_thread(verify_all, self.store, self.log_keys, page)
        validate.check_id(chain_id, "chain_id", self.config.limits)
        return await asyncio.to_thread(verify_chain, self.store, self.log_keys, chain_id, page)

    async def purge_expired(self) -> int:
        cutoff_us = self.clock.now_us() - self.config.decision_log.retention_days * 86_400_000_000
        return await asyncio.to_thread(
            self.log.purge_expired, cutoff_us, self.config.decision_log.replay_page_records
        )

    async def overrule_series(
        self, tenant_id: str, start_us: int, end_us: int, bucket_s: int
    ) -> cases_mod.OverruleSeries:
        self.require_tenant(tenant_id)
        return await asyncio.to_thread(
            self.cases.overrule_series, tenant_id, start_us, end_us, bucket_s
        )

    async def metrics(self, tenant_id: str) -> PolicyMetrics:
        self.require_tenant(tenant_id)
        total = await asyncio.to_thread(self.store.count_decisions, tenant_id)
        overrule = await asyncio.to_thread(self.cases.overrule_stats, tenant_id)
        live = self.bundles.live
        shadow = self.bundles.shadow
        stats = self.shadow_stats
        if shadow is None or shadow.version != stats.bundle_version:
            stats = ShadowStats(bundle_version=shadow.version if shadow else "")
        return PolicyMetrics(total, live.version if live else "", stats, overrule)


def _writer_chain(config: PolicyConfig) -> str:
    """This writer's chain, checked as a chain id is everywhere else."""
    log_config = config.decision_log
    chain = chain_for_writer(log_config.chain_id, log_config.writer_id)
    if len(chain) > config.limits.max_id_length or not validate.ID_PATTERN.fullmatch(chain):
        raise ConfigError(
            f"policy.decision_log.chain_id and writer_id make the chain {chain!r}, which "
            f"must match [A-Za-z0-9_.:-]{{1,{config.limits.max_id_length}}}"
        )
    return chain


# The snapshot's fields the engine fills from the customer's profile.
_PROFILE_FACTS = ("kyc_tier", "kyc_country", "pep", "kyc_known", "account_age_days")


def _check_four_eyes(reviewed: DecisionRecord, reviewer: str) -> None:
    """Whoever asked for a write-off or reversal cannot be the one who
    reviews it."""
    adjustment = reviewed.input.adjustment
    if adjustment is not None and adjustment.requested_by == reviewer:
        raise PermissionDenied(
            "CASE_REVIEWER_IS_REQUESTER",
            f"{reviewer} asked for this {adjustment.resolution}: another operator must review it",
            "reviewer",
        )


def without_declared_facts(inp: EvaluationInput) -> EvaluationInput:
    """The request without the customer facts a caller may have declared."""
    snapshot = inp.snapshot
    if (
        snapshot.kyc_tier == 0
        and not snapshot.kyc_country
        and not snapshot.pep
        and not snapshot.kyc_known
        and snapshot.account_age_days == 0
    ):
        return inp
    cleared = msgspec.structs.replace(
        snapshot, kyc_tier=0, kyc_country="", pep=False, kyc_known=False, account_age_days=0
    )
    return msgspec.structs.replace(inp, snapshot=cleared)


def profile_facts(profile: CustomerProfile | None, decided_at_us: int) -> dict[str, object]:
    """The snapshot's customer facts from a profile: an unknown customer is
    known=False with nothing else, which the bundle handles explicitly."""
    if profile is None:
        return {"kyc_known": False}
    return {
        "kyc_tier": profile.kyc_tier,
        "kyc_country": profile.country,
        "pep": profile.pep,
        "kyc_known": True,
        "account_age_days": account_age_days(profile, decided_at_us),
    }


_PROTO_PATHS = {
    "payment.amount_minor": "payment.amount.amount_minor",
    "payment.currency": "payment.amount.currency",
    "snapshot.kyc_tier": "snapshot.kyc.tier",
    "snapshot.kyc_country": "snapshot.kyc.country",
    "snapshot.pep": "snapshot.kyc.pep",
    "snapshot.decided_at_us": "snapshot.decided_at",
}


def _proto_path(path: str) -> str:
    if path.startswith("snapshot.score"):
        return path.replace("snapshot.score", "snapshot.model_score", 1)
    return _PROTO_PATHS.get(path, path)
