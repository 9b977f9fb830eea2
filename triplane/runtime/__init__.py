"""The shared runtime every plane uses: config, errors, server bootstrap, the
NATS bus and envelope, telemetry, decision tokens, currencies and clocks."""
