"""Inference over Triton's HTTP endpoint (KServe v2 with binary tensors).

Why not gRPC for the hot path: in this process a grpc.aio unary call costs
about 0.4 ms of CPU (the completion-queue poller thread hands every event to
the event loop), a keep-alive HTTP/1.1 exchange on an asyncio stream about
0.15 ms, and Triton answers it sooner too (measured side by side on the
2-core development machine: p50 1.0 ms against 1.35 ms). Model control
(load, readiness) stays on gRPC; only `infer` goes here.

One request per connection at a time (no pipelining); idle connections are
kept for the next call, a connection whose call failed or timed out is
closed (its answer may still arrive), so a late answer is never read by the
next call.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

_MAX_IDLE = 32
_OUTPUTS = [
    {"name": "SCORE", "parameters": {"binary_data": True}},
    {"name": "CONTRIB", "parameters": {"binary_data": True}},
]


class TritonHttpError(Exception):
    """Triton answered with an error (its message, as Triton wrote it)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.http_status = status


class TritonHttpUnavailable(ConnectionError):
    """No connection, or it broke mid-call."""


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("http://").rstrip("/").rpartition(":")
    return host or "127.0.0.1", int(port)


class TritonHttpInfer:
    def __init__(self, address: str) -> None:
        self.address = address
        self._host, self._port = _split(address)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._paths: dict[tuple[str, int], bytes] = {}

    def _path(self, model: str, version: int) -> bytes:
        path = self._paths.get((model, version))
        if path is None:
            path = f"/v2/models/{model}/versions/{version}/infer".encode()
            self._paths[(model, version)] = path
        return path

    async def infer(
        self, model: str, version: int, rows: FloatArray, timeout_s: float, queue_timeout_us: int
    ) -> tuple[FloatArray, FloatArray]:
        data = np.ascontiguousarray(rows, dtype=np.float32)
        payload = data.tobytes()
        header: dict[str, Any] = {
            "inputs": [
                {
                    "name": "FEATURES",
                    "shape": list(data.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(payload)},
                }
            ],
            "outputs": _OUTPUTS,
        }
        if queue_timeout_us:  # 0: Triton's configured queue timeout applies
            header["parameters"] = {"timeout": queue_timeout_us}
        head = json.dumps(header, separators=(",", ":")).encode()
        request = b"".join(
            (
                b"POST ",
                self._path(model, version),
                b" HTTP/1.1\r\nHost: triton\r\nContent-Type: application/octet-stream\r\n"
                b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
                % (len(head), len(head) + len(payload)),
                head,
                payload,
            )
        )
        async with asyncio.timeout(timeout_s):
            return await self._exchange(request, data.shape[0])

    async def _exchange(self, request: bytes, n_rows: int) -> tuple[FloatArray, FloatArray]:
        reader, writer, reused = await self._connection()
        try:
            status, headers, body = await self._round_trip(reader, writer, request)
        except (OSError, asyncio.IncompleteReadError) as error:
            if not reused:
                raise TritonHttpUnavailable(f"triton http: {error!r}") from error
            # A kept connection the server had closed meanwhile: once more on
            # a new one (inference is idempotent).
            reader, writer = await self._connect()
            try:
                status, headers, body = await self._round_trip(reader, writer, request)
            except (OSError, asyncio.IncompleteReadError) as again:
                raise TritonHttpUnavailable(f"triton http: {again!r}") from again
        header_length = int(headers.get("inference-header-content-length", len(body)))
        meta = json.loads(body[:header_length])
        if status != 200:
            raise TritonHttpError(status, str(meta.get("error", meta)))
        return _outputs(meta, body[header_length:], n_rows)

    async def _round_trip(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        keep = False
        try:
            writer.write(request)
            status, headers, body = await _read_response(reader)
            keep = headers.get("connection", "").lower() != "close"
            return status, headers, body
        finally:
            # Cancelled (timeout) or broken: the connection may still carry
            # this call's answer, so it is never reused.
            if keep and len(self._idle) < _MAX_IDLE:
                self._idle.append((reader, writer))
            else:
                writer.close()

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A kept connection (reused: True) or a new one."""
        while self._idle:
            reader, writer = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        reader, writer = await self._connect()
        return reader, writer, False

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_connection(self._host, self._port)
        except OSError as error:
            raise TritonHttpUnavailable(f"triton http: cannot connect: {error}") from error

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" not in headers:
        raise TritonHttpError(status, "answer without Content-Length (not supported)")
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


def _outputs(meta: dict[str, Any], binary: bytes, n_rows: int) -> tuple[FloatArray, FloatArray]:
    found: dict[str, bytes] = {}
    offset = 0
    for output in meta["outputs"]:
        size = int(output["parameters"]["binary_data_size"])
        found[output["name"]] = binary[offset : offset + size]
        offset += size
    scores = np.frombuffer(found["SCORE"], dtype=np.float32).astype(np.float64)
    contributions = np.frombuffer(found["CONTRIB"], dtype=np.float32).astype(np.float64)
    return scores, contributions.reshape(n_rows, -1)
