"""Triton over gRPC: inference through the generated stub, model control
through tritonclient's aio client (the adapter behind `scorer.TritonInference`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ai_plane.scorer import FloatArray
from ai_plane.triton_http import TritonHttpInfer


class TritonClient:
    """Triton over gRPC, reduced to what the plane needs.

    Inference goes straight through the generated gRPC stub on a channel of
    its own: the request is assembled from prebuilt parts (model, version,
    input tensor description per row count), the rows travel as one raw FP32
    buffer and the outputs are read with `np.frombuffer`. tritonclient's
    wrapper objects (InferInput, InferResult, the per-call request builder)
    cost more CPU per call than the rest of the call's Python together.
    Model control (load, readiness, liveness) stays on tritonclient's aio
    client: it is off the hot path.
    """

    def __init__(self, url: str, http_url: str = "") -> None:
        import grpc
        import tritonclient.grpc.aio as triton_aio
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self._pb: Any = service_pb2
        self._client: Any = triton_aio.InferenceServerClient(url)
        self._channel: Any = grpc.aio.insecure_channel(
            url,
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ],
        )
        self._infer: Any = service_pb2_grpc.GRPCInferenceServiceStub(self._channel).ModelInfer
        # (rows, columns) -> the FEATURES tensor description.
        self._inputs: dict[tuple[int, int], Any] = {}
        self.url = url
        # The same Triton's HTTP endpoint, when known: inference goes there
        # (a third of the CPU of a grpc.aio call here; see triton_http.py).
        self.http: TritonHttpInfer | None = TritonHttpInfer(http_url) if http_url else None

    def _input(self, shape: tuple[int, int]) -> Any:
        tensor = self._inputs.get(shape)
        if tensor is None:
            tensor = self._pb.ModelInferRequest.InferInputTensor(
                name="FEATURES", datatype="FP32", shape=list(shape)
            )
            self._inputs[shape] = tensor
        return tensor

    async def infer(
        self, model: str, version: int, rows: FloatArray, timeout_s: float, queue_timeout_us: int
    ) -> tuple[FloatArray, FloatArray]:
        if self.http is not None:
            return await self.http.infer(model, version, rows, timeout_s, queue_timeout_us)
        data = np.ascontiguousarray(rows, dtype=np.float32)
        request = self._pb.ModelInferRequest(
            model_name=model,
            model_version=str(version),
            inputs=[self._input((data.shape[0], data.shape[1]))],
            raw_input_contents=[data.tobytes()],
        )
        if queue_timeout_us:  # 0: Triton's configured queue timeout applies
            request.parameters["timeout"].int64_param = queue_timeout_us
        response = await self._infer(request, timeout=timeout_s)
        return _outputs(response, data.shape[0])

    async def load(
        self,
        model: str,
        timeout_s: float,
        config: str | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        await self._client.load_model(model, config=config, files=files, client_timeout=timeout_s)

    async def ready(self, model: str, version: int, timeout_s: float) -> bool:
        ready: bool = await self._client.is_model_ready(
            model, str(version), client_timeout=timeout_s
        )
        return ready

    async def warm_up(self, timeout_s: float) -> bool:
        """Opens both connections now, so the first score does not pay for it."""
        try:
            live: bool = await self._client.is_server_live(client_timeout=timeout_s)
            await self._channel.channel_ready()
        except Exception:
            return False
        return live

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        await self._client.close()
        await self._channel.close()


_MAX_MESSAGE_BYTES = 2**31 - 1


def _outputs(response: Any, n_rows: int) -> tuple[FloatArray, FloatArray]:
    """(SCORE per row, CONTRIB rows) of a ModelInferResponse with raw outputs."""
    raw = response.raw_output_contents
    found: dict[str, bytes] = {o.name: raw[i] for i, o in enumerate(response.outputs)}
    scores = np.frombuffer(found["SCORE"], dtype=np.float32).astype(np.float64)
    contributions = np.frombuffer(found["CONTRIB"], dtype=np.float32).astype(np.float64)
    return scores, contributions.reshape(n_rows, -1)
