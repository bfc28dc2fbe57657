"""``lensfeed metrics RUN``: summarise, plot or export the reference trainer's JSONL metrics.

The trainer appends one JSON record per event to one file per rank (``metrics_path`` for rank
0, ``<stem>.rank<r><suffix>`` for rank r; :func:`lensfeed.common.metrics.metrics_file`). This
module turns those records into what people look at: a per-cycle/per-rank table (also the end
of ``lensfeed demo``), a PNG of samples/s, data-wait share and wraps per cycle (``--plot``,
needs matplotlib) and TensorBoard scalars (``--tensorboard``, needs tensorboard). Those two
live in :mod:`lensfeed.metrics_export`; their libraries are optional extras, imported only when
asked for.

The files are append-only, so they may hold several runs (a resume starts a new one): a run
starts at a ``start`` record, and a ``status`` record ends it. The last run is the default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lensfeed.common.errors import LensfeedError
from lensfeed.common.metrics import metrics_file
from lensfeed.metrics_export import MissingExtraError, plot, require_extra, write_tensorboard

Records = dict[int, list[dict[str, Any]]]

_RANK_STEM = re.compile(r"^(?P<stem>.+)\.rank(?P<rank>\d+)$")


# --------------------------------------------------------------------------- reading


def rank_files(run: str | Path) -> dict[int, Path]:
    """Each rank's metrics file of ``run``: rank 0's file (``metrics_path``), any rank's file,
    or a directory that holds one set of them. Ranks are found from the files that exist."""
    p = Path(run)
    if p.is_dir():
        bases = sorted({_base(f) for f in p.glob("*.jsonl")})
        if not bases:
            raise LensfeedError(f"no metrics *.jsonl file in {p}")
        if len(bases) > 1:
            names = ", ".join(b.name for b in bases)
            raise LensfeedError(f"{p} holds several runs' metrics ({names}); pass one of them")
        p = bases[0]
    else:
        p = _base(p)
    found = {0: p} if p.is_file() else {}
    for f in p.parent.glob(f"{p.stem}.rank*{p.suffix}"):
        m = _RANK_STEM.match(f.stem)
        if m and m["stem"] == p.stem:
            found[int(m["rank"])] = f
    if not found:
        raise LensfeedError(f"metrics file not found: {run}")
    return dict(sorted(found.items()))


def _base(f: Path) -> Path:
    """Rank 0's file name for any rank's file (``m.rank3.jsonl`` -> ``m.jsonl``)."""
    m = _RANK_STEM.match(f.stem)
    return f.with_name(m["stem"] + f.suffix) if m else f


def read_jsonl(path: Path, start: int = 0) -> list[dict[str, Any]]:
    """Records of ``path`` from byte ``start`` on; a torn last line (a live run) is skipped."""
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    with path.open("rb") as fh:
        fh.seek(start)
        for line in fh.read().decode("utf-8", "replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
    return out


def read_new_records(metrics_path: str | Path, offsets: Mapping[int, int]) -> Records:
    """Records each rank appended after ``offsets`` (its file sizes before a run started)."""
    return {r: read_jsonl(metrics_file(metrics_path, r), start) for r, start in offsets.items()}


def split_runs(records: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """One rank's records cut into runs: a ``start`` record opens one, ``status`` closes it."""
    runs: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] | None = None
    for rec in records:
        if rec.get("event") == "start" or current is None:
            current = []
            runs.append(current)
        current.append(rec)
        if rec.get("event") == "status":
            current = None
    return runs


def read_run(run: str | Path | Mapping[int, Path], which: int | None = -1) -> Records:
    """The records of one run per rank (``which``: index among the runs in the files, negative
    from the end; ``None``: all of them). ``run`` is as for :func:`rank_files`, or its result.

    Runs are counted in rank 0's file (the lowest rank's, without it), and each other rank's
    part of the chosen run is its run that began nearest in time: ranks need not hold the same
    runs (a resume with fewer ranks leaves the extra ranks' files behind, a rank may fail
    before writing anything). Ranks beyond the run's ``world_size`` are left out; ranks within
    it whose file or part is missing get no records, so the table shows them as missing.
    """
    files = run if isinstance(run, Mapping) else rank_files(run)
    runs = {rank: split_runs(read_jsonl(path)) for rank, path in files.items()}
    if which is None:
        out: Records = {rank: [r for part in parts for r in part] for rank, parts in runs.items()}
        world = max((int(r.get("world_size", 0)) for rs in out.values() for r in rs), default=0)
    else:
        lead = min((r for r in runs if runs[r]), default=min(runs))  # rank 0 may not have begun
        if not -len(runs[lead]) <= which < len(runs[lead]):
            held = len(runs[lead])
            raise LensfeedError(
                f"no run {which} in {files[lead]}: it holds {held} run{'' if held == 1 else 's'}"
                + (f" (0..{held - 1}, or -1 for the last)" if held else "")
            )
        chosen = runs[lead][which]
        starts = [r for r in chosen if r.get("event") == "start"]
        world = int(starts[0].get("world_size", 0)) if starts else max(runs) + 1
        out = {lead: chosen}
        for rank, parts in runs.items():
            if rank != lead and rank < world:
                out[rank] = _matching_part(parts, runs[lead], which)
    for rank in range(world):
        out.setdefault(rank, [])
    return dict(sorted(out.items()))


def _began(part: Sequence[dict[str, Any]]) -> float:
    """When a run (one rank's part of it) began: its first record's time; NaN without one."""
    t = part[0].get("time") if part else None
    return float(t) if isinstance(t, int | float) else math.nan


def _matching_part(
    parts: Sequence[list[dict[str, Any]]], lead: Sequence[list[dict[str, Any]]], which: int
) -> list[dict[str, Any]]:
    """The one of a rank's ``parts`` that belongs to the lead rank's run ``which``: of the
    parts that began nearer to that run's start than to any other lead run's, the nearest.
    Without timestamps (hand-written files), the part at the same index."""
    lead_t = [_began(p) for p in lead]
    part_t = [_began(p) for p in parts]
    if any(math.isnan(t) for t in [*lead_t, *part_t]):
        return list(parts[which]) if -len(parts) <= which < len(parts) else []
    target = which % len(lead)
    best: tuple[float, list[dict[str, Any]]] | None = None
    for t, part in zip(part_t, parts, strict=True):
        gaps = [abs(t - lt) for lt in lead_t]
        if min(range(len(gaps)), key=gaps.__getitem__) == target and (
            best is None or gaps[target] < best[0]
        ):
            best = (gaps[target], part)
    return best[1] if best else []


# --------------------------------------------------------------------------- summary


@dataclass
class RankSummary:
    """One rank's totals: an ``ok`` status record's, else (a failure's status record has none)
    those its ``cycle`` records add up to. ``seconds`` and ``wait_s`` are what the rate and
    the wait share are over, so several runs' totals can be added up."""

    rank: int
    status: str = "missing"
    cycles: int = 0
    samples: int = 0
    samples_per_s: float = 0.0
    wait_share: float = 0.0
    wraps: int = 0
    message: str = ""
    #: the rank a failure's message names (a failure every rank recorded from the vote)
    failed_rank: int | None = None
    seconds: float = 0.0
    wait_s: float = 0.0


@dataclass
class CycleRow:
    """One ``cycle`` record of one rank: what the per-cycle table, plot and exports show."""

    rank: int = 0
    cycle: int = -1
    batches: int = 0
    samples_per_s: float = 0.0
    wait_s: float = 0.0
    wait_share: float = 0.0
    wraps: int = 0
    total_wraps: int = 0
    regen_s: float = 0.0
    prepared_ahead: bool = False
    reconnects: int = 0
    recovery_s: float = 0.0
    loss: float = math.nan
    time: float = 0.0

    @classmethod
    def from_record(cls, rank: int, rec: Mapping[str, Any]) -> CycleRow:
        """Keys a record lacks keep their defaults, so older trainers' records still read."""
        cast = {"int": int, "float": float, "bool": bool}
        values: dict[str, Any] = {"rank": rank}
        for f in fields(cls):
            key = _RECORD_KEYS.get(f.name, f.name)
            if f.name != "rank" and rec.get(key) is not None:
                values[f.name] = cast[str(f.type)](rec[key])
        return cls(**values)

    def scalars(self) -> dict[str, float]:
        """Flat ``tag -> number`` dict for any logger (TensorBoard, ``wandb.log``), step=cycle."""
        feed = {f"feed/{name}": float(getattr(self, name)) for name in _FEED_SCALARS}
        return {**feed, "train/loss": self.loss}


#: CycleRow field -> the trainer's record key, where they differ.
_RECORD_KEYS = {"reconnects": "feed_reconnects", "recovery_s": "feed_recovery_s"}
_FEED_SCALARS = (
    "samples_per_s",
    "wait_s",
    "wait_share",
    "wraps",
    "total_wraps",
    "regen_s",
    "reconnects",
    "recovery_s",
)


@dataclass
class Summary:
    """A run's per-rank totals and per-cycle rows; :meth:`table` is the demo's summary."""

    ranks: list[RankSummary] = field(default_factory=list)
    cycles: list[CycleRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.ranks) and all(r.status == "ok" for r in self.ranks)

    def table(self) -> str:
        """Per-rank totals and an ``all`` row (rates add up; the worst data-wait share)."""
        head = f"{'rank':>4}  {'status':<8} {'cycles':>6} {'samples':>8} {'samples/s':>10} "
        head += f"{'data wait':>9} {'wraps':>5}"
        lines = [head]
        for r in self.ranks:
            lines.append(
                f"{r.rank:>4}  {r.status:<8} {r.cycles:>6} {r.samples:>8} "
                f"{r.samples_per_s:>10.0f} {100 * r.wait_share:>8.1f}% {r.wraps:>5}"
            )
        total_s = sum(r.samples for r in self.ranks)
        total_rate = sum(r.samples_per_s for r in self.ranks)
        share = max((r.wait_share for r in self.ranks), default=0.0)
        lines.append(
            f"{'all':>4}  {'':<8} {max((r.cycles for r in self.ranks), default=0):>6} "
            f"{total_s:>8} {total_rate:>10.0f} {100 * share:>8.1f}% "
            f"{sum(r.wraps for r in self.ranks):>5}"
        )
        # Every rank records the failure the ranks voted on: say each cause once, under the
        # rank it names, not under each rank that recorded it. One that blames no rank (ranks
        # disagree: each says its own value) stays under the rank that said it.
        causes = dict.fromkeys(
            (r.failed_rank if r.failed_rank is not None and r.failed_rank >= 0 else r.rank, m)
            for r in self.ranks
            if (m := r.message)
        )
        for rank, message in causes:
            lines.append(f"rank {rank}: {message}")
        return "\n".join(lines)

    def cycle_table(self) -> str:
        """One row per cycle and rank, cycle-major, so ranks in lockstep read side by side."""
        head = (
            f"{'cycle':>5} {'rank':>4} {'batches':>7} {'samples/s':>9} {'wait s':>7} "
            f"{'data wait':>9} {'wraps':>5} {'total':>5} {'regen s':>7} {'ahead':>5} "
            f"{'reconn':>6} {'loss':>8}"
        )
        lines = [head]
        for c in sorted(self.cycles, key=lambda c: (c.cycle, c.rank, c.time)):
            lines.append(
                f"{c.cycle:>5} {c.rank:>4} {c.batches:>7} {c.samples_per_s:>9.0f} "
                f"{c.wait_s:>7.3f} {100 * c.wait_share:>8.1f}% {c.wraps:>5} {c.total_wraps:>5} "
                f"{c.regen_s:>7.3f} {'yes' if c.prepared_ahead else 'no':>5} "
                f"{c.reconnects:>6} {c.loss:>8.4f}"
            )
        if not self.cycles:
            lines.append("(no cycle records)")
        return "\n".join(lines)


def summarize(records: Records) -> Summary:
    """Per-rank totals and per-cycle rows from the ``cycle`` and ``status`` records of one run
    (or of several, ``--run all``: each rank's totals add up its runs under its last run's
    status and message).

    A rank with records but no ``status`` shows ``running?``: still running, or killed before
    it could write one."""
    summary = Summary()
    for rank in sorted(records):
        parts = [_part_summary(rank, part) for part in split_runs(records[rank])]
        summary.cycles += [
            CycleRow.from_record(rank, rec) for rec in records[rank] if rec.get("event") == "cycle"
        ]
        summary.ranks.append(_add_up(rank, parts))
    return summary


def _part_summary(rank: int, part: Sequence[dict[str, Any]]) -> RankSummary:
    """One rank's totals over one run: an ``ok`` status record has them (its time includes
    start-up and checkpoints); a failure's status record holds only ``steps``, and a rank that
    was killed has none, so theirs come from the ``cycle`` records."""
    rs = RankSummary(rank, status="running?")
    cycles = [rec for rec in part if rec.get("event") == "cycle"]
    for rec in cycles:
        rs.cycles = max(rs.cycles, int(rec.get("cycle", -1)) + 1)
        rs.wraps = int(rec.get("total_wraps", rs.wraps))
    status = part[-1] if part and part[-1].get("event") == "status" else {}
    if status:
        rs.status = str(status.get("training_status", "?"))
        rs.cycles = int(status.get("cycles", rs.cycles))
        if rs.status != "ok":
            rs.message = str(status.get("message", ""))
            failed = status.get("failed_rank")
            rs.failed_rank = failed if type(failed) is int else None
    if "samples" in status:
        rs.samples = int(status["samples"])
        rs.samples_per_s = float(status.get("samples_per_s", 0.0))
        rs.wait_share = float(status.get("wait_share", 0.0))
        rate = rs.samples_per_s
        rs.seconds = float(status.get("wall_s", rs.samples / rate if rate > 0 else 0.0))
        rs.wait_s = float(status.get("wait_s", rs.wait_share * rs.seconds))
    else:
        rs.samples, rs.seconds, rs.wait_s, rs.samples_per_s = _cycle_totals(cycles)
        rs.wait_share = rs.wait_s / rs.seconds if rs.seconds > 0 else 0.0
    return rs


def _cycle_totals(cycles: Sequence[dict[str, Any]]) -> tuple[int, float, float, float]:
    """(samples, seconds, data-wait seconds, samples/s) that ``cycles``' records add up to.
    Records of trainers older than their ``samples`` and ``seconds`` fields count as none."""
    samples = sum(int(rec.get("samples") or 0) for rec in cycles)
    seconds = sum(float(rec.get("seconds") or 0.0) for rec in cycles)
    wait_s = sum(float(rec.get("wait_s") or 0.0) for rec in cycles if rec.get("seconds"))
    return samples, seconds, wait_s, samples / seconds if seconds > 0 else 0.0


def _add_up(rank: int, parts: Sequence[RankSummary]) -> RankSummary:
    """A rank's totals over several runs: samples and time add up; the cycle and wraps are
    the furthest reached; status and message are the last run's."""
    if len(parts) <= 1:
        return parts[0] if parts else RankSummary(rank)
    last = parts[-1]
    samples = sum(p.samples for p in parts)
    seconds = sum(p.seconds for p in parts)
    wait_s = sum(p.wait_s for p in parts)
    return RankSummary(
        rank,
        status=last.status,
        cycles=max(p.cycles for p in parts),
        samples=samples,
        samples_per_s=samples / seconds if seconds > 0 else 0.0,
        wait_share=wait_s / seconds if seconds > 0 else 0.0,
        wraps=max(p.wraps for p in parts),
        message=last.message,
        failed_rank=last.failed_rank,
        seconds=seconds,
        wait_s=wait_s,
    )


# --------------------------------------------------------------------------- command line


def _run_index(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lensfeed metrics",
        description="Summarise a training run from the reference trainer's metrics JSONL "
        "files: one row per cycle and rank, then per-rank totals. Optionally plot it "
        "(matplotlib) or export it to TensorBoard.",
    )
    p.add_argument(
        "run",
        metavar="RUN",
        help="rank 0's metrics file (training.metrics_path, e.g. runs/demo/metrics.jsonl; the "
        "*.rank<r>.jsonl siblings are found), any rank's file, or the directory holding them",
    )
    p.add_argument(
        "--run",
        dest="which",
        type=_run_index,
        default=-1,
        metavar="N|all",
        help="which run in these append-only files: 0 = first, -1 = last (default), all",
    )
    p.add_argument(
        "--plot",
        metavar="OUT.png",
        help="draw samples/s, data-wait share and wraps per cycle per rank (pip install "
        "'lensfeed[plot]')",
    )
    p.add_argument(
        "--tensorboard",
        metavar="LOGDIR",
        help="write each rank's per-cycle scalars to LOGDIR/rank<r> (pip install "
        "'lensfeed[tensorboard]')",
    )
    return p


def _header(run: Path, records: Records, which: int | None) -> str:
    starts = [r for rs in records.values() for r in rs if r.get("event") == "start"]
    n = len(records)
    text = f"run: {run} ({n} rank{'' if n == 1 else 's'}"
    text += ", all runs" if which is None else ""
    if starts:
        first = min(float(s.get("time", 0.0)) for s in starts)
        text += f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(first))}"
        resumed = starts[0].get("resumed_from")
        if resumed and which is not None:
            text += f", resumed from {resumed}"
    return text + ")"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        # Missing extras are reported before any work, not after it.
        if args.plot:
            require_extra("matplotlib", "plot", "plotting (--plot)")
        if args.tensorboard:
            require_extra("tensorboard", "tensorboard", "TensorBoard export (--tensorboard)")
        files = rank_files(args.run)
        base = _base(next(iter(files.values())))
        records = read_run(files, args.which)
        summary = summarize(records)
        print(_header(base, records, args.which))
        print(summary.cycle_table())
        print()
        print(summary.table())
        if args.plot:
            print(f"plot: {plot(summary, args.plot, title=str(base))}")
        if args.tensorboard:
            write_tensorboard(summary, args.tensorboard)
            print(f"tensorboard: tensorboard --logdir {args.tensorboard}")
    except (LensfeedError, OSError) as exc:
        print(f"lensfeed metrics: error: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "CycleRow",
    "MissingExtraError",
    "RankSummary",
    "Summary",
    "main",
    "plot",
    "rank_files",
    "read_jsonl",
    "read_new_records",
    "read_run",
    "split_runs",
    "summarize",
    "write_tensorboard",
]


if __name__ == "__main__":
    sys.exit(main())
