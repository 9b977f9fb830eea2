"""`triplane ai ...`: train, promote, rollback, ope, backfill.

train writes a draft into the registry directly (no running plane needed),
trained on a dataset file under the state dir (`triplane ai datasets` and
`triplane ai bootstrap` write them: those commands need the synthetic world,
so the tools above the plane add them to this group);
promote and rollback go through the running plane's ModelRegistryService, so
Triton switches versions without a restart (promote to live passes the
off-policy gate, ai.ope, unless --force); ope asks the running plane for
EstimatePolicyValue (the plane reads the exposure log from NATS); backfill rebuilds one tenant (or
an account cohort) from the JetStream history into the configured store.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Callable
from typing import TypeAlias

import grpc
from google.protobuf import json_format, timestamp_pb2
from nats.js import JetStreamContext

from ai_plane.app import datasets_dir
from ai_plane.manager import train_into
from ai_plane.ope_log import OpeEvaluator
from ai_plane.pipeline import Applier, backfill
from ai_plane.registry import open_registry
from ai_plane.store.base import build_store
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.runtime import bus
from triplane.runtime import codec as wire
from triplane.runtime.clock import SystemClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.errors import InvalidArgument, TriplaneError
from triplane.runtime.net import dial_address
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import ADMIN, files_for, open_sync_channel

Handler = Callable[[Config, argparse.Namespace], int]
_STATES = {
    "approved": pb.MODEL_STATE_APPROVED,
    "live": pb.MODEL_STATE_LIVE,
    "retired": pb.MODEL_STATE_RETIRED,
}


SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(subparsers: SubParsers) -> SubParsers:
    """Adds `ai` and its subcommands to the `triplane` CLI; returns the `ai`
    command group, so the tools above the plane can add theirs to it."""
    ai = subparsers.add_parser("ai", help="AI plane: model registry, backfill")
    commands = ai.add_subparsers(dest="ai_command", required=True)

    train = commands.add_parser(
        "train", help="train a model on its dataset under the state dir (a draft)"
    )
    train.add_argument("model", choices=["payment_risk", "offer_propensity"])
    train.add_argument(
        "--seed", type=int, default=0, help="dataset (and LightGBM) seed; default: ai.models.seed"
    )
    train.set_defaults(func=lambda args: run(args, _train))

    promote = commands.add_parser("promote", help="move a version to approved, live or retired")
    promote.add_argument("model")
    promote.add_argument("version", type=int)
    promote.add_argument("--to", choices=sorted(_STATES), default="live")
    promote.add_argument("--address", default="", help="host:port (default: ai.listen)")
    promote.add_argument(
        "--force", action="store_true", help="promote to live even if the off-policy gate refuses"
    )
    promote.set_defaults(func=lambda args: run(args, _promote))

    estimate = commands.add_parser(
        "ope",
        help="off-policy estimate (IPS, SNIPS, DR with intervals) of a model version on "
        "the logged traffic (the learner's exposure log), beside the logging policy's value",
    )
    estimate.add_argument("--model", default="offer_propensity")
    estimate.add_argument("--version", type=int, default=0, help="0: the live version")
    estimate.add_argument("--tenant", default="", help="one tenant's traffic (default: all)")
    estimate.add_argument(
        "--since", default="", help="ISO 8601 (default: ai.ope.window_s before --until)"
    )
    estimate.add_argument("--until", default="", help="ISO 8601 (default: now)")
    estimate.add_argument("--address", default="", help="host:port (default: ai.listen)")
    estimate.add_argument(
        "--direct",
        action="store_true",
        help="without a running plane: read the registry and the exposure log (nats.url) here",
    )
    estimate.set_defaults(func=lambda args: run(args, _ope))

    rollback = commands.add_parser("rollback", help="make the previous live version live again")
    rollback.add_argument("model")
    rollback.add_argument("--address", default="", help="host:port (default: ai.listen)")
    rollback.set_defaults(func=lambda args: run(args, _rollback))

    fill = commands.add_parser("backfill", help="rebuild features of a tenant from JetStream")
    fill.add_argument("tenant")
    fill.add_argument("--accounts", default="", help="comma-separated cohort (default: all)")
    fill.set_defaults(func=lambda args: run(args, _backfill))
    return commands


def run(args: argparse.Namespace, handler: Handler) -> int:
    config = load_config(getattr(args, "config", None))
    try:
        return handler(config, args)
    except TriplaneError as err:
        print(f"error: {err.reason}: {err.message}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        reason, field = parse_rpc_error(err)
        print(f"error: {err.code().name}: {reason or err.details()} {field}", file=sys.stderr)
        return 2


def _print(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _train(config: Config, args: argparse.Namespace) -> int:
    registry = open_registry(config, SystemClock())
    try:
        record, created = train_into(
            registry, config.ai, datasets_dir(config), args.model, args.seed
        )
    finally:
        registry.close()
    _print(
        {
            "model": record.model,
            "version": record.version,
            "created": created,
            "state": str(record.state),
            "metrics": record.metrics,
            "artifact_sha256": record.artifact_sha256,
        }
    )
    return 0


def _stub(config: Config, address: str) -> ai_pb2_grpc.ModelRegistryServiceStub:
    """The registry as the admin identity (mutual TLS unless runtime.tls is off)."""
    target = address or dial_address(config.ai.listen)
    channel = open_sync_channel(target, files_for(config, ADMIN), who="triplane ai (admin)")
    return ai_pb2_grpc.ModelRegistryServiceStub(channel)


def _promote(config: Config, args: argparse.Namespace) -> int:
    request = pb.PromoteModelRequest(
        model=args.model, version=args.version, target_state=_STATES[args.to], force=args.force
    )
    response = _stub(config, args.address).PromoteModel(
        request, timeout=config.ai.triton.load_timeout_s + 30
    )
    shown: dict[str, object] = {
        "model": response.version.model,
        "version": response.version.version,
        "state": pb.ModelState.Name(response.version.state),
    }
    if response.HasField("gate"):
        shown["ope_gate"] = json_format.MessageToDict(
            response.gate, preserving_proto_field_name=True
        )
    _print(shown)
    return 0


def _timestamp(text: str, flag: str) -> timestamp_pb2.Timestamp | None:
    if not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument("OPE_TIME_INVALID", f"{flag} {text!r} is not ISO 8601") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def _ope_direct(
    config: Config, request: pb.EstimatePolicyValueRequest
) -> pb.EstimatePolicyValueResponse:
    """The same estimate without a running plane: the registry of the state
    dir (or database) and the exposure log from NATS (nats.url)."""
    if not config.nats.url:
        raise InvalidArgument("OPE_LOG_UNAVAILABLE", "--direct needs nats.url (NATS_URL)")
    registry = open_registry(config, SystemClock())
    nc = await bus.connect(config.nats, "ai-ope")
    try:

        async def jetstream() -> JetStreamContext:
            return nc.jetstream()

        evaluator = OpeEvaluator(config.ai.ope, registry, jetstream, SystemClock().now_us)
        return await evaluator.estimate(
            request.model,
            request.version,
            request.tenant_id,
            wire.micros(request.since, "since"),
            wire.micros(request.until, "until"),
        )
    finally:
        await nc.close()
        registry.close()


def _ope(config: Config, args: argparse.Namespace) -> int:
    request = pb.EstimatePolicyValueRequest(
        model=args.model,
        version=args.version,
        tenant_id=args.tenant,
        since=_timestamp(args.since, "--since"),
        until=_timestamp(args.until, "--until"),
    )
    if getattr(args, "direct", False):
        response = asyncio.run(_ope_direct(config, request))
    else:
        response = _stub(config, args.address).EstimatePolicyValue(request, timeout=60)
    _print(
        json_format.MessageToDict(
            response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )
    return 0


def _rollback(config: Config, args: argparse.Namespace) -> int:
    response = _stub(config, args.address).RollbackModel(
        pb.RollbackModelRequest(model=args.model), timeout=config.ai.triton.load_timeout_s + 5
    )
    _print(
        {
            "model": response.live.model,
            "live_version": response.live.version,
            "rollback_s": round(response.rollback_s, 3),
        }
    )
    return 0


async def _backfill_async(config: Config, args: argparse.Namespace) -> int:
    if config.ai.features.backend == "in_process":
        print(
            "error: the in-process store lives inside the running plane; "
            "backfill targets redis or aerospike (ai.features.backend)",
            file=sys.stderr,
        )
        return 2
    if not config.nats.url:
        print("error: nats.url (NATS_URL) is required", file=sys.stderr)
        return 2
    store = build_store(config.ai.features)
    cohort = {a for a in args.accounts.split(",") if a} or None
    applier = Applier(store, config.ai.features.namespace, cohort)
    nc = await bus.connect(config.nats, "ai-backfill")
    try:
        read = await backfill(nc.jetstream(), applier, args.tenant, config.ai.pipeline)
    finally:
        await nc.close()
        await store.close()
    _print(
        {
            "tenant": args.tenant,
            "messages_read": read,
            "applied": applier.applied,
            "already_applied": applier.duplicates,
        }
    )
    return 0


def _backfill(config: Config, args: argparse.Namespace) -> int:
    return asyncio.run(_backfill_async(config, args))
