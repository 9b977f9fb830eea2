"""Mutual TLS and the permission tables, through a real money plane on a free
port (SQLite, no NATS) with the dev CA under the test's state dir: who gets
in at the handshake, who gets which method, certificates rotated on disk
under a running server and under a running client, the plaintext health
port, reflection off, `runtime.tls: off`, and a plane without a certificate
refusing to start."""

from __future__ import annotations

import asyncio
import datetime
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from money_plane import permissions as money_permissions
from money_plane.app import MoneyPlane
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.runtime import authz
from triplane.runtime.config import Config, load_config
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import (
    ADMIN,
    CA_CERT_FILE,
    GATEWAY,
    MONEY_PLANE,
    RotatingChannel,
    TlsFiles,
    TlsSetupError,
    open_channel,
    tls_dir,
)
from triplane_tools.certs import (
    Authority,
    ensure_dev_certificates,
    issue,
    load_authority,
    new_authority,
    write_pair,
)

from ..tls_helpers import identity_files, partner_files

CALL_TIMEOUT_S = 10.0


def plane_config(state_dir: Path, **runtime: Any) -> Config:
    return load_config(
        environ={},
        overrides={"runtime": {"state_dir": str(state_dir), **runtime}, "nats": {"url": ""}},
    )


async def start_money(config: Config) -> MoneyPlane:
    plane = MoneyPlane(config, listen="127.0.0.1:0")
    await plane.start(sweepers=False, relay=False)
    return plane


@pytest.fixture
async def money(state_dir: Path) -> AsyncIterator[MoneyPlane]:
    """A money plane with mutual TLS on and the dev certificates."""
    ensure_dev_certificates(state_dir, plane_config(state_dir).runtime.tls)
    plane = await start_money(plane_config(state_dir))
    try:
        yield plane
    finally:
        await plane.stop()


def address_of(plane: MoneyPlane) -> str:
    assert plane.server is not None
    return f"127.0.0.1:{plane.server.port}"


async def create_tenant(channel: grpc.aio.Channel, tenant_id: str) -> money_pb2.Tenant:
    stub = money_pb2_grpc.LedgerServiceStub(channel)
    answer: money_pb2.CreateTenantResponse = await stub.CreateTenant(
        money_pb2.CreateTenantRequest(tenant_id=tenant_id, display_name="tls"),
        timeout=CALL_TIMEOUT_S,
    )
    return answer.tenant


async def create_tenant_as(address: str, files: TlsFiles | None, tenant_id: str) -> Any:
    """CreateTenant over a fresh connection with `files`; the tenant or the error."""
    async with open_channel(address, files) as channel:
        try:
            return await create_tenant(channel, tenant_id)
        except grpc.aio.AioRpcError as error:
            return error


def refused_at_handshake(outcome: Any) -> bool:
    """No call got through: the connection never came up (UNAVAILABLE, no
    reason from a Triplane server, as a TLS handshake refused shows)."""
    return (
        isinstance(outcome, grpc.aio.AioRpcError)
        and outcome.code() == grpc.StatusCode.UNAVAILABLE
        and parse_rpc_error(outcome) == ("", "")
    )


def write_identity(
    authority: Authority, directory: Path, name: str, identity_uri: str, **issue_args: Any
) -> TlsFiles:
    certificate, key = issue(authority, identity_uri, **issue_args)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    write_pair(cert_path, key_path, certificate, key)
    return TlsFiles(ca_path=directory / "trusted-ca.crt", cert_path=cert_path, key_path=key_path)


def trust(directory: Path, *authorities: Authority) -> Path:
    path = directory / "trusted-ca.crt"
    path.write_bytes(
        b"".join(a.certificate.public_bytes(serialization.Encoding.PEM) for a in authorities)
    )
    return path


# ---- who gets in ----


async def test_the_admin_identity_is_served(money: MoneyPlane, state_dir: Path) -> None:
    tenant = await create_tenant_as(address_of(money), identity_files(state_dir), "tls-admin")
    assert isinstance(tenant, money_pb2.Tenant) and tenant.tenant_id == "tls-admin"


async def test_a_client_without_a_certificate_is_refused_at_the_handshake(
    money: MoneyPlane, state_dir: Path
) -> None:
    address = address_of(money)
    assert refused_at_handshake(
        await create_tenant_as(address, partner_files(state_dir), "tls-no-cert")
    )
    # Plaintext does not get in either.
    assert refused_at_handshake(await create_tenant_as(address, None, "tls-plaintext"))


async def test_the_gateways_certificate_on_an_admin_rpc_is_permission_denied(
    money: MoneyPlane, state_dir: Path
) -> None:
    address = address_of(money)
    outcome = await create_tenant_as(address, identity_files(state_dir, GATEWAY), "tls-gw")
    assert isinstance(outcome, grpc.aio.AioRpcError)
    assert outcome.code() == grpc.StatusCode.PERMISSION_DENIED
    assert parse_rpc_error(outcome)[0] == "IDENTITY_NOT_ALLOWED"
    assert "spiffe://triplane/gateway" in (outcome.details() or "")
    # Nothing was created: the admin sees no such tenant being there already.
    tenant = await create_tenant_as(address, identity_files(state_dir), "tls-gw")
    assert isinstance(tenant, money_pb2.Tenant)


async def test_the_gateway_passes_the_table_on_what_it_calls(
    money: MoneyPlane, state_dir: Path
) -> None:
    """GetBalance is the gateway's: the call reaches the ledger, which answers
    for itself (an unknown tenant), not the permission table."""
    async with open_channel(address_of(money), identity_files(state_dir, GATEWAY)) as channel:
        stub = money_pb2_grpc.LedgerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetBalance(
                money_pb2.GetBalanceRequest(tenant_id="nobody", account_id="a"),
                timeout=CALL_TIMEOUT_S,
            )
    assert caught.value.code() != grpc.StatusCode.PERMISSION_DENIED
    assert parse_rpc_error(caught.value)[0] != "IDENTITY_NOT_ALLOWED"


async def test_a_plane_identity_without_a_role_gets_nothing(
    money: MoneyPlane, state_dir: Path
) -> None:
    """The money plane's own certificate is valid, but no role lists it: even
    the gateway's methods are refused."""
    async with open_channel(address_of(money), identity_files(state_dir, MONEY_PLANE)) as channel:
        stub = money_pb2_grpc.LedgerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetBalance(
                money_pb2.GetBalanceRequest(tenant_id="t", account_id="a"),
                timeout=CALL_TIMEOUT_S,
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert parse_rpc_error(caught.value)[0] == "IDENTITY_NOT_ALLOWED"
        # Health stays open to any identity.
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_certificate_from_another_ca_is_refused(
    money: MoneyPlane, state_dir: Path, tmp_path: Path
) -> None:
    stranger = new_authority("Somebody else's CA")
    files = write_identity(stranger, tmp_path, "admin", "spiffe://triplane/admin")
    # The client trusts the plane's CA, so only the plane can refuse it.
    shutil.copy(tls_dir(state_dir) / CA_CERT_FILE, tmp_path / "trusted-ca.crt")
    assert refused_at_handshake(await create_tenant_as(address_of(money), files, "tls-other"))


async def test_an_expired_certificate_is_refused(
    money: MoneyPlane, state_dir: Path, tmp_path: Path
) -> None:
    authority = load_authority(tls_dir(state_dir))
    assert authority is not None
    now = datetime.datetime.now(datetime.UTC)
    files = write_identity(
        authority,
        tmp_path,
        "admin",
        "spiffe://triplane/admin",
        not_before=now - datetime.timedelta(days=3),
        lifetime=datetime.timedelta(days=1),
    )
    shutil.copy(tls_dir(state_dir) / CA_CERT_FILE, tmp_path / "trusted-ca.crt")
    assert refused_at_handshake(await create_tenant_as(address_of(money), files, "tls-expired"))


# ---- default deny ----


async def test_a_method_missing_from_the_table_is_refused(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import money_plane.app

    table = dict(money_permissions.PERMISSIONS)
    del table["/triplane.money.v1.LedgerService/CreateTenant"]
    monkeypatch.setattr(money_plane.app, "PERMISSIONS", table)
    ensure_dev_certificates(state_dir, plane_config(state_dir).runtime.tls)
    plane = await start_money(plane_config(state_dir))
    try:
        outcome = await create_tenant_as(address_of(plane), identity_files(state_dir), "tls-m")
    finally:
        await plane.stop()
    assert isinstance(outcome, grpc.aio.AioRpcError)
    assert outcome.code() == grpc.StatusCode.PERMISSION_DENIED
    assert parse_rpc_error(outcome)[0] == "METHOD_NOT_ALLOWED"


def test_the_peer_cache_is_bounded(state_dir: Path) -> None:
    ensure_dev_certificates(state_dir, plane_config(state_dir).runtime.tls)
    cache = authz.PeerIdentityCache(max_entries=2)
    pems = [(tls_dir(state_dir) / f"{name}.crt").read_bytes() for name in ("admin", "gateway")]
    pems.append((tls_dir(state_dir) / "ca.crt").read_bytes())
    identities = [cache.identity_of(pem) for pem in pems]
    assert identities == ["spiffe://triplane/admin", "spiffe://triplane/gateway", None]
    assert len(cache) == 2


# ---- rotation ----


async def test_a_running_server_picks_up_rotated_files(state_dir: Path, tmp_path: Path) -> None:
    """The plane's CA bundle and certificate are replaced on disk by ones of
    a new CA: new connections are judged by the new files, no restart."""
    config = plane_config(state_dir)
    ensure_dev_certificates(state_dir, config.runtime.tls)
    directory = tls_dir(state_dir)
    plane = await start_money(config)
    try:
        address = address_of(plane)
        old_admin = identity_files(state_dir)
        assert isinstance(await create_tenant_as(address, old_admin, "rot-1"), money_pb2.Tenant)

        successor = new_authority("The next dev CA")
        new_admin = write_identity(successor, tmp_path, "admin", "spiffe://triplane/admin")
        trust(tmp_path, successor)
        certificate, key = issue(successor, "spiffe://triplane/money_plane")
        write_pair(directory / "money_plane.crt", directory / "money_plane.key", certificate, key)
        shutil.copy(tmp_path / "trusted-ca.crt", directory / CA_CERT_FILE)

        assert isinstance(await create_tenant_as(address, new_admin, "rot-2"), money_pb2.Tenant)
        assert refused_at_handshake(await create_tenant_as(address, old_admin, "rot-3"))
        assert plane.server is not None and plane.server.certificates is not None
        assert plane.server.certificates.reloads == 1
    finally:
        await plane.stop()


async def test_a_half_written_rotation_keeps_the_old_pair(
    money: MoneyPlane, state_dir: Path
) -> None:
    """A new certificate beside the old key is not taken: the server goes on
    with the pair it has until the key arrives."""
    authority = load_authority(tls_dir(state_dir))
    assert authority is not None
    certificate, _ = issue(authority, "spiffe://triplane/money_plane")
    (tls_dir(state_dir) / "money_plane.crt").write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
    )
    tenant = await create_tenant_as(address_of(money), identity_files(state_dir), "half")
    assert isinstance(tenant, money_pb2.Tenant)
    assert money.server is not None and money.server.certificates is not None
    assert money.server.certificates.reloads == 0


async def test_a_running_client_picks_up_rotated_files(
    money: MoneyPlane, state_dir: Path, tmp_path: Path
) -> None:
    """A RotatingChannel (the gateway's to each plane) dials with the new
    files once its check interval has passed: the same path, rewritten from
    the gateway's identity to the admin's, gets an admin RPC through."""
    directory = tls_dir(state_dir)
    for suffix in ("crt", "key"):
        shutil.copy(directory / f"gateway.{suffix}", tmp_path / f"client.{suffix}")
    files = TlsFiles(directory / CA_CERT_FILE, tmp_path / "client.crt", tmp_path / "client.key")
    now = [0.0]
    channel = RotatingChannel(
        address_of(money), files, check_interval_s=5.0, close_grace_s=1.0, monotonic=lambda: now[0]
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create_tenant(channel.channel, "client-rot")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for suffix in ("key", "crt"):
            shutil.copy(directory / f"admin.{suffix}", tmp_path / f"client.{suffix}")
        # Before the interval the channel is kept; after it the new files are used.
        assert channel.rotations == 0
        now[0] = 5.0
        tenant = await create_tenant(channel.channel, "client-rot")
        assert tenant.tenant_id == "client-rot" and channel.rotations == 1
    finally:
        await channel.close()


# ---- health port, reflection, TLS off, no certificate ----


async def test_probes_get_a_plaintext_health_only_port(state_dir: Path) -> None:
    config = plane_config(state_dir, health_listen="127.0.0.1:0", reflection=False)
    ensure_dev_certificates(state_dir, config.runtime.tls)
    plane = await start_money(config)
    try:
        assert plane.server is not None and plane.server.health_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.server.health_port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            # Nothing else is served there.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await create_tenant(channel, "via-health-port")
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # runtime.reflection false: the main port answers no reflection.
        async with open_channel(address_of(plane), identity_files(state_dir)) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.ServerReflectionInfo(iter([request]), timeout=CALL_TIMEOUT_S):
                    pass
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await plane.stop()


async def test_reflection_is_served_by_default(money: MoneyPlane, state_dir: Path) -> None:
    async with open_channel(address_of(money), identity_files(state_dir, GATEWAY)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names = [
            service.name
            async for answer in stub.ServerReflectionInfo(iter([request]), timeout=CALL_TIMEOUT_S)
            for service in answer.list_services_response.service
        ]
    assert "triplane.money.v1.LedgerService" in names


async def test_tls_off_is_plaintext_and_warns(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(
        environ={"TRIPLANE__RUNTIME__TLS": "off"},
        overrides={"runtime": {"state_dir": str(state_dir)}, "nats": {"url": ""}},
    )
    assert not config.runtime.tls.enabled
    with caplog.at_level(logging.WARNING, logger="triplane.server"):
        plane = await start_money(config)
    try:
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert any("runtime.tls is off" in r.getMessage() for r in warnings)
        tenant = await create_tenant_as(address_of(plane), None, "plain")
        assert isinstance(tenant, money_pb2.Tenant)
    finally:
        await plane.stop()


async def test_a_plane_without_a_certificate_refuses_to_start(state_dir: Path) -> None:
    plane = MoneyPlane(plane_config(state_dir), listen="127.0.0.1:0")
    with pytest.raises(TlsSetupError, match="triplane certs dev"):
        await plane.start(sweepers=False, relay=False)
    if plane.ledger is not None:
        await plane.ledger.stop()


def test_the_dev_ca_renews_what_is_due_and_keeps_the_rest(state_dir: Path) -> None:
    tls = plane_config(state_dir).runtime.tls
    first = {i.identity: i for i in ensure_dev_certificates(state_dir, tls)}
    assert all(item.created for item in first.values())
    assert (tls_dir(state_dir) / "admin.key").stat().st_mode & 0o777 == 0o600
    assert (tls_dir(state_dir) / "ca.key").stat().st_mode & 0o777 == 0o600
    again = ensure_dev_certificates(state_dir, tls)
    assert not any(item.created for item in again)
    # Twenty-five of thirty days later, less than a third of the life is left.
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=25)
    renewed = ensure_dev_certificates(state_dir, tls, now=later)
    assert all(item.created for item in renewed)
    assert all(item.not_after > first[item.identity].not_after for item in renewed)


async def test_a_stalled_old_channel_is_closed_after_rotation(
    money: MoneyPlane, state_dir: Path, tmp_path: Path
) -> None:
    """The channel replaced by a rotation is closed (after its grace), so
    rotations do not pile up connections."""
    directory = tls_dir(state_dir)
    for suffix in ("crt", "key"):
        shutil.copy(directory / f"admin.{suffix}", tmp_path / f"client.{suffix}")
    files = TlsFiles(directory / CA_CERT_FILE, tmp_path / "client.crt", tmp_path / "client.key")
    now = [0.0]
    channel = RotatingChannel(
        address_of(money), files, check_interval_s=1.0, close_grace_s=0.0, monotonic=lambda: now[0]
    )
    first = channel.channel
    await create_tenant(first, "old-channel")
    ensure_dev_certificates(state_dir, plane_config(state_dir).runtime.tls, [ADMIN], renew=True)
    for suffix in ("key", "crt"):
        shutil.copy(directory / f"admin.{suffix}", tmp_path / f"client.{suffix}")
    now[0] = 1.0
    assert channel.channel is not first
    for _ in range(100):
        if first.get_state() == grpc.ChannelConnectivity.SHUTDOWN:
            break
        await asyncio.sleep(0.05)
    assert first.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    await channel.close()


# ---- a public port beside a port that requires certificates ----


async def test_a_public_port_identifies_no_one_and_its_mtls_port_does(
    money: MoneyPlane, state_dir: Path
) -> None:
    """As the gateway serves: the public port lets a client in without a
    certificate, and gRPC does not ask for one there, so an admin RPC is
    refused for want of an identity even to the admin's certificate; the
    second port requires a certificate and knows the admin by it."""
    from money_plane.service import ledger_service
    from triplane.runtime.server import PlaneServer, ServerSecurity

    assert money.ledger is not None
    config = plane_config(state_dir)
    server = PlaneServer(
        name="public",
        listen="127.0.0.1:0",
        services=[ledger_service(money.ledger, money.clock)],
        security=ServerSecurity.from_config(
            config,
            MONEY_PLANE,
            money_permissions.PERMISSIONS,
            require_client_cert=False,
            mtls_listen="127.0.0.1:0",
        ),
    )
    public = f"127.0.0.1:{await server.start()}"
    admin_port = f"127.0.0.1:{server.mtls_port}"
    try:
        admin = identity_files(state_dir)
        for files in (partner_files(state_dir), admin):
            outcome = await create_tenant_as(public, files, "public-port")
            assert isinstance(outcome, grpc.aio.AioRpcError)
            assert parse_rpc_error(outcome)[0] == "IDENTITY_NOT_ALLOWED"
        tenant = await create_tenant_as(admin_port, admin, "admin-port")
        assert isinstance(tenant, money_pb2.Tenant)
        assert refused_at_handshake(
            await create_tenant_as(admin_port, partner_files(state_dir), "admin-port-2")
        )
    finally:
        await server.stop()


async def test_the_gateway_dials_the_configured_plane_addresses(state_dir: Path) -> None:
    from gateway.planes import PlaneChannels

    ensure_dev_certificates(state_dir, plane_config(state_dir).runtime.tls)
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir)},
            "gateway": {"plane_addresses": {"money": "money-plane:50061"}},
            "policy": {"listen": "0.0.0.0:50062"},
        },
    )
    channels = PlaneChannels.from_config(config, ai_address="10.0.0.3:50063")
    try:
        assert channels.money.address == "money-plane:50061"
        assert channels.policy.address == "127.0.0.1:50062"
        assert channels.ai.address == "10.0.0.3:50063"
        assert channels.tls is not None and channels.tls.cert_path == tls_dir(state_dir) / (
            "gateway.crt"
        )
    finally:
        await channels.close()


def test_triplane_certs_dev_creates_and_renews(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from triplane_tools import cli

    monkeypatch.setenv("TRIPLANE_STATE_DIR", str(state_dir))
    monkeypatch.delenv("TRIPLANE_CONFIG", raising=False)
    assert cli.main(["certs", "dev"]) == 0
    directory = tls_dir(state_dir)
    before = {name: (directory / f"{name}.crt").read_bytes() for name in ("admin", "gateway")}
    assert "spiffe://triplane/money_plane" in capsys.readouterr().out
    assert cli.main(["certs", "dev", "--renew", "--identity", "admin"]) == 0
    assert (directory / "admin.crt").read_bytes() != before["admin"]
    assert (directory / "gateway.crt").read_bytes() == before["gateway"]
    assert "issued admin" in capsys.readouterr().out
