"""`python -m bench` (`make bench`): runs the benchmark suites in order.

A suite is a module `bench/<name>.py` with a `main()`; the suites are run in
the order of SUITES, skipping any not written yet. `--only NAME` (or the ONLY
environment variable, as in `make bench ONLY=ledger`) runs just one. Each suite
merges its figures into bench/results.json (bench/common.py). The exit status is
non-zero when any suite failed; the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

SUITES = ("ledger", "policy", "ai", "gateway", "nba", "recon", "console")
BENCH_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    return [name for name in SUITES if (BENCH_DIR / f"{name}.py").is_file()]


def run_suite(name: str) -> int:
    """Runs one suite's main(); its exit status (0 for None, SystemExit honoured)."""
    print(f"\n######## bench: {name} ########", flush=True)
    started = time.monotonic()
    try:
        module = importlib.import_module(f"bench.{name}")
        result = module.main()
        code = int(result or 0)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception:
        traceback.print_exc()
        code = 1
    print(f"######## bench: {name}: exit {code} in {time.monotonic() - started:.0f} s", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=os.environ.get("ONLY", ""), help="one suite by name")
    args = parser.parse_args(argv)
    names = available()
    if args.only:
        if args.only not in SUITES:
            parser.error(f"unknown suite {args.only!r}; suites: {', '.join(SUITES)}")
        if args.only not in names:
            print(f"bench: suite {args.only!r} is not written yet (no bench/{args.only}.py)")
            return 2
        names = [args.only]
    if not names:
        print("bench: no suite found")
        return 2
    failed = [name for name in names if run_suite(name) != 0]
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"bench: done ({', '.join(names)}); results in bench/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
