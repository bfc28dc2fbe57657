"""``lensfeed demo``: the whole job on one machine, on a dataset made from Python's own source.

1. Creates ``dataset.path`` (``data/demo`` in ``conf/demo.yaml``) if it is missing: the source
   of a fixed list of standard-library modules, byte-level tokens packed into rows of 128
   (:func:`prepare_demo_data`; offline and deterministic for a given Python version).
2. Starts one producer per rank (``python -m producer --config C --rank r``) and a CPU DDP
   trainer (``python -m torch.distributed.run --standalone --nproc_per_node W -m trainer
   --config C``), passing the same ``key=value`` overrides to all of them.
3. Waits for the trainer (rank 0 shows a progress bar), then prints this run's summary from the
   metrics JSONL (:mod:`lensfeed.metrics`, as ``lensfeed metrics`` does). Exits non-zero if any
   process failed; on failure or Ctrl-C every child is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lensfeed.common.errors import LensfeedError
from lensfeed.common.metrics import metrics_file
from lensfeed.demo_data import (
    DEMO_SEQ_LEN,
    prepare_demo_data,
)
from lensfeed.metrics import read_new_records, summarize

DEFAULT_CONFIG = "demo.yaml"
#: Seconds producers get to exit by themselves once the trainer is done.
_PRODUCER_EXIT_S = 15.0
#: Seconds the trainer gets to notice a dead producer before it is stopped.
_TRAINER_GRACE_S = 5.0
_STOP_S = 10.0


def _say(msg: str) -> None:
    print(f"[lensfeed demo] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- paths


def repo_root() -> Path:
    """The checkout that holds ``conf/`` (src/lensfeed/ -> the repository), else the cwd."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "conf").is_dir() else Path.cwd()


def conf_dir() -> Path:
    return repo_root() / "conf"


def resolve_config(name: str | None) -> Path:
    """``--config`` as given, else relative to the repo / its ``conf/`` (default demo.yaml)."""
    if name is None:
        name = DEFAULT_CONFIG
    given = Path(name)
    candidates = [given]
    if not given.is_absolute():
        candidates += [repo_root() / given, conf_dir() / given, Path.cwd() / "conf" / given]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise LensfeedError(f"config file not found: {name} (tried {tried})")


# --------------------------------------------------------------------------- metrics


def _offsets(metrics_path: str, world: int) -> dict[int, int]:
    """Each rank's metrics file size before the run: the summary reads only what follows."""
    out = {}
    for r in range(world):
        f = metrics_file(metrics_path, r)
        out[r] = f.stat().st_size if f.is_file() else 0
    return out


# --------------------------------------------------------------------------- processes


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # 2 trainer ranks + producers share the cores
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def producer_cmd(config: Path, rank: int, overrides: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lensfeed.producer",
        "--config",
        str(config),
        "--rank",
        str(rank),
    ] + list(overrides)


def trainer_cmd(config: Path, world: int, overrides: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(world),
        "-m",
        "lensfeed.trainer",
        "--config",
        str(config),
        *overrides,
    ]


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A child in its own process group, so :func:`_stop` reaches everything it starts."""
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def _signal_group(p: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every child's process group (torchrun and its workers alike), then SIGKILL
    whatever is left after ``_STOP_S``."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


class _Terminated(Exception):
    """SIGTERM reached the demo: stop the children like Ctrl-C does."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _wait_for_trainer(
    trainer: subprocess.Popen[bytes], producers: Sequence[subprocess.Popen[bytes]]
) -> int:
    """The trainer's exit code; a trainer that outlives a failed producer by
    ``_TRAINER_GRACE_S`` is stopped (it would otherwise wait out its own timeouts)."""
    dead_since: float | None = None
    while True:
        try:
            return trainer.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        bad = [(r, p.returncode) for r, p in enumerate(producers) if p.poll() not in (None, 0)]
        if bad and dead_since is None:
            dead_since = time.monotonic()
            r, c = bad[0]
            _say(f"producer {r} exited with code {c}; waiting for the trainer to stop")
        if dead_since is not None and time.monotonic() - dead_since > _TRAINER_GRACE_S:
            _say("stopping the trainer")
            _stop([trainer])
            return trainer.returncode


def _producer_failures(
    producers: Sequence[subprocess.Popen[bytes]], *, trainer_ok: bool
) -> list[str]:
    """After a good run every producer exits 0 on the trainer's goodbye; say which did not."""
    failed = []
    deadline = time.monotonic() + (_PRODUCER_EXIT_S if trainer_ok else 0.5)
    for r, p in enumerate(producers):
        try:
            pc = p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pc = None
        if pc is None:
            if trainer_ok:
                failed.append(f"producer {r} did not exit after the trainer said goodbye")
        elif pc != 0:
            failed.append(f"producer {r} exited with code {pc}")
    return failed


def run_demo(config: Path, overrides: Sequence[str], *, world: int) -> int:
    """Start producers and trainer, wait, summarize. Returns the exit code."""
    from lensfeed.common.config import load_config

    cfg = load_config(config, overrides)
    offsets = _offsets(cfg.training.metrics_path, world)
    env = _child_env()
    producers: list[subprocess.Popen[bytes]] = []
    trainer: subprocess.Popen[bytes] | None = None
    t0 = time.perf_counter()
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    failed: list[str] = []
    try:
        for r in range(world):
            producers.append(_start(producer_cmd(config, r, overrides), env))
        _say(f"started {world} producer(s); starting the {world}-rank trainer (torchrun)")
        trainer = _start(trainer_cmd(config, world, overrides), env)
        code = _wait_for_trainer(trainer, producers)
        if code != 0:
            failed.append(f"trainer exited with code {code}")
        failed += _producer_failures(producers, trainer_ok=code == 0)
    except (KeyboardInterrupt, _Terminated):
        _say("interrupted; stopping producers and trainer")
        _stop(([trainer] if trainer else []) + producers)
        return 130
    finally:
        _stop(([trainer] if trainer else []) + producers)
        signal.signal(signal.SIGTERM, old)
    wall = time.perf_counter() - t0
    summary = summarize(read_new_records(cfg.training.metrics_path, offsets))
    print(
        f"\nlensfeed demo: {'ok' if not failed and summary.ok else 'FAILED'} in {wall:.1f} s "
        f"({world} rank{'' if world == 1 else 's'}, batch {cfg.batch_size}, "
        f"cycle {cfg.cycle_size} samples, config {config})"
    )
    print(summary.table())
    metrics = metrics_file(cfg.training.metrics_path, 0)
    print(f"metrics: {metrics} (rank r: *.rank<r>.jsonl)")
    print(f"per cycle: lensfeed metrics {metrics} [--plot out.png]")
    if not summary.ok and not failed:
        failed.append("the trainer wrote no successful status record")
    for f in failed:
        _say(f"FAILED: {f}")
    return 1 if failed else 0


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lensfeed demo",
        description="Run the whole job locally: create the demo dataset if missing (source of "
        "Python's standard library as byte tokens), start one producer per rank and a CPU DDP "
        "trainer, and print a summary. Exits non-zero if any process failed.",
    )
    p.add_argument(
        "--config",
        "-c",
        default=None,
        help="YAML config (default: conf/demo.yaml of this checkout)",
    )
    p.add_argument(
        "--world-size",
        "-n",
        type=int,
        default=None,
        help="ranks (producers and trainer processes); default: the config's world_size",
    )
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="only create the demo dataset at dataset.path if it is missing, then exit",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=DEMO_SEQ_LEN,
        help=f"tokens per row of the demo dataset (default {DEMO_SEQ_LEN})",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides passed to producers and trainer, e.g. training.num_cycles=5",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from lensfeed.common.config import load_config

    try:
        config = resolve_config(args.config)
        overrides = list(args.overrides)
        if args.world_size is not None:
            overrides.append(f"world_size={args.world_size}")
        cfg = load_config(config, overrides)
        info = prepare_demo_data(cfg.dataset.path, seq_len=args.seq_len)
        if info["created"]:
            _say(
                f"created {cfg.dataset.path}: {info['rows']} rows x {args.seq_len} byte tokens "
                f"from {len(info['modules_found'])} standard-library modules "
                f"({info['seconds']:.1f} s)"
            )
        else:
            _say(f"using the dataset at {cfg.dataset.path}")
        if args.prepare_only:
            return 0
        return run_demo(config, overrides, world=cfg.world_size)
    except LensfeedError as exc:
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


__all__ = [
    "conf_dir",
    "main",
    "parser",
    "resolve_config",
    "run_demo",
]
