"""Every RPC of every plane, found in the generated contracts: each
`triplane/<plane>/v1/*_pb2.py` module's services, so an RPC (or a service)
added to a contract is fuzzed without editing the suite."""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.descriptor import Descriptor, ServiceDescriptor

import triplane

# The stack's plane serving each contract package (`triplane.<name>.v1`).
PLANE_OF_PACKAGE = {
    "triplane.money.v1": "money",
    "triplane.policy.v1": "policy",
    "triplane.ai.v1": "ai",
    "triplane.gateway.v1": "gateway",
}


@dataclass(frozen=True, slots=True)
class Target:
    """One RPC: the plane that serves it, its path and its messages."""

    plane: str
    service: str  # full name, triplane.money.v1.LedgerService
    method: str
    input_type: Descriptor
    output_type: Descriptor

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def test_id(self) -> str:
        return f"{self.plane}-{self.service.rsplit('.', 1)[1]}.{self.method}"


def contract_modules() -> list[str]:
    """Every generated message module under triplane/<package>/v<n>/."""
    root = Path(triplane.__file__).parent
    names: list[str] = []
    for package in sorted(p for p in root.iterdir() if (p / "v1").is_dir()):
        for info in pkgutil.iter_modules([str(package / "v1")]):
            if info.name.endswith("_pb2"):
                names.append(f"triplane.{package.name}.v1.{info.name}")
    return names


def services() -> list[ServiceDescriptor]:
    found: list[ServiceDescriptor] = []
    for name in contract_modules():
        module = importlib.import_module(name)
        found.extend(module.DESCRIPTOR.services_by_name.values())
    return sorted(found, key=lambda service: service.full_name)


def targets() -> list[Target]:
    """Every method of every service, with its plane (a KeyError names a
    contract package no plane serves: add it to PLANE_OF_PACKAGE)."""
    return [
        Target(
            PLANE_OF_PACKAGE[service.file.package],
            service.full_name,
            method.name,
            method.input_type,
            method.output_type,
        )
        for service in services()
        for method in service.methods
    ]


def cases_of(target: Target, every: list[Target], per_plane: int) -> int:
    """The cases `target` gets of its plane's `per_plane`, from the contracts
    alone, so an RPC replays alone (`-k`) with the cases it had in the whole
    run. A request without fields has one value (Hypothesis stops after it):
    it gets one case and its plane's other RPCs share the rest, so a plane
    gets at least `per_plane`."""
    if not target.input_type.fields:
        return 1
    sharing = sum(1 for t in every if t.plane == target.plane and t.input_type.fields)
    return math.ceil(per_plane / sharing)
