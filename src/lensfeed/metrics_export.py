"""Pictures and exports of a run's metrics: a PNG (matplotlib) and TensorBoard scalars.

Both libraries are optional extras (``plot``, ``tensorboard``) and imported only when called,
so ``lensfeed metrics`` and the demo work without them; a missing one raises
:class:`MissingExtraError` with the pip command. The data comes from
:func:`lensfeed.metrics.summarize`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lensfeed.common.errors import LensfeedError

if TYPE_CHECKING:
    from lensfeed.metrics import Summary


class MissingExtraError(LensfeedError):
    """An optional feature needs a package that is not installed (the message says how to)."""

    code = "missing_extra"


def require_extra(module: str, extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` naming the pip command unless ``module`` imports."""
    try:
        __import__(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{feature} needs the '{module}' package, which is not installed: "
            f"pip install 'lensfeed[{extra}]' (in a checkout: pip install -e '.[{extra}]')"
        ) from exc


def _need_cycles(summary: Summary) -> None:
    if not summary.cycles:
        raise LensfeedError("this run has no cycle records yet: nothing to plot or export")


def plot(summary: Summary, out: str | Path, *, title: str = "") -> Path:
    """Samples/s, data-wait share and wraps per cycle, one line per rank, as a PNG.

    Uses matplotlib's object API (no pyplot, no global backend), so it is safe in a library."""
    require_extra("matplotlib", "plot", "plotting (--plot)")
    _need_cycles(summary)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [
        ("samples_per_s", "samples/s", 1.0),
        ("wait_share", "data wait (%)", 100.0),
        ("wraps", "wraps", 1.0),
    ]
    fig = Figure(figsize=(8, 7), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True)
    for rank in sorted({c.rank for c in summary.cycles}):
        rows = sorted((c for c in summary.cycles if c.rank == rank), key=lambda c: c.cycle)
        xs = [c.cycle for c in rows]
        for ax, (attr, _, scale) in zip(axes, panels, strict=True):
            ax.plot(xs, [scale * getattr(c, attr) for c in rows], marker="o", label=f"rank {rank}")
    for ax, (_, label, _) in zip(axes, panels, strict=True):
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)  # a share of 0.01 % must not look like a spike
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("cycle")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].yaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_tensorboard(summary: Summary, logdir: str | Path) -> list[Path]:
    """Each rank's per-cycle :meth:`~lensfeed.metrics.CycleRow.scalars` as TensorBoard scalars
    in ``logdir/rank<r>`` (step = cycle, wall time = the record's): ranks compare in one view."""
    require_extra("tensorboard", "tensorboard", "TensorBoard export (--tensorboard)")
    _need_cycles(summary)
    from torch.utils.tensorboard import SummaryWriter

    written = []
    for rank in sorted({c.rank for c in summary.cycles}):
        d = Path(logdir) / f"rank{rank}"
        with SummaryWriter(log_dir=str(d)) as w:
            for c in (c for c in summary.cycles if c.rank == rank):
                for tag, value in c.scalars().items():
                    w.add_scalar(tag, value, global_step=c.cycle, walltime=c.time or None)
        written.append(d)
    return written


__all__ = ["MissingExtraError", "plot", "require_extra", "write_tensorboard"]
