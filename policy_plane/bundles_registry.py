"""Which bundles exist, which one is live and which one is in shadow.

Switching is one attribute assignment of an immutable compiled bundle, so a
request in flight finishes on the bundle it started with and no request ever
sees half a bundle. A bundle that fails to compile raises before anything is
stored or swapped.

Replicas on one store share the live and shadow slots (policy_bundle_state);
each follows a switch another made within policy.bundles.follow_interval_s
(PolicyPlane runs follow() on that period).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import msgspec

from policy_plane.bundle import SHIPPED_LISTS_DIR, BundleLimits, BundleSource, shipped_default_path
from policy_plane.cel_check import ConditionBounds
from policy_plane.evaluation import CompiledBundle, compile_source
from policy_plane.sanctions import MATCHER_TOKEN_SORT
from policy_plane.store import PolicyStore
from triplane.runtime.clock import Clock
from triplane.runtime.config import PolicyConfig
from triplane.runtime.errors import InvalidArgument, NotFound

log = logging.getLogger("policy_plane.bundles")

TARGETS = ("store", "live", "shadow")


@dataclass(frozen=True, slots=True)
class SlotApproval:
    """One move of a bundle into (or out of) a slot: who approved it and why
    (empty from a caller that sent neither), and when."""

    slot: str
    set: bool
    actor: str
    reason: str
    at_us: int


@dataclass(frozen=True, slots=True)
class BundleInfo:
    version: str
    label: str
    content_hash: str
    rule_count: int
    sanctions_entry_count: int
    loaded_at_us: int
    # Its slot moves, oldest first (policy_bundle_slot_history).
    approvals: tuple[SlotApproval, ...] = ()


def bundle_limits(config: PolicyConfig) -> BundleLimits:
    limits = config.limits
    return BundleLimits(
        max_rules=limits.max_rules_per_bundle,
        max_bundle_bytes=limits.max_bundle_bytes,
        max_sanctions_entries=limits.max_sanctions_entries,
        max_sanctions_name_length=limits.max_sanctions_name_length,
        default_hit_threshold=config.sanctions.hit_threshold,
        default_possible_match_threshold=config.sanctions.possible_match_threshold,
        max_bundle_depth=limits.max_bundle_depth,
        max_parameter_items=limits.max_parameter_items,
        max_parameter_string_length=limits.max_parameter_string_length,
        condition=ConditionBounds(
            max_chars=limits.max_condition_chars,
            max_nodes=limits.max_condition_nodes,
            max_nesting=limits.max_condition_nesting,
            max_comprehension_nesting=limits.max_comprehension_nesting,
        ),
    )


class BundleRegistry:
    def __init__(self, store: PolicyStore, config: PolicyConfig, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._limits = bundle_limits(config)
        self._lists_dir = (
            Path(config.bundles.lists_dir) if config.bundles.lists_dir else SHIPPED_LISTS_DIR
        )
        self._default_path = (
            Path(config.bundles.default_path)
            if config.bundles.default_path
            else shipped_default_path()
        )
        self._cache_size = max(2, config.bundles.compiled_cache_size)
        self._cache: OrderedDict[str, CompiledBundle] = OrderedDict()
        self._lock = threading.Lock()
        # Held while a slot is written and the bundle it names made current,
        # so follow() never puts back what a switch here just replaced.
        self._slots_lock = threading.Lock()
        self.live: CompiledBundle | None = None
        self.shadow: CompiledBundle | None = None

    def start(self) -> None:
        """Restores the live and shadow bundles, or loads the default one."""
        live_version = self._store.get_slot("live")
        if live_version:
            self.live = self.resolve(live_version)
        else:
            source = BundleSource(yaml_text=self._default_path.read_text())
            self.load(source, "live", bundle_dir=self._default_path.parent)
        shadow_version = self._store.get_slot("shadow")
        self.shadow = self.resolve(shadow_version) if shadow_version else None

    def compile(self, source: BundleSource, bundle_dir: Path | None = None) -> CompiledBundle:
        return compile_source(source, self._limits, self._lists_dir, bundle_dir)

    def load(self, source: BundleSource, target: str, bundle_dir: Path | None = None) -> BundleInfo:
        if target not in TARGETS:
            raise InvalidArgument(
                "BUNDLE_TARGET_INVALID", "target is store, live or shadow", "target"
            )
        compiled = self.compile(source, bundle_dir)
        stored = msgspec.structs.replace(compiled.source, label_override=compiled.label)
        self._store.put_bundle(
            compiled.version,
            compiled.label,
            compiled.content_hash,
            msgspec.json.encode(stored).decode(),
            len(compiled.rules),
            compiled.screener.entry_count,
            self._clock.now_us(),
        )
        self._remember(compiled)
        with self._slots_lock:
            if target == "live":
                self._store.set_slot("live", compiled.version, at_us=self._clock.now_us())
                self.live = compiled
            elif target == "shadow":
                self._store.set_slot("shadow", compiled.version, at_us=self._clock.now_us())
                self.shadow = compiled
        return self.info(compiled.version)

    def activate(self, version: str, actor: str = "", reason: str = "") -> BundleInfo:
        """Makes a stored bundle live, recording who approved it and why."""
        compiled = self.resolve(version)
        with self._slots_lock:
            self._store.set_slot("live", version, actor, reason, self._clock.now_us())
            self.live = compiled
        return self.info(version)

    def set_shadow(self, version: str, actor: str = "", reason: str = "") -> BundleInfo | None:
        """Puts a stored bundle in shadow (empty: clears the slot), recording
        who approved it and why."""
        if not version:
            with self._slots_lock:
                self._store.set_slot("shadow", "", actor, reason, self._clock.now_us())
                self.shadow = None
            return None
        compiled = self.resolve(version)
        with self._slots_lock:
            self._store.set_slot("shadow", version, actor, reason, self._clock.now_us())
            self.shadow = compiled
        return self.info(version)

    def follow(self) -> bool:
        """Makes the store's live and shadow slots current here: another
        replica on the same store may have switched them (LoadBundle,
        ActivateBundle, SetShadowBundle, a KV watch). True when anything
        changed. A slot naming a bundle that does not compile to its version
        raises, as start() does: the store is not what it claims."""
        with self._slots_lock:
            live_version = self._store.get_slot("live")
            shadow_version = self._store.get_slot("shadow")
            changed = False
            if live_version and (self.live is None or self.live.version != live_version):
                self.live = self.resolve(live_version)
                changed = True
            current_shadow = self.shadow.version if self.shadow is not None else ""
            if shadow_version != current_shadow:
                self.shadow = self.resolve(shadow_version) if shadow_version else None
                changed = True
        if changed:
            log.info(
                "bundles follow the store: live %s, shadow %s",
                live_version,
                shadow_version or "(none)",
            )
        return changed

    def resolve(self, version: str) -> CompiledBundle:
        """A compiled bundle by version: from memory, else from the store."""
        with self._lock:
            cached = self._cache.get(version)
            if cached is not None:
                self._cache.move_to_end(version)
                return cached
        row = self._store.get_bundle(version)
        if row is None:
            raise NotFound("BUNDLE_VERSION_NOT_FOUND", f"no bundle {version!r}", "bundle_version")
        source = stored_source(str(row[3]))
        compiled = self.compile(source)
        # A stored bundle must compile to the version it was stored under, or
        # the store (or the compiler) changed under us: stop, don't guess.
        assert compiled.version == version, (compiled.version, version)
        self._remember(compiled)
        return compiled

    def _remember(self, compiled: CompiledBundle) -> None:
        with self._lock:
            self._cache[compiled.version] = compiled
            self._cache.move_to_end(compiled.version)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def info(self, version: str) -> BundleInfo:
        row = self._store.get_bundle(version)
        if row is None:
            raise NotFound("BUNDLE_VERSION_NOT_FOUND", f"no bundle {version!r}", "version")
        return self._with_approvals([_info(row)])[0]

    def list_bundles(self, offset: int, limit: int) -> list[BundleInfo]:
        return self._with_approvals([_info(r) for r in self._store.list_bundles(limit, offset)])

    def _with_approvals(self, infos: list[BundleInfo]) -> list[BundleInfo]:
        history = self._store.slot_history([i.version for i in infos])
        return [
            dataclasses.replace(
                info,
                approvals=tuple(
                    SlotApproval(str(slot), bool(is_set), str(actor), str(reason), int(at_us))
                    for slot, is_set, actor, reason, at_us in history.get(info.version, [])
                ),
            )
            for info in infos
        ]

    def source(self, version: str, field: str = "version") -> BundleSource:
        """A stored bundle's source; NOT_FOUND naming `field` when none."""
        row = self._store.get_bundle(version)
        if row is None:
            raise NotFound("BUNDLE_VERSION_NOT_FOUND", f"no bundle {version!r}", field)
        return stored_source(str(row[3]))

    def diff(
        self, from_version: str, to_version: str, context_lines: int
    ) -> tuple[BundleInfo, BundleInfo, str, bool]:
        """(from, to, the unified diff of their YAML texts, whether their
        sanctions lists differ): what an operator reads before activating.
        The lists are compared, not shown: they hold names."""
        older = self.source(from_version, "from_version")
        newer = self.source(to_version, "to_version")
        lines = difflib.unified_diff(
            older.yaml_text.splitlines(keepends=True),
            newer.yaml_text.splitlines(keepends=True),
            fromfile=from_version,
            tofile=to_version,
            n=context_lines,
        )
        text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
        lists_changed = (older.sanctions_csv, older.aliases_csv) != (
            newer.sanctions_csv,
            newer.aliases_csv,
        )
        return self.info(from_version), self.info(to_version), text, lists_changed


def stored_source(text: str) -> BundleSource:
    """A bundle's source as the store holds it. One stored before sanctions
    matchers had names was decided with `token_sort`, and keeps it."""
    source = msgspec.json.decode(text, type=BundleSource)
    if '"sanctions_matcher"' not in text:
        source = msgspec.structs.replace(source, sanctions_matcher=MATCHER_TOKEN_SORT)
    return source


def _info(row: tuple[object, ...]) -> BundleInfo:
    return BundleInfo(
        version=str(row[0]),
        label=str(row[1]),
        content_hash=str(row[2]),
        rule_count=int(str(row[4])),
        sanctions_entry_count=int(str(row[5])),
        loaded_at_us=int(str(row[6])),
    )
