"""Every config key a `.proto` comment names is a real key of
`triplane/runtime/defaults.yaml` (`max_batch_size` in money.proto was
`money.limits.max_transfers_per_request` all along)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = ROOT / "triplane" / "runtime" / "defaults.yaml"
# A dotted name in a comment, with or without backticks (`<...>` placeholders
# and trailing punctuation excluded).
DOTTED = re.compile(r"(?<![\w.<])([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)")


def _keys(node: Any, prefix: str = "") -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for name, value in node.items():
            path = f"{prefix}.{name}" if prefix else str(name)
            found |= {path} | _keys(value, path)
    return found


def _named_keys(keys: set[str]) -> list[tuple[str, int, str]]:
    """(file, line, name) of each dotted name in a comment whose first two
    segments are a config section (`money.limits...`): a config key, not an
    event type (`money.entry.posted`) or a package."""
    named = []
    for path in sorted((ROOT / "proto").rglob("*.proto")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            _, slashes, comment = line.partition("//")
            if not slashes:
                continue
            for match in DOTTED.finditer(comment):
                name = match.group(1)
                if ".".join(name.split(".")[:2]) in keys:
                    named.append((str(path.relative_to(ROOT)), number, name))
    return named


def test_proto_comments_name_real_config_keys() -> None:
    keys = _keys(yaml.safe_load(DEFAULTS.read_text()))
    named = _named_keys(keys)
    assert named, "no config key named in any .proto comment: the scan is broken"
    unknown = [f"{file}:{line}: {name}" for file, line, name in named if name not in keys]
    assert unknown == []


def test_the_scan_finds_a_wrong_key() -> None:
    keys = {"money", "money.limits", "money.limits.max_transfers_per_request"}
    comment = "// up to `money.limits.max_batch_size` transfers; see money.entry.posted"
    names = [m.group(1) for m in DOTTED.finditer(comment.partition("//")[2])]
    checked = [n for n in names if ".".join(n.split(".")[:2]) in keys]
    assert checked == ["money.limits.max_batch_size"]
