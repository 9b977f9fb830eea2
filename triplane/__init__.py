"""The ground floor every plane stands on, and nothing above it.

- `triplane.runtime`: the shared runtime (config, errors, the gRPC server
  bootstrap and interceptors, the storage layer, the NATS bus and envelope,
  the outbox relay, retries, telemetry, decision tokens, currencies, clocks,
  the wire codec).
- `triplane.<plane>.v1` (`common`, `money`, `policy`, `ai`, `gateway`): the
  generated protobuf contracts. These packages ARE the wire contract: their
  paths follow the proto packages (`triplane.money.v1`, ...), which buf's
  STANDARD lint ties to the files under `proto/`. Do not move or rename them;
  change `proto/` and run `make proto`.

Nothing in this package imports a plane, the gateway, the simulator
(`triplane_sim`) or the tools (`triplane_tools`); `make lint` enforces it.
"""
