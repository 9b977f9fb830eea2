"""Online feature store: one interface, three backends (in-process, Redis,
Aerospike), one contract test suite (tests/ai_plane/test_store_contract.py)."""

from ai_plane.store.base import FeatureStore, build_store, read_stored_features

__all__ = ["FeatureStore", "build_store", "read_stored_features"]
