"""The synthetic world: seeded customers, merchants, fraud patterns and
offers with hidden true propensities, and the tenant built from them through
the planes' public APIs. The demo, the benchmarks, the tests and bootstrap
training use it; no plane's serving path imports it (`make lint` enforces it)."""
