"""Turn the suite's results into a Markdown report (targets are evaluated in
:mod:`benchmarks.targets`, the plot drawn in :mod:`benchmarks.plot`)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from benchmarks.common import fmt_bytes, fmt_rate
from benchmarks.settings import CASES
from benchmarks.targets import METHOD_ORDER, Target

NO_PROFILER = "py-spy is not installed (`pip install -e '.[bench]'`)"
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


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


def _targets_md(targets: list[Target]) -> list[str]:
    lines = ["", "#### Targets", "", "| target | measured | pass | note |", "|---|---|---|---|"]
    for t in targets:
        ok = "**PASS**" if t["ok"] else "**FAIL**"
        lines.append(f"| {t['target']} | {t['value']} | {ok} | {t.get('note', '')} |")
    return lines


def _throughput_md(rows: list[dict[str, Any]], repeats: int) -> list[str]:
    lines = [
        "",
        "#### Throughput",
        "",
        f"Median of {repeats} repeats [min–max]. GB/s counts wire payload (tensor frames incl. "
        "`sample_idx`), identical for every method of a case, so GB/s ratios equal samples/s "
        "ratios. `limit` sends one batch per message; `limit@msg` sends messages of the size "
        "lensfeed packs for that batch (`feed.batches_per_message` auto), its receiver's malloc "
        "tuned as lensfeed's is, so `x limit@msg` "
        "compares like with like. CPU s/GB: CPU seconds of both processes together (producer "
        "and trainer; the limit's sender and receiver) per GB delivered over the timed repeats, "
        "read at each repeat's edges (the scheduler's per-thread run time), median [min–max]; "
        "`CPU x limit*` divides the medians by the malloc-tuned limit's at the same message "
        "size: `limit@msg` where lensfeed packs batches, else `limit+malloc` (lower is "
        "better).",
        "",
        "| payload | order | method | samples/s | GB/s | x limit | x limit@msg "
        "| x limit+malloc | x original | x DL w0 | x DL w2 | CPU s/GB | CPU x limit* |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
            f"{_ratio(rt.get('limit@msg'))} | {_ratio(rt['limit+malloc'])} | "
            f"{_ratio(rt['original'])} | {_ratio(rt['DL w0'])} | {_ratio(rt['DL w2'])} | "
            f"{_spread(r['cpu_s_per_gb']) if r.get('cpu_s_per_gb') else '–'} | "
            f"{_ratio(r.get('cpu_ratio'))} |"
        )
    return lines


def _stall_md(stall: dict[str, Any]) -> list[str]:
    p = stall["params"]
    lines = [
        "",
        "#### Cycle-boundary stall",
        "",
        f"{p['cycles']} cycles x {p['batches_per_cycle']} batches of {p['batch_size']}; "
        f"regeneration transform {p['regen_s_per_batch'] * 1e3:.1f} ms/batch, training step "
        f"{p['step_s_per_batch'] * 1e3:.1f} ms/batch (both sleep). Boundary = end of the last "
        "step of a cycle -> first batch of the next in the loop (cycles 1..; cycle 0 is the cold "
        "start). Feed wait = the part spent waiting on the producer; the rest is the client's "
        f"cycle-end cleanup. Ideal pipelined wall time: {stall['ideal_wall_s']:.2f} s.",
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
    return lines


def _memory_md(mem: dict[str, Any]) -> list[str]:
    small, large = mem["small"], mem["large"]
    lines = [
        "",
        "#### Memory",
        "",
        f"Shuffled (64, 128) tokens; S = samples per cycle. S={small['samples_per_cycle']:,}: "
        f"{small['batches_consumed']} batches consumed; S={large['samples_per_cycle']:,}: "
        f"{large['batches_consumed']} batches: the same samples, so both runs touch the same "
        "shard rows. VmHWM includes memory-mapped dataset pages (shared, clean page cache: it "
        "grows with the distinct rows touched, up to the shard's size, whatever S is); RssAnon "
        "is private memory (sampled peak). One cycle's permutation at the large S: "
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
    sizes = ", ".join(
        f"S={x['samples']:,}: {fmt_bytes(x['peak_rss_bytes'])}" for x in mem["original"]
    )
    return [
        *lines,
        "",
        f"Original (Python list cache, one process): {sizes}; "
        f"{mem['original_bytes_per_sample']:,.0f} B/sample -> extrapolated "
        f"{fmt_bytes(mem['original_extrapolated_large_bytes'])} at "
        f"S={large['samples_per_cycle']:,}.",
    ]


def _profile_md(prof: dict[str, Any]) -> list[str]:
    if not prof.get("profiler"):
        lines = ["", "#### Profile hot spots", "", "Not measured: " + NO_PROFILER + "."]
    else:
        lines = ["", f"#### Profile hot spots ({prof['profiler']}, % of on-CPU samples)", ""]
    for run in prof.get("runs", []):
        for side, top in run.get("top", {}).items():
            hot = ", ".join(f"{name} {pct:.0f}%" for name, pct in top[:5])
            lines.append(f"- **{run['name']} / {side}** (`{run['files'][side]}`): {hot}")
    return lines + (_thread_table(prof["threads"]) if prof.get("threads") else [])


def _gpu_md(gpu: dict[str, Any]) -> list[str]:
    if not gpu.get("available"):
        return ["", "#### GPU", "", f"{gpu['note']}."]
    lines = [
        "",
        "#### GPU",
        "",
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
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The report: machine, targets, then one table per section that ran."""
    s = results["settings"]
    lines = [
        f"### Results ({s['mode']} run, {results['elapsed_s']:.0f} s)",
        "",
        *_machine_md(results["machine"]),
        *_targets_md(results["targets"]),
    ]
    if results.get("throughput"):
        lines += _throughput_md(results["throughput"], s["repeats"])
    if results.get("stall"):
        lines += _stall_md(results["stall"])
    if results.get("memory"):
        lines += _memory_md(results["memory"])
    if results.get("profile"):
        lines += _profile_md(results["profile"])
    if results.get("gpu") is not None:
        lines += _gpu_md(results["gpu"])
    times = ", ".join(f"{k} {v:.0f} s" for k, v in results["section_s"].items())
    lines += ["", f"Section times: {times}."]
    for section, error in results.get("errors", {}).items():
        lines += ["", f"**{section} failed:** `{error}`"]
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


__all__ = ["NO_PROFILER", "markdown", "update_readme"]
