"""The console's gRPC channels to the planes, as its own identity (console):
each plane's permission table allows that identity only the methods the
console's pages call. Channels follow certificate rotation (RotatingChannel);
stubs are made per call on the current channel (cheap), so a rotated channel
is used at once."""

from __future__ import annotations

import grpc

from triplane.ai.v1 import ai_pb2_grpc
from triplane.gateway.v1 import delivery_admin_pb2_grpc, experiments_admin_pb2_grpc
from triplane.money.v1 import money_pb2_grpc, recon_pb2_grpc
from triplane.policy.v1 import policy_pb2_grpc
from triplane.runtime.config import Config
from triplane.runtime.net import dial_address
from triplane.runtime.tls import CONSOLE, RotatingChannel, channel_options_for, files_for

CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 30_000)]


class Planes:
    def __init__(self, config: Config, identity: str = CONSOLE) -> None:
        dial = config.console.plane_addresses
        self.timeout_s = config.console.plane_timeout_s
        tls = config.runtime.tls
        files = files_for(config, identity)
        options = channel_options_for(config, extra=CHANNEL_OPTIONS)
        self._addresses = {
            "money": dial.money or dial_address(config.money.listen),
            "policy": dial.policy or dial_address(config.policy.listen),
            "ai": dial.ai or dial_address(config.ai.listen),
            # The gateway's certificate port: only there does it know the
            # console by its certificate (empty: not configured).
            "gateway": dial.gateway
            or (dial_address(config.gateway.admin_listen) if config.gateway.admin_listen else ""),
        }
        self._channels: dict[str, RotatingChannel] = {}
        self._files = files
        self._options = options
        self._check_interval_s = tls.reload_check_interval_s
        self._close_grace_s = tls.rotation_close_grace_s

    def channel(self, plane: str) -> grpc.aio.Channel:
        """The channel to `plane` (money, policy, ai), dialled on first use."""
        if plane not in self._channels:
            address = self._addresses[plane]
            self._channels[plane] = RotatingChannel(
                address,
                self._files,
                self._options,
                check_interval_s=self._check_interval_s,
                close_grace_s=self._close_grace_s,
                who=f"console channel to {address}",
            )
        return self._channels[plane].channel

    # ---- stubs: one accessor a service ----

    def cases(self) -> policy_pb2_grpc.CaseServiceStub:
        return policy_pb2_grpc.CaseServiceStub(self.channel("policy"))

    def policy(self) -> policy_pb2_grpc.PolicyServiceStub:
        return policy_pb2_grpc.PolicyServiceStub(self.channel("policy"))

    def ledger(self) -> money_pb2_grpc.LedgerServiceStub:
        return money_pb2_grpc.LedgerServiceStub(self.channel("money"))

    def scoring(self) -> ai_pb2_grpc.ScoringServiceStub:
        return ai_pb2_grpc.ScoringServiceStub(self.channel("ai"))

    def recon(self) -> recon_pb2_grpc.ReconciliationServiceStub:
        return recon_pb2_grpc.ReconciliationServiceStub(self.channel("money"))

    def deliveries(self) -> delivery_admin_pb2_grpc.DeliveryAdminServiceStub:
        return delivery_admin_pb2_grpc.DeliveryAdminServiceStub(self.channel("gateway"))

    def has(self, plane: str) -> bool:
        """Whether the console knows where `plane` is."""
        return bool(self._addresses.get(plane))

    def bundles(self) -> policy_pb2_grpc.BundleServiceStub:
        return policy_pb2_grpc.BundleServiceStub(self.channel("policy"))

    def models(self) -> ai_pb2_grpc.ModelRegistryServiceStub:
        return ai_pb2_grpc.ModelRegistryServiceStub(self.channel("ai"))

    def experiments(self) -> experiments_admin_pb2_grpc.ExperimentAdminServiceStub:
        return experiments_admin_pb2_grpc.ExperimentAdminServiceStub(self.channel("gateway"))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
