"""The model registry: versions, artifacts, lineage, metrics, approval states
and the rollback pointer.

Three backends (ai.registry.backend): `file`, one JSON document plus artifact
files under the state dir (the embedded default, one pod's own); `sqlite` and
`postgres`, through the runtime's storage layer (triplane/runtime/db.py), with
the artifact bytes in the database beside their record, so any replica on the
same database can materialize any version into its own Triton repository. A
database registry opened empty imports an existing registry.json next to it.

States move draft -> approved -> live -> retired. Going live records the
previous live version as the rollback pointer and retires it; a rollback makes
that pointer live again. Only the registry's own transitions change states;
serving (Triton, the in-process copy) follows what the registry says is live.
Every change bumps a generation number in the same transaction (and, on a
database, the row lock on it serializes replicas' changes); replicas poll it
and follow a new live version (ai_plane/manager.py, RegistryFollower).

An artifact whose hash no longer matches its record is refused loudly: a
corrupt model is never served.

The registry also keeps each model's drift history (ai_plane/drift.py): PSI
points keyed by model, version, series and time slot, written by whichever
replica recomputed them (the same slot twice: the later write wins) and
bounded to the last `keep` slots per model: table ai_drift_points on a
database, drift.json beside registry.json for the file backend. It is not
part of the generation: recording a point moves no replica's serving.
"""

from __future__ import annotations

import enum
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from ai_plane.drift import DriftPoint
from triplane.runtime.clock import Clock
from triplane.runtime.config import Config
from triplane.runtime.db import Database, Row
from triplane.runtime.errors import FailedPrecondition, InvalidArgument, NotFound


class ModelState(enum.StrEnum):
    DRAFT = "draft"
    APPROVED = "approved"
    LIVE = "live"
    RETIRED = "retired"


# Allowed transitions by request (rollback has its own path).
_TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    ModelState.DRAFT: frozenset({ModelState.APPROVED, ModelState.RETIRED}),
    ModelState.APPROVED: frozenset({ModelState.LIVE, ModelState.RETIRED}),
    ModelState.LIVE: frozenset({ModelState.RETIRED}),
    ModelState.RETIRED: frozenset({ModelState.APPROVED}),
}


class Approval(msgspec.Struct, kw_only=True):
    """One recorded move of a version: the state it moved to (a rollback:
    live, with `rollback`), who asked and why (empty when the caller sent
    neither), and when."""

    state: ModelState
    actor: str = ""
    reason: str = ""
    at_us: int = 0
    rollback: bool = False


class ModelRecord(msgspec.Struct, kw_only=True):
    model: str
    version: int
    state: ModelState
    artifact_sha256: str
    lineage: dict[str, str | int]
    metrics: dict[str, float]
    feature_names: list[str]
    created_at_us: int
    rollback_version: int = 0
    # Drift baselines on held-out data: series -> [bin edges, expected fractions].
    baselines: dict[str, list[list[float]]] = msgspec.field(default_factory=dict)
    # Who approved each move of this version and why, oldest first.
    approvals: list[Approval] = msgspec.field(default_factory=list)


class _Document(msgspec.Struct):
    models: dict[str, list[ModelRecord]] = msgspec.field(default_factory=dict)


class _Change:
    """What one mutation wrote: the document (changed in place) and the
    artifacts of the versions it added."""

    def __init__(self, doc: _Document) -> None:
        self.doc = doc
        self.artifacts: dict[tuple[str, int], str] = {}


class _FileStore:
    """registry.json (temp file + rename) and artifacts/<model>/<v>/model.txt."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "registry.json"
        root.mkdir(parents=True, exist_ok=True)
        # drift.json is read, merged and replaced: one writer at a time.
        self._drift_lock = threading.Lock()

    def load(self) -> _Document:
        if not self.path.exists():
            return _Document()
        return msgspec.json.decode(self.path.read_bytes(), type=_Document)

    def artifact_path(self, model: str, version: int) -> Path:
        return self.root / "artifacts" / model / str(version) / "model.txt"

    @contextmanager
    def change(self) -> Iterator[_Change]:
        change = _Change(self.load())
        yield change
        for (model, version), text in change.artifacts.items():
            path = self.artifact_path(model, version)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.format(msgspec.json.encode(change.doc)))
        os.replace(tmp, self.path)

    def artifact(self, model: str, version: int) -> str:
        return self.artifact_path(model, version).read_text()

    def generation(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def _drift_points(self) -> list[DriftPoint]:
        path = self.root / "drift.json"
        if not path.exists():
            return []
        return [DriftPoint(*row) for row in msgspec.json.decode(path.read_bytes(), type=list[_Row])]

    def record_drift(self, points: list[DriftPoint], keep: int) -> None:
        with self._drift_lock:
            merged = {(p.model, p.version, p.series, p.slot): p for p in self._drift_points()}
            merged.update({(p.model, p.version, p.series, p.slot): p for p in points})
            newest: dict[str, int] = {}
            for point in merged.values():
                newest[point.model] = max(newest.get(point.model, point.slot), point.slot)
            kept = [p for p in merged.values() if p.slot > newest[p.model] - keep]
            tmp = self.root / "drift.tmp"
            tmp.write_bytes(msgspec.json.encode([tuple(p) for p in kept]))
            os.replace(tmp, self.root / "drift.json")

    def drift_history(self, model: str, version: int) -> list[DriftPoint]:
        return sorted(
            (p for p in self._drift_points() if p.model == model and p.version == version),
            key=lambda p: (p.series, p.slot),
        )

    def close(self) -> None:
        pass


_Row = tuple[str, int, str, int, int, float]


_DDL = """
CREATE TABLE IF NOT EXISTS ai_model_versions (
    model TEXT NOT NULL,
    version BIGINT NOT NULL,
    state TEXT NOT NULL,
    record TEXT NOT NULL,
    artifact {blob} NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS ai_registry_generation (
    id BIGINT PRIMARY KEY,
    generation BIGINT NOT NULL
);
INSERT INTO ai_registry_generation (id, generation) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS ai_drift_points (
    model TEXT NOT NULL,
    version BIGINT NOT NULL,
    series TEXT NOT NULL,
    slot BIGINT NOT NULL,
    at_us BIGINT NOT NULL,
    psi DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (model, version, series, slot)
)
"""


class _DatabaseStore:
    """Tables ai_model_versions (record as JSON, artifact bytes) and
    ai_registry_generation (one row, bumped by every change)."""

    def __init__(self, db: Database, legacy: Path | None) -> None:
        self.db = db
        db.migrate(_DDL.format(blob=db.blob_type))
        if legacy is not None and (legacy / "registry.json").exists():
            self._import(_FileStore(legacy))

    def _import(self, old: _FileStore) -> None:
        """A file registry found next to an empty database registry moves in
        (versions, states and artifacts as they are; hashes checked)."""
        with self.change() as change:
            if change.doc.models:
                return
            change.doc = old.load()
            for records in change.doc.models.values():
                for record in records:
                    text = old.artifact(record.model, record.version)
                    digest = hashlib.sha256(text.encode()).hexdigest()
                    if digest != record.artifact_sha256:
                        raise FailedPrecondition(
                            "MODEL_ARTIFACT_CORRUPT",
                            f"{record.model} v{record.version} in {old.path}: artifact hash "
                            f"{digest[:12]} != registered {record.artifact_sha256[:12]}",
                            "version",
                        )
                    change.artifacts[(record.model, record.version)] = text

    @staticmethod
    def _decode(rows: list[Row]) -> _Document:
        doc = _Document()
        for (raw,) in rows:
            record = msgspec.json.decode(raw, type=ModelRecord)
            doc.models.setdefault(record.model, []).append(record)
        return doc

    _SELECT = "SELECT record FROM ai_model_versions ORDER BY model, version"

    def load(self) -> _Document:
        with self.db.read() as tx:
            return self._decode(tx.all(self._SELECT))

    @contextmanager
    def change(self) -> Iterator[_Change]:
        with self.db.tx() as tx:
            # The row lock serializes changes from every replica (SQLite's
            # BEGIN IMMEDIATE already does); the read below sees the latest.
            tx.execute("UPDATE ai_registry_generation SET generation = generation + 1 WHERE id = 1")
            change = _Change(self._decode(tx.all(self._SELECT)))
            yield change
            for records in change.doc.models.values():
                for record in records:
                    key = (record.model, record.version)
                    encoded = msgspec.json.encode(record).decode()
                    if key in change.artifacts:
                        tx.execute(
                            "INSERT INTO ai_model_versions (model, version, state, record, "
                            "artifact) VALUES (?, ?, ?, ?, ?)",
                            (*key, str(record.state), encoded, change.artifacts[key].encode()),
                        )
                    else:
                        tx.execute(
                            "UPDATE ai_model_versions SET state = ?, record = ? "
                            "WHERE model = ? AND version = ?",
                            (str(record.state), encoded, *key),
                        )

    def artifact(self, model: str, version: int) -> str:
        row = self.db.read_one(
            "SELECT artifact FROM ai_model_versions WHERE model = ? AND version = ?",
            (model, version),
        )
        if row is None:
            raise NotFound("MODEL_VERSION_NOT_FOUND", f"{model}: no version {version}", "version")
        return bytes(row[0]).decode()

    def generation(self) -> int:
        row = self.db.read_one("SELECT generation FROM ai_registry_generation WHERE id = 1")
        return int(row[0]) if row is not None else 0

    def record_drift(self, points: list[DriftPoint], keep: int) -> None:
        with self.db.tx() as tx:
            for point in points:
                tx.execute(
                    "INSERT INTO ai_drift_points (model, version, series, slot, at_us, psi) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (model, version, series, slot) "
                    "DO UPDATE SET at_us = excluded.at_us, psi = excluded.psi",
                    tuple(point),
                )
            for model in sorted({p.model for p in points}):
                newest = tx.one("SELECT MAX(slot) FROM ai_drift_points WHERE model = ?", (model,))
                assert newest is not None
                tx.execute(
                    "DELETE FROM ai_drift_points WHERE model = ? AND slot <= ?",
                    (model, int(newest[0]) - keep),
                )

    def drift_history(self, model: str, version: int) -> list[DriftPoint]:
        with self.db.read() as tx:
            rows = tx.all(
                "SELECT model, version, series, slot, at_us, psi FROM ai_drift_points "
                "WHERE model = ? AND version = ? ORDER BY series, slot",
                (model, version),
            )
        return [
            DriftPoint(str(m), int(v), str(s), int(slot), int(at), float(value))
            for m, v, s, slot, at, value in rows
        ]

    def close(self) -> None:
        self.db.close()


class Registry:
    """Reads come from the last loaded copy (`reload()` refreshes it); every
    change re-reads the stored registry, applies itself and writes, in one
    transaction on a database (temp file + rename for the file)."""

    def __init__(
        self,
        root: Path,
        clock: Clock,
        backend: str = "file",
        db: Database | None = None,
    ) -> None:
        self.root = root
        self.backend = backend
        self._clock = clock
        self._store: _FileStore | _DatabaseStore
        if backend == "file":
            self._store = _FileStore(root)
        else:
            assert db is not None, "a database registry needs its database"
            self._store = _DatabaseStore(db, root)
        self._doc = self._store.load()

    def reload(self) -> None:
        """Re-reads the stored registry (another process or replica may have
        trained or promoted)."""
        self._doc = self._store.load()

    def generation(self) -> int:
        """Changes with every change of the stored registry (cheap to poll)."""
        return self._store.generation()

    def close(self) -> None:
        self._store.close()

    def artifact_path(self, model: str, version: int) -> Path:
        """The artifact file of the file backend."""
        assert isinstance(self._store, _FileStore), "artifacts are in the database"
        return self._store.artifact_path(model, version)

    def versions(self, model: str = "") -> list[ModelRecord]:
        if model:
            return list(self._doc.models.get(model, []))
        return [r for name in sorted(self._doc.models) for r in self._doc.models[name]]

    @staticmethod
    def _find(doc: _Document, model: str, version: int) -> ModelRecord:
        for record in doc.models.get(model, []):
            if (version == 0 and record.state is ModelState.LIVE) or record.version == version:
                return record
        what = "live version" if version == 0 else f"version {version}"
        raise NotFound("MODEL_VERSION_NOT_FOUND", f"{model}: no {what}", "version")

    def get(self, model: str, version: int = 0) -> ModelRecord:
        """`version` 0: the live one."""
        return self._find(self._doc, model, version)

    def live(self, model: str) -> ModelRecord | None:
        try:
            return self.get(model)
        except NotFound:
            return None

    @contextmanager
    def _change(self) -> Iterator[_Document]:
        with self._store.change() as change:
            yield change.doc
        self._doc = change.doc

    def register(
        self,
        model: str,
        artifact_text: str,
        lineage: dict[str, str | int],
        metrics: dict[str, float],
        feature_names: list[str],
        baselines: dict[str, list[list[float]]],
    ) -> tuple[ModelRecord, bool]:
        """A new draft; an identical artifact already registered is returned
        as is (training is deterministic, so a retrain is idempotent)."""
        digest = hashlib.sha256(artifact_text.encode()).hexdigest()
        self.reload()
        for record in self._doc.models.get(model, []):
            if record.artifact_sha256 == digest:
                return record, False
        with self._store.change() as change:
            records = change.doc.models.setdefault(model, [])
            for record in records:
                if record.artifact_sha256 == digest:  # registered meanwhile
                    self._doc = change.doc
                    return record, False
            version = max((r.version for r in records), default=0) + 1
            record = ModelRecord(
                model=model,
                version=version,
                state=ModelState.DRAFT,
                artifact_sha256=digest,
                lineage=lineage,
                metrics=metrics,
                feature_names=feature_names,
                created_at_us=self._clock.now_us(),
                baselines=baselines,
            )
            records.append(record)
            change.artifacts[(model, version)] = artifact_text
        self._doc = change.doc
        return record, True

    def artifact_text(self, model: str, version: int) -> str:
        record = self.get(model, version)
        text = self._store.artifact(model, version)
        actual = hashlib.sha256(text.encode()).hexdigest()
        if actual != record.artifact_sha256:
            raise FailedPrecondition(
                "MODEL_ARTIFACT_CORRUPT",
                f"{model} v{version}: artifact hash {actual[:12]} != registered "
                f"{record.artifact_sha256[:12]}",
                "version",
            )
        return text

    @staticmethod
    def _checked(doc: _Document, model: str, version: int, target: ModelState) -> ModelRecord:
        record = Registry._find(doc, model, version)
        if target not in _TRANSITIONS[record.state]:
            raise FailedPrecondition(
                "MODEL_STATE_TRANSITION_REFUSED",
                f"{model} v{version}: {record.state} -> {target} is not allowed",
                "target_state",
            )
        return record

    def check_transition(self, model: str, version: int, target: ModelState) -> ModelRecord:
        """The record, if `target` is a legal next state for it; else refused."""
        return self._checked(self._doc, model, version, target)

    def transition(
        self, model: str, version: int, target: ModelState, actor: str = "", reason: str = ""
    ) -> ModelRecord:
        """Applies a checked transition (checked again on the stored registry),
        recording who approved it and why on the version; going live retires
        the old live one and points the new one's rollback at it."""
        with self._change() as doc:
            record = self._checked(doc, model, version, target)
            if target is ModelState.LIVE:
                for previous in doc.models.get(model, []):
                    if previous.state is ModelState.LIVE:
                        previous.state = ModelState.RETIRED
                        record.rollback_version = previous.version
            record.state = target
            record.approvals.append(
                Approval(state=target, actor=actor, reason=reason, at_us=self._clock.now_us())
            )
        return record

    @staticmethod
    def _rollback_pair(doc: _Document, model: str) -> tuple[ModelRecord, ModelRecord]:
        live = Registry._find(doc, model, 0)
        if live.rollback_version == 0:
            raise FailedPrecondition(
                "NO_ROLLBACK_TARGET",
                f"{model} v{live.version} has no previous live version",
                "model",
            )
        return live, Registry._find(doc, model, live.rollback_version)

    def rollback_target(self, model: str) -> tuple[ModelRecord, ModelRecord]:
        """(current live, the version a rollback makes live)."""
        return self._rollback_pair(self._doc, model)

    def record_drift(self, points: list[DriftPoint], keep: int) -> None:
        """Writes drift history points (one per model, version, series and
        slot: a slot written again takes the later value) and drops each
        written model's points older than its newest `keep` slots."""
        if points:
            self._store.record_drift(points, keep)

    def drift_history(self, model: str, version: int) -> dict[str, list[DriftPoint]]:
        """A version's drift history per series, oldest first, as recorded by
        any replica on this registry's store."""
        history: dict[str, list[DriftPoint]] = {}
        for point in self._store.drift_history(model, version):
            history.setdefault(point.series, []).append(point)
        return history

    def rollback(self, model: str, actor: str = "", reason: str = "") -> ModelRecord:
        """Makes the rollback pointer live again, recording who asked and why
        on the version made live."""
        with self._change() as doc:
            live, target = self._rollback_pair(doc, model)
            live.state = ModelState.RETIRED
            target.state = ModelState.LIVE
            target.approvals.append(
                Approval(
                    state=ModelState.LIVE,
                    actor=actor,
                    reason=reason,
                    at_us=self._clock.now_us(),
                    rollback=True,
                )
            )
        return target


def open_registry(config: Config, clock: Clock) -> Registry:
    """The registry ai.registry names: its file under the state dir, or its
    database (SQLite under the state dir, or PostgreSQL)."""
    models = Path(config.ai.models.dir)
    root = (models if models.is_absolute() else config.state_path / models) / "registry"
    settings = config.ai.registry
    if settings.backend == "file":
        return Registry(root, clock)
    if settings.backend == "sqlite":
        path = Path(settings.sqlite_path)
        target = str(path if path.is_absolute() else root / path)
    else:
        target = settings.postgres_dsn
    return Registry(root, clock, settings.backend, Database(settings.backend, target, readers=1))


def parse_state(name: str) -> ModelState:
    try:
        return ModelState(name.lower())
    except ValueError as exc:
        raise InvalidArgument(
            "UNKNOWN_MODEL_STATE", f"unknown model state {name!r}", "target_state"
        ) from exc
