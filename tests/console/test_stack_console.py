"""The console as the stack runs it (`triplane up`): its own process, its own
certificate (spiffe://triplane/console), the config handed down by the
supervisor; a reviewer signs in over HTTP and the queue comes from the
policy plane through the console's identity."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import httpx
import pytest

from console.auth import hash_password
from console.store import ConsoleStore
from triplane.policy.v1 import policy_pb2 as pb
from triplane.policy.v1 import policy_pb2_grpc
from triplane.runtime.config import load_config
from triplane.runtime.net import free_port
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import CONSOLE
from triplane_tools.stack import Stack, describe

from .conftest import clean_env


async def test_the_stack_starts_the_console(tmp_path: Path) -> None:
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(tmp_path)},
            "policy": {"listen": f"127.0.0.1:{free_port()}"},
            "console": {"listen": f"127.0.0.1:{free_port()}"},
        },
    )
    store = ConsoleStore.from_config(config)
    store.add_user("rita", hash_password("a long stack password"), ["reviewer"], 0)
    store.close()
    async with Stack(config, planes=["policy", "console"], environ=clean_env()) as stack:
        assert (tmp_path / "tls" / "console.crt").is_file()
        url = f"http://{stack.addresses['console']}"
        assert f"console     {url}/" in describe(stack)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.get("/healthz")).text == "ok"
            form = (await client.get("/login")).text
            token = re.search(r'name="csrf_token" value="([^"]+)"', form)
            assert token
            signed = await client.post(
                "/login",
                data={
                    "username": "rita",
                    "password": "a long stack password",
                    "csrf_token": token.group(1),
                },
            )
            assert signed.status_code == 303
            # The tenant does not exist: the policy plane's own answer (with
            # its reason and field), which it gives only to an identity it
            # lets call ListCases (another would be PERMISSION_DENIED).
            queue = await client.get("/cases", params={"tenant": "nobody"})
            assert queue.status_code == 404, queue.text
            assert queue.headers["x-triplane-reason"] == "TENANT_NOT_FOUND"
            assert queue.headers["x-triplane-field"] == "tenant_id"
        # Default deny: the console's certificate calls nothing else.
        async with stack.channel("policy", identity=CONSOLE) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await policy_pb2_grpc.PolicyServiceStub(channel).CreateTenant(
                    pb.CreateTenantRequest(tenant_id="console-made"), timeout=10
                )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert parse_rpc_error(refused.value)[0] == "IDENTITY_NOT_ALLOWED"
