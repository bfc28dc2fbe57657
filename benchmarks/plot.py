"""``throughput.png``: throughput per case and method, cycle-boundary waits, peak memory.

matplotlib is optional (the ``bench`` extra): without it the suite says so at start and writes
every other result.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from benchmarks.common import MiB
from benchmarks.settings import CASES
from benchmarks.targets import METHOD_ORDER, find_row


def available() -> bool:
    """Whether matplotlib is installed (checked before a run starts, not after it)."""
    return importlib.util.find_spec("matplotlib") is not None


def _throughput(ax: Any, rows: list[dict[str, Any]]) -> None:
    groups = [
        (c.key, shuf)
        for c in CASES
        for shuf in (True, False)
        if any(r["case"] == c.key and r["shuffle"] == shuf for r in rows)
    ]
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for g, (case, shuf) in enumerate(groups):
            r = find_row(rows, case, m, shuf)
            if r is None:
                continue
            gb = r["gb_per_s"]
            xs.append(g + (i - (len(methods) - 1) / 2) * width)
            ys.append(gb["median"])
            lo.append(gb["median"] - gb["min"])
            hi.append(gb["max"] - gb["median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], label=m, capsize=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{c}\n{'shuffled' if s else 'seq'}" for c, s in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("GB/s of payload (log)")
    ax.set_title("Throughput: median, min-max bars")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    ax.grid(axis="y", alpha=0.3, which="both")


def _stall(ax: Any, stall: dict[str, Any]) -> None:
    names = [r["key"] for r in stall["rows"]]
    vals = [max(r["boundary_s"]["median"] * 1e3, 1e-2) for r in stall["rows"]]
    regen = [r["regen_s"]["median"] * 1e3 for r in stall["rows"]]
    ax.bar(names, vals, color="tab:red", label="boundary wait (median)")
    ax.plot(names, [0.05 * g for g in regen], "k_", markersize=20, label="5% of regen")
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("Wait at a cycle boundary")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.legend(fontsize=8)


def _memory(ax: Any, mem: dict[str, Any]) -> None:
    labels, small, large = [], [], []
    for k, c in mem["checks"].items():
        side, metric = k.split(".")
        labels.append(f"{side}\n{'VmHWM' if metric == 'peak_rss_bytes' else 'anon'}")
        small.append(c["small"] / MiB)
        large.append(c["large"] / MiB)
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], small, 0.4, label=f"S={mem['small']['samples_per_cycle']:,}")
    ax.bar([i + 0.2 for i in x], large, 0.4, label=f"S={mem['large']['samples_per_cycle']:,}")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title("Peak memory")
    ax.legend(fontsize=8)


def plot(results: dict[str, Any], path: Path) -> bool:
    """Write the figure to ``path``; False (nothing written) without matplotlib."""
    if not available():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), gridspec_kw={"width_ratios": [3, 1.3, 1.3]})
    _throughput(axes[0], results.get("throughput", []))
    if results.get("stall"):
        _stall(axes[1], results["stall"])
    if results.get("memory"):
        _memory(axes[2], results["memory"])
    m = results["machine"]
    fig.suptitle(
        f"lensfeed benchmarks ({results['settings']['mode']}): {m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']}, libzmq {m['libzmq']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


__all__ = ["available", "plot"]
