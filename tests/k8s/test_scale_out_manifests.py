"""What the scale-out manifests promise beyond their schemas:

- the AI plane's pod runs Triton as a native sidecar that the plane's config
  points at (its gRPC port, the model repository both containers mount), in
  explicit model control, probed on Triton's own health endpoints;
- the production overlay gives the money plane alone its shard map, each
  shard's DSN a file of a mounted Secret, and the config then loads with
  those shards; every plane reaches NATS through a list of the cluster's
  nodes;
- the custom-metrics overlay scales the gateway on a metric that the
  prometheus-adapter rules serve, from a series the planes export, with CPU
  kept first."""

from __future__ import annotations

import posixpath
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.tools import require_tool
from triplane.runtime.bus import nats_servers
from triplane.runtime.config import load_config
from triplane.runtime.metrics import PROCESS_REGISTRY

ROOT = Path(__file__).resolve().parents[2]


def _render(overlay: str) -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl", "kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", overlay],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _deployment(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name)


def _config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")
    data = yaml.safe_load(config_map["data"]["config.yaml"])
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module", params=["k8s/base", "k8s/overlays/production"])
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _render(str(request.param))


@pytest.fixture(scope="module")
def production() -> list[dict[str, Any]]:
    return _render("k8s/overlays/production")


def _arg(args: list[str], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(f"{flag}=")]


def test_the_ai_plane_runs_triton_as_a_sidecar_it_is_configured_for(
    objects: list[dict[str, Any]],
) -> None:
    pod = _deployment(objects, "ai-plane")["spec"]["template"]["spec"]
    sidecars = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    assert [c["name"] for c in sidecars] == ["triton"]
    triton = sidecars[0]
    assert triton["command"] == ["tritonserver"]
    args = triton["args"]
    assert _arg(args, "--model-control-mode") == ["explicit"]
    # A restarted Triton loads what the plane wrote into the shared repository.
    assert _arg(args, "--load-model") == ["*"]
    for probe in ("startupProbe", "readinessProbe"):
        assert triton[probe]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    http_port = int(_arg(args, "--http-port")[0])
    assert {triton[p]["httpGet"]["port"] for p in ("startupProbe", "livenessProbe")} == {http_port}

    ai = _config(objects)["ai"]
    # The plane dials this Triton, on loopback, at its gRPC port.
    assert ai["triton_url"] == f"127.0.0.1:{_arg(args, '--grpc-port')[0]}"
    assert _arg(args, "--grpc-address") == ["127.0.0.1"]
    # Both containers mount one volume at the repository path.
    repository = _arg(args, "--model-repository")[0]
    assert ai["triton_repository"] == repository
    plane = next(c for c in pod["containers"] if c["name"] == "ai-plane")
    mounts = {
        container["name"]: {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        for container in (plane, triton)
    }
    assert mounts["ai-plane"][repository] == mounts["triton"][repository]
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["triton"][repository])
    assert "emptyDir" in volume
    # The Triton image is the one the Dockerfile's `triton` target builds from
    # the official image of the Triton release the project runs.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:24\.10-py3 AS triton$", dockerfile, re.M)
    assert "triton" in triton["image"]


def test_production_gives_the_money_plane_alone_its_shard_map(
    production: list[dict[str, Any]],
) -> None:
    pod = _deployment(production, "money-plane")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "TRIPLANE_MONEY_DSN" not in env
    shards = yaml.safe_load(env["TRIPLANE__MONEY__STORE__SHARDS"])
    assert [s["name"] for s in shards] == ["s1", "s2"]
    # Each DSN is a file of the Secret triplane-money-shards, mounted here.
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    for shard in shards:
        directory, key = posixpath.split(shard["postgres_dsn_file"])
        assert key == shard["name"]
        assert secrets[mounts[directory]] == "triplane-money-shards"
    # Only the money plane sees the shards' DSNs.
    for name in ("gateway", "policy-plane", "ai-plane"):
        other = _deployment(production, name)["spec"]["template"]["spec"]
        assert all(
            v.get("secret", {}).get("secretName") != "triplane-money-shards"
            for v in other["volumes"]
        )
    # The money plane's config loads with them (a DSN variable per shard
    # stands in for the files, which only exist in the pod).
    environ = _pod_environ(_deployment(production, "money-plane"))
    config = load_config(environ=environ, overrides=_config(production))
    assert config.money.store.backend == "postgres"
    assert [s.name for s in config.money.store.shards] == ["s1", "s2"]
    # ... and every other plane loads the same file without them.
    gateway = _pod_environ(_deployment(production, "gateway"))
    assert load_config(environ=gateway, overrides=_config(production)).money.store.shards == []


def _pod_environ(deployment: dict[str, Any]) -> dict[str, str]:
    """The plane container's environment as the pod gets it: a value from a
    Secret (a DSN) stands in as a DSN; a money shard's DSN file, which only
    exists in the pod, as its TRIPLANE_MONEY_DSN_<NAME> variable."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    environ: dict[str, str] = {}
    for entry in container.get("env", []):
        name = entry["name"]
        if name == "TRIPLANE_CONFIG" or not name.startswith("TRIPLANE"):
            continue
        environ[name] = entry.get("value", "host=pg dbname=x")
    for shard in yaml.safe_load(environ.get("TRIPLANE__MONEY__STORE__SHARDS", "[]")):
        environ[f"TRIPLANE_MONEY_DSN_{shard['name'].upper()}"] = "host=pg dbname=x"
    return environ


def test_every_plane_loads_the_config_with_its_own_environment(
    objects: list[dict[str, Any]],
) -> None:
    """Every plane reads the one ConfigMap with its own environment: a
    setting that needs another plane's secret (a registry DSN, the shards')
    must not be in the shared file, or the runtime refuses that plane."""
    data = _config(objects)
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert len(deployments) == 5  # the four planes and the console
    for deployment in deployments:
        load_config(environ=_pod_environ(deployment), overrides=data)


def test_production_reaches_every_nats_node(production: list[dict[str, Any]]) -> None:
    servers = nats_servers(_config(production)["nats"]["url"])
    assert len(servers) == 3
    assert all(server.startswith("tls://") for server in servers)


def test_the_gateway_scales_on_a_custom_metric_the_adapter_serves() -> None:
    objects = _render("k8s/overlays/custom-metrics")
    hpa = next(
        o
        for o in objects
        if o["kind"] == "HorizontalPodAutoscaler" and o["metadata"]["name"] == "gateway"
    )
    metrics = hpa["spec"]["metrics"]
    assert metrics[0]["resource"]["name"] == "cpu"  # CPU stays the default
    pods = [m["pods"] for m in metrics if m["type"] == "Pods"]
    assert len(pods) == 1
    name = pods[0]["metric"]["name"]
    assert pods[0]["metric"]["selector"]["matchLabels"] == {"plane": "gateway"}
    # The other planes keep CPU alone.
    for other in objects:
        if other["kind"] == "HorizontalPodAutoscaler" and other is not hpa:
            assert [m["type"] for m in other["spec"]["metrics"]] == ["Resource"]

    adapter = yaml.safe_load((ROOT / "k8s/observability/prometheus-adapter.yaml").read_text())
    rules = [r for r in adapter["rules"]["custom"] if r["name"]["as"] == name]
    assert len(rules) == 1
    rule = rules[0]
    series = re.match(r"^([a-z_:]+)\{", rule["seriesQuery"])
    assert series is not None
    assert re.fullmatch(rule["name"]["matches"], series.group(1))
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # A series the planes export: the RED counter every plane's server
    # registers (triplane/runtime/metrics.py), exposed with `_total`.
    exported = {
        f"{family.name}_total" for family in PROCESS_REGISTRY.collect() if family.type == "counter"
    }
    assert series.group(1) in exported
