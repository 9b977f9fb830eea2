"""The dev stack gives the gateway a certificate port when none is
configured (`triplane up`, `make demo`), and the console, handed the same
config, reaches the gateway there: its Deliveries page answers from the
gateway's DeliveryAdminService instead of GATEWAY_ADDRESS_UNSET."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from console.auth import hash_password
from console.store import ConsoleStore
from triplane.runtime.config import load_config
from triplane.runtime.net import free_port
from triplane_tools.stack import Stack, describe

from .conftest import clean_env

PASSWORD = "a long stack password"


async def test_the_stack_gives_the_gateway_an_admin_port_the_console_uses(
    tmp_path: Path,
) -> None:
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(tmp_path)},
            "gateway": {"listen": f"127.0.0.1:{free_port()}"},
            "console": {"listen": f"127.0.0.1:{free_port()}"},
        },
    )
    assert not config.gateway.admin_listen  # the shipped default: none
    store = ConsoleStore.from_config(config)
    store.add_user("sam", hash_password(PASSWORD), ["sre"], 0)
    store.close()
    async with Stack(config, planes=["gateway", "console"], environ=clean_env()) as stack:
        admin = stack.config.gateway.admin_listen
        assert admin.startswith("127.0.0.1:") and admin != stack.config.gateway.listen
        assert f"gateway adm {admin}" in describe(stack)
        url = f"http://{stack.addresses['console']}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            form = (await client.get("/login")).text
            token = re.search(r'name="csrf_token" value="([^"]+)"', form)
            assert token
            signed = await client.post(
                "/login",
                data={"username": "sam", "password": PASSWORD, "csrf_token": token.group(1)},
            )
            assert signed.status_code == 303
            page = await client.get("/deliveries", params={"tenant": "acme"})
            assert page.headers.get("x-triplane-reason") != "GATEWAY_ADDRESS_UNSET", page.text
            assert page.status_code == 200, page.text
