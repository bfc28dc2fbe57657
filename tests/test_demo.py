"""``lensfeed demo``: the embedded dataset, the summary, and the whole job end to end."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import threading
import time
from pathlib import Path

import datasets
import pytest

from lensfeed import demo as D
from lensfeed import demo_data as DD
from lensfeed.common.config import load_config
from lensfeed.common.metrics import metrics_file
from lensfeed.producer.shard import load_shard
from tests._util import REPO, Procs, python_cmd


def test_demo_data_is_small_real_and_deterministic(tmp_path: Path) -> None:
    a = DD.prepare_demo_data(tmp_path / "a")
    b = DD.prepare_demo_data(tmp_path / "b")
    assert a["created"]
    assert b["created"]
    assert a["sha256"] == b["sha256"]
    assert a["modules_found"] == list(DD.DEMO_MODULES)
    size = sum(f.stat().st_size for f in (tmp_path / "a").iterdir())
    assert 300_000 < size < 8_000_000
    ds = datasets.load_from_disk(str(tmp_path / "a"))
    assert ds.num_rows == a["rows"] > 1000
    row = bytes(ds.with_format("numpy")["input_ids"][0].astype("uint8").tolist())
    assert row.startswith(b"# Python 3.")  # byte tokens of real text
    shard = load_shard(tmp_path / "a", rank=0, world_size=2, columns=["input_ids"])
    assert shard.columns["input_ids"].row_shape == (DD.DEMO_SEQ_LEN,)

    again = DD.prepare_demo_data(tmp_path / "a")
    assert not again["created"]
    assert again["sha256"] == a["sha256"]
    rebuilt = DD.prepare_demo_data(tmp_path / "a", seq_len=64)
    assert rebuilt["created"]
    assert rebuilt["rows"] > a["rows"]


def test_prepare_never_touches_other_data(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    info = DD.prepare_demo_data(mine)
    assert not info["created"]
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]


def test_config_is_found_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert D.resolve_config(None) == REPO / "conf" / "demo.yaml"
    assert D.resolve_config("conf/demo.yaml") == REPO / "conf" / "demo.yaml"
    assert D.resolve_config("demo.yaml") == REPO / "conf" / "demo.yaml"
    with pytest.raises(Exception, match="config file not found"):
        D.resolve_config("nope.yaml")


def test_prepare_only_and_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert D.main(["--prepare-only"]) == 0
    assert (tmp_path / "data" / "demo" / DD.DEMO_MARKER).is_file()
    assert D.main(["--prepare-only", "batch_sise=3"]) == 1  # unknown key: nothing started


def test_summary_reads_only_this_runs_records(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"event": "status", "training_status": "error_x"}) + "\n")
    offsets = D._offsets(str(path), 2)
    recs = {
        0: [
            {"event": "cycle", "cycle": 0, "total_wraps": 0},
            {"event": "cycle", "cycle": 1, "total_wraps": 2},
            {
                "event": "status",
                "training_status": "ok",
                "cycles": 2,
                "samples": 64,
                "samples_per_s": 100.0,
                "wait_share": 0.25,
            },
        ],
        1: [{"event": "status", "training_status": "error_empty_cache_regen", "message": "m"}],
    }
    for rank, lines in recs.items():
        with metrics_file(path, rank).open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)
    s = D.summarize(D.read_new_records(str(path), offsets))
    assert [r.status for r in s.ranks] == ["ok", "error_empty_cache_regen"]
    assert (s.ranks[0].cycles, s.ranks[0].wraps, s.ranks[0].samples) == (2, 2, 64)
    assert not s.ok
    table = s.table()
    assert "25.0%" in table
    assert "rank 1: m" in table


# --------------------------------------------------------------------------- end to end

# Small cycles keep these runs short; everything else is conf/demo.yaml.
_FAST = [
    "dataset.on_the_fly.samples_per_regeneration_cycle=256",
    "training.num_cycles=2",
    "training.progress=false",
]


def _demo_cmd(tmp_path: Path, *extra: str) -> list[str]:
    endpoint = f"feed.endpoint=ipc://{tmp_path}/ipc/demo-{{rank}}.sock"
    return python_cmd("lensfeed.cli", "demo", *_FAST, endpoint, *extra)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_demo_runs_the_whole_job(tmp_path: Path, procs: Procs) -> None:
    p = procs.start(_demo_cmd(tmp_path), cwd=tmp_path)
    code, out = procs.wait(p, timeout=100)
    assert code == 0, out
    assert "lensfeed demo: ok" in out
    assert (tmp_path / "data" / "demo" / DD.DEMO_MARKER).is_file()
    cfg = load_config(REPO / "conf" / "demo.yaml", _FAST)
    status = [
        json.loads(line)
        for r in range(2)
        for line in metrics_file(tmp_path / cfg.training.metrics_path, r).read_text().splitlines()
    ]
    assert {s["training_status"] for s in status if s["event"] == "status"} == {"ok"}
    table = out[out.index("rank  status") :]
    assert re.search(r"^\s+all\s+2\s+", table, re.M)  # 2 cycles
    assert _group_gone(p.pid)


@pytest.mark.slow
def test_demo_fails_and_stops_producers_when_a_producer_fails(tmp_path: Path, procs: Procs) -> None:
    # Producers cannot serve a missing column: they report it and linger (30 s) for the trainer;
    # the trainer fails, and the demo must stop the lingering producers instead of waiting.
    cmd = _demo_cmd(
        tmp_path,
        "dataset.columns=[input_ids,nope]",
        "feed.error_linger_s=30",
        "feed.timeout_s=30",
        "feed.reconnect_timeout_s=20",
        "training.collective_timeout_s=90",
    )
    t0 = time.monotonic()
    p = procs.start(cmd, cwd=tmp_path)
    code, out = procs.wait(p, timeout=60)
    assert code == 1, out
    assert "column 'nope' not found" in out
    assert "FAILED" in out
    assert time.monotonic() - t0 < 30 + 10
    assert _group_gone(p.pid)


@pytest.mark.slow
def test_ctrl_c_stops_every_process(tmp_path: Path, procs: Procs) -> None:
    # A child inherits an *ignored* SIGINT (e.g. a CI runner in the background); make sure the
    # demo starts with the default disposition, as it has in a terminal.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        p = procs.start(_demo_cmd(tmp_path, "training.num_cycles=1000"), cwd=tmp_path)
    finally:
        signal.signal(signal.SIGINT, old)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in p.stdout], daemon=True).start()
    deadline = time.monotonic() + 60
    seen = []
    while not any("trainer connected" in x for x in seen):
        seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
    os.kill(p.pid, signal.SIGINT)  # what Ctrl-C sends the demo (its children get it too)
    assert p.wait(timeout=30) == 130
    assert _group_gone(p.pid)
