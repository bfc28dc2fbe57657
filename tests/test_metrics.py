"""``lensfeed metrics``: the per-cycle/per-rank table, ``--plot``, ``--tensorboard``, FeedStats.

One real 2-rank run (torchrun + fake producers) feeds the end-to-end tests; the rest use
hand-written records so each rule (run selection, missing ranks, torn lines) is checked alone.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lensfeed import demo as D
from lensfeed import metrics as M
from lensfeed.common.errors import LensfeedError
from lensfeed.trainer.client import FeedStats
from tests._util import Procs, python_cmd, read_records, torchrun_cmd

CYCLES, BATCH, CYCLE_SIZE = 3, 4, 20
FILES = ("metrics.jsonl", "metrics.rank1.jsonl")  # rank 0, rank 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory holding metrics.jsonl and metrics.rank1.jsonl of one real 2-rank run."""
    d = tmp_path_factory.mktemp("run")
    d.chmod(0o700)  # holds the ipc sockets too
    settings = {
        "world_size": 2,
        "batch_size": BATCH,
        "dataset.on_the_fly.samples_per_regeneration_cycle": CYCLE_SIZE,
        "feed.endpoint": f"ipc://{d}/feed-{{rank}}.sock",
        "feed.timeout_s": 20,
        "feed.reconnect_timeout_s": 20,
        "training.collective_timeout_s": 70,
        "training.num_cycles": CYCLES,
        "training.progress": "false",
        "training.checkpoint_dir": str(d / "ckpt"),
        "training.metrics_path": str(d / "metrics.jsonl"),
        "fake.seq_len": 8,
        "fake.shard_rows": 13,
    }
    args = [f"{k}={v}" for k, v in settings.items()]
    procs = Procs()
    try:
        fakes = [
            procs.start(python_cmd("lensfeed.producer.fake", "--rank", str(r), *args))
            for r in range(2)
        ]
        code, out = procs.wait(procs.start(torchrun_cmd(*args)), timeout=100)
        assert code == 0, out
        for f in fakes:
            procs.wait(f, timeout=20)
        yield d
    finally:
        procs.cleanup()


def _rows(out: str, first: str) -> list[list[str]]:
    """The whitespace-split rows of the table whose header starts with ``first``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first])
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip() or not re.match(r"^\s*(\d+|all)\s", line):
            break
        rows.append(line.split())
    return rows


# --------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_table_has_a_row_per_cycle_and_rank(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert M.main([str(run_dir / "metrics.jsonl")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run: {run_dir / 'metrics.jsonl'} (2 ranks, started ")
    cycles = _rows(out, "cycle")
    assert [(int(r[0]), int(r[1])) for r in cycles] == [(c, r) for c in range(3) for r in (0, 1)]
    for rank, name in enumerate(FILES):
        for rec in read_records(run_dir / name, "cycle"):
            row = next(r for r in cycles if (int(r[0]), int(r[1])) == (rec["cycle"], rank))
            assert int(row[2]) == rec["batches"] == CYCLE_SIZE // BATCH
            assert row[3] == f"{rec['samples_per_s']:.0f}"
            assert row[5] == f"{100 * rec['wait_share']:.1f}%"
            assert (int(row[6]), int(row[7])) == (rec["wraps"], rec["total_wraps"])
            assert row[11] == f"{rec['loss']:.4f}"
    ranks = _rows(out, "rank")
    assert [r[:2] for r in ranks[:2]] == [["0", "ok"], ["1", "ok"]]
    samples = CYCLES * CYCLE_SIZE // BATCH * BATCH
    assert ranks[2][:3] == ["all", str(CYCLES), str(2 * samples)]
    status = [read_records(run_dir / name, "status")[-1] for name in FILES]
    assert [int(r[3]) for r in ranks[:2]] == [s["samples"] for s in status]
    assert ranks[0][4] == f"{status[0]['samples_per_s']:.0f}"


@pytest.mark.slow
def test_a_ranks_cycle_records_add_up_to_its_status_totals(run_dir: Path) -> None:
    """What a failed or killed rank's totals come from (its cycle records alone) agrees with
    what an ok status says: the same samples, in no more time than the whole run took."""
    for rank, recs in M.read_run(run_dir).items():
        status = recs[-1]
        without = {rank: [r for r in recs if r.get("event") != "status"]}
        rs = M.summarize(without).ranks[0]
        assert rs.status == "running?"
        assert (rs.cycles, rs.samples) == (status["cycles"], status["samples"]) == (CYCLES, 60)
        assert 0 < rs.seconds <= status["wall_s"]
        assert 0 < rs.wait_s <= status["wait_s"] + 1e-9
        assert rs.samples_per_s == pytest.approx(rs.samples / rs.seconds)
        assert rs.wait_share == pytest.approx(rs.wait_s / rs.seconds)


@pytest.mark.slow
def test_run_can_be_any_rank_file_or_the_directory(run_dir: Path) -> None:
    expected = {0: run_dir / "metrics.jsonl", 1: run_dir / "metrics.rank1.jsonl"}
    for given in (run_dir, run_dir / "metrics.jsonl", run_dir / "metrics.rank1.jsonl"):
        assert M.rank_files(given) == expected
    assert M.summarize(M.read_run(run_dir)).ok


@pytest.mark.slow
def test_the_demo_prints_the_same_summary(run_dir: Path) -> None:
    assert D.summarize is M.summarize
    offsets = dict.fromkeys(range(2), 0)
    from_demo = D.summarize(D.read_new_records(run_dir / "metrics.jsonl", offsets))
    assert from_demo.table() == M.summarize(M.read_run(run_dir)).table()


@pytest.mark.slow
def test_plot_writes_a_png(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (pip install '.[plot]')")
    out = tmp_path / "sub" / "run.png"
    assert M.main([str(run_dir), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    assert f"plot: {out}" in capsys.readouterr().out


@pytest.mark.slow
def test_tensorboard_scalars_match_the_records(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="--tensorboard needs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert M.main([str(run_dir), "--tensorboard", str(tmp_path / "tb")]) == 0
    for rank, name in enumerate(FILES):
        ea = EventAccumulator(str(tmp_path / "tb" / f"rank{rank}"))
        ea.Reload()
        assert "feed/wait_share" in ea.Tags()["scalars"]
        got = [(e.step, e.value) for e in ea.Scalars("feed/samples_per_s")]
        want = [(r["cycle"], r["samples_per_s"]) for r in read_records(run_dir / name, "cycle")]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


# --------------------------------------------------------------------------- optional extras


@pytest.mark.parametrize(
    ("option", "module", "extra"),
    [("--plot", "matplotlib", "plot"), ("--tensorboard", "tensorboard", "tensorboard")],
)
def test_a_missing_extra_says_how_to_install_it(
    option: str,
    module: str,
    extra: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    _write(tmp_path / "m.jsonl", [_start(1), _cycle(0, 100.0), _status()])
    assert M.main([str(tmp_path / "m.jsonl"), option, str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert f"needs the '{module}' package" in captured.err
    assert f"pip install 'lensfeed[{extra}]'" in captured.err
    assert captured.out == ""  # said before doing anything
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- hand-written records


def _write(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _start(world: int) -> dict:
    return {"event": "start", "world_size": world, "time": 1.0e9, "resumed_from": None}


def _cycle(i: int, rate: float) -> dict:
    return {"event": "cycle", "cycle": i, "batches": 2, "samples_per_s": rate, "total_wraps": i}


def _status(ok: bool = True) -> dict:
    if ok:
        return {"event": "status", "training_status": "ok", "cycles": 1, "samples": 8}
    return {"event": "status", "training_status": "error_timeout", "message": "no answer"}


def test_runs_are_split_at_start_and_the_last_is_the_default(tmp_path: Path) -> None:
    m = tmp_path / "m.jsonl"
    _write(m, [_start(1), _cycle(0, 1.0), _status(ok=False)])  # run 0
    _write(m, [_status(ok=False)])  # run 1: failed before writing 'start' (e.g. its resume)
    _write(m, [_start(1), _cycle(0, 2.0), _cycle(1, 3.0), _status()])  # run 2
    assert [len(r) for r in M.split_runs(M.read_jsonl(m))] == [3, 1, 4]
    last = M.summarize(M.read_run(m))
    assert [c.samples_per_s for c in last.cycles] == [2.0, 3.0]
    assert last.ok
    first = M.summarize(M.read_run(m, 0))
    assert first.ranks[0].status == "error_timeout"
    assert "rank 0: no answer" in first.table()
    assert len(M.summarize(M.read_run(m, None)).cycles) == 3
    with pytest.raises(LensfeedError, match=r"no run 7 in .*m.jsonl: it holds 3 runs \(0..2"):
        M.read_run(m, 7)


def _timed(t: float, *records: dict) -> list[dict]:
    return [{**r, "time": t + i} for i, r in enumerate(records)]


def test_each_rank_contributes_its_part_of_rank_0s_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ranks need not hold the same runs: a resume on fewer ranks leaves the extra ranks'
    files behind, and a rank can die before writing anything. Rank 0 names the run and each
    other rank's part of it is the one that began at the same time, or none."""
    files = [tmp_path / "m.jsonl", *(tmp_path / f"m.rank{r}.jsonl" for r in (1, 2, 3))]
    for r, f in enumerate(files):  # run 0: four ranks
        _write(f, _timed(1000.0 + r / 10, _start(4), _cycle(0, 1.0 + r), _status()))
    _write(files[0], _timed(2000.0, _start(2), _cycle(0, 10.0), _status()))  # run 1: two ranks
    # ... whose rank 1 wrote nothing (killed at start-up): it is missing, not run 0's rank 1.
    last = M.read_run(tmp_path)
    assert sorted(last) == [0, 1]
    assert last[1] == []
    assert [(c.rank, c.samples_per_s) for c in M.summarize(last).cycles] == [(0, 10.0)]
    first = M.summarize(M.read_run(tmp_path, 0))
    assert [(c.rank, c.samples_per_s) for c in first.cycles] == [(r, 1.0 + r) for r in range(4)]
    _write(files[1], _timed(2000.3, _start(2), _cycle(0, 11.0)))  # rank 1 came late: running
    assert [c.samples_per_s for c in M.summarize(M.read_run(tmp_path)).cycles] == [10.0, 11.0]
    assert M.main([str(tmp_path), "--run", "2"]) == 1
    assert "no run 2 in" in capsys.readouterr().err


def _measured_cycle(i: int, *, batches: int, batch: int, seconds: float, wait: float) -> dict:
    """A cycle record as the trainer writes it: the rate and wait share of ``seconds``."""
    rate = batches * batch / seconds
    share = wait / seconds
    return {
        **_cycle(i, rate),
        "batches": batches,
        "samples": batches * batch,
        "seconds": seconds,
        "wait_s": wait,
        "wait_share": share,
    }


#: Seven cycles of 8 batches of 512 in 14 s, 3.5 s of it waiting on data: 2048 samples/s, 25%
#: (the plain means of the per-cycle rates and shares are 2638/s and 12.5%).
_SECONDS = (1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 2.0)
_WAITS = (0.0, 1.5, 0.0, 1.5, 0.0, 0.5, 0.0)


def _seven_cycles() -> list[dict]:
    return [
        _measured_cycle(i, batches=8, batch=512, seconds=s, wait=w)
        for i, (s, w) in enumerate(zip(_SECONDS, _WAITS, strict=True))
    ]


def _failure(code: str, message: str, steps: int) -> dict:
    """A failure status record: like trainer/records.py's, it has no totals, only ``steps``."""
    return {
        "event": "status",
        "training_status": f"error_{code}",
        "failed_rank": 0,
        "code": code,
        "message": message,
        "steps": steps,
    }


def test_a_failed_runs_totals_come_from_its_cycle_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failure status holds no totals: a producer lost in cycle 7 of 8 still trained 7
    cycles (28,672 samples), which the table shows, not 0 samples at 0/s."""
    lost = _failure("producer_lost", "producer 0 lost", steps=58)
    _write(tmp_path / "m.jsonl", [_start(2), *_seven_cycles(), lost])
    _write(tmp_path / "m.rank1.jsonl", [_start(2), *_seven_cycles()])  # killed: no status
    assert M.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    ranks = _rows(out, "rank")
    assert ranks[0] == ["0", "error_producer_lost", "7", "28672", "2048", "25.0%", "6"]
    assert ranks[1] == ["1", "running?", "7", "28672", "2048", "25.0%", "6"]
    assert ranks[2] == ["all", "7", "57344", "4096", "25.0%", "12"]
    assert "rank 0: producer 0 lost" in out


def _ok(cycles: int, samples: int, wall: float, wait: float) -> dict:
    return {
        "event": "status",
        "training_status": "ok",
        "cycles": cycles,
        "samples": samples,
        "wall_s": wall,
        "samples_per_s": samples / wall,
        "wait_s": wait,
        "wait_share": wait / wall,
    }


def test_all_runs_add_up_each_ranks_runs_under_the_last_runs_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--run all``: each rank's totals cover every run (the failed one from its cycles), its
    status and message are its last run's, never an older run's error beside ``ok``."""
    m = tmp_path / "m.jsonl"
    _write(m, [_start(1), *_seven_cycles(), _failure("timeout", "no answer", steps=58)])
    _write(m, [_start(1), _cycle(7, 1.0), _ok(cycles=8, samples=4096, wall=2.0, wait=0.5)])
    assert M.main([str(m), "--run", "all"]) == 0
    out = capsys.readouterr().out
    # 28,672 + 4,096 samples in 14 + 2 s, 3.5 + 0.5 s of it waiting on data.
    assert _rows(out, "rank")[0] == ["0", "ok", "8", "32768", "2048", "25.0%", "7"]
    assert "no answer" not in out
    assert M.main([str(m), "--run", "-1"]) == 0  # the last run alone: its status record
    last = _rows(capsys.readouterr().out, "rank")[0]
    assert last == ["0", "ok", "8", "4096", "2048", "25.0%", "7"]
    _write(m, [_start(1), _failure("timeout", "gone again", steps=64)])  # failed at once
    assert M.main([str(m), "--run", "all"]) == 0
    out = capsys.readouterr().out
    assert _rows(out, "rank")[0][:4] == ["0", "error_timeout", "8", "32768"]
    assert "rank 0: gone again" in out
    assert "no answer" not in out


def test_missing_and_unfinished_ranks_are_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = tmp_path / "m.jsonl"
    _write(m, [_start(3), _cycle(0, 5.0), _status()])
    _write(tmp_path / "m.rank1.jsonl", [_start(3), _cycle(0, 4.0)])  # still running, or killed
    with (tmp_path / "m.rank1.jsonl").open("a") as f:
        f.write('{"event": "cyc')  # a torn last line is skipped
    assert M.main([str(tmp_path), "--run", "-1"]) == 0
    ranks = _rows(capsys.readouterr().out, "rank")
    assert [r[:2] for r in ranks[:3]] == [["0", "ok"], ["1", "running?"], ["2", "missing"]]


def test_bad_arguments_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert M.main([str(tmp_path / "nope.jsonl")]) == 1
    assert "metrics file not found" in capsys.readouterr().err
    assert M.main([str(tmp_path)]) == 1
    assert "no metrics *.jsonl file" in capsys.readouterr().err
    _write(tmp_path / "a.jsonl", [_start(1)])
    _write(tmp_path / "b.jsonl", [_start(1)])
    assert M.main([str(tmp_path)]) == 1
    assert "several runs' metrics (a.jsonl, b.jsonl)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        M.main([str(tmp_path / "a.jsonl"), "--run", "last"])


# --------------------------------------------------------------------------- FeedStats


def test_feed_stats_is_a_plain_dict_for_any_logger() -> None:
    stats = FeedStats(batches=3, samples=12, wait_s=0.25)
    d = stats.as_dict()
    assert d == dataclasses.asdict(stats)
    assert d["batches"] == 3
    assert json.loads(json.dumps(d)) == d
    assert stats.as_dict("feed/")["feed/wait_s"] == 0.25
    d["batches"] = 99  # a snapshot: the logger may keep or change it
    assert stats.batches == 3


def test_a_voted_failure_is_said_once_under_the_rank_it_names(tmp_path: Path) -> None:
    """Every rank records the failure the ranks voted on (rank 0's producer here): the table
    says it once, as rank 0's, not once per rank under each rank's own number."""
    for name in ("m.jsonl", "m.rank1.jsonl"):
        _write(tmp_path / name, [_start(2), _failure("shard", "rank 0's shard is gone", 0)])
    _write(tmp_path / "n.jsonl", [_start(1), {**_failure("ranks_disagree", "x", 0)}])
    lines = M.summarize(M.read_run(tmp_path / "m.jsonl")).table().splitlines()
    assert [line for line in lines if "shard is gone" in line] == ["rank 0: rank 0's shard is gone"]
    with (tmp_path / "n.jsonl").open("a") as f:
        f.write(json.dumps({**_failure("ranks_disagree", "y", 0), "failed_rank": -1}) + "\n")
    assert "rank 0: y" in M.summarize(M.read_run(tmp_path / "n.jsonl")).table()
    # Ranks that disagree blame no rank, and each says its own value: both lines stay.
    for r, name in enumerate(("d.jsonl", "d.rank1.jsonl")):
        rec = {**_failure("ranks_disagree", f"this rank: {r}", 0), "failed_rank": -1}
        _write(tmp_path / name, [_start(2), rec])
    table = M.summarize(M.read_run(tmp_path / "d.jsonl")).table()
    assert "rank 0: this rank: 0" in table
    assert "rank 1: this rank: 1" in table
