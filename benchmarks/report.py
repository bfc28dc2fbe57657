"""Turn the suite's results into targets (pass/fail), a Markdown report and a PNG plot."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from benchmarks.common import KiB, MiB, fmt_bytes, fmt_rate
from benchmarks.settings import CASES

METHOD_ORDER = [
    "limit",
    "limit@msg",
    "limit+malloc",
    "lensfeed",
    "lensfeed+proto",
    "original",
    "dataloader-w0",
    "dataloader-w2",
]
BASELINES = {"original": "original", "DL w0": "dataloader-w0", "DL w2": "dataloader-w2"}
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


# --------------------------------------------------------------------------- lookups


def _find(rows: list[dict[str, Any]], case: str, method: str, shuffle: bool | None) -> Any:
    for r in rows:
        same = r["case"] == case and r["method"] == method
        if same and (r["shuffle"] is None or r["shuffle"] == shuffle):
            return r
    return None


def _median(row: dict[str, Any] | None, key: str = "samples_per_s") -> float:
    return row[key]["median"] if row else float("nan")


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratios``: this row's median samples/s over the limit's and each baseline's."""
    for r in rows:
        shuffle = r["shuffle"]
        limit = _find(rows, r["case"], "limit", None)
        ref = {
            "limit": limit,
            # the limit at the message size lensfeed sends (= limit when it sends one batch)
            "limit@msg": _find(rows, r["case"], "limit@msg", None) or limit,
            "limit+malloc": _find(rows, r["case"], "limit+malloc", None),
        }
        for label, method in BASELINES.items():
            ref[label] = _find(rows, r["case"], method, shuffle)
        mine = _median(r)
        r["ratios"] = {k: (mine / _median(v) if v else None) for k, v in ref.items()}


# --------------------------------------------------------------------------- targets


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = results.get("throughput", [])
    out: list[dict[str, Any]] = []

    def limit_check(method: str) -> tuple[bool, str, float] | None:
        vals = []
        for r in rows:
            if r["method"] == method and r["batch_bytes"] >= 512 * KiB:
                ratio = r["ratios"]["limit"]
                shuf = "shuffled" if r["shuffle"] else "sequential"
                same = r["ratios"].get("limit@msg")
                msg = r.get("samples_per_message", 64) // 64
                extra = f" ({same:.2f}x limit@msg, {msg} batches/msg)" if msg > 1 and same else ""
                vals.append((ratio, f"{r['case']} {shuf} {ratio:.2f}x{extra}"))
        if not vals:
            return None
        worst = min(v for v, _ in vals)
        return worst >= 0.8, "; ".join(t for _, t in vals), worst

    if rows:
        chk = limit_check("lensfeed")
        proto = limit_check("lensfeed+proto")
        if chk:
            out.append(
                {
                    "target": ">= 0.8x the raw-ZeroMQ limit for batch messages >= 512 KiB",
                    "value": chk[1],
                    "worst": chk[2],
                    "ok": chk[0],
                    "prototypes": proto[1] if proto else None,
                    "prototypes_ok": proto[0] if proto else None,
                }
            )
        feed = _find(rows, "tok128", "lensfeed", True)
        pfeed = _find(rows, "tok128", "lensfeed+proto", True)
        if feed:
            out.append(
                {
                    "target": ">= 1,000,000 samples/s end-to-end, shuffled (64, 128) int32 tokens",
                    "value": f"{_median(feed):,.0f} samples/s",
                    "worst": _median(feed),
                    "ok": _median(feed) >= 1e6,
                    "prototypes": f"{_median(pfeed):,.0f} samples/s" if pfeed else None,
                    "prototypes_ok": _median(pfeed) >= 1e6 if pfeed else None,
                }
            )
    stall = results.get("stall")
    if stall:
        by = {r["key"]: r for r in stall["rows"]}

        def stall_value(r: dict[str, Any]) -> str:
            b, g = r["boundary_s"], r["regen_s"]["median"]
            return (
                f"median {b['median'] * 1e3:.1f} ms (max {b['max'] * 1e3:.1f} ms) = "
                f"{r['boundary_over_regen']['median']:.1%} of a {g * 1e3:.0f} ms regeneration"
            )

        a, p = by.get("ahead"), by.get("ahead+proto")
        if a:
            out.append(
                {
                    "target": "cycle-boundary wait <= 5% of one cycle's regeneration time "
                    "(prepare_ahead)",
                    "value": stall_value(a),
                    "worst": a["boundary_over_regen"]["median"],
                    "ok": a["boundary_over_regen"]["median"] <= 0.05,
                    "prototypes": stall_value(p) if p else None,
                    "prototypes_ok": p["boundary_over_regen"]["median"] <= 0.05 if p else None,
                }
            )
    mem = results.get("memory")
    if mem:
        c = mem["checks"]
        parts, ok = [], True
        for side in ("producer", "trainer"):
            x = c[f"{side}.peak_rss_bytes"]
            parts.append(
                f"{side} {fmt_bytes(x['small'])} -> {fmt_bytes(x['large'])} "
                f"(limit {fmt_bytes(x['limit_bytes'])})"
            )
            ok = ok and x["ok"]
        anon_ok = all(c[f"{s}.peak_anon_bytes"]["ok"] for s in ("producer", "trainer"))
        anon = "; ".join(
            f"{s} {fmt_bytes(c[f'{s}.peak_anon_bytes']['small'])} -> "
            f"{fmt_bytes(c[f'{s}.peak_anon_bytes']['large'])}"
            for s in ("producer", "trainer")
        )
        small, large = mem["small"]["samples_per_cycle"], mem["large"]["samples_per_cycle"]
        out.append(
            {
                "target": f"peak RSS at S={large:,} within 10% (+ the index permutation, "
                f"{fmt_bytes(mem['permutation_bytes'])}) of S={small:,}",
                "value": "VmHWM: " + "; ".join(parts),
                "worst": max(c[f"{s}.peak_rss_bytes"]["ratio"] for s in ("producer", "trainer")),
                "ok": ok,
                "prototypes": None,
                "prototypes_ok": None,
                "note": "both runs serve the same samples (the small S over many cycles), so "
                "they map the same dataset pages; private memory (peak RssAnon): "
                f"{anon}: " + ("within" if anon_ok else "NOT within") + " the same limit",
            }
        )
    return out


# --------------------------------------------------------------------------- markdown


def _spread(s: dict[str, Any], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    if not s or not s.get("n"):
        return "n/a"
    return (
        f"{fmt.format(s['median'] * scale)} "
        f"[{fmt.format(s['min'] * scale)}–{fmt.format(s['max'] * scale)}]"
    )


def _rate_spread(s: dict[str, Any]) -> str:
    return f"{fmt_rate(s['median'])} [{fmt_rate(s['min'])}–{fmt_rate(s['max'])}]"


def _ratio(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def _machine_md(m: dict[str, Any]) -> list[str]:
    return [
        f"- **Machine:** {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['ram_bytes'] / 2**30:.0f} GiB RAM, {m['os']}, GPU: {m['cuda'] or 'none'}",
        f"- **Software:** Python {m['python']}, torch {m['torch']}, pyzmq {m['pyzmq']} "
        f"(libzmq {m['libzmq']}), msgpack {m['msgpack']}, numpy {m['numpy']}, pyarrow "
        f"{m['pyarrow']}, datasets {m['datasets']}",
        f"- **Code:** commit {m['git']['commit']} ({m['git']['dirty_files']} uncommitted files), "
        f"measured {m['timestamp']}",
    ]


def _thread_table(runs: list[dict[str, Any]]) -> list[str]:
    """CPU microseconds per batch per thread, one column per case (shuffled)."""
    names = sorted({n for r in runs for n in r["cpu_us_per_batch"]})
    lines = [
        "",
        "#### Where a batch's CPU goes (per thread, shuffled)",
        "",
        "CPU microseconds per batch of each thread over the timed (steady-state) cycle, from "
        "`/proc/<pid>/task/*/stat` sampled every 20 ms with no profiler attached. Two cores "
        "carry both processes, so a batch cannot take less wall time than about sum / 2, "
        "whichever thread the CPU is spent in.",
        "",
        "| thread | " + " | ".join(r["case"] for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for n in names:
        cells = [f"{r['cpu_us_per_batch'].get(n, 0.0):,.0f}" for r in runs]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    total = [sum(r["cpu_us_per_batch"].values()) for r in runs]
    lines.append("| **sum** | " + " | ".join(f"**{t:,.0f}**" for t in total) + " |")
    lines.append(
        "| wall per batch | " + " | ".join(f"{r['wall_us_per_batch']:,.0f}" for r in runs) + " |"
    )
    lines.append(
        "| samples/s (steady) | " + " | ".join(fmt_rate(r["samples_per_s"]) for r in runs) + " |"
    )
    return lines


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"### Results ({s['mode']} run, {results['elapsed_s']:.0f} s)",
        "",
        *_machine_md(results["machine"]),
        "",
        "#### Targets",
        "",
    ]
    protos = any(t.get("prototypes") for t in results["targets"])
    lines += (
        ["| target | measured | pass | with prototypes | note |", "|---|---|---|---|---|"]
        if protos
        else ["| target | measured | pass | note |", "|---|---|---|---|"]
    )
    for t in results["targets"]:
        proto = "–"
        if t.get("prototypes"):
            proto = f"{t['prototypes']} ({'pass' if t['prototypes_ok'] else 'fail'})"
        lines.append(
            f"| {t['target']} | {t['value']} | {'**PASS**' if t['ok'] else '**FAIL**'} | "
            + (f"{proto} | " if protos else "")
            + f"{t.get('note', '')} |"
        )
    rows = results.get("throughput", [])
    if rows:
        lines += [
            "",
            "#### Throughput",
            "",
            f"Median of {s['repeats']} repeats [min–max]. GB/s counts wire payload (tensor "
            "frames incl. `sample_idx`), identical for every method of a case, so GB/s ratios "
            "equal samples/s ratios. `limit` sends one batch per message; `limit@msg` sends "
            "messages of the size lensfeed packs for that batch (`feed.batches_per_message` "
            "auto), so `x limit@msg` compares like with like. `lensfeed+proto` (when present) "
            "= lensfeed with the prototype changes of `benchmarks/patches.py`.",
            "",
            "| payload | order | method | samples/s | GB/s | x limit | x limit@msg "
            "| x limit+malloc | x original | x DL w0 | x DL w2 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = {m: i for i, m in enumerate(METHOD_ORDER)}
        case_order = {c.key: i for i, c in enumerate(CASES)}

        def key(r: dict[str, Any]) -> tuple[int, int, int]:
            shuf = 0 if r["shuffle"] is None else (1 if r["shuffle"] else 2)
            return case_order[r["case"]], shuf, order.get(r["method"], 99)

        for r in sorted(rows, key=key):
            shuffle = "–" if r["shuffle"] is None else ("shuffled" if r["shuffle"] else "seq")
            rt = r["ratios"]
            lines.append(
                f"| {r['label']} ({fmt_bytes(r['batch_bytes'])}/batch) | {shuffle} | "
                f"{r['method']} | {_rate_spread(r['samples_per_s'])} | "
                f"{_spread(r['gb_per_s'], fmt='{:.3f}')} | {_ratio(rt['limit'])} | "
                f"{_ratio(rt.get('limit@msg'))} | "
                f"{_ratio(rt['limit+malloc'])} | {_ratio(rt['original'])} | "
                f"{_ratio(rt['DL w0'])} | {_ratio(rt['DL w2'])} |"
            )
    stall = results.get("stall")
    if stall:
        p = stall["params"]
        lines += [
            "",
            "#### Cycle-boundary stall",
            "",
            f"{p['cycles']} cycles x {p['batches_per_cycle']} batches of {p['batch_size']}; "
            f"regeneration transform {p['regen_s_per_batch'] * 1e3:.1f} ms/batch, training step "
            f"{p['step_s_per_batch'] * 1e3:.1f} ms/batch (both sleep). Boundary = end of the "
            "last step of a cycle -> first batch of the next in the loop (cycles 1..; cycle 0 is "
            "the cold start). Feed wait = the part spent waiting on the producer; the rest is "
            "the client's cycle-end cleanup. Ideal pipelined wall time: "
            f"{stall['ideal_wall_s']:.2f} s.",
            "",
            "| variant | cold start ms | boundary ms | feed wait ms | regen/cycle ms "
            "| boundary / regen | in-cycle wait ms | wall s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in stall["rows"]:
            lines.append(
                f"| {r['name']} | {r['first_batch_s'] * 1e3:.1f} | "
                f"{_spread(r['boundary_s'], 1e3, '{:.1f}')} | "
                f"{_spread(r['boundary_feed_wait_s'], 1e3, '{:.1f}')} | "
                f"{_spread(r['regen_s'], 1e3, '{:.0f}')} | "
                f"{r['boundary_over_regen']['median']:.1%} | "
                f"{_spread(r['wait_in_cycle_s'], 1e3, '{:.1f}')} | {r['wall_s']:.2f} |"
            )
    mem = results.get("memory")
    if mem:
        small, large = mem["small"], mem["large"]
        lines += [
            "",
            "#### Memory",
            "",
            f"Shuffled (64, 128) tokens; S = samples per cycle. S={small['samples_per_cycle']:,}:"
            f" {small['batches_consumed']} batches consumed; S={large['samples_per_cycle']:,}: "
            f"{large['batches_consumed']} batches: the same samples, so both runs touch the same "
            "shard rows. VmHWM includes memory-mapped dataset pages (shared, clean page cache: "
            "it grows with the distinct rows touched, up to the shard's size, whatever S is); "
            "RssAnon is private memory (sampled peak). One cycle's permutation at the large S: "
            f"{fmt_bytes(mem['permutation_bytes'])}.",
            "",
            "| process | metric | small S | large S | growth | limit (1.1x + perm) | ok |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, c in mem["checks"].items():
            side, metric = k.split(".")
            name = "peak RSS (VmHWM)" if metric == "peak_rss_bytes" else "peak RssAnon"
            lines.append(
                f"| {side} | {name} | {fmt_bytes(c['small'])} | {fmt_bytes(c['large'])} | "
                f"{fmt_bytes(c['growth_bytes'])} | {fmt_bytes(c['limit_bytes'])} | "
                f"{'yes' if c['ok'] else 'no'} |"
            )
        o = mem["original"]
        lines += [
            "",
            "Original (Python list cache, one process): "
            + ", ".join(f"S={x['samples']:,}: {fmt_bytes(x['peak_rss_bytes'])}" for x in o)
            + f"; {mem['original_bytes_per_sample']:,.0f} B/sample -> extrapolated "
            f"{fmt_bytes(mem['original_extrapolated_large_bytes'])} at "
            f"S={large['samples_per_cycle']:,}.",
        ]
    prof = results.get("profile")
    if prof and prof.get("runs"):
        lines += ["", f"#### Profile hot spots ({prof['profiler']}, % of on-CPU samples)", ""]
        for run in prof["runs"]:
            for side, top in run.get("top", {}).items():
                hot = ", ".join(f"{name} {pct:.0f}%" for name, pct in top[:5])
                lines.append(f"- **{run['name']} / {side}** (`{run['files'][side]}`): {hot}")
    if prof and prof.get("threads"):
        lines += _thread_table(prof["threads"])
    gpu = results.get("gpu")
    if gpu is not None:
        lines += ["", "#### GPU", ""]
        if not gpu.get("available"):
            lines.append(f"{gpu['note']}.")
        else:
            lines += [
                f"Device: {gpu['device']}.",
                "",
                "| payload | FeedClient(device='cuda') GB/s | pinned copy_ GB/s | ratio |",
                "|---|---|---|---|",
            ]
            for r in gpu["rows"]:
                ratio = r["feed_gb_per_s"]["median"] / r["pinned_copy_gb_per_s"]["median"]
                lines.append(
                    f"| {r['label']} | {_spread(r['feed_gb_per_s'])} | "
                    f"{_spread(r['pinned_copy_gb_per_s'])} | {ratio:.2f}x |"
                )
    lines += [
        "",
        "Section times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in results["section_s"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, md: str) -> None:
    """Replace the text between the results markers of ``readme`` with ``md``."""
    if not readme.is_file():
        return
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    readme.write_text(pattern.sub(lambda _: f"{README_START}\n{md}{README_END}", text))


# --------------------------------------------------------------------------- plot


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("throughput", [])
    stall = results.get("stall")
    mem = results.get("memory")
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), gridspec_kw={"width_ratios": [3, 1.3, 1.3]})
    ax = axes[0]
    groups: list[tuple[str, bool | None]] = []
    for c in CASES:
        for shuf in (True, False):
            if any(r["case"] == c.key and r["shuffle"] == shuf for r in rows):
                groups.append((c.key, shuf))
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for g, (case, shuf) in enumerate(groups):
            r = _find(rows, case, m, shuf)
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
    ax = axes[1]
    if stall:
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
    ax = axes[2]
    if mem:
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
    m = results["machine"]
    fig.suptitle(
        f"lensfeed benchmarks ({results['settings']['mode']}): {m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']}, libzmq {m['libzmq']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["add_ratios", "evaluate_targets", "markdown", "plot", "update_readme"]
