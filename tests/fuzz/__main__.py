"""The command line: ``python -m tests.fuzz --messages 100000 --seed 7`` prints the report's
summary and exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import tests.fuzz
from tests.fuzz.config import STATES
from tests.fuzz.results import Limits
from tests.fuzz.run import run_fuzz


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.fuzz", description=tests.fuzz.__doc__.split("\n\n")[0]
    )
    p.add_argument("--messages", type=int, default=10000, help="messages per state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--states", default=",".join(STATES), help="comma-separated, in this order")
    p.add_argument("--only", help="regex: send only message classes matching it")
    p.add_argument("--skip", help="regex: never send message classes matching it")
    p.add_argument("--max-crashes", type=int, default=5, help="per state; then the next state")
    p.add_argument("--no-triage", action="store_true", help="do not replay to find culprits")
    p.add_argument("--rss-limit-mib", type=int, default=200)
    p.add_argument("--log-bytes-per-message", type=int, default=20)
    p.add_argument("--keep", type=Path, help="work (dataset, producer logs) in this directory")
    args = p.parse_args(argv)
    states = [s for s in args.states.split(",") if s]
    if unknown := set(states) - set(STATES):
        p.error(f"unknown state(s) {sorted(unknown)}; known: {', '.join(STATES)}")
    import datasets

    datasets.disable_progress_bars()
    report = run_fuzz(
        messages=args.messages,
        seed=args.seed,
        states=states,
        workdir=args.keep,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        limits=Limits(
            rss_growth=args.rss_limit_mib << 20, log_per_message=args.log_bytes_per_message
        ),
        max_crashes=args.max_crashes,
        triage=not args.no_triage,
        only=args.only,
        skip=args.skip,
    )
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
