"""The sandbox bank as an optional plane of the dev stack: `triplane up`
(Stack(optional=True)) and a stack naming it start it, waiting for its HTTP
health; other stacks keep to the planes."""

from __future__ import annotations

from pathlib import Path

from sandbox_helpers import BankClient

from triplane.runtime.config import load_config
from triplane.runtime.net import free_port
from triplane_tools.stack import Stack


def test_optional_plane_is_left_out_unless_asked(tmp_path: Path) -> None:
    config = load_config(environ={}, overrides={"runtime": {"state_dir": str(tmp_path)}})
    names = [p.name for p in Stack(config)._selected_planes()]
    assert "sandbox_bank" not in names
    names = [p.name for p in Stack(config, optional=True)._selected_planes()]
    assert names[-1] == "sandbox_bank"
    assert Stack(config, replicas=2, optional=True).replica_count("sandbox_bank") == 1


async def test_stack_starts_and_stops_the_sandbox_bank(tmp_path: Path) -> None:
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(tmp_path)},
            "sandbox_bank": {"listen": f"127.0.0.1:{free_port()}", "clock": "manual"},
        },
    )
    async with Stack(config, planes=["sandbox_bank"]) as stack:
        address = stack.addresses["sandbox_bank"]
        client = BankClient(f"http://{address}")
        try:
            assert (await client.json("/healthz"))["status"] == "serving"
            assert (await client.json("/v1/truth"))["payments"] == []
        finally:
            await client.aclose()
        process = stack.process_of("sandbox_bank")
    assert not process.running()
