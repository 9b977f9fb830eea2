"""Hypothesis strategies that walk a protobuf message descriptor.

A strategy draws a *spec*, a plain dict of field name -> value (nested dicts
for messages, lists for repeated fields, dicts for maps), which `build` turns
into the message. The spec is what a failing case reports, and it lets a
value be chosen at send time: a `Pooled` stands for "one of the ids the
servers answered so far under this name" (a hold the gateway placed, a case
the policy plane opened), so a fuzz run reaches the code behind a real id,
not only the "not found" branch.

Every field may be missing; present values are drawn from valid-but-odd
ones: boundary numbers (0, -1, the type's extremes, NaN and infinities),
empty, huge and unicode-odd strings, unknown enum numbers, repeated fields
and maps of 0..N items (and, now and then, just past a configured limit),
nested messages to a bounded depth. A `hints` table adds meaningful values by
field name wherever the name appears (a seeded tenant for `tenant_id`, a
seeded account for `account_id`), so part of the cases get past the first
lookup.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

# Nesting of message fields below the request; deeper ones are left unset.
MAX_DEPTH = 5
# Items of an ordinary repeated field or map.
MAX_ITEMS = 4
# Counts just past the limits the planes configure (splits 16, attributes 32,
# candidates 64, events 500, transfers and accounts 1000): one item repeated.
OVER_LIMIT_COUNTS = (17, 33, 65, 257, 501, 1001)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1

# Strings that have broken parsers, subjects, logs and SQL elsewhere.
ODD_STRINGS = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "line\nbreak",
    "tab\tbed",
    "\r\n",
    "\u202e\u0644\u0627",  # right-to-left override, Arabic
    "\u200b",  # zero-width space
    "\ufeff",  # byte order mark
    "e\u0301",  # combining accent
    "\u00e9",
    "\U0001f642",
    "\U0001d518\U0001d52b\U0001d526",
    "\uffff",
    "\U0010ffff",
    "\u0130stanbul",  # dotted capital I: lower() grows it
    "\u00df",  # sharp s: upper() grows it
    "\u0660\u0661\u0662",  # Arabic-Indic digits
    "\uff11\uff12\uff13",  # full-width digits
    "../../etc/passwd",
    "%s%n%x",
    "{0}{1}",
    "${jndi:ldap://x}",
    "*",
    ">",
    "a.b",
    "a.*.>",
    "tenant.>",
    "' OR 1=1 --",
    '"; DROP TABLE x; --',
    "NaN",
    "-1",
    "0",
    "9" * 40,
    "1e309",
    "true",
    "null",
    "[]",
    "{}",
    "&amp;<b>",
    "a" * 63,
    "a" * 64,
    "a" * 65,
)
# Huge strings: one character repeated (cheap to draw, expensive to carry).
HUGE_LENGTHS = (255, 256, 257, 2001, 4097, 65_537)
HUGE_CHARS = "aZ9_-\u00e9\U0001f642\u0000 "


@dataclass(frozen=True, slots=True)
class Pooled:
    """The `index`-th (modulo) value the servers answered under `name`; the
    generic `fallback` when they answered none yet."""

    name: str
    index: int
    fallback: str = ""


# name -> values answered so far (see Pooled).
Pools = Mapping[str, list[str]]


def pooled(name: str) -> st.SearchStrategy[Pooled]:
    """A value of the pool `name`, chosen at send time."""
    return st.builds(Pooled, st.just(name), st.integers(0, 2**16))


def rarely(
    common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], one_in: int = 10
) -> st.SearchStrategy[Any]:
    """`rare` one time in `one_in`, else `common` (one_of would pick each half the time)."""
    return st.integers(0, one_in - 1).flatmap(lambda draw: rare if draw == 0 else common)


def _with_boundaries(
    values: st.SearchStrategy[Any], boundaries: tuple[Any, ...]
) -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(boundaries), values)


def _int_strategy(low: int, high: int) -> st.SearchStrategy[int]:
    edges = tuple(v for v in (0, 1, -1, 2, low, low + 1, high, high - 1) if low <= v <= high)
    return _with_boundaries(st.integers(low, high), edges)


def _float_strategy(width: Literal[32, 64]) -> st.SearchStrategy[float]:
    edges: tuple[float, ...] = (
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        math.nan,
        math.inf,
        -math.inf,
        # The largest, the smallest and a subnormal of the width.
        3.4028234663852886e38 if width == 32 else 1.7976931348623157e308,
        1.401298464324817e-45 if width == 32 else 5e-324,
        -1e30,
    )
    return _with_boundaries(st.floats(width=width), edges)


def text_strategy() -> st.SearchStrategy[str]:
    """Strings a caller could send: odd, valid-looking, random unicode, huge."""
    return rarely(
        st.one_of(
            st.sampled_from(ODD_STRINGS),
            st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True),
            st.text(max_size=24),
        ),
        st.builds(
            lambda char, count: char * count,
            st.sampled_from(HUGE_CHARS),
            st.sampled_from(HUGE_LENGTHS),
        ),
    )


def bytes_strategy() -> st.SearchStrategy[bytes]:
    return rarely(
        st.binary(max_size=32),
        st.builds(lambda n: b"\xff" * n, st.sampled_from((1024, 65_537))),
    )


_INTEGER_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (INT32_MIN, INT32_MAX),
    FieldDescriptor.TYPE_SINT32: (INT32_MIN, INT32_MAX),
    FieldDescriptor.TYPE_SFIXED32: (INT32_MIN, INT32_MAX),
    FieldDescriptor.TYPE_INT64: (INT64_MIN, INT64_MAX),
    FieldDescriptor.TYPE_SINT64: (INT64_MIN, INT64_MAX),
    FieldDescriptor.TYPE_SFIXED64: (INT64_MIN, INT64_MAX),
    FieldDescriptor.TYPE_UINT32: (0, UINT32_MAX),
    FieldDescriptor.TYPE_FIXED32: (0, UINT32_MAX),
    FieldDescriptor.TYPE_UINT64: (0, UINT64_MAX),
    FieldDescriptor.TYPE_FIXED64: (0, UINT64_MAX),
}


def _declared(field: FieldDescriptor) -> list[int]:
    """The numbers an enum field's type declares, in order."""
    assert field.enum_type is not None, field.full_name
    return sorted(value.number for value in field.enum_type.values)


def _enum_strategy(field: FieldDescriptor) -> st.SearchStrategy[int]:
    """A declared number, or one the contract does not declare (open enums
    carry unknown numbers on the wire)."""
    declared = _declared(field)
    unknown = st.one_of(
        st.sampled_from((max(declared) + 1, -1, INT32_MAX, INT32_MIN)),
        st.integers(INT32_MIN, INT32_MAX),
    )
    return st.one_of(st.sampled_from(declared), unknown)


@dataclass(frozen=True, slots=True)
class Hints:
    """Meaningful values by field name, wherever the name appears: `text`
    for string fields, `numbers` for integer ones."""

    text: Mapping[str, st.SearchStrategy[Any]]
    numbers: Mapping[str, st.SearchStrategy[int]]

    def for_field(self, field: FieldDescriptor) -> st.SearchStrategy[Any] | None:
        if field.type == FieldDescriptor.TYPE_STRING:
            return self.text.get(field.name)
        if field.type in _INTEGER_RANGES:
            return self.numbers.get(field.name)
        return None


NO_HINTS = Hints({}, {})


def _tame_scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    """A value a well-behaved client might send: short identifiers, small
    non-negative numbers, declared enum values other than UNSPECIFIED."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_ENUM:
        declared = _declared(field)
        return st.sampled_from([n for n in declared if n != 0] or declared)
    if kind == FieldDescriptor.TYPE_STRING:
        return st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=8)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(0.0, 1.0)
    if kind in _INTEGER_RANGES:
        return st.integers(0, 1000)
    raise AssertionError(f"field {field.full_name}: no strategy for protobuf type {kind}")


def _hostile_scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_ENUM:
        return _enum_strategy(field)
    if kind == FieldDescriptor.TYPE_STRING:
        return text_strategy()
    if kind == FieldDescriptor.TYPE_BYTES:
        return bytes_strategy()
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return _float_strategy(64)
    if kind == FieldDescriptor.TYPE_FLOAT:
        return _float_strategy(32)
    if kind in _INTEGER_RANGES:
        return _int_strategy(*_INTEGER_RANGES[kind])
    raise AssertionError(f"field {field.full_name}: no strategy for protobuf type {kind}")


class SpecStrategies:
    """Strategies for every message reachable from the requests, built once
    per (message, depth) and reused. `tame`: the values a well-behaved client
    sends (short ids, small numbers, declared enums, few items), so cases get
    past validation to the code behind it; otherwise hostile ones."""

    def __init__(self, hints: Hints = NO_HINTS, tame: bool = False) -> None:
        self._hints = hints
        self._tame = tame
        self._cache: dict[tuple[str, int], st.SearchStrategy[dict[str, Any]]] = {}
        self._scalar = _tame_scalar if tame else _hostile_scalar

    def for_message(
        self, descriptor: Descriptor, depth: int = 0
    ) -> st.SearchStrategy[dict[str, Any]]:
        key = (descriptor.full_name, depth)
        found = self._cache.get(key)
        if found is None:
            # Deferred, so a message that contains itself is built lazily.
            found = st.deferred(lambda: self._build_message(descriptor, depth))
            self._cache[key] = found
        return found

    def _build_message(
        self, descriptor: Descriptor, depth: int
    ) -> st.SearchStrategy[dict[str, Any]]:
        fields: dict[str, st.SearchStrategy[Any]] = {}
        for field in descriptor.fields:
            if field.message_type is not None and depth >= MAX_DEPTH:
                continue  # too deep: left unset
            fields[field.name] = self._field(field, depth)
        if self._tame:
            # Every field set: most refusals are a field left out.
            return st.fixed_dictionaries(fields)
        return st.fixed_dictionaries({}, optional=fields)

    def _field(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        message_type = field.message_type
        if message_type is not None and message_type.GetOptions().map_entry:
            return self._map(field, depth)
        single = self._single(field, depth)
        if not field.is_repeated:
            return single
        if self._tame:
            return st.lists(single, max_size=MAX_ITEMS - 1)
        return rarely(
            st.lists(single, max_size=MAX_ITEMS),
            # Just past a limit: one item repeated.
            st.builds(lambda item, n: [item] * n, single, st.sampled_from(OVER_LIMIT_COUNTS)),
        )

    def _map(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[dict[Any, Any]]:
        entry = field.message_type
        assert entry is not None, field.full_name
        key = self._single(entry.fields_by_name["key"], depth + 1)
        value = self._single(entry.fields_by_name["value"], depth + 1)
        if self._tame or entry.fields_by_name["key"].type != FieldDescriptor.TYPE_STRING:
            return st.dictionaries(key, value, max_size=MAX_ITEMS)
        return rarely(
            st.dictionaries(key, value, max_size=MAX_ITEMS),
            st.builds(
                lambda item, n: {f"k{i}": item for i in range(n)},
                value,
                st.sampled_from(OVER_LIMIT_COUNTS[:3]),
            ),
        )

    def _single(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if field.message_type is not None:
            return self.for_message(field.message_type, depth + 1)
        generic = self._scalar(field)
        hint = self._hints.for_field(field)
        if hint is None:
            return generic
        # A well-behaved client names what exists; a hostile one, anything.
        return hint if self._tame else st.one_of(hint, generic)


def spec_bytes(spec: Any) -> int:
    """About the bytes the message of `spec` takes on the wire (a string or
    bytes value its length, anything else a few bytes), without building it:
    an item repeated past a limit is one object, counted once and multiplied."""
    seen: dict[int, int] = {}

    def size(value: Any) -> int:
        if isinstance(value, str | bytes):
            return len(value) + 2
        if isinstance(value, dict | list):
            known = seen.get(id(value))
            if known is None:
                items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
                known = sum(size(k) + size(v) + 2 for k, v in items)
                seen[id(value)] = known
            return known
        return 8  # a number, a bool, a Pooled id

    return size(spec)


def resolve(value: Any, pools: Pools) -> Any:
    """A Pooled as the value it stands for now; anything else as it is."""
    if not isinstance(value, Pooled):
        return value
    pool = pools.get(value.name)
    if not pool:
        return value.fallback
    return pool[value.index % len(pool)]


def build(descriptor: Descriptor, spec: Mapping[str, Any], pools: Pools) -> Message:
    """The message a spec stands for, with pooled values taken from `pools`."""
    message: Message = GetMessageClass(descriptor)()
    fill(message, spec, pools)
    return message


def fill(message: Message, spec: Mapping[str, Any], pools: Pools) -> None:
    descriptor = message.DESCRIPTOR
    for name, value in spec.items():
        field = descriptor.fields_by_name[name]
        target = getattr(message, name)
        message_type = field.message_type
        if message_type is not None and message_type.GetOptions().map_entry:
            _fill_map(target, message_type, value, pools)
        elif field.is_repeated:
            for item in value:
                if message_type is not None:
                    fill(target.add(), item, pools)
                else:
                    target.append(resolve(item, pools))
        elif message_type is not None:
            target.SetInParent()  # present even when empty
            fill(target, value, pools)
        else:
            setattr(message, name, resolve(value, pools))


def _fill_map(target: Any, entry: Any, items: Mapping[Any, Any], pools: Pools) -> None:
    value_is_message = entry.fields_by_name["value"].message_type is not None
    for key, value in items.items():
        key = resolve(key, pools)
        if value_is_message:
            fill(target[key], value, pools)
        else:
            target[key] = resolve(value, pools)


def harvest(
    message: Message, keep: Callable[[str], bool], into: dict[str, list[str]], bound: int
) -> None:
    """Adds every non-empty string field of `message` (nested ones too) whose
    name `keep` accepts to `into[name]`, keeping the newest `bound` of each."""
    for field, value in message.ListFields():
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                continue
            items = value if field.is_repeated else [value]
            for item in items:
                harvest(item, keep, into, bound)
        elif field.type == FieldDescriptor.TYPE_STRING and keep(field.name):
            values = value if field.is_repeated else [value]
            add_to_pool(into, field.name, [v for v in values if v], bound)


def add_to_pool(pools: dict[str, list[str]], name: str, values: list[str], bound: int) -> None:
    pool = pools.setdefault(name, [])
    for value in values:
        if value in pool:
            continue
        pool.append(value)
        if len(pool) > bound:
            del pool[0]
