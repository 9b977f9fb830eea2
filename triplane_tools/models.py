"""The AI plane's models from the synthetic world: datasets and bootstrap.

The AI plane trains on dataset files and serves what its registry says is
live; it never imports the simulator. This module sits above both: it writes
the datasets (triplane_sim replays the world through the plane's own feature
definitions) and bootstraps the registry, so an embedded stack starts with
working models and nothing downloaded. The dev supervisor calls
`ensure_bootstrap_models` before it starts the AI plane when
`ai.models.bootstrap_train` is on; `triplane ai bootstrap` does the same (a
Kubernetes init container can run it against the plane's state volume).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from ai_plane.app import datasets_dir
from ai_plane.cli import SubParsers, run
from ai_plane.features import FEATURE_SET_VERSION
from ai_plane.manager import make_live, train_into
from ai_plane.registry import ModelRecord, open_registry
from ai_plane.training import MODEL_FEATURES, dataset_lineage, dataset_path, write_dataset
from triplane.runtime.clock import SystemClock
from triplane.runtime.config import Config
from triplane_sim import datasets, synth

log = logging.getLogger("triplane.tools.models")


def _is_current(path: Path, seed: int, customers: int, days: int) -> bool:
    """Whether `path` holds the dataset these settings would write now."""
    found = dataset_lineage(path)
    if found is None:
        return False
    wanted = {
        "generator_version": synth.GENERATOR_VERSION,
        "generator_seed": seed,
        "customers": customers,
        "days": days,
        "feature_set_version": FEATURE_SET_VERSION,
    }
    return all(found.get(key) == value for key, value in wanted.items())


def write_datasets(
    config: Config, seed: int = 0, models: Iterable[str] = tuple(MODEL_FEATURES)
) -> list[Path]:
    """Writes each model's dataset for generator seed `seed` (0: ai.models.seed)
    where TrainModel reads it, unless an identical one is already there."""
    settings = config.ai.models
    seed = seed or settings.seed
    written: list[Path] = []
    for model in models:
        path = dataset_path(datasets_dir(config), model, seed)
        if not _is_current(path, seed, settings.training_customers, settings.training_days):
            dataset = datasets.build(
                model, seed, settings.training_customers, settings.training_days
            )
            write_dataset(path, dataset)
            log.info("wrote %s (%d rows)", path, len(dataset.y))
        written.append(path)
    return written


def ensure_bootstrap_models(config: Config) -> dict[str, ModelRecord]:
    """Every model has a live version: those without one are trained on the
    synthetic world of ai.models.seed and promoted. Idempotent; returns the
    live record of each model."""
    registry = open_registry(config, SystemClock())
    try:
        missing = [model for model in MODEL_FEATURES if registry.live(model) is None]
        if missing:
            write_datasets(config, config.ai.models.seed, missing)
        for model in missing:
            record, _ = train_into(registry, config.ai, datasets_dir(config), model)
            record = make_live(registry, record)
            log.info("bootstrapped %s v%d", model, record.version)
        live: dict[str, ModelRecord] = {}
        for model in MODEL_FEATURES:
            found = registry.live(model)
            assert found is not None, model
            live[model] = found
        return live
    finally:
        registry.close()


# ---- `triplane ai bootstrap`, `triplane ai datasets` ----


def _bootstrap(config: Config, args: argparse.Namespace) -> int:
    live = ensure_bootstrap_models(config)
    print(json.dumps({m: {"version": r.version, "state": str(r.state)} for m, r in live.items()}))
    return 0


def _datasets(config: Config, args: argparse.Namespace) -> int:
    paths = write_datasets(config, args.seed)
    print(json.dumps([str(p) for p in paths]))
    return 0


def register(commands: SubParsers) -> None:
    """Adds the commands that need the synthetic world to `triplane ai`."""
    bootstrap = commands.add_parser(
        "bootstrap",
        help="train and promote every model without a live version (synthetic data; "
        "what the dev supervisor runs before starting the AI plane)",
    )
    bootstrap.set_defaults(func=lambda args: run(args, _bootstrap))
    written = commands.add_parser(
        "datasets", help="write the synthetic training datasets that `ai train` reads"
    )
    written.add_argument("--seed", type=int, default=0, help="default: ai.models.seed")
    written.set_defaults(func=lambda args: run(args, _datasets))
