"""The ``lensfeed`` command: one entry point with a subcommand per job.

``lensfeed demo``          the whole job on this machine, on the embedded demo dataset
``lensfeed metrics``       a run's metrics per cycle and rank (``--plot``, ``--tensorboard``)
``lensfeed produce``       one producer (``python -m lensfeed.producer``)
``lensfeed train``         the reference trainer (``python -m lensfeed.trainer``; torchrun: DDP)
``lensfeed fake-produce``  synthetic batches over the real protocol (``lensfeed.producer.fake``)
``lensfeed tokenize``      .txt/.jsonl corpus -> pretokenized fixed-length Arrow dataset
``lensfeed keys``          create the CURVE key set for authenticated, encrypted tcp

Each subcommand's module is imported only when it runs, so ``lensfeed --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str
    help: str

    def load(self) -> Callable[[Sequence[str] | None], int]:
        return importlib.import_module(self.module).main  # type: ignore[no-any-return]


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "lensfeed.demo",
        "run producers + a 2-rank CPU trainer on the embedded demo dataset, then summarize",
    ),
    "metrics": Command(
        "lensfeed.metrics",
        "summarise a run's metrics JSONL per cycle and rank; --plot PNG, --tensorboard LOGDIR",
    ),
    "produce": Command(
        "lensfeed.producer.main", "serve one DDP rank's shard over ZeroMQ (a producer)"
    ),
    "train": Command("lensfeed.trainer.main", "the reference DDP trainer (run it under torchrun)"),
    "fake-produce": Command(
        "lensfeed.producer.fake", "serve synthetic batches over the real protocol (no dataset)"
    ),
    "tokenize": Command(
        "lensfeed.pretokenize",
        "turn .txt/.jsonl text into a pretokenized fixed-length Arrow dataset",
    ),
    "keys": Command(
        "lensfeed.keys", "create CURVE keys for authenticated, encrypted tcp (feed.keys_dir)"
    ),
}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lensfeed")
    except Exception:
        return "unknown"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lensfeed",
        description="Streaming data-loader service for PyTorch training: per-rank producers "
        "regenerate a cycling cache and push it over ZeroMQ to the trainer ranks.",
        epilog="Run 'lensfeed COMMAND --help' for a command's options. Quick start: "
        "'lensfeed demo'.",
    )
    p.add_argument("--version", action="version", version=f"lensfeed {_version()}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for name, cmd in COMMANDS.items():
        sub.add_parser(name, help=cmd.help, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    if not args or args[0] in ("-h", "--help"):
        p.print_help()
        return 0 if args else 2
    if args[0] == "--version":
        p.parse_args(args[:1])  # prints and exits
    name, rest = args[0], args[1:]
    cmd = COMMANDS.get(name)
    if cmd is None:
        p.error(f"unknown command {name!r} (choose from {', '.join(COMMANDS)})")
    return int(cmd.load()(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
