"""The one error mapper bounds what a status echoes of a request, so the
status fits a gRPC client's trailer limit whatever the caller sent (found by
the fuzz suite: a 4,097-character value quoted in an error message reached
the caller as RESOURCE_EXHAUSTED, its reason unreadable)."""

from __future__ import annotations

from google.rpc import error_details_pb2

from triplane.runtime.errors import InvalidArgument
from triplane.runtime.status import (
    MAX_STATUS_FIELD_BYTES,
    MAX_STATUS_MESSAGE_BYTES,
    to_status_proto,
)


def _unpacked(status: object) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest]:
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    for detail in status.details:  # type: ignore[attr-defined]
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            detail.Unpack(bad)
    return info, bad


def test_a_huge_message_field_and_metadata_are_cut() -> None:
    huge = "\U0001f642" * 5000  # four UTF-8 bytes each
    status = to_status_proto(
        InvalidArgument("ID_INVALID", f"bad id {huge!r}", f"attributes[{huge}]", {"scope": huge})
    )
    info, bad = _unpacked(status)
    assert len(status.message.encode()) <= MAX_STATUS_MESSAGE_BYTES
    assert status.message.startswith("bad id '\U0001f642") and status.message.endswith("...")
    assert len(info.metadata["field"].encode()) <= MAX_STATUS_FIELD_BYTES
    assert len(info.metadata["scope"].encode()) <= MAX_STATUS_FIELD_BYTES
    assert info.reason == "ID_INVALID"
    violation = bad.field_violations[0]
    assert violation.field == info.metadata["field"] and violation.description == status.message
    assert status.ByteSize() < 4096


def test_an_ordinary_status_is_kept_whole() -> None:
    status = to_status_proto(InvalidArgument("FIELD_REQUIRED", "amount is required", "amount"))
    info, bad = _unpacked(status)
    assert status.message == "amount is required"
    assert info.metadata["field"] == "amount" and bad.field_violations[0].field == "amount"
