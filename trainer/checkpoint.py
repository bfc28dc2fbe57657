"""Per-rank checkpoints: model, optimizer, feed cursor and step, one file per rank.

Layout::

    <checkpoint_dir>/step_00000042/rank0.pt
    <checkpoint_dir>/step_00000042/rank1.pt
    <checkpoint_dir>/step_00000042/COMPLETE      {"step": 42, "world_size": 2}

A step counts only once it is *complete*: every rank wrote its file durably (:func:`save`:
``rankR.pt.tmp``, fsync, rename, fsync of the directory), all ranks passed a barrier, and then
rank 0 wrote the ``COMPLETE`` marker the same way (:func:`commit`). A crash at any point leaves
the previous complete step as the newest one, so every rank resumes from the same step.
``resume=`` accepts a complete step directory or the checkpoint directory itself (its newest
complete step). The directory must be shared by all ranks (rank 0 writes the marker).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lensfeed.common.errors import LensfeedError

log = logging.getLogger("lensfeed.trainer")

#: Name of the completion marker rank 0 writes once every rank's file is durable.
MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(LensfeedError):
    """A checkpoint cannot be written, found or read."""

    code = "checkpoint"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def rank_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank}.pt"


# --------------------------------------------------------------------------- durable writes


def _fsync_dir(directory: Path) -> None:
    """Make a rename/unlink in ``directory`` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def _write_durably(path: Path, write: Callable[[Any], None]) -> None:
    """``write(file)`` to ``path.tmp``, fsync it, rename it to ``path``, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as exc:  # disk full, permissions, an unpicklable state: all ranks stop
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint file {path}: {exc}") from exc


def save(root: str | Path, *, step: int, rank: int, state: dict[str, Any]) -> Path:
    """Write this rank's file of ``step`` durably; the step is not complete until :func:`commit`."""
    d = step_dir(root, step)
    try:
        d.mkdir(parents=True, exist_ok=True)
        _fsync_dir(d.parent)
    except OSError as exc:
        raise CheckpointError(f"cannot create checkpoint directory {d}: {exc}") from exc
    path = rank_file(d, rank)
    _write_durably(path, lambda f: torch.save(state, f))
    return path


def discard_marker(root: str | Path, *, step: int) -> None:
    """Rank 0, before the ranks (re)write ``step``: drop a marker left by an earlier run."""
    marker = step_dir(root, step) / MARKER
    if marker.exists():
        try:
            marker.unlink()
        except OSError as exc:
            raise CheckpointError(f"cannot remove stale marker {marker}: {exc}") from exc
        _fsync_dir(marker.parent)


def commit(root: str | Path, *, step: int, world_size: int, keep: int | None = None) -> Path:
    """Rank 0, after every rank's :func:`save` of ``step`` passed a barrier: mark it complete.

    Then, when ``keep`` is given, :func:`prune` older step directories.
    """
    d = step_dir(root, step)
    missing = [r for r in range(world_size) if not rank_file(d, r).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {d} lacks the files of ranks {missing} after every rank saved; is "
            "training.checkpoint_dir shared by all ranks?"
        )
    body = json.dumps({"step": step, "world_size": world_size}).encode()
    _write_durably(d / MARKER, lambda f: f.write(body))
    if keep is not None:
        prune(root, keep=keep, current=step)
    return d


# --------------------------------------------------------------------------- reading


def _marker(directory: Path) -> dict[str, Any] | None:
    """The parsed marker of a complete step directory, else None."""
    try:
        info = json.loads((directory / MARKER).read_text())
        step, world = int(info["step"]), int(info["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    m = _STEP_RE.match(directory.name)
    if m is not None and int(m.group(1)) != step:
        return None
    if world < 1 or not all(rank_file(directory, r).is_file() for r in range(world)):
        return None
    return {"step": step, "world_size": world}


def is_complete(directory: str | Path) -> bool:
    return _marker(Path(directory)) is not None


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_RE.match(d.name)
            if m is not None and d.is_dir():
                out.append((int(m.group(1)), d))
    return sorted(out)


def complete_steps(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every complete step under ``root``, oldest first."""
    return [(s, d) for s, d in _step_dirs(Path(root)) if is_complete(d)]


def latest(root: str | Path) -> Path | None:
    """The newest complete step directory under ``root``, or None."""
    steps = complete_steps(root)
    return steps[-1][1] if steps else None


def resolve(path: str | Path, *, rank: int) -> Path:
    """The rank's checkpoint file under ``path``: a complete step dir, or a root of step dirs."""
    p = Path(path)
    if _STEP_RE.match(p.name) or (p / MARKER).exists():
        directory: Path | None = p if is_complete(p) else None
        what = "is not a complete checkpoint (no valid COMPLETE marker: an interrupted save?)"
    else:
        directory = latest(p)
        what = "holds no complete checkpoint (step_*/ with a COMPLETE marker)"
    if directory is None:
        raise CheckpointError(f"resume={path}: {what}")
    info = _marker(directory)
    assert info is not None
    if rank >= info["world_size"]:
        raise CheckpointError(
            f"resume={path}: checkpoint {directory} was written by {info['world_size']} ranks; "
            f"there is no file for rank {rank}"
        )
    return rank_file(directory, rank)


def step_of(directory: str | Path) -> int:
    """The step of a complete step directory (from its marker)."""
    info = _marker(Path(directory))
    if info is None:
        raise CheckpointError(f"{directory} is not a complete checkpoint")
    return int(info["step"])


def read(file: str | Path) -> dict[str, Any]:
    """One rank file's state (tensors on the CPU; only plain data and tensors are unpickled)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file: name it rather than crash one rank
        raise CheckpointError(f"cannot read checkpoint {file}: {exc}") from exc


def load(path: str | Path, *, rank: int) -> dict[str, Any]:
    """This rank's state from ``path`` (see :func:`resolve`)."""
    return read(resolve(path, rank=rank))


# --------------------------------------------------------------------------- pruning


def prune(root: str | Path, *, keep: int, current: int) -> list[Path]:
    """Keep the newest ``keep`` complete steps up to ``current``; drop older ones, and incomplete
    ones older than the newest complete. Steps after ``current`` (another run's) stay."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep})")
    dirs = [(s, d) for s, d in _step_dirs(Path(root)) if s <= current]
    complete = [(s, d) for s, d in dirs if is_complete(d)]
    if not complete:
        return []
    kept = {s for s, _ in complete[-keep:]}
    newest = complete[-1][0]
    removed = []
    for s, d in dirs:
        if s in kept or s > newest:
            continue
        try:
            (d / MARKER).unlink(missing_ok=True)  # a half-deleted dir must not look complete
            shutil.rmtree(d)
        except OSError as exc:
            log.warning("could not remove old checkpoint %s: %s", d, exc)
            continue
        removed.append(d)
    if removed:
        _fsync_dir(Path(root))
    return removed


__all__ = [
    "MARKER",
    "CheckpointError",
    "commit",
    "complete_steps",
    "discard_marker",
    "is_complete",
    "latest",
    "load",
    "prune",
    "rank_file",
    "read",
    "resolve",
    "save",
    "step_dir",
    "step_of",
]
