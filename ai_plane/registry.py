"""The model registry: versions, artifacts, lineage, metrics, approval states
and the rollback pointer, persisted as one JSON document plus artifact files.

States move draft -> approved -> live -> retired. Going live records the
previous live version as the rollback pointer and retires it; a rollback makes
that pointer live again. Only the registry's own transitions change states;
serving (Triton, the in-process copy) follows what the registry says is live.

An artifact whose hash no longer matches its record is refused loudly: a
corrupt model is never served.
"""

from __future__ import annotations

import enum
import hashlib
import os
from pathlib import Path

import msgspec

from triplane.runtime.clock import Clock
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


class _Document(msgspec.Struct):
    models: dict[str, list[ModelRecord]] = msgspec.field(default_factory=dict)


class Registry:
    """File-backed; every change is written atomically (temp file + rename)."""

    def __init__(self, root: Path, clock: Clock) -> None:
        self.root = root
        self._clock = clock
        self._path = root / "registry.json"
        root.mkdir(parents=True, exist_ok=True)
        self._doc = self._load()

    def _load(self) -> _Document:
        if not self._path.exists():
            return _Document()
        return msgspec.json.decode(self._path.read_bytes(), type=_Document)

    def reload(self) -> None:
        """Re-reads the file (another process, e.g. the CLI, may have trained)."""
        self._doc = self._load()

    def _save(self) -> None:
        tmp = self._path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.format(msgspec.json.encode(self._doc)))
        os.replace(tmp, self._path)

    def artifact_path(self, model: str, version: int) -> Path:
        return self.root / "artifacts" / model / str(version) / "model.txt"

    def versions(self, model: str = "") -> list[ModelRecord]:
        if model:
            return list(self._doc.models.get(model, []))
        return [r for name in sorted(self._doc.models) for r in self._doc.models[name]]

    def get(self, model: str, version: int = 0) -> ModelRecord:
        """`version` 0: the live one."""
        for record in self._doc.models.get(model, []):
            if (version == 0 and record.state is ModelState.LIVE) or record.version == version:
                return record
        what = "live version" if version == 0 else f"version {version}"
        raise NotFound("MODEL_VERSION_NOT_FOUND", f"{model}: no {what}", "version")

    def live(self, model: str) -> ModelRecord | None:
        try:
            return self.get(model)
        except NotFound:
            return None

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
        records = self._doc.models.setdefault(model, [])
        for record in records:
            if record.artifact_sha256 == digest:
                return record, False
        version = max((r.version for r in records), default=0) + 1
        path = self.artifact_path(model, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(artifact_text)
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
        self._save()
        return record, True

    def artifact_text(self, model: str, version: int) -> str:
        record = self.get(model, version)
        text = self.artifact_path(model, version).read_text()
        actual = hashlib.sha256(text.encode()).hexdigest()
        if actual != record.artifact_sha256:
            raise FailedPrecondition(
                "MODEL_ARTIFACT_CORRUPT",
                f"{model} v{version}: artifact hash {actual[:12]} != registered "
                f"{record.artifact_sha256[:12]}",
                "version",
            )
        return text

    def check_transition(self, model: str, version: int, target: ModelState) -> ModelRecord:
        """The record, if `target` is a legal next state for it; else refused."""
        record = self.get(model, version)
        if target not in _TRANSITIONS[record.state]:
            raise FailedPrecondition(
                "MODEL_STATE_TRANSITION_REFUSED",
                f"{model} v{version}: {record.state} -> {target} is not allowed",
                "target_state",
            )
        return record

    def transition(self, model: str, version: int, target: ModelState) -> ModelRecord:
        """Applies a checked transition; going live retires the old live one
        and points the new one's rollback at it."""
        record = self.check_transition(model, version, target)
        if target is ModelState.LIVE:
            previous = self.live(model)
            if previous is not None:
                previous.state = ModelState.RETIRED
                record.rollback_version = previous.version
        record.state = target
        self._save()
        return record

    def rollback_target(self, model: str) -> tuple[ModelRecord, ModelRecord]:
        """(current live, the version a rollback makes live)."""
        live = self.get(model)
        if live.rollback_version == 0:
            raise FailedPrecondition(
                "NO_ROLLBACK_TARGET",
                f"{model} v{live.version} has no previous live version",
                "model",
            )
        return live, self.get(model, live.rollback_version)

    def rollback(self, model: str) -> ModelRecord:
        live, target = self.rollback_target(model)
        live.state = ModelState.RETIRED
        target.state = ModelState.LIVE
        self._save()
        return target


def parse_state(name: str) -> ModelState:
    try:
        return ModelState(name.lower())
    except ValueError as exc:
        raise InvalidArgument(
            "UNKNOWN_MODEL_STATE", f"unknown model state {name!r}", "target_state"
        ) from exc
