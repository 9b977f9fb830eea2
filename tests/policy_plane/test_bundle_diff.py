"""DiffBundles: the plane's unified diff of two stored bundles' sources, what
the console shows before a bundle is activated."""

from __future__ import annotations

import grpc
import pytest

from policy_plane.bundle import shipped_default_path
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime.status import parse_rpc_error

from .conftest import Stubs

DEFAULT_YAML = shipped_default_path().read_text()
POSSIBLE_MATCH = """  - id: sanctions_possible_match
    when: sanctions.possible_match
    outcome: review
"""


async def _load(stubs: Stubs, content: str, label: str) -> pb.BundleInfo:
    answer = await stubs.bundles.LoadBundle(
        pb.LoadBundleRequest(content=content, label=label, target=pb.BUNDLE_TARGET_STORE)
    )
    bundle: pb.BundleInfo = answer.bundle
    return bundle


async def _refused(call: object, code: grpc.StatusCode) -> tuple[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return parse_rpc_error(caught.value)


async def test_the_diff_shows_the_changed_rule(stubs: Stubs) -> None:
    assert DEFAULT_YAML.count(POSSIBLE_MATCH) == 1
    older = await _load(stubs, DEFAULT_YAML, "diff-old")
    changed = DEFAULT_YAML.replace(POSSIBLE_MATCH, POSSIBLE_MATCH.replace("review", "hold"))
    newer = await _load(stubs, changed, "diff-new")

    answer = await stubs.bundles.DiffBundles(
        pb.DiffBundlesRequest(from_version=older.version, to_version=newer.version)
    )
    assert answer.from_bundle == older and answer.to_bundle == newer
    lines = answer.unified_diff.splitlines()
    assert lines[0] == f"--- {older.version}" and lines[1] == f"+++ {newer.version}"
    changes = [line for line in lines[2:] if line[:1] in "+-"]
    assert changes == ["-    outcome: review", "+    outcome: hold"]
    # Three lines of context by default: the rule's id is in the hunk.
    assert "   - id: sanctions_possible_match" in lines
    assert not answer.sanctions_lists_changed

    narrow = await stubs.bundles.DiffBundles(
        pb.DiffBundlesRequest(from_version=older.version, to_version=newer.version, context_lines=1)
    )
    assert "   - id: sanctions_possible_match" not in narrow.unified_diff.splitlines()

    same = await stubs.bundles.DiffBundles(
        pb.DiffBundlesRequest(from_version=older.version, to_version=older.version)
    )
    assert same.unified_diff == ""


async def test_bad_diff_requests_name_the_field(stubs: Stubs) -> None:
    live = (await stubs.bundles.GetActiveBundle(pb.GetActiveBundleRequest())).live.version
    assert await _refused(
        stubs.bundles.DiffBundles(pb.DiffBundlesRequest(from_version=live)),
        grpc.StatusCode.INVALID_ARGUMENT,
    ) == ("FIELD_REQUIRED", "to_version")
    assert await _refused(
        stubs.bundles.DiffBundles(pb.DiffBundlesRequest(from_version="nope@0", to_version=live)),
        grpc.StatusCode.NOT_FOUND,
    ) == ("BUNDLE_VERSION_NOT_FOUND", "from_version")
    assert await _refused(
        stubs.bundles.DiffBundles(pb.DiffBundlesRequest(from_version=live, to_version="nope@0")),
        grpc.StatusCode.NOT_FOUND,
    ) == ("BUNDLE_VERSION_NOT_FOUND", "to_version")
    assert await _refused(
        stubs.bundles.DiffBundles(
            pb.DiffBundlesRequest(from_version=live, to_version=live, context_lines=101)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ) == ("CONTEXT_LINES_INVALID", "context_lines")
