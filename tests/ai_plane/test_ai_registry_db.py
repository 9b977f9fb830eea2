"""The model registry on the runtime's storage layer (SQLite and PostgreSQL):
the same states and rollback pointer as the file registry, artifact bytes in
the database (so another replica's registry, opened on the same database,
reads them), a generation that moves with every change, an existing
registry.json imported, and the config guard on replicas."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ai_plane.manager import make_live
from ai_plane.registry import ModelState, Registry, open_registry
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import ConfigError, load_config
from triplane.runtime.db import Database
from triplane.runtime.errors import FailedPrecondition


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    if request.param == "sqlite":
        yield "sqlite", str(tmp_path / "registry.db")
    else:
        yield "postgres", request.getfixturevalue("pg_dsn")


def _open(root: Path, target: tuple[str, str]) -> Registry:
    backend, where = target
    return Registry(root, ManualClock(), backend, Database(backend, where, readers=1))


def _register(registry: Registry, text: str, model: str = "m") -> int:
    record, _ = registry.register(model, text, {"generator_seed": 1}, {"roc_auc": 0.9}, ["f"], {})
    return record.version


def test_two_replicas_share_versions_states_and_artifacts(
    tmp_path: Path, target: tuple[str, str]
) -> None:
    a, b = _open(tmp_path / "a", target), _open(tmp_path / "b", target)
    try:
        start = b.generation()
        v1, v2 = _register(a, "model one"), _register(a, "model two")
        assert (v1, v2) == (1, 2)
        assert _register(b, "model one") == 1  # same artifact, either replica: same version
        assert b.generation() != start
        b.reload()
        assert b.artifact_text("m", v2) == "model two"  # bytes from the database, not a file
        a.transition("m", v1, ModelState.APPROVED)
        a.transition("m", v1, ModelState.LIVE)
        b.transition("m", v2, ModelState.APPROVED)  # checked on the stored registry
        live = b.transition("m", v2, ModelState.LIVE)
        assert live.rollback_version == v1
        a.reload()
        assert a.get("m").version == v2 and a.get("m", v1).state is ModelState.RETIRED
        assert a.rollback("m").version == v1
        b.reload()
        assert b.get("m").version == v1 and b.get("m", v2).state is ModelState.RETIRED
        with pytest.raises(FailedPrecondition) as refused:
            b.transition("m", v2, ModelState.LIVE)  # retired: approve first
        assert refused.value.reason == "MODEL_STATE_TRANSITION_REFUSED"
    finally:
        a.close()
        b.close()


def test_concurrent_registrations_get_distinct_versions(
    tmp_path: Path, target: tuple[str, str]
) -> None:
    registries = [_open(tmp_path / str(i), target) for i in range(4)]
    try:
        threads = [
            threading.Thread(target=_register, args=(r, f"artifact {i}"))
            for i, r in enumerate(registries)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        registries[0].reload()
        versions = registries[0].versions("m")
        assert sorted(r.version for r in versions) == [1, 2, 3, 4]
        assert {registries[0].artifact_text("m", r.version) for r in versions} == {
            f"artifact {i}" for i in range(4)
        }
    finally:
        for registry in registries:
            registry.close()


def test_replicas_bootstrapping_at_once_both_end_on_one_live_version(
    tmp_path: Path, target: tuple[str, str]
) -> None:
    a, b = _open(tmp_path / "a", target), _open(tmp_path / "b", target)
    try:
        _register(a, "bootstrap")
        stale_a, _ = a.register("m", "bootstrap", {}, {}, ["f"], {})
        stale_b, _ = b.register("m", "bootstrap", {}, {}, ["f"], {})
        assert stale_a.state is stale_b.state is ModelState.DRAFT
        assert make_live(a, stale_a).state is ModelState.LIVE
        assert make_live(b, stale_b).version == stale_a.version  # moved on by A: left live
        b.reload()
        assert b.get("m").version == stale_a.version and b.get("m").rollback_version == 0
    finally:
        a.close()
        b.close()


def test_a_corrupt_artifact_in_the_database_is_refused(tmp_path: Path) -> None:
    registry = _open(tmp_path, ("sqlite", str(tmp_path / "registry.db")))
    try:
        version = _register(registry, "model text")
        with registry._store.db.tx() as tx:  # type: ignore[union-attr]
            tx.execute("UPDATE ai_model_versions SET artifact = ?", (b"tampered",))
        with pytest.raises(FailedPrecondition) as caught:
            registry.artifact_text("m", version)
        assert caught.value.reason == "MODEL_ARTIFACT_CORRUPT"
    finally:
        registry.close()


def test_an_existing_file_registry_is_imported(tmp_path: Path) -> None:
    config = load_config(
        environ={},
        overrides={"runtime": {"state_dir": str(tmp_path)}, "nats": {"url": ""}},
    )
    old = open_registry(config, ManualClock())
    assert old.backend == "file"
    v1, v2 = _register(old, "first"), _register(old, "second")
    old.transition("m", v1, ModelState.APPROVED)
    old.transition("m", v1, ModelState.LIVE)
    sqlite = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(tmp_path)},
            "nats": {"url": ""},
            "ai": {"registry": {"backend": "sqlite"}},
        },
    )
    new = open_registry(sqlite, ManualClock())
    try:
        assert new.backend == "sqlite" and new.get("m").version == v1
        assert new.artifact_text("m", v2) == "second"
        assert (new.root / "registry.db").exists()
    finally:
        new.close()
    again = open_registry(sqlite, ManualClock())  # not imported twice
    try:
        assert [r.version for r in again.versions("m")] == [v1, v2]
    finally:
        again.close()


def _config(ai: dict[str, object], environ: dict[str, str] | None = None) -> None:
    load_config(environ=environ or {}, overrides={"ai": ai})


def test_in_process_features_refuse_more_than_one_replica() -> None:
    with pytest.raises(ConfigError, match=r"ai\.features\.backend 'in_process' with ai\.replicas"):
        _config({"replicas": 3, "registry": {"backend": "postgres", "postgres_dsn": "x"}})
    with pytest.raises(ConfigError, match=r"ai\.registry\.backend 'file' with ai\.replicas"):
        _config({"replicas": 2, "features": {"backend": "redis"}})
    _config({"replicas": 2, "features": {"backend": "redis"}}, {"TRIPLANE_AI_DSN": "dbname=x"})
    _config({"replicas": 1})


def test_triplane_ai_dsn_selects_postgres() -> None:
    config = load_config(environ={"TRIPLANE_AI_DSN": "host=db dbname=ai"})
    assert config.ai.registry.backend == "postgres"
    assert config.ai.registry.postgres_dsn == "host=db dbname=ai"
    assert load_config(environ={}).ai.registry.backend == "file"
