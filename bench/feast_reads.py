"""Feast's online read latency, for bench/ai.py (run with the Feast venv's
Python: Feast pins protobuf<7, which the planes' environment cannot share).

Input (argv[1], JSON): {"entities": {kind: [ids...]}, "features": {kind: [names]},
"values": {kind: {id: [values...]}}, "requests": [[account, device, merchant]...]}.
Output (stdout, JSON): {"latencies_ms": [...], "feast_version": "..."}.

A local provider with the SQLite online store; values are written with
`write_to_online_store`, reads are `get_online_features` for one payment's
three entities at a time, exactly what a scorer needs per request.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import feast
import pandas as pd
from feast import Entity, FeatureStore, FeatureView, Field, FileSource
from feast.types import Float64

JOIN_KEYS = {"acct": "account_id", "dev": "device_id", "merch": "merchant_id"}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    repo = Path(tempfile.mkdtemp(prefix="feast_bench_"))
    (repo / "data").mkdir()
    (repo / "feature_store.yaml").write_text(
        "project: triplane_bench\n"
        "registry: data/registry.db\n"
        "provider: local\n"
        "online_store:\n  type: sqlite\n  path: data/online.db\n"
        "entity_key_serialization_version: 3\n"
    )
    now = datetime.now(tz=UTC)
    objects: list[object] = []
    frames: dict[str, pd.DataFrame] = {}
    for kind, names in spec["features"].items():
        key = JOIN_KEYS[kind]
        rows = [
            {key: entity_id, "event_timestamp": now, **dict(zip(names, values, strict=True))}
            for entity_id, values in spec["values"][kind].items()
        ]
        frame = pd.DataFrame(rows)
        path = repo / "data" / f"{kind}.parquet"
        frame.to_parquet(path)
        entity = Entity(name=kind, join_keys=[key])
        view = FeatureView(
            name=f"{kind}_features",
            entities=[entity],
            schema=[Field(name=n, dtype=Float64) for n in names],
            source=FileSource(path=str(path), timestamp_field="event_timestamp"),
            online=True,
            ttl=timedelta(days=1),
        )
        objects += [entity, view]
        frames[f"{kind}_features"] = frame
    store = FeatureStore(repo_path=str(repo))
    store.apply(objects)
    for view_name, frame in frames.items():
        store.write_to_online_store(view_name, frame)
    refs = [f"{kind}_features:{n}" for kind, names in spec["features"].items() for n in names]
    latencies: list[float] = []
    for account, device, merchant in spec["requests"]:
        row = {"account_id": account, "device_id": device, "merchant_id": merchant}
        started = time.perf_counter()
        store.get_online_features(features=refs, entity_rows=[row]).to_dict()
        latencies.append((time.perf_counter() - started) * 1000)
    print(json.dumps({"latencies_ms": latencies, "feast_version": feast.__version__}))


if __name__ == "__main__":
    main()
