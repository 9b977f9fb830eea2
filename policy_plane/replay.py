"""Replay: re-evaluate a window of logged decisions under a bundle version.

Under the version each decision was made with, every verdict and every token
claim it decides must come out identical (determinism score 1.0): the movement
the token allows, the decision and bundle it names and its expiry. The token
id (random) and the key that signed it are not decided by the bundle, so they
are not compared. Under another version, the changed
decisions are the drift. With outcome labels (fraud, chargeback) both the
logged and the replayed decisions get a confusion matrix: a backtest.

The names sealed in the log (policy_plane/pii.py) are opened before a record
is replayed (worker processes get the key ring when they start), so what is
replayed is exactly the input decided on.
"""

from __future__ import annotations

import base64
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import msgspec

from policy_plane.bundle import SHIPPED_LISTS_DIR, BundleLimits, BundleSource
from policy_plane.evaluation import CompiledBundle, compile_source
from policy_plane.model import DecisionRecord, Outcome, Verdict, record_decoder, token_movement
from policy_plane.pii import DecisionSealer
from policy_plane.store import LogRow, PolicyStore
from triplane.runtime.tokens import DecisionClaims

log = logging.getLogger("policy_plane.replay")
POSITIVE_LABELS = frozenset({"fraud", "chargeback"})
_claims_decoder = msgspec.json.Decoder(DecisionClaims)


class _V1Claims(msgspec.Struct, frozen=True, kw_only=True):
    """The claims of the v1 tokens logged before decision tokens became JWS
    (`v1.<claims>.<signature>`), so old logs still replay."""

    decision_id: str
    tenant_id: str
    account_id: str
    amount_minor: int
    currency: str
    idempotency_key: str
    expires_at_s: int
    outcome: str = "allow"
    policy_version: str = ""
    key_id: str = ""


_v1_decoder = msgspec.json.Decoder(_V1Claims)
# What a replay compares of a token: what the bundle and the input decide.
TokenTerms = tuple[object, ...]


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


def _payload(token: str) -> bytes:
    body = token.split(".")[1]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def token_claims(token: str) -> DecisionClaims | None:
    """The claims of a JWS decision token, without checking it (the log is
    verified apart); None for no token or a v1 one."""
    if not token or token.startswith("v1."):
        return None
    return _claims_decoder.decode(_payload(token))


def logged_terms(record: DecisionRecord) -> TokenTerms | None:
    """What the logged token says that a replay decides again."""
    token = record.token
    if not token:
        return None
    if token.startswith("v1."):
        v1 = _v1_decoder.decode(_payload(token))
        return (
            "v1",
            v1.decision_id,
            v1.tenant_id,
            v1.account_id,
            v1.amount_minor,
            v1.currency,
            v1.idempotency_key,
            v1.expires_at_s,
            v1.outcome,
            v1.policy_version,
        )
    claims = _claims_decoder.decode(_payload(token))
    return (
        claims.movement(),
        claims.decision_id,
        claims.payment_kind,
        claims.expires_at_s,
        claims.outcome,
        claims.policy_version,
    )


def expected_terms(
    record: DecisionRecord, verdict: Verdict, bundle_version: str
) -> TokenTerms | None:
    """What a token of this verdict would say (None: no token)."""
    if verdict.outcome_enum != Outcome.ALLOW:
        return None
    inp = record.input
    if record.token.startswith("v1."):
        return (
            "v1",
            record.decision_id,
            inp.tenant_id,
            inp.payment.account_id,
            inp.payment.amount_minor,
            inp.payment.currency,
            inp.idempotency_key,
            record.token_expires_at_s,
            "allow",
            bundle_version,
        )
    return (
        token_movement(record),
        record.decision_id,
        inp.payment.kind,
        record.token_expires_at_s,
        "allow",
        bundle_version,
    )


@dataclass(frozen=True, slots=True)
class ReplayParallelism:
    """How a long window is spread over worker processes.

    `workers` <= 1 replays in this process. Otherwise the first
    `min_decisions` decisions are replayed here (a short window never pays for
    starting processes) and the rest, page by page, by `workers` processes
    (spawned, so a server's threads are never forked); pages are merged back
    in window order, so the report is the one a serial replay gives."""

    workers: int = 1
    min_decisions: int = 0


def default_workers(configured: int) -> int:
    """`configured`, or the machine's cores when it is 0."""
    return configured if configured > 0 else (os.cpu_count() or 1)


def replay_window(
    store: PolicyStore,
    resolve: Callable[[str], CompiledBundle],
    window: ReplayWindow,
    bundle_version: str,
    page_records: int,
    max_changed_listed: int,
    parallelism: ReplayParallelism = ReplayParallelism(),
    *,
    sealer: DecisionSealer,
) -> ReplayReport:
    """Replays the window. `sealer` opens the names sealed in the log, so the
    replayed input is the one decided on (and replay stays deterministic)."""
    started = time.perf_counter()
    report = _empty_report(bundle_version)
    pool: _Pool | None = None
    try:
        for page, labels in _pages(store, window, page_records):
            if (
                pool is None
                and parallelism.workers > 1
                and report.replayed >= max(parallelism.min_decisions, 1)
            ):
                pool = _Pool(store, resolve, window, bundle_version, parallelism.workers, sealer)
            if pool is None:
                bodies = [row.body for row in page]
                _merge(
                    report,
                    replay_bodies(
                        bodies, labels, resolve, bundle_version, max_changed_listed, sealer
                    ),
                    max_changed_listed,
                )
                continue
            for done in pool.submit(page, labels, max_changed_listed):
                _merge(report, done, max_changed_listed)
        if pool is not None:
            for done in pool.drain():
                _merge(report, done, max_changed_listed)
    finally:
        if pool is not None:
            pool.close()
    report.elapsed_s = time.perf_counter() - started
    return report


def _empty_report(bundle_version: str) -> ReplayReport:
    report = ReplayReport(bundle_version)
    report.logged_backtest = Confusion("logged")
    report.replayed_backtest = Confusion(bundle_version or "logged")
    return report


def _pages(
    store: PolicyStore, window: ReplayWindow, page_records: int
) -> Iterator[tuple[list[LogRow], list[str | None]]]:
    """The window's decisions in (time, id) order, a page at a time, with
    each decision's outcome label (None when unlabelled)."""
    after: tuple[int, str] = (-1, "")
    remaining = window.max_decisions
    while remaining > 0:
        limit = min(page_records, remaining)
        page = store.window_page(
            window.tenant_id, window.account_id, window.start_us, window.end_us, after, limit
        )
        if not page:
            return
        found = store.labels_for([r.decision_id for r in page])
        yield page, [found.get(r.decision_id) for r in page]
        remaining -= len(page)
        after = (page[-1].recorded_at_us, page[-1].decision_id)
        if len(page) < limit:
            return


def replay_bodies(
    bodies: Sequence[str],
    labels: Sequence[str | None],
    resolve: Callable[[str], CompiledBundle],
    bundle_version: str,
    max_changed_listed: int,
    sealer: DecisionSealer,
) -> ReplayReport:
    """The report of a run of logged records (what a page contributes)."""
    report = _empty_report(bundle_version)
    for body, label in zip(bodies, labels, strict=True):
        record = sealer.open(record_decoder.decode(body))
        bundle = resolve(bundle_version or record.bundle_version)
        same_version = not bundle_version or bundle_version == record.bundle_version
        verdict = _replay_one(report, record, bundle, same_version, max_changed_listed)
        if label is not None:
            _backtest(report, record, verdict, label)
    return report


def _merge(report: ReplayReport, part: ReplayReport, max_changed_listed: int) -> None:
    report.replayed += part.replayed
    report.identical += part.identical
    report.changed_count += part.changed_count
    room = max_changed_listed - len(report.changed)
    if room > 0:
        report.changed.extend(part.changed[:room])
    report.labelled += part.labelled
    for mine, theirs in (
        (report.logged_backtest, part.logged_backtest),
        (report.replayed_backtest, part.replayed_backtest),
    ):
        mine.true_positives += theirs.true_positives
        mine.false_positives += theirs.false_positives
        mine.true_negatives += theirs.true_negatives
        mine.false_negatives += theirs.false_negatives


# ------------------------------------------------------------ worker processes
# Each worker compiles the window's bundles once (from their sources, checking
# that each compiles to its version), takes the key ring that opens the sealed
# names, and then replays the pages it is sent.
_WORKER_BUNDLES: dict[str, CompiledBundle] = {}
_WORKER_SEALER: list[DecisionSealer] = []


def _worker_start(
    sources: list[tuple[str, BundleSource, BundleLimits]], pii_keys: list[bytes]
) -> None:
    _WORKER_SEALER[:] = [DecisionSealer.from_key_material(pii_keys)]
    for version, source, limits in sources:
        compiled = compile_source(source, limits, SHIPPED_LISTS_DIR)
        assert compiled.version == version, (compiled.version, version)
        _WORKER_BUNDLES[version] = compiled


def _worker_resolve(version: str) -> CompiledBundle:
    return _WORKER_BUNDLES[version]


def _worker_replay(
    bodies: list[str], labels: list[str | None], bundle_version: str, max_changed_listed: int
) -> ReplayReport:
    return replay_bodies(
        bodies, labels, _worker_resolve, bundle_version, max_changed_listed, _WORKER_SEALER[0]
    )


@dataclass
class _Page:
    bodies: list[str]
    labels: list[str | None]
    max_changed: int
    future: Future[ReplayReport] | None = None
    report: ReplayReport | None = None


class _Pool:
    """Worker processes replaying pages, answered in the order submitted.

    While every worker has its share of pages (two each: they never wait for
    the reader), the next page is replayed here instead of waiting: the
    calling process works too, notably while the workers are starting."""

    def __init__(
        self,
        store: PolicyStore,
        resolve: Callable[[str], CompiledBundle],
        window: ReplayWindow,
        bundle_version: str,
        workers: int,
        sealer: DecisionSealer,
    ) -> None:
        self._resolve = resolve
        self._sealer = sealer
        self._bundle_version = bundle_version
        versions = (
            [bundle_version]
            if bundle_version
            else store.window_versions(
                window.tenant_id, window.account_id, window.start_us, window.end_us
            )
        )
        self._versions = set(versions)
        sources = []
        for version in versions:
            compiled = resolve(version)
            sources.append((version, compiled.source, compiled.limits))
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_start,
            initargs=(sources, sealer.cipher.key_material),
        )
        self._max_pending = 2 * workers
        self._pending = 0
        self._broken = False
        self._in_order: deque[_Page] = deque()

    def submit(
        self, page: list[LogRow], labels: list[str | None], max_changed_listed: int
    ) -> list[ReplayReport]:
        """Takes a page; returns the reports of the oldest pages that are done
        (in window order)."""
        bodies = [row.body for row in page]
        # A page logged under a version activated after the replay started
        # (the workers lack it) is replayed here too, in its place.
        unknown = not self._bundle_version and any(
            row.bundle_version not in self._versions for row in page
        )
        entry = _Page(bodies, labels, max_changed_listed)
        if unknown or self._broken or self._pending >= self._max_pending:
            entry.report = self._here(entry)
        else:
            entry.future = self._executor.submit(
                _worker_replay, bodies, labels, self._bundle_version, max_changed_listed
            )
            self._pending += 1
        self._in_order.append(entry)
        return self._collect(wait=False)

    def _here(self, entry: _Page) -> ReplayReport:
        return replay_bodies(
            entry.bodies,
            entry.labels,
            self._resolve,
            self._bundle_version,
            entry.max_changed,
            self._sealer,
        )

    def _collect(self, wait: bool) -> list[ReplayReport]:
        finished = []
        while self._in_order:
            entry = self._in_order[0]
            if entry.future is not None:
                if not (wait or entry.future.done()):
                    break
                try:
                    entry.report = entry.future.result()
                except BrokenProcessPool:
                    # A worker could not start or died (say the main module
                    # of a script without a `__main__` guard): same report,
                    # replayed here.
                    if not self._broken:
                        log.warning("replay workers failed; replaying in process", exc_info=True)
                    self._broken = True
                    entry.report = self._here(entry)
                self._pending -= 1
            self._in_order.popleft()
            assert entry.report is not None
            finished.append(entry.report)
        return finished

    def drain(self) -> list[ReplayReport]:
        return self._collect(wait=True)

    def close(self) -> None:
        for entry in self._in_order:
            if entry.future is not None:
                entry.future.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)


def _replay_one(
    report: ReplayReport,
    record: DecisionRecord,
    bundle: CompiledBundle,
    same_version: bool,
    max_changed: int,
) -> Verdict:
    # A reviewer's approval is not the bundle's to decide again: its verdict
    # replays as logged, and its token must still allow exactly the movement
    # the reviewed decision named.
    verdict = record.verdict if record.review is not None else bundle.evaluate(record.input)
    report.replayed += 1
    if same_version:
        identical = verdict == record.verdict and logged_terms(record) == expected_terms(
            record, verdict, bundle.version
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
