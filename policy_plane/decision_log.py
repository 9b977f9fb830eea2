"""The hash-chained, signed decision log.

Record n holds the hash of record n-1; its own hash covers the chain id, its
sequence number, the previous hash, its time, the request fingerprint and the
full canonical body (input, verdict, token; the names in the input sealed,
see policy_plane/pii.py). Each hash is signed with the policy plane's Ed25519
key, and a signed `head` mark (the last record) is kept in the same
transaction as every append, so verification detects an altered
record (hash), a removed or reordered one (sequence and link), a forged one
(signature) and a cut-off tail (head). Retention purges a prefix of the chain
and leaves a signed `anchor` where the rest of the chain now starts.

Appends are group-committed: concurrent decisions queue, one writer task
chains, signs and inserts them in one transaction, then answers each caller.
A group that lost a race (for an idempotency key, or for the next sequence
number of a chain another writer also appends to) is written again per
`policy.decision_log.write_retry`.

Many writers, one database (ARCHITECTURE.md rule 9): each writer appends to
the chain `chain_for_writer` names (`policy.decision_log.chain_id`, and
`-<writer_id>` when one is set, so each replica may keep a chain of its own),
and every append reads its chain's head inside its own transaction, the head
row locked (FOR UPDATE on PostgreSQL; SQLite's write transaction is already
exclusive). Writers that share a chain are therefore serialized by the
database and can never fork it: nothing about the chain is remembered in
memory between appends. Verification, retention and replay cover every chain
in the store together (`verify_all`, `purge_expired`; a replay window is
chosen by tenant and time, whichever chain holds a decision).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from policy_plane.model import DecisionRecord, canonical_encoder, record_decoder
from policy_plane.pii import DecisionSealer
from policy_plane.store import CaseRow, ChainMark, LogRow, PolicyStore, SearchRow
from triplane.runtime.db import is_unique_violation
from triplane.runtime.deadline import Deadline
from triplane.runtime.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from triplane.runtime.retry import RetryPolicy
from triplane.runtime.tasks import cancel_and_wait
from triplane.runtime.tokens import key_id_of

log = logging.getLogger("policy_plane.decision_log")
GENESIS_HASH = "0" * 64
_SIGNED_PREFIX = b"triplane.policy.log.v1|"


class LogKeys:
    """Signs with the plane's key; verifies with it and any other known keys."""

    def __init__(
        self, private_key: SigningKey, other_public_keys: Sequence[VerifyKey] = ()
    ) -> None:
        self._key = private_key
        self.key_id = key_id_of(private_key.verify_key)
        self._public = {key_id_of(k): k for k in [private_key.verify_key, *other_public_keys]}

    def knows(self, key_id: str) -> bool:
        return key_id in self._public

    def sign(self, text: str) -> str:
        signature = self._key.sign(_SIGNED_PREFIX + text.encode()).signature
        return base64.b64encode(signature).decode()

    def verify(self, text: str, signature: str, key_id: str = "") -> bool:
        """Whether `signature` is one of a known key's over `text`: the key
        named (a record's key id), or any known one (marks name none)."""
        if key_id and key_id not in self._public:
            return False
        keys = [self._public[key_id]] if key_id else list(self._public.values())
        try:
            raw = base64.b64decode(signature, validate=True)
        except ValueError:
            return False
        for key in keys:
            try:
                key.verify(_SIGNED_PREFIX + text.encode(), raw)
                return True
            except (BadSignatureError, ValueError):
                continue
        return False


def record_hash(
    chain_id: str, seq: int, prev_hash: str, recorded_at_us: int, request_hash: str, body: str
) -> str:
    material = canonical_encoder.encode(
        [chain_id, seq, prev_hash, recorded_at_us, request_hash, body]
    )
    return hashlib.sha256(material).hexdigest()


def mark_text(chain_id: str, kind: str, seq: int, hash_hex: str) -> str:
    return f"{kind}|{chain_id}|{seq}|{hash_hex}"


def chain_for_writer(chain_id: str, writer_id: str) -> str:
    """The chain a writer appends to: `chain_id` alone (one chain every
    writer shares, serialized in the store), or `<chain_id>-<writer_id>`."""
    return f"{chain_id}-{writer_id}" if writer_id else chain_id


# Decisions indexed per transaction by the search backfill.
BACKFILL_PAGE_RECORDS = 500


@dataclass
class _Pending:
    record: DecisionRecord
    request_hash: str
    recorded_at_us: int
    case: CaseRow | None
    future: asyncio.Future[AppendResult] = field(repr=False)
    deadline: Deadline | None = None


@dataclass(frozen=True, slots=True)
class AppendResult:
    row: LogRow
    # True when the idempotency key was already logged: `row` is the old one.
    existing: bool


class DecisionLog:
    def __init__(
        self,
        store: PolicyStore,
        keys: LogKeys,
        chain_id: str,
        max_batch_records: int,
        max_wait_ms: float,
        max_queue_records: int,
        write_retry: RetryPolicy,
        sealer: DecisionSealer,
    ) -> None:
        if write_retry.until_cancelled:
            raise ValueError("policy.decision_log.write_retry.maximum_attempts must be >= 1")
        self._store = store
        self._keys = keys
        # Names are sealed in what is stored; the hash, the chain and the
        # signature cover the record as stored.
        self._sealer = sealer
        self.chain_id = chain_id
        self._max_batch = max_batch_records
        self._max_wait_s = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue_records)
        self._task: asyncio.Task[None] | None = None
        self._backfill: asyncio.Task[None] | None = None
        self._stopping = False
        # Another writer (another chain) may take an idempotency key between
        # our check and our insert: the retry sees it and answers with it.
        self._write_retrying = write_retry.retrying(
            is_unique_violation,
            "decision log append (an idempotency key was logged meanwhile)",
            log,
            logging.INFO,
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="decision-log-writer")
        if self._backfill is None:
            self._stopping = False
            self._backfill = asyncio.create_task(
                self._backfill_in_background(), name="decision-search-backfill"
            )

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait([self._task])
        self._task = None
        if self._backfill is not None:
            # Its thread cannot be cancelled: it sees _stopping after the
            # page it is on, so the store is not closed under it.
            await self._backfill
            self._backfill = None

    async def _backfill_in_background(self) -> None:
        try:
            indexed = await asyncio.to_thread(self.backfill_search, BACKFILL_PAGE_RECORDS)
        except Exception:
            # Old decisions stay findable by id; the next start tries again.
            log.exception("decision search backfill failed")
            return
        if indexed:
            log.info("decision search: indexed %d decisions logged before it existed", indexed)

    def backfill_search(self, page_records: int) -> int:
        """Indexes for ListDecisions every logged decision decision_search
        lacks (those logged before it existed), one page at a time, then
        records that it is done so later starts skip the pass. Replicas may
        run it at once: a row another indexed is left as it is. Returns how
        many decisions it indexed."""
        if self._store.search_backfilled():
            return 0
        indexed = 0
        after = ("", 0)
        while not self._stopping:
            rows = self._store.unindexed_page(after, page_records)
            if not rows:
                self._store.mark_search_backfilled(indexed)
                break
            opened = [(self._sealer.open(record_decoder.decode(r.body)), r) for r in rows]
            self._store.index_decisions([self._search_row(record, r) for record, r in opened])
            indexed += len(rows)
            after = (rows[-1].chain_id, rows[-1].seq)
        return indexed

    async def append(
        self,
        record: DecisionRecord,
        request_hash: str,
        recorded_at_us: int,
        case: CaseRow | None,
        deadline: Deadline | None = None,
    ) -> AppendResult:
        """Logs a record. A record still queued when `deadline` passes, or
        whose caller went away (cancelled), is never written."""
        if self._task is None:
            raise Unavailable("DECISION_LOG_STOPPED", "the decision log is not running")
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(
                _Pending(record, request_hash, recorded_at_us, case, future, deadline)
            )
        except asyncio.QueueFull:
            raise ResourceExhausted(
                "DECISION_LOG_QUEUE_FULL", "too many decisions waiting to be logged"
            ) from None
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()  # still queued: the writer skips it
            raise

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + self._max_wait_s
            while len(batch) < self._max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            batch = self._still_wanted(batch)
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self._write_with_retries, batch)
            except Exception as exc:
                log.exception("decision log append failed")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(
                            Unavailable("DECISION_LOG_UNAVAILABLE", f"decision log: {exc}")
                        )
                continue
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)

    @staticmethod
    def _still_wanted(batch: list[_Pending]) -> list[_Pending]:
        """The batch less what nobody waits for: callers gone, deadlines past
        (answered DEADLINE_EXCEEDED here, before anything is written)."""
        wanted = []
        for pending in batch:
            if pending.future.done():
                continue
            if pending.deadline is not None and pending.deadline.expired():
                pending.future.set_exception(
                    DeadlineExceeded(
                        "DEADLINE_EXCEEDED",
                        "deadline passed while the decision waited for the log; nothing was logged",
                    )
                )
                continue
            wanted.append(pending)
        return wanted

    def _write_with_retries(self, batch: list[_Pending]) -> list[AppendResult]:
        results: list[AppendResult] = self._write_retrying(self._write, batch)
        return results

    def _write(self, batch: list[_Pending]) -> list[AppendResult]:
        results: list[AppendResult] = []
        new_rows: list[LogRow] = []
        search: list[SearchRow] = []
        cases: list[CaseRow] = []
        in_batch: dict[tuple[str, str], LogRow] = {}
        with self._store.db.tx() as tx:
            # The head as committed, locked until this transaction ends: another
            # writer of this chain waits here, then chains after these records.
            head_mark = self._store.lock_head(tx, self.chain_id)
            seq = head_mark.seq if head_mark else 0
            prev_hash = head_mark.record_hash if head_mark else GENESIS_HASH
            logged = self._store.find_many_by_idempotency(
                tx, [(p.record.input.tenant_id, p.record.input.idempotency_key) for p in batch]
            )
            for pending in batch:
                inp = pending.record.input
                key = (inp.tenant_id, inp.idempotency_key)
                existing = in_batch.get(key) or logged.get(key)
                if existing is not None:
                    results.append(AppendResult(existing, existing=True))
                    continue
                seq += 1
                row = self._row(pending, seq, prev_hash)
                prev_hash = row.record_hash
                new_rows.append(row)
                search.append(self._search_row(pending.record, row))
                in_batch[key] = row
                if pending.case is not None:
                    cases.append(pending.case)
                results.append(AppendResult(row, existing=False))
            if new_rows:
                head = ChainMark(
                    seq,
                    prev_hash,
                    self._keys.sign(mark_text(self.chain_id, "head", seq, prev_hash)),
                )
                self._store.insert_log_rows(tx, new_rows, head, cases, search)
        return results

    def _search_row(self, record: DecisionRecord, row: LogRow) -> SearchRow:
        """What ListDecisions finds the record by: its customer's id and the
        token of its customer's name (never the name itself)."""
        payment = record.input.payment
        return SearchRow(
            decision_id=row.decision_id,
            tenant_id=row.tenant_id,
            recorded_at_us=row.recorded_at_us,
            account_id=row.account_id,
            customer_id=payment.customer_id,
            customer_token=self._sealer.token(row.tenant_id, payment.customer.name),
            chain_id=row.chain_id,
            seq=row.seq,
        )

    def _row(self, pending: _Pending, seq: int, prev_hash: str) -> LogRow:
        record = pending.record
        body = canonical_encoder.encode(self._sealer.seal(record)).decode()
        digest = record_hash(
            self.chain_id, seq, prev_hash, pending.recorded_at_us, pending.request_hash, body
        )
        return LogRow(
            chain_id=self.chain_id,
            seq=seq,
            decision_id=record.decision_id,
            tenant_id=record.input.tenant_id,
            account_id=record.input.payment.account_id,
            idempotency_key=record.input.idempotency_key,
            request_hash=pending.request_hash,
            recorded_at_us=pending.recorded_at_us,
            bundle_version=record.bundle_version,
            outcome=record.verdict.outcome,
            body=body,
            prev_hash=prev_hash,
            record_hash=digest,
            key_id=self._keys.key_id,
            signature=self._keys.sign(digest),
        )

    def purge_expired(self, cutoff_us: int, page_records: int) -> int:
        """Deletes every chain's prefix recorded before cutoff_us, leaving an
        anchor on each: a replica purges the chains of writers gone too."""
        return sum(
            self._purge_chain(chain_id, cutoff_us, page_records)
            for chain_id in self._store.chain_ids(with_rows=False)
        )

    def _purge_chain(self, chain_id: str, cutoff_us: int, page_records: int) -> int:
        anchor = self._store.chain_mark(chain_id, "anchor")
        after = anchor.seq if anchor else 0
        last: LogRow | None = None
        while True:
            page = self._store.chain_page(chain_id, after, page_records)
            old = [r for r in page if r.recorded_at_us < cutoff_us]
            prefix = old if len(old) == len(page) else _prefix_before(page, cutoff_us)
            if prefix:
                last = prefix[-1]
            if len(prefix) < len(page) or not page:
                break
            after = page[-1].seq
        if last is None:
            return 0
        text = mark_text(chain_id, "anchor", last.seq, last.record_hash)
        mark = ChainMark(last.seq, last.record_hash, self._keys.sign(text))
        return self._store.purge_until(chain_id, last.seq, mark)


def _prefix_before(page: list[LogRow], cutoff_us: int) -> list[LogRow]:
    prefix: list[LogRow] = []
    for row in page:
        if row.recorded_at_us >= cutoff_us:
            break
        prefix.append(row)
    return prefix


@dataclass(frozen=True, slots=True)
class VerifyResult:
    valid: bool
    records_checked: int
    first_bad_sequence: int = 0
    problem: str = ""
    detail: str = ""


def _check_row(row: LogRow, expected_seq: int, prev_hash: str, keys: LogKeys) -> tuple[str, str]:
    """("", "") when the row is sound, else (problem, detail)."""
    if row.seq != expected_seq:
        return "RECORD_MISSING", f"expected sequence {expected_seq}, found {row.seq}"
    if row.prev_hash != prev_hash:
        return "CHAIN_BROKEN", "record does not link to the one before it"
    digest = record_hash(
        row.chain_id, row.seq, row.prev_hash, row.recorded_at_us, row.request_hash, row.body
    )
    if digest != row.record_hash:
        return "RECORD_ALTERED", "record content does not match its hash"
    try:
        record = record_decoder.decode(row.body)
    except Exception as exc:
        return "RECORD_ALTERED", f"record body unreadable: {exc}"
    columns = (row.decision_id, row.tenant_id, row.account_id, row.idempotency_key)
    body = (
        record.decision_id,
        record.input.tenant_id,
        record.input.payment.account_id,
        record.input.idempotency_key,
    )
    if columns != body or (row.bundle_version, row.outcome) != (
        record.bundle_version,
        record.verdict.outcome,
    ):
        return "RECORD_ALTERED", "indexed columns differ from the signed body"
    if row.key_id and not keys.knows(row.key_id):
        return "UNKNOWN_KEY", (
            f"record signed by key {row.key_id}, not among the log's keys "
            "(an earlier key belongs in keys.decision_log_public_keys)"
        )
    if not keys.verify(row.record_hash, row.signature, row.key_id):
        return "BAD_SIGNATURE", "record signature does not verify"
    return "", ""


def verify_chain(
    store: PolicyStore, keys: LogKeys, chain_id: str, page_records: int
) -> VerifyResult:
    anchor = store.chain_mark(chain_id, "anchor")
    seq, prev_hash = 0, GENESIS_HASH
    if anchor is not None:
        if not keys.verify(
            mark_text(chain_id, "anchor", anchor.seq, anchor.record_hash), anchor.signature
        ):
            return VerifyResult(False, 0, anchor.seq, "BAD_ANCHOR", "retention anchor not signed")
        seq, prev_hash = anchor.seq, anchor.record_hash
    checked = 0
    while True:
        page = store.chain_page(chain_id, seq, page_records)
        for row in page:
            problem, detail = _check_row(row, seq + 1, prev_hash, keys)
            if problem:
                return VerifyResult(False, checked, seq + 1, problem, detail)
            seq, prev_hash = row.seq, row.record_hash
            checked += 1
        if len(page) < page_records:
            break
    return _check_head(store, keys, chain_id, checked, seq, prev_hash)


def verify_all(store: PolicyStore, keys: LogKeys, page_records: int) -> VerifyResult:
    """Every chain in the store (each writer's), verified together: valid
    when each is; the first broken one is reported, its id in the detail."""
    checked = 0
    for chain_id in store.chain_ids(with_rows=True):
        result = verify_chain(store, keys, chain_id, page_records)
        checked += result.records_checked
        if not result.valid:
            return VerifyResult(
                False,
                checked,
                result.first_bad_sequence,
                result.problem,
                f"chain {chain_id}: {result.detail}",
            )
    return VerifyResult(True, checked)


def _check_head(
    store: PolicyStore, keys: LogKeys, chain_id: str, checked: int, seq: int, prev_hash: str
) -> VerifyResult:
    head = store.chain_mark(chain_id, "head")
    if head is None:
        if checked == 0:
            return VerifyResult(True, 0)
        return VerifyResult(False, checked, seq, "HEAD_MISSING", "no signed head mark")
    if not keys.verify(mark_text(chain_id, "head", head.seq, head.record_hash), head.signature):
        return VerifyResult(False, checked, head.seq, "BAD_HEAD", "head mark not signed")
    if (head.seq, head.record_hash) != (seq, prev_hash):
        return VerifyResult(
            False, checked, seq + 1, "RECORD_MISSING", f"chain ends at {seq}, head is {head.seq}"
        )
    return VerifyResult(True, checked)
