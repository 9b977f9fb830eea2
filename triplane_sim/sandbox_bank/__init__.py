"""The sandbox bank: a local HTTP bank the rail adapters send payments to,
which books them with seeded faults and writes statements (README "Rails and
the sandbox bank"). `python -m triplane_sim.sandbox_bank`."""
