"""Replay: re-evaluate a window of logged decisions under a bundle version.

Under the version each decision was made with, every verdict and every token
claim must come out identical (determinism score 1.0): Ed25519 signatures are
deterministic too, so only a rotated key could change a token's bytes, and the
claims are compared without the key id. Under another version, the changed
decisions are the drift. With outcome labels (fraud, chargeback) both the
logged and the replayed decisions get a confusion matrix: a backtest.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from policy_plane.evaluation import CompiledBundle
from policy_plane.model import DecisionRecord, Outcome, Verdict, record_decoder
from policy_plane.store import PolicyStore
from triplane.runtime.tokens import DecisionClaims

POSITIVE_LABELS = frozenset({"fraud", "chargeback"})
_claims_decoder = msgspec.json.Decoder(DecisionClaims)


@dataclass
class Confusion:
    bundle_version: str
    true_positives: int = 0
    false_positives: int = 0
    true_negatives: int = 0
    false_negatives: int = 0

    def add(self, predicted_positive: bool, actual_positive: bool) -> None:
        if predicted_positive and actual_positive:
            self.true_positives += 1
        elif predicted_positive:
            self.false_positives += 1
        elif actual_positive:
            self.false_negatives += 1
        else:
            self.true_negatives += 1

    @property
    def precision(self) -> float:
        flagged = self.true_positives + self.false_positives
        return self.true_positives / flagged if flagged else 0.0

    @property
    def recall(self) -> float:
        actual = self.true_positives + self.false_negatives
        return self.true_positives / actual if actual else 0.0


@dataclass(frozen=True, slots=True)
class ChangedDecision:
    decision_id: str
    logged_outcome: str
    replayed_outcome: str
    logged_reason_codes: list[str]
    replayed_reason_codes: list[str]


@dataclass
class ReplayReport:
    bundle_version: str
    replayed: int = 0
    identical: int = 0
    changed: list[ChangedDecision] = field(default_factory=list)
    changed_count: int = 0
    labelled: int = 0
    logged_backtest: Confusion = field(default_factory=lambda: Confusion(""))
    replayed_backtest: Confusion = field(default_factory=lambda: Confusion(""))
    elapsed_s: float = 0.0

    @property
    def determinism_score(self) -> float:
        return self.identical / self.replayed if self.replayed else 1.0

    @property
    def drift_rate(self) -> float:
        return self.changed_count / self.replayed if self.replayed else 0.0


@dataclass(frozen=True, slots=True)
class ReplayWindow:
    tenant_id: str
    account_id: str
    start_us: int
    end_us: int
    max_decisions: int


def token_claims(token: str) -> DecisionClaims | None:
    """The claims of a token, without checking it (the log is verified apart)."""
    if not token:
        return None
    body = token.split(".")[1]
    return _claims_decoder.decode(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def expected_claims(
    record: DecisionRecord, verdict: Verdict, bundle_version: str
) -> DecisionClaims | None:
    if verdict.outcome_enum != Outcome.ALLOW:
        return None
    inp = record.input
    return DecisionClaims(
        decision_id=record.decision_id,
        tenant_id=inp.tenant_id,
        account_id=inp.payment.account_id,
        amount_minor=inp.payment.amount_minor,
        currency=inp.payment.currency,
        idempotency_key=inp.idempotency_key,
        expires_at_s=record.token_expires_at_s,
        outcome="allow",
        policy_version=bundle_version,
    )


def _same_claims(logged: DecisionClaims | None, replayed: DecisionClaims | None) -> bool:
    if logged is None or replayed is None:
        return logged is replayed
    return msgspec.structs.replace(logged, key_id="") == replayed


def replay_window(
    store: PolicyStore,
    resolve: Callable[[str], CompiledBundle],
    window: ReplayWindow,
    bundle_version: str,
    page_records: int,
    max_changed_listed: int,
) -> ReplayReport:
    started = time.perf_counter()
    report = ReplayReport(bundle_version)
    report.logged_backtest = Confusion("logged")
    report.replayed_backtest = Confusion(bundle_version or "logged")
    after: tuple[int, str] = (-1, "")
    while report.replayed < window.max_decisions:
        limit = min(page_records, window.max_decisions - report.replayed)
        page = store.window_page(
            window.tenant_id, window.account_id, window.start_us, window.end_us, after, limit
        )
        if not page:
            break
        labels = store.labels_for([r.decision_id for r in page])
        for row in page:
            record = record_decoder.decode(row.body)
            bundle = resolve(bundle_version or record.bundle_version)
            same_version = not bundle_version or bundle_version == record.bundle_version
            verdict = _replay_one(report, record, bundle, same_version, max_changed_listed)
            label = labels.get(record.decision_id)
            if label is not None:
                _backtest(report, record, verdict, label)
        after = (page[-1].recorded_at_us, page[-1].decision_id)
        if len(page) < limit:
            break
    report.elapsed_s = time.perf_counter() - started
    return report


def _replay_one(
    report: ReplayReport,
    record: DecisionRecord,
    bundle: CompiledBundle,
    same_version: bool,
    max_changed: int,
) -> Verdict:
    verdict = bundle.evaluate(record.input)
    report.replayed += 1
    if same_version:
        identical = verdict == record.verdict and _same_claims(
            token_claims(record.token), expected_claims(record, verdict, bundle.version)
        )
    else:
        identical = (verdict.outcome, verdict.reason_codes) == (
            record.verdict.outcome,
            record.verdict.reason_codes,
        )
    if identical:
        report.identical += 1
        return verdict
    report.changed_count += 1
    if len(report.changed) < max_changed:
        report.changed.append(
            ChangedDecision(
                record.decision_id,
                record.verdict.outcome,
                verdict.outcome,
                record.verdict.reason_codes,
                verdict.reason_codes,
            )
        )
    return verdict


def _backtest(report: ReplayReport, record: DecisionRecord, verdict: Verdict, label: str) -> None:
    actual = label in POSITIVE_LABELS
    report.labelled += 1
    report.logged_backtest.add(record.verdict.outcome != "allow", actual)
    report.replayed_backtest.add(verdict.outcome != "allow", actual)
