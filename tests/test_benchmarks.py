"""The benchmark suite must not rot: a smoke run executes every section's code path at toy
sizes, the report rebuilds from the committed full results, and a missing optional tool (the
``bench`` extra) is announced instead of crashing the run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import plot, profiling
from benchmarks import run as bench_run
from benchmarks.common import BENCH_DIR, REPO
from benchmarks.targets import METHOD_ORDER

HEADINGS = (
    "#### Targets",
    "#### Throughput",
    "#### Cycle-boundary stall",
    "#### Memory",
    "#### Profile hot spots",
    "#### Where a batch's CPU goes",
    "#### GPU",
)


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~1-2 min on a quiet 2-core machine; CPU is often shared
def test_smoke_run_covers_every_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--data-dir", str(tmp_path / "data")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == {}
    assert set(bench_run.SECTIONS) <= results.keys()
    assert {r["method"] for r in results["throughput"]} == set(METHOD_ORDER)  # every method
    assert {r["case"] for r in results["throughput"]} == {"tok128", "act4"}
    assert [r["key"] for r in results["stall"]["rows"]] == [
        "ahead",
        "ahead16",
        "no-ahead",
        "original",
    ]
    assert len(results["targets"]) == 5
    # CPU per GB for every row measured in processes (lensfeed, every limit)
    cpu = {
        r["method"]: r.get("cpu_s_per_gb")
        for r in results["throughput"]
        if "limit" in r["method"] or r["method"] == "lensfeed"
    }
    assert all(x is not None and x["median"] > 0 for x in cpu.values()), cpu
    prof = results["profile"]
    assert [t["case"] for t in prof["threads"]] == ["tok128", "act4"]
    if prof["profiler"]:
        assert all((out / f).is_file() for r in prof["runs"] for f in r["files"].values())
    else:
        assert "left out, for want of an optional tool: profile" in proc.stderr
    md = (out / "results.md").read_text()
    assert [h for h in HEADINGS if h not in md] == []
    assert (out / "throughput.png").is_file() == plot.available()


def test_report_rebuilds_from_committed_results(tmp_path: Path) -> None:
    shutil.copy(BENCH_DIR / "results" / "results.json", tmp_path)
    assert bench_run.main(["--rebuild", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert [h for h in HEADINGS if h not in md] == []
    assert md.count("| **PASS** |") + md.count("| **FAIL** |") == 5


def test_missing_tools_are_announced_not_crashed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_run, "profiler", lambda: None)
    monkeypatch.setattr(plot, "available", lambda: False)
    assert len(bench_run.left_out(bench_run.SECTIONS)) == 2
    assert len(bench_run.left_out(["throughput"])) == 1
    assert not plot.plot({}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_profile_summary_keeps_the_data_path(tmp_path: Path) -> None:
    raw = tmp_path / "raw.collapsed"
    raw.write_text(
        "thread (1): MainThread;<module> (benchmarks/consumer.py:9);"
        "run (benchmarks/consumer.py:50);Poller.poll (zmq/sugar/poll.py:20) 30\n"
        "thread (2): lensfeed-regen;Prefetcher._run (lensfeed/producer/ahead.py:1);"
        "TokenColumn.gather (lensfeed/producer/shard.py:40) 70\n"
        "thread (1): MainThread;<module> (x.py:1);import_module (importlib/__init__.py:9) 50\n"
        "thread (3): rss-sampler;sample (benchmarks/common.py:1) 5\n"
    )
    summary = tmp_path / "summary.txt"
    summary.write_text(profiling.summarize_collapsed(raw, title="t"))
    assert "on-CPU samples on the data path: 100 (excluded: 50" in summary.read_text()
    assert profiling.top_self(summary) == [
        ("TokenColumn.gather (producer/shard.py)", 70.0),
        ("Poller.poll (sugar/poll.py)", 30.0),
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_activation_benchmark_runs_three_ways(tmp_path: Path) -> None:
    """The raw-forward / seed-loop / lensfeed comparison at toy sizes (numbers mean nothing)."""
    pytest.importorskip("transformers")
    small = ["--hidden", "32", "--layers", "2", "--seq-len", "16", "--batch", "8"]
    cmd = [sys.executable, "-m", "benchmarks.activations", *small, "--cycle-size", "32"]
    cmd += ["--cycles", "2", "--throughput-cycles", "2", "--repeats", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "activations.json").read_text())
    assert res["raw_samples_per_s"] > 0
    assert res["feed_samples_per_s"] > 0
    assert res["seed_wall_s"] > 0
    assert res["lensfeed_wall_s"] > 0
    assert "end-to-end speed-up over the seed" in (tmp_path / "activations.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_raw_limit_runs_over_curve_with_a_lensfeed_key_set(tmp_path: Path) -> None:
    """The CURVE benchmark's ceiling (``benchmarks.limit --keys``): the raw sender and receiver
    complete a CurveZMQ handshake with a ``lensfeed keys`` set over loopback tcp and stream
    every round, reporting rate and CPU per GB like every other limit row."""
    from benchmarks.common import Workdir
    from benchmarks.settings import CASES, SMOKE
    from benchmarks.throughput import measure_limit
    from lensfeed.common.keyfiles import create_keys
    from tests._util import free_port

    keys = tmp_path / "keys"
    create_keys(keys)
    case = next(c for c in CASES if c.key == "tok128")
    with Workdir() as work:
        row = measure_limit(
            work,
            case,
            SMOKE,
            tuned=True,
            endpoint=f"tcp://127.0.0.1:{free_port()}",
            keys=keys,
            method="limit-curve",
        )
    assert row["method"] == "limit-curve"
    assert row["samples_per_s"]["median"] > 0
    assert row["cpu_s_per_gb"]["median"] > 0


def test_workdir_is_removed_on_exit_unless_kept() -> None:
    """Benchmark runs leave nothing in /tmp (sockets, logs, a model and data set for the
    activation benchmark) unless asked to keep the child logs."""
    from benchmarks.common import Workdir

    with Workdir() as work:
        work.path("log").write_text("x")
        assert work.root.stat().st_mode & 0o077 == 0  # private: it holds ipc sockets
    assert not work.root.exists()
    with Workdir(keep=True) as kept:
        kept.path("log").write_text("x")
    assert kept.root.is_dir()
    shutil.rmtree(kept.root)
