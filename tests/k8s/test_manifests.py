"""What the rendered manifests promise beyond their schemas (make k8s-check
validates those with kubernetes-validate and checkov): every plane has its
own token-less ServiceAccount, a PodDisruptionBudget, a CPU autoscaler, a
scraped metrics port that its config serves, and sits behind a default-deny
NetworkPolicy; the namespace enforces the restricted Pod Security standard."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.tools import require_tool
from triplane.runtime.config import load_config

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["k8s/base", "k8s/overlays/production"]
PLANES = {
    "gateway": ("gateway", 50051),
    "money-plane": ("money", 50061),
    "policy-plane": ("policy", 50062),
    "ai-plane": ("ai", 50063),
}
# The operator console: HTTP for operators (behind the Ingress), a client of
# the planes; a Deployment like theirs.
CONSOLE = {"console": ("console", 8080)}
DEPLOYED = {**PLANES, **CONSOLE}
METRICS_PORT = 9464


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


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _render(str(request.param))


def _of(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_namespace_enforces_restricted_pod_security(objects: list[dict[str, Any]]) -> None:
    labels = _of(objects, "Namespace")["triplane"]["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


def test_every_plane_runs_as_its_own_tokenless_service_account(
    objects: list[dict[str, Any]],
) -> None:
    accounts = _of(objects, "ServiceAccount")
    for name, deployment in _of(objects, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == name
        assert pod["automountServiceAccountToken"] is False
        assert accounts[name]["automountServiceAccountToken"] is False


def test_every_plane_has_a_disruption_budget_and_a_cpu_autoscaler(
    objects: list[dict[str, Any]],
) -> None:
    deployments = _of(objects, "Deployment")
    assert set(deployments) == set(DEPLOYED)
    assert set(_of(objects, "PodDisruptionBudget")) == set(DEPLOYED)
    hpas = _of(objects, "HorizontalPodAutoscaler")
    assert set(hpas) == set(DEPLOYED)
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        # The autoscaler never goes below what the overlay deploys.
        assert hpa["spec"]["minReplicas"] == deployments[name]["spec"]["replicas"]


def test_the_ai_plane_scales_only_where_its_state_is_shared(
    objects: list[dict[str, Any]],
) -> None:
    # More than one AI replica needs shared features (not in process) and a
    # shared registry; the base's config has neither.
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")
    features = yaml.safe_load(config_map["data"]["config.yaml"])["ai"].get("features", {})
    hpa = _of(objects, "HorizontalPodAutoscaler")["ai-plane"]
    if features.get("backend", "in_process") == "in_process":
        assert hpa["spec"]["maxReplicas"] == 1
    else:
        assert hpa["spec"]["maxReplicas"] > 1


def test_the_config_each_overlay_ships_loads_and_matches_its_ai_replicas(
    objects: list[dict[str, Any]],
) -> None:
    """The ConfigMap through the real loader, with the environment the pods
    get (the DSNs from Secrets): a config the runtime refuses would crash
    every pod; and the AI plane is told how many replicas it runs, so the
    runtime's refusal of per-pod state applies."""
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")
    data = yaml.safe_load(config_map["data"]["config.yaml"])
    ai_env = {
        e["name"]: e.get("value", "")
        for e in _of(objects, "Deployment")["ai-plane"]["spec"]["template"]["spec"]["containers"][
            0
        ].get("env", [])
    }
    environ = {name: "host=pg dbname=x" for name in ai_env if name.endswith("_DSN")}
    # Settings given in the AI plane's environment (TRIPLANE__AI__...).
    environ.update({k: v for k, v in ai_env.items() if k.startswith("TRIPLANE__")})
    config = load_config(environ=environ, overrides=data)
    deployed = _of(objects, "Deployment")["ai-plane"]["spec"]["replicas"]
    hpa = _of(objects, "HorizontalPodAutoscaler")["ai-plane"]["spec"]
    if hpa["maxReplicas"] > 1:
        assert config.ai.replicas == deployed > 1
        assert config.ai.registry.backend == "postgres"
        assert "TRIPLANE_AI_DSN" in ai_env


def test_every_plane_serves_and_advertises_its_metrics(objects: list[dict[str, Any]]) -> None:
    config_maps = [o for o in objects if o["kind"] == "ConfigMap"]
    assert len(config_maps) == 1
    config = yaml.safe_load(config_maps[0]["data"]["config.yaml"])
    for name, deployment in _of(objects, "Deployment").items():
        section, _ = DEPLOYED[name]
        assert config[section]["metrics_listen"] == f"0.0.0.0:{METRICS_PORT}"
        template = deployment["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(METRICS_PORT)
        assert annotations["prometheus.io/path"] == "/metrics"
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == METRICS_PORT


def test_containers_are_locked_down(objects: list[dict[str, Any]]) -> None:
    for deployment in _of(objects, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert set(container["resources"]) == {"requests", "limits"}


def _allows(policy: dict[str, Any], direction: str, port: int) -> bool:
    for rule in policy["spec"].get(direction, []):
        if any(p.get("port") == port for p in rule.get("ports", [])):
            return True
    return False


def test_network_is_denied_but_for_the_calls_the_architecture_makes(
    objects: list[dict[str, Any]],
) -> None:
    policies = _of(objects, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {}
    assert sorted(deny["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny and "egress" not in deny
    gateway = policies["gateway"]
    for name, (_, port) in PLANES.items():
        policy = policies[name]
        assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        assert _allows(policy, "ingress", port)
        if name != "gateway":
            # Only the gateway (and the admin tools) call a plane.
            sources = [s for r in policy["spec"]["ingress"] for s in r["from"]]
            assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}} in (
                sources
            )
            assert all("namespaceSelector" not in s for s in sources)
            assert _allows(gateway, "egress", port)
        # The health port is never opened to other pods.
        assert not _allows(policy, "ingress", 8081)
        if name != "gateway":
            # The console calls the planes (its certificate decides what).
            assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "console"}}} in (
                [s for r in policy["spec"]["ingress"] for s in r["from"]]
            )
            assert _allows(policies["console"], "egress", port)
    console = policies["console"]
    assert _allows(console, "ingress", 8080)
    assert not any(_allows(console, "ingress", port) for _, port in PLANES.values())
    assert not _allows(gateway, "egress", 8080)
    scrape = policies["allow-prometheus-scrape"]
    assert _allows(scrape, "ingress", METRICS_PORT)
