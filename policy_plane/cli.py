"""`triplane policy ...`: verify-log, load-bundle, replay.

verify-log and replay read the store directly (an auditor needs no running
plane); load-bundle validates the file locally, then hands it to the running
plane over gRPC, or to the fleet through the NATS KV key.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec

from policy_plane import bundle_sync
from policy_plane.app import build_engine, open_policy_store
from policy_plane.bundle import BundleSource
from policy_plane.bundles_registry import BundleRegistry
from policy_plane.decision_log import verify_all, verify_chain
from policy_plane.pii import DecisionSealer, load_cipher
from policy_plane.replay import (
    Confusion,
    ReplayParallelism,
    ReplayWindow,
    default_workers,
    replay_window,
)
from triplane.runtime import bus
from triplane.runtime.clock import SystemClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.errors import TriplaneError
from triplane.runtime.net import dial_address
from triplane.runtime.tls import channel_for


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `policy` with its subcommands to the `triplane` CLI; each sets
    `func`, so the caller runs `sys.exit(args.func(args))`."""
    policy = subparsers.add_parser("policy", help="policy plane: decision log, bundles, replay")
    commands = policy.add_subparsers(dest="policy_command", required=True)

    verify = commands.add_parser(
        "verify-log", help="check the decision log's hash chain and signatures"
    )
    verify.add_argument(
        "--chain", default="", help="one chain id (default: every chain, each writer's)"
    )
    verify.set_defaults(func=lambda args: run(args, _verify_log))

    load = commands.add_parser("load-bundle", help="validate a bundle and make it live")
    load.add_argument("path", type=Path)
    load.add_argument("--label", default="", help="override the bundle's label")
    load.add_argument(
        "--target", choices=["live", "shadow", "store"], default="live", help="where it goes (gRPC)"
    )
    load.add_argument(
        "--via",
        choices=["grpc", "kv", "check"],
        default="grpc",
        help="grpc: the plane at --address; kv: the NATS KV key; check: validate only",
    )
    load.add_argument("--address", default="", help="host:port (default: policy.listen)")
    load.set_defaults(func=lambda args: run(args, _load_bundle))

    replay = commands.add_parser(
        "replay", help="re-evaluate logged decisions under a bundle version"
    )
    replay.add_argument("--tenant", required=True)
    replay.add_argument("--account", default="")
    replay.add_argument("--since", default="", help="ISO 8601 start (inclusive)")
    replay.add_argument("--until", default="", help="ISO 8601 end (exclusive)")
    replay.add_argument("--bundle-version", default="", help="default: each decision's own version")
    replay.add_argument("--max-decisions", type=int, default=0)
    replay.add_argument(
        "--workers",
        type=int,
        default=-1,
        help="worker processes (0: one per core, 1: none; default: "
        "policy.decision_log.replay_workers)",
    )
    replay.set_defaults(func=lambda args: run(args, _replay))


Handler = Callable[[Config, argparse.Namespace], int]


def run(args: argparse.Namespace, handler: Handler) -> int:
    """Runs one subcommand; `args.func(args)` is what the triplane CLI calls."""
    # `--config` belongs to the top-level `triplane` parser.
    config = load_config(getattr(args, "config", None))
    try:
        return handler(config, args)
    except TriplaneError as err:
        print(
            f"error: {err.reason}: {err.message}" + (f" (field {err.field})" if err.field else ""),
            file=sys.stderr,
        )
        return 2


def _verify_log(config: Config, args: argparse.Namespace) -> int:
    engine = build_engine(config)
    page = config.policy.decision_log.replay_page_records
    if args.chain:
        result = verify_chain(engine.store, engine.log_keys, args.chain, page)
        chains = [args.chain]
    else:
        result = verify_all(engine.store, engine.log_keys, page)
        chains = engine.store.chain_ids(with_rows=True)
    engine.store.db.close()
    print(json.dumps({"chain_id": args.chain, "chains": chains, **_fields(result)}))
    return 0 if result.valid else 1


def _fields(obj: object) -> dict[str, object]:
    return {name: getattr(obj, name) for name in getattr(obj, "__slots__", ())}


def _load_bundle(config: Config, args: argparse.Namespace) -> int:
    source = BundleSource(yaml_text=args.path.read_text(), label_override=args.label)
    store = open_policy_store(config)
    registry = BundleRegistry(store, config.policy, SystemClock())
    try:
        compiled = registry.compile(source, bundle_dir=args.path.parent)
    finally:
        store.db.close()
    # Ship the resolved source: the plane may not see the lists beside the file.
    resolved = msgspec.structs.replace(compiled.source, label_override=compiled.label)
    if args.via == "check":
        print(
            json.dumps({"version": compiled.version, "rules": len(compiled.rules), "valid": True})
        )
        return 0
    if args.via == "kv":
        asyncio.run(_put_kv(config, resolved))
    else:
        address = args.address or dial_address(config.policy.listen)
        asyncio.run(_load_grpc(config, address, resolved, args.target))
    print(json.dumps({"version": compiled.version, "via": args.via, "target": args.target}))
    return 0


async def _put_kv(config: Config, source: BundleSource) -> None:
    client = await bus.connect(config.nats, "triplane-cli")
    try:
        bundles = config.policy.bundles
        await bundle_sync.publish_bundle(
            client.jetstream(),
            bundles.kv_bucket,
            bundles.kv_key,
            source,
            config.policy.limits.max_bundle_bytes,
        )
    finally:
        await client.close()


async def _load_grpc(config: Config, address: str, source: BundleSource, target: str) -> None:
    from triplane.policy.v1 import policy_pb2 as pb
    from triplane.policy.v1 import policy_pb2_grpc as pb_grpc

    targets = {
        "live": pb.BUNDLE_TARGET_LIVE,
        "shadow": pb.BUNDLE_TARGET_SHADOW,
        "store": pb.BUNDLE_TARGET_STORE,
    }
    # As the admin identity: loading a bundle is an admin RPC.
    async with channel_for(config, address) as channel:
        stub = pb_grpc.BundleServiceStub(channel)
        await stub.LoadBundle(
            pb.LoadBundleRequest(
                content=source.yaml_text,
                label=source.label_override,
                sanctions_list_csv=source.sanctions_csv,
                sanctions_aliases_csv=source.aliases_csv,
                target=targets[target],
            ),
            timeout=30,
        )


def _confusion(confusion: Confusion) -> dict[str, object]:
    return {**vars(confusion), "precision": confusion.precision, "recall": confusion.recall}


def _parse_time(text: str, name: str) -> int:
    if not text:
        return 0
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise SystemExit(f"--{name}: not an ISO 8601 time: {text!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1_000_000)


def _replay(config: Config, args: argparse.Namespace) -> int:
    log_config = config.policy.decision_log
    workers = args.workers if args.workers >= 0 else log_config.replay_workers
    store = open_policy_store(config)
    registry = BundleRegistry(store, config.policy, SystemClock())
    window = ReplayWindow(
        tenant_id=args.tenant,
        account_id=args.account,
        start_us=_parse_time(args.since, "since"),
        end_us=_parse_time(args.until, "until") or 2**62,
        max_decisions=args.max_decisions or config.policy.limits.max_replay_decisions,
    )
    try:
        report = replay_window(
            store,
            registry.resolve,
            window,
            args.bundle_version,
            config.policy.decision_log.replay_page_records,
            config.policy.limits.max_changed_decisions_listed,
            ReplayParallelism(default_workers(workers), log_config.replay_parallel_min_decisions),
            sealer=DecisionSealer(load_cipher(config.policy.pii, config.state_path)),
        )
    finally:
        store.db.close()
    print(
        json.dumps(
            {
                "decisions_replayed": report.replayed,
                "decisions_identical": report.identical,
                "determinism_score": report.determinism_score,
                "drift_rate": report.drift_rate,
                "changed": [_fields(c) for c in report.changed],
                "decisions_labelled": report.labelled,
                "logged_backtest": _confusion(report.logged_backtest),
                "replayed_backtest": _confusion(report.replayed_backtest),
                "elapsed_s": report.elapsed_s,
            }
        )
    )
    return 0 if report.determinism_score == 1.0 or args.bundle_version else 1
