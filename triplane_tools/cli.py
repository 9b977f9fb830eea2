"""The `triplane` command: the local stack, the demo, dev keys and certificates,
ledger checks.

Each plane adds its own subcommands through its `cli` module's
`register(subparsers)`. A registered command is run by the `func` it sets
(`parser.set_defaults(func=...)`), or else by the module's `run(args)`; either
takes the parsed arguments and returns an exit code (or an awaitable of one).
The global `--config` reaches them as `args.config` unless the command set its
own.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ai_plane import cli as ai_cli
from console import cli as console_cli
from gateway import cli as gateway_cli
from policy_plane import cli as policy_cli
from triplane.runtime.config import Config, ConfigError, load_config
from triplane.runtime.tls import IDENTITIES, TlsSetupError
from triplane_tools import models
from triplane_tools.replicas import DEFAULT_PG_ADMIN_DSN
from triplane_tools.stack import StackError

PLANE_COMMANDS = (policy_cli, ai_cli, gateway_cli, console_cli)


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.global_config)


# ---- up ----


def _cmd_up(args: argparse.Namespace) -> int:
    from triplane_tools.stack import run_foreground

    planes = args.planes.split(",") if args.planes else None
    return asyncio.run(
        run_foreground(
            _config(args),
            planes,
            replicas=args.replicas,
            postgres_admin_dsn=args.postgres,
            nats_cluster=args.nats_cluster,
        )
    )


# ---- demo ----


def _cmd_demo(args: argparse.Namespace) -> int:
    from triplane_tools import demo

    options = demo.DemoOptions(
        duration_s=args.duration_s,
        workers=args.workers,
        customers=args.customers,
        merchants=args.merchants,
        seed=args.seed,
        all_planes=args.all_planes,
        state_dir=args.state_dir,
        money_only=args.money_only,
    )
    return asyncio.run(demo.run_demo(options))


# ---- keys ----


def _cmd_keys_gen(args: argparse.Namespace) -> int:
    from triplane.runtime import tokens

    config = _config(args)
    state_dir = config.state_path.resolve()
    for what, (private_path, public_path) in (
        ("decision tokens", tokens.ensure_dev_keypair(state_dir)),
        ("decision log", tokens.ensure_dev_log_keypair(state_dir)),
    ):
        print(f"{what}:")
        print(f"  private key  {private_path}")
        print(f"  public key   {public_path}")
        print(f"  public (b64) {public_path.read_text().strip()}")
    return 0


# ---- certs ----


def _cmd_certs_dev(args: argparse.Namespace) -> int:
    from triplane_tools.certs import ensure_dev_certificates

    config = _config(args)
    issued = ensure_dev_certificates(
        config.state_path.resolve(),
        config.runtime.tls,
        args.identity or IDENTITIES,
        renew=args.renew,
    )
    for item in issued:
        state = "issued" if item.created else "kept  "
        print(
            f"{state} {item.identity:<13} {item.spiffe_id:<32} "
            f"until {item.not_after:%Y-%m-%d %H:%M}Z  {item.cert_path}"
        )
    return 0


# ---- money ----


async def _check_balanced(config: Config, address: str, tenant_id: str, timeout_s: float) -> int:
    import grpc

    from triplane.money.v1 import money_pb2, money_pb2_grpc
    from triplane.runtime.status import parse_rpc_error
    from triplane.runtime.tls import channel_for

    async with channel_for(config, address) as channel:
        stub = money_pb2_grpc.LedgerServiceStub(channel)
        try:
            response = await stub.CheckBalanced(
                money_pb2.CheckBalancedRequest(tenant_id=tenant_id), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as err:
            reason, field = parse_rpc_error(err)
            print(
                f"CheckBalanced failed: {err.code().name} {reason} {field} {err.details()}",
                file=sys.stderr,
            )
            return 2
    verdict = "BALANCED" if response.balanced else "NOT BALANCED"
    print(
        f"tenant {tenant_id}: {verdict} ({response.accounts_checked} accounts, "
        f"{response.postings_checked} postings)"
    )
    for total in response.totals:
        print(
            f"  {total.currency}: debits {total.debits_minor} credits {total.credits_minor} "
            f"pending debits {total.pending_debits_minor} "
            f"pending credits {total.pending_credits_minor}"
        )
    return 0 if response.balanced else 1


def _cmd_money_check_balanced(args: argparse.Namespace) -> int:
    from triplane.runtime.net import dial_address

    config = _config(args)
    address = args.address or dial_address(config.money.listen)
    return asyncio.run(_check_balanced(config, address, args.tenant, args.timeout_s))


async def _review_payout(config: Config, address: str, args: argparse.Namespace, token: str) -> int:
    """ApprovePayout (with the approval's token, read from a file: a token
    is a bearer credential, kept off the command line) or DeclinePayout."""
    import grpc

    from triplane.money.v1 import money_pb2, money_pb2_grpc
    from triplane.runtime.status import parse_rpc_error
    from triplane.runtime.tls import channel_for

    async with channel_for(config, address) as channel:
        stub = money_pb2_grpc.LedgerServiceStub(channel)
        try:
            if args.money_command == "approve-payout":
                answer = await stub.ApprovePayout(
                    money_pb2.ApprovePayoutRequest(
                        tenant_id=args.tenant,
                        payout_id=args.payout_id,
                        idempotency_key=args.idempotency_key,
                        decision_token=token,
                    ),
                    timeout=args.timeout_s,
                )
            else:
                answer = await stub.DeclinePayout(
                    money_pb2.DeclinePayoutRequest(
                        tenant_id=args.tenant,
                        payout_id=args.payout_id,
                        idempotency_key=args.idempotency_key,
                        case_id=args.case_id,
                    ),
                    timeout=args.timeout_s,
                )
        except grpc.aio.AioRpcError as err:
            reason, field = parse_rpc_error(err)
            print(f"{err.code().name} {reason} {field} {err.details()}", file=sys.stderr)
            return 2
    payout = answer.payout
    state = money_pb2.PayoutState.Name(payout.state).removeprefix("PAYOUT_STATE_").lower()
    print(
        f"payout {payout.payout_id}: {state}"
        f"{' (replayed)' if answer.replayed else ''} decision {payout.decision_id}"
    )
    return 0


def _cmd_money_review_payout(args: argparse.Namespace) -> int:
    from triplane.runtime.net import dial_address

    config = _config(args)
    address = args.address or dial_address(config.money.listen)
    token = ""
    if args.money_command == "approve-payout":
        if args.token_file == "-":
            token = sys.stdin.read().strip()
        else:
            token = Path(args.token_file).read_text().strip()
    return asyncio.run(_review_payout(config, address, args, token))


# ---- reconciliation ----


async def _recon_import(
    config: Config, address: str, args: argparse.Namespace, content: bytes
) -> int:
    import grpc

    from triplane.money.v1 import recon_pb2, recon_pb2_grpc
    from triplane.runtime.status import parse_rpc_error
    from triplane.runtime.tls import channel_for

    async with channel_for(config, address) as channel:
        stub = recon_pb2_grpc.ReconciliationServiceStub(channel)
        try:
            response = await stub.ImportStatement(
                recon_pb2.ImportStatementRequest(
                    tenant_id=args.tenant,
                    ledger_account_id=args.account,
                    content=content,
                    actor=args.actor,
                ),
                timeout=args.timeout_s,
            )
        except grpc.aio.AioRpcError as err:
            reason, field = parse_rpc_error(err)
            print(
                f"ImportStatement refused: {err.code().name} {reason} at {field}: {err.details()}",
                file=sys.stderr,
            )
            return 2
    if response.duplicate_file:
        print(f"{args.file}: imported before; nothing added")
        return 0
    for st in response.statements:
        agree = (
            ""
            if not st.has_balances
            else (" balances add up" if st.balances_agree else " balances DO NOT add up")
        )
        print(
            f"{st.statement_id} {st.kind} {st.bank_statement_id}: {st.line_count} lines, "
            f"{st.new_line_count} new{agree}"
        )
    rules: dict[str, int] = {}
    for m in response.matches:
        rules[m.rule] = rules.get(m.rule, 0) + len(m.line_fingerprints)
    print(
        f"lines read {response.lines_read}, new {response.lines_new}, matched "
        + (", ".join(f"{rule} {n}" for rule, n in sorted(rules.items())) or "none")
    )
    for b in response.breaks:
        print(
            f"break {b.break_id} {b.break_class} {b.amount.amount_minor} {b.amount.currency} "
            f"owner {b.owner}: {b.reason}"
        )
    return 1 if response.breaks else 0


def _cmd_recon_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from triplane.runtime.net import dial_address

    config = _config(args)
    address = args.address or dial_address(config.money.listen)
    content = Path(args.file).read_bytes()
    return asyncio.run(_recon_import(config, address, args, content))


def _add_recon_commands(sub: Any) -> None:
    recon = sub.add_parser("recon", help="reconciliation: bank statements against the ledger")
    recon_sub = recon.add_subparsers(dest="recon_command", required=True)
    imp = recon_sub.add_parser(
        "import",
        help="ImportStatement: a camt.052/053/054 or MT940 file, matched as it arrives "
        "(exit 1 when it raised breaks, 2 when refused)",
    )
    imp.add_argument("file")
    imp.add_argument("--tenant", required=True)
    imp.add_argument("--account", default="bank", help="the ledger's bank account (bank)")
    imp.add_argument("--actor", default="cli")
    imp.add_argument("--address", default="", help="host:port (default: money.listen)")
    imp.add_argument("--timeout-s", type=float, default=120.0)
    imp.set_defaults(func=_cmd_recon_import)


# ---- chaos ----


def _cmd_chaos(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from triplane_tools import chaos, chaos_checks

    if os.environ.get(chaos.FORK_SUPPORT_ENV) != "false":
        # Planes are restarted (forked) while this process's gRPC is busy;
        # gRPC's fork handlers then abort the child (chaos.FORK_SUPPORT_ENV).
        # The setting is read when grpc is imported, so the command starts over.
        env = {**os.environ, chaos.FORK_SUPPORT_ENV: "false"}
        command = [sys.executable, "-m", "triplane_tools.cli", *args.argv]
        os.execve(sys.executable, command, env)

    options = chaos.ChaosOptions(
        duration_s=args.duration_s,
        schedule=args.schedule,
        workers=args.workers,
        deadline_s=args.deadline_s,
        ai_replicas=args.ai_replicas,
        warmup_s=args.warmup_s,
        fault_gap_s=args.fault_gap_s,
        triton_stop_s=args.triton_stop_s,
        customers=args.customers,
        faults=tuple(args.faults.split(",")) if args.faults else chaos.FAULT_KINDS,
        seed=args.seed,
        state_dir=Path(args.state_dir).resolve() if args.state_dir else None,
    )
    report = asyncio.run(chaos.run_chaos(options))
    print(report.table(), flush=True)
    if not args.no_results:
        path = Path(args.results) if args.results else chaos_checks.default_results_path()
        chaos_checks.write_results(path, report.figures)
        print(f"figures merged into {path}")
    return 0 if report.ok else 1


def _add_chaos_command(sub: Any) -> None:
    chaos = sub.add_parser(
        "chaos",
        help="a mixed workload through the gateway of a 2-replica stack while planes, "
        "Triton, a JetStream node and PostgreSQL are killed; then the stores are checked",
    )
    chaos.add_argument("--duration-s", type=float, default=240.0, help="workload length")
    chaos.add_argument(
        "--schedule",
        choices=("full", "short"),
        default="full",
        help="full: the fault schedule in rounds for the whole run; short: each fault once",
    )
    chaos.add_argument("--workers", type=int, default=6, help="concurrent clients")
    chaos.add_argument("--deadline-s", type=float, default=5.0, help="each call's deadline")
    chaos.add_argument(
        "--ai-replicas", type=int, choices=(1, 2), default=2, help="AI plane replicas"
    )
    chaos.add_argument(
        "--warmup-s", type=float, default=8.0, help="workload before the first fault"
    )
    chaos.add_argument("--fault-gap-s", type=float, default=6.0, help="between two faults")
    chaos.add_argument(
        "--triton-stop-s", type=float, default=5.0, help="how long Triton stays stopped"
    )
    chaos.add_argument(
        "--faults",
        default="",
        help="comma-separated kinds of fault (default: all of "
        "money,policy,gateway,ai,triton,nats,postgres)",
    )
    chaos.add_argument("--customers", type=int, default=40, help="synthetic customers seeded")
    chaos.add_argument("--seed", type=int, default=20261206)
    chaos.add_argument("--state-dir", default="", help="keep the stack's state and logs here")
    chaos.add_argument("--results", default="", help="results file (default: bench/results.json)")
    chaos.add_argument("--no-results", action="store_true", help="write no results file")
    chaos.set_defaults(func=_cmd_chaos)


# ---- parser ----


def _add_stack_commands(sub: Any) -> None:
    up = sub.add_parser("up", help="run the stack in the foreground until Ctrl-C / SIGTERM")
    up.add_argument(
        "--planes", default="", help="comma-separated plane names (default: all available)"
    )
    up.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="processes of every plane (above 1: on PostgreSQL and Redis, the gateway "
        "balancing round_robin over every replica)",
    )
    up.add_argument(
        "--postgres",
        default=DEFAULT_PG_ADMIN_DSN,
        help="admin DSN of the PostgreSQL server on which --replicas creates one database "
        "per plane (a plane given a DSN, e.g. TRIPLANE_MONEY_DSN, keeps it)",
    )
    up.add_argument(
        "--nats-cluster",
        action="store_true",
        help="a 3-node JetStream cluster on loopback (sync_interval: always) with R3 "
        "streams instead of one nats-server",
    )
    up.set_defaults(func=_cmd_up)

    demo = sub.add_parser("demo", help="start a fresh stack, drive a workload, print a summary")
    demo.add_argument("--duration-s", type=float, default=60.0, help="workload length")
    demo.add_argument("--workers", type=int, default=16, help="concurrent clients")
    demo.add_argument("--customers", type=int, default=200)
    demo.add_argument("--merchants", type=int, default=20)
    demo.add_argument("--seed", type=int, default=7, help="seed of the workload's choices")
    demo.add_argument(
        "--all-planes", action="store_true", help="start every available plane, not only money"
    )
    demo.add_argument(
        "--state-dir", default="", help="state dir (default: .triplane/demo-<timestamp>)"
    )
    demo.add_argument(
        "--money-only",
        action="store_true",
        help="the money plane's own workload (no gateway), as before the product flows",
    )
    demo.set_defaults(func=_cmd_demo)


def _add_keys_commands(sub: Any) -> None:
    # `signing-keys`: the policy plane's decision-signing keys. `keys` is the
    # gateway's (partners' API keys: gateway/auth/cli.py).
    keys = sub.add_parser("signing-keys", help="dev signing key pair of the embedded stack")
    keys_sub = keys.add_subparsers(dest="signing_keys_command", required=True)
    gen = keys_sub.add_parser(
        "gen", help="create the dev Ed25519 key pairs (tokens, decision log) under state_dir/keys"
    )
    gen.set_defaults(func=_cmd_keys_gen)


def _add_certs_commands(sub: Any) -> None:
    certs = sub.add_parser("certs", help="certificates of the mesh's mutual TLS")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    dev = certs_sub.add_parser(
        "dev",
        help="create the dev CA and a certificate per identity under state_dir/tls "
        "(missing or due ones; the stack does it at start)",
    )
    dev.add_argument(
        "--renew",
        action="store_true",
        help="re-issue the certificates now (a rotation: running planes pick it up)",
    )
    dev.add_argument(
        "--identity",
        action="append",
        default=[],
        choices=IDENTITIES,
        help="only this identity (repeatable; default: every one)",
    )
    dev.set_defaults(func=_cmd_certs_dev)


def _add_money_commands(sub: Any) -> None:
    money = sub.add_parser("money", help="money plane operations")
    money_sub = money.add_subparsers(dest="money_command", required=True)
    check = money_sub.add_parser(
        "check-balanced", help="CheckBalanced for a tenant (exit 1 when not balanced)"
    )
    check.add_argument("--tenant", required=True)
    check.add_argument("--address", default="", help="host:port (default: money.listen)")
    check.add_argument("--timeout-s", type=float, default=30.0)
    check.set_defaults(func=_cmd_money_check_balanced)
    for name, what in (
        ("approve-payout", "ApprovePayout: a payout held for review, with its approval's token"),
        ("decline-payout", "DeclinePayout: a payout held for review, declined (nothing posted)"),
    ):
        review = money_sub.add_parser(name, help=what)
        review.add_argument("--tenant", required=True)
        selector = review.add_mutually_exclusive_group(required=True)
        selector.add_argument("--payout-id", default="")
        selector.add_argument("--idempotency-key", default="", help="the payout's key")
        if name == "approve-payout":
            review.add_argument(
                "--token-file",
                required=True,
                help="file holding the approval's decision token (policy.case.resolved's); "
                "- for stdin",
            )
        else:
            review.add_argument("--case-id", required=True)
        review.add_argument("--address", default="", help="host:port (default: money.listen)")
        review.add_argument("--timeout-s", type=float, default=30.0)
        review.set_defaults(func=_cmd_money_review_payout)


def _register_plugins(sub: Any) -> dict[str, Any]:
    """Lets each plane's CLI module add its commands; returns the module that
    added each command name."""
    owners: dict[str, Any] = {}
    for module in PLANE_COMMANDS:
        before = set(sub.choices)
        group = module.register(sub)
        if module is ai_cli:
            # `ai bootstrap` and `ai datasets` need the synthetic world, which
            # the plane never imports: the tools add them to its group.
            models.register(group)
        owners.update(dict.fromkeys(set(sub.choices) - before, module))
    return owners


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triplane", description="Triplane: real-time decisioning mesh for embedded finance."
    )
    parser.add_argument(
        "--config",
        dest="global_config",
        default=None,
        help="YAML config file (default: $TRIPLANE_CONFIG)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_stack_commands(sub)
    _add_keys_commands(sub)
    _add_certs_commands(sub)
    _add_money_commands(sub)
    _add_recon_commands(sub)
    _add_chaos_command(sub)
    parser.set_defaults(plugin_owners=_register_plugins(sub))
    return parser


def _handler(args: argparse.Namespace) -> Any:
    func = getattr(args, "func", None)
    if func is not None:
        return func
    owner = args.plugin_owners.get(args.command)
    run = getattr(owner, "run", None)
    if run is None:
        raise SystemExit(f"triplane: command {args.command!r} has no handler")
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "config", None) is None:
        args.config = args.global_config
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = _handler(args)(args)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
    except ConfigError as err:
        print(f"triplane: config error: {err}", file=sys.stderr)
        return 2
    except (StackError, TlsSetupError) as err:
        print(f"triplane: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


async def _await(awaitable: Any) -> Any:
    return await awaitable


if __name__ == "__main__":
    sys.exit(main())
