"""A do-nothing grpc.aio hop, the floor under any Python gRPC sidecar.

`python -m bench.grpc_relay LISTEN TARGET` serves Triton's
`inference.GRPCInferenceService/ModelInfer` on LISTEN and forwards each call's
bytes, untouched, to the Triton at TARGET: no protobuf decoding, no features,
no fallback, no metrics, on the same event loop as the planes (uvloop). It is
what every sidecar must at least do (take a call, make a call, answer), so
the latency the AI benchmark measures through it, beside the direct calls and
the AI plane in the same run, shows how much of the plane's extra latency is
the hop itself and how much is the plane's own work.
"""

from __future__ import annotations

import sys

import grpc

from triplane.runtime.server import run

SERVICE = "inference.GRPCInferenceService"
METHOD = "ModelInfer"


async def serve(listen: str, target: str) -> None:
    channel = grpc.aio.insecure_channel(target)
    forward = channel.unary_unary(f"/{SERVICE}/{METHOD}")

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        answer: bytes = await forward(request, timeout=remaining)
        return answer

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(model_infer)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(listen)
    await server.start()
    await channel.channel_ready()
    print("relay ready", flush=True)
    await server.wait_for_termination()


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.grpc_relay LISTEN TARGET")
    run(lambda: serve(sys.argv[1], sys.argv[2]))


if __name__ == "__main__":
    main()
