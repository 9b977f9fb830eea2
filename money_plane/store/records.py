"""Compact binary encoding of domain records for storage (msgpack arrays).

The stores' own format, not the wire's: it lives beside the stores that read
and write it, while `money_plane.codec` translates the protobuf contract."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from money_plane.domain import Entry, Hold, IdempotencyRecord, Reserve

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {
    cls: msgspec.msgpack.Decoder(cls) for cls in (Entry, Hold, Reserve, IdempotencyRecord)
}


def encode(record: msgspec.Struct) -> bytes:
    return _encoder.encode(record)


def decode(data: bytes, cls: type[T]) -> T:
    return _decoders[cls].decode(data)  # type: ignore[no-any-return]
