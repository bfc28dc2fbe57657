"""Multi-host deployments on simulated hosts (network namespaces on one switch, tests/_netns.py).

A 2-node x 2-rank torchrun trainer (static rendezvous, gloo over each host's ``eth0``) is fed two
ways, and each rank's per-step stream (``training.log_batches``: sample_idx and a digest of the
bytes) must equal a single-node ``torchrun --standalone --nproc_per_node 4`` run of the same
config on ipc:

* co-located: each node runs a producer supervisor for its own ranks on per-node ipc sockets
  (``{node_rank}`` in ``feed.endpoint``);
* disaggregated: all four producers on a third host, served over tcp with CURVE to both nodes
  (``{host}``/``{port}`` templates, ``feed.keys_dir``); it heals a ``kill -9`` of one remote
  producer, and a run stopped early resumes (``training.resume=auto``) against the same,
  still-running remote producers.

Only the namespaces' own addresses and loopback see traffic; the namespaces are deleted at the
end, also on failure. Skipped where namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest

from lensfeed.common.keyfiles import create_keys
from lensfeed.producer.shard import rank_slice
from tests._netns import IFNAME, Network, Unavailable
from tests._util import Procs, make_dataset, python_cmd, read_records, torchrun_cmd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROWS, WORLD, PER_NODE, BATCH, CYCLE, CYCLES = 203, 4, 2, 4, 80, 6
STEPS = CYCLES * CYCLE // BATCH  # per rank
#: Bounds on the waits (seconds): a 4-rank job starts ~12 Python processes on 2 cores.
START_S, RUN_S = 150, 180
NODES = ("n0", "n1")
PRODUCER_HOST = "p"
_ports = count(29400)  # a fresh rendezvous port per job: no TIME_WAIT from the previous one

Steps = dict[int, tuple[list[int], str]]


class Output:
    """Drains a child's output in the background (a full pipe never blocks it), so a test waits
    on a line the child prints, with a deadline, instead of on the clock."""

    def __init__(self, p: subprocess.Popen[str]) -> None:
        self.p = p
        self.lines: list[str] = []
        self.done = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        try:
            for line in self.p.stdout:
                with self.cond:
                    self.lines.append(line)
                    self.cond.notify_all()
        except (OSError, ValueError):  # the stream was closed by the teardown's kill
            pass
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> None:
        def seen() -> bool:
            return any(text in line for line in self.lines)

        with self.cond:
            if not self.cond.wait_for(lambda: self.done or seen(), timeout):
                raise AssertionError(f"no {text!r} within {timeout:.0f} s:\n{self}")
            if not seen():
                raise AssertionError(f"ended ({self.p.poll()}) before printing {text!r}:\n{self}")

    def finish(self, timeout: float) -> tuple[int, str]:
        """Exit code and the whole output; fails (not hangs) after ``timeout``."""
        try:
            code = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:.0f} s:\n{self}") from None
        self.thread.join(timeout=10)
        return code, str(self)

    def __str__(self) -> str:
        with self.cond:
            return "".join(self.lines)


def start(procs: Procs, cmd: list[str], **env: str) -> Output:
    return Output(procs.start(cmd, **env))


def overrides(run: Path, data: Path, **extra: object) -> list[str]:
    """The job's config; every process of a deployment loads the same overrides."""
    base: dict[str, object] = {
        "world_size": WORLD,
        "batch_size": BATCH,
        "dataset.path": data,
        "dataset.on_the_fly.samples_per_regeneration_cycle": CYCLE,
        "feed.endpoint": f"ipc://{run}/ipc/p{{rank}}.sock",
        "feed.prefetch": 4,  # producers are never far ahead: a kill is felt while training
        "feed.timeout_s": 60,
        "feed.heartbeat_timeout_s": 1,
        "feed.reconnect_timeout_s": 30,
        "training.collective_timeout_s": 160,
        "training.num_cycles": CYCLES,
        "training.progress": "false",
        "training.log_batches": "true",
        "training.checkpoint_dir": run / "ckpt",  # shared by both nodes (one filesystem)
        "training.metrics_path": run / "metrics.jsonl",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def supervisor(ranks: str, over: list[str]) -> list[str]:
    return python_cmd("lensfeed.producer", "--ranks", ranks, "--cpus-per-rank", "0", *over)


def start_trainers(procs: Procs, net: Network, over: list[str]) -> list[Output]:
    """One torchrun agent per node, 2 ranks each, gloo on the node's link to the switch."""
    port = str(next(_ports))
    out = []
    for node, host in enumerate(NODES):
        cmd = python_cmd(
            "torch.distributed.run",
            "--nnodes=2",
            f"--nproc_per_node={PER_NODE}",
            f"--node_rank={node}",
            f"--master_addr={net.addr[NODES[0]]}",
            f"--master_port={port}",
            "-m",
            "lensfeed.trainer",
            *over,
        )
        out.append(start(procs, net.cmd(host, cmd), GLOO_SOCKET_IFNAME=IFNAME))
    return out


def finish_all(outs: list[Output], timeout: float = RUN_S) -> list[str]:
    """Wait for every process; each must exit 0. Returns their outputs."""
    logs = []
    for o in outs:
        code, log = o.finish(timeout)
        assert code == 0, log
        logs.append(log)
    return logs


def metrics(run: Path, rank: int) -> Path:
    return run / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl")


def steps(run: Path, rank: int) -> Steps:
    """``step -> (sample_idx, digest)``; a step served twice keeps its last record."""
    return {
        r["step"]: (r["sample_idx"], r["digest"]) for r in read_records(metrics(run, rank), "batch")
    }


def assert_same_streams(run: Path, reference: dict[int, Steps]) -> None:
    """Lockstep and identical bytes: every rank ran all steps, each equal to the reference's."""
    for rank in range(WORLD):
        got = steps(run, rank)
        assert sorted(got) == list(range(1, STEPS + 1)), f"rank {rank}: steps {sorted(got)}"
        assert got == reference[rank], f"rank {rank}: stream differs from the single-node run"
        status = read_records(metrics(run, rank), "status")[-1]
        assert status["training_status"] == "ok", status
        assert status["steps"] == STEPS


def child_of(pid: int, rank: int) -> int:
    """The pid of the supervisor ``pid``'s producer child serving ``rank`` (from /proc)."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"--rank" in cmd and cmd[cmd.index(b"--rank") + 1] == str(rank).encode():
            return int(child)
    raise AssertionError(f"no producer child for rank {rank} under pid {pid}")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    try:
        network = Network([*NODES, PRODUCER_HOST])
    except Unavailable as exc:
        pytest.skip(f"cannot simulate hosts with network namespaces: {exc}")
    try:
        yield network
    finally:
        network.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "ds", rows=ROWS, seq_len=16)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys") / "set"
    create_keys(d)
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict[int, Steps]:
    """The single-node run (root namespace, ipc): what every deployment must reproduce. Its
    own checks: lockstep, and each rank served exactly (all of) its contiguous shard."""
    run = tmp_path_factory.mktemp("ref")
    over = overrides(run, data)
    procs = Procs()
    try:
        sup = start(procs, supervisor(f"0-{WORLD - 1}", over))
        trainer = start(procs, torchrun_cmd(*over, nproc=WORLD))
        finish_all([trainer, sup])
    finally:
        procs.cleanup()
    ref = {rank: steps(run, rank) for rank in range(WORLD)}
    for rank, got in ref.items():
        assert sorted(got) == list(range(1, STEPS + 1)), rank
        lo, hi = rank_slice(ROWS, rank, WORLD)
        seen = {i for idx, _ in got.values() for i in idx}
        assert seen == set(range(lo, hi)), rank  # CYCLES * CYCLE > shard rows: all are seen
        cycles = read_records(metrics(run, rank), "cycle")
        assert [c["batches"] for c in cycles] == [CYCLE // BATCH] * CYCLES
    return ref


# --------------------------------------------------------------------------- tests


def test_colocated_producers_per_node_over_ipc(net, reference, data, procs, tmp_path):
    """Each node serves its own ranks: node i's supervisor binds ``node{i}/rank{r}.sock``. A
    wrong ``{node_rank}`` would point a trainer at a socket nobody binds (a timeout)."""
    over = overrides(
        tmp_path,
        data,
        **{
            "feed.endpoint": f"ipc://{tmp_path}/node{{node_rank}}/rank{{rank}}.sock",
            "feed.ranks_per_node": PER_NODE,
        },
    )
    sups = [
        start(procs, net.cmd(host, supervisor(f"{n * PER_NODE}-{n * PER_NODE + 1}", over)))
        for n, host in enumerate(NODES)
    ]
    trainers = start_trainers(procs, net, over)
    finish_all(trainers)
    sup_logs = finish_all(sups, timeout=30)
    assert_same_streams(tmp_path, reference)
    for n, log in enumerate(sup_logs):  # each node served only its own ranks
        served = sorted(int(r) for r in re.findall(r"rank (\d+): started producer", log))
        assert served == [n * PER_NODE, n * PER_NODE + 1], log
        assert (tmp_path / f"node{n}").stat().st_mode & 0o777 == 0o700  # private, made so


def disaggregated(run: Path, data: Path, net: Network, keys: Path, **extra: object) -> list[str]:
    """All producers on the producer host, bound on every interface with CURVE; trainers
    connect to ``{host}:{port}`` (``feed.hosts``, ``feed.base_port + rank``)."""
    return overrides(
        run,
        data,
        **{
            "feed.bind": "tcp://0.0.0.0:{port}",
            "feed.endpoint": "tcp://{host}:{port}",
            "feed.hosts": f"[{net.addr[PRODUCER_HOST]}]",
            "feed.keys_dir": keys,
            **extra,
        },
    )


def test_disaggregated_producers_heal_a_killed_rank(net, reference, data, keys, procs, tmp_path):
    """kill -9 of rank 2's producer on the remote host mid-cycle (after the step-30 checkpoint,
    batch 10 of cycle 1, with batches in flight): the supervisor restarts it, the rank's client
    reconnects over tcp+CURVE, and every stream equals the single-node run."""
    kill_after = CYCLE // BATCH + CYCLE // BATCH // 2
    over = disaggregated(
        tmp_path,
        data,
        net,
        keys,
        **{"training.checkpoint_every": kill_after, "training.checkpoint_every_cycles": 0},
    )
    sup = start(procs, net.cmd(PRODUCER_HOST, supervisor(f"0-{WORLD - 1}", over)))
    trainers = start_trainers(procs, net, over)
    trainers[1].wait_for(f"rank 2: checkpoint {tmp_path / 'ckpt'}/step_{kill_after:08d} ", START_S)
    os.kill(child_of(sup.p.pid, 2), signal.SIGKILL)
    logs = finish_all(trainers)
    m = re.search(r"reconnected to the producer for rank 2 .* at cycle (\d+), batch (\d+)", logs[1])
    assert m, logs[1]
    assert (int(m[1]), int(m[2])) >= (1, kill_after % (CYCLE // BATCH)), m[0]  # not rewound
    code, sup_log = sup.finish(30)
    assert code == 0, sup_log
    assert re.search(r"rank 2: producer pid \d+ killed by SIGKILL; restart 1 of", sup_log), sup_log
    for rank in range(WORLD):
        assert f"CURVE on tcp://0.0.0.0:{50000 + rank}" in sup_log, sup_log
    assert_same_streams(tmp_path, reference)
    reconnects = [
        read_records(metrics(tmp_path, r), "status")[-1]["feed_reconnects"] for r in range(WORLD)
    ]
    assert reconnects[2] >= 1, reconnects
    assert [reconnects[r] for r in (0, 1, 3)] == [0, 0, 0], reconnects  # the others never noticed


def test_disaggregated_run_stopped_early_resumes_exactly(
    net, reference, data, keys, procs, tmp_path
):
    """A run stopped at step 30 (mid-cycle) resumes from its checkpoint on both nodes against
    the same remote producers (``feed.exit_on_bye=false``: they keep serving after the first
    trainer's goodbye), and the joined records equal the uninterrupted single-node run."""
    stop_at = CYCLE // BATCH + 10
    over = disaggregated(
        tmp_path, data, net, keys, **{"feed.exit_on_bye": "false", "feed.base_port": 51000}
    )
    sup = start(procs, net.cmd(PRODUCER_HOST, supervisor(f"0-{WORLD - 1}", over)))
    finish_all(start_trainers(procs, net, [*over, f"training.max_steps={stop_at}"]))
    assert sup.p.poll() is None, str(sup)
    for rank in range(WORLD):
        assert sorted(steps(tmp_path, rank)) == list(range(1, stop_at + 1)), rank
    finish_all(start_trainers(procs, net, [*over, "training.resume=auto"]))
    assert sup.p.poll() is None, str(sup)  # the same producers served both runs
    sup.p.send_signal(signal.SIGTERM)
    code, sup_log = sup.finish(30)
    assert code == 128 + signal.SIGTERM, sup_log
    assert not re.search(r"; restart \d+ of", sup_log), sup_log  # none died and came back
    assert_same_streams(tmp_path, reference)
    for rank in range(WORLD):
        starts = read_records(metrics(tmp_path, rank), "start")
        assert [s["step"] for s in starts] == [0, stop_at], starts
        # No step served twice: the resumed run began right after the checkpoint.
        served = [r["step"] for r in read_records(metrics(tmp_path, rank), "batch")]
        assert served == list(range(1, STEPS + 1)), rank
