"""Helpers of the AI plane tests (importable, unlike conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ai_plane.app import registry_dir
from ai_plane.manager import write_live_repository
from ai_plane.registry import Registry
from ai_plane.triton import ModelRepository, TritonProcess, TritonUnavailable, find_dist
from tests.conftest import _loud_skip
from tests.tls_helpers import dev_certificates
from triplane.ai.v1 import ai_pb2 as pb
from triplane.common.v1 import types_pb2
from triplane.runtime.clock import SystemClock
from triplane.runtime.config import Config, load_config
from triplane_tools.models import ensure_bootstrap_models

# Small synthetic world: training takes about a second. A roomy Triton budget:
# the 2-core machine is shared, and tests that want timeouts set their own.
TEST_AI: dict[str, Any] = {
    "triton": {"score_timeout_ms": 250},
    "models": {"training_customers": 300, "training_days": 7, "num_boost_round": 40},
    "pipeline": {"enabled": False},
    "drift": {"update_every_scores": 50},
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = deep_merge(base[key], value)
        else:
            merged[key] = value
    return merged


def ai_config(state_dir: Path, ai: dict[str, Any] | None = None, nats_url: str = "") -> Config:
    """The test config of a plane on `state_dir`, whose dev CA and
    certificates it creates (mutual TLS is on, as in the dev stack); no NATS
    unless `nats_url`."""
    dev_certificates(state_dir)
    overrides = {"runtime": {"state_dir": str(state_dir)}, "nats": {"url": nats_url}}
    merged_ai = deep_merge(TEST_AI, ai or {})
    return load_config(environ={}, overrides={**overrides, "ai": merged_ai})


def require_triton() -> None:
    """Triton tests need the tritonserver binary (nvidia-pytriton): missing,
    they fail under CI=true and are skipped loudly elsewhere."""
    try:
        find_dist()
    except TritonUnavailable as exc:
        _loud_skip("Triton tests", str(exc))


def bootstrapped(config: Config) -> Config:
    """`config` once its state dir holds live models, trained and promoted by
    the same bootstrap the dev supervisor runs before it starts the plane."""
    ensure_bootstrap_models(config)
    return config


def start_triton(root: Path, config: Config) -> TritonProcess:
    """A tritonserver over a repository holding freshly trained live models
    (bootstrapped into `config`'s state dir)."""
    require_triton()
    registry = Registry(registry_dir(bootstrapped(config)), SystemClock())
    repository = ModelRepository(root / "repository")
    write_live_repository(registry, repository, config.ai)
    process = TritonProcess(repository, root / "work", config.ai.triton)
    process.start()
    return process


def payment(
    tenant_id: str = "t1",
    account_id: str = "acct_000001",
    amount_minor: int = 12_000,
    **extra: Any,
) -> pb.PaymentContext:
    return pb.PaymentContext(
        tenant_id=tenant_id,
        account_id=account_id,
        device_id=extra.pop("device_id", "dev_1"),
        merchant_id=extra.pop("merchant_id", "mer_1"),
        amount=types_pb2.Money(amount_minor=amount_minor, currency="USD"),
        merchant_category=extra.pop("merchant_category", "5816"),
        channel=pb.CHANNEL_ECOMMERCE,
        **extra,
    )
