"""Self-healing feed: real producer processes killed (kill -9), frozen (SIGSTOP) and restarted at
the awkward moments, against the real client. "Nothing lost or repeated" is checked by comparing
the per-batch stream of (cycle, batch, sample_idx, digest of every tensor's bytes) with an
uninterrupted run of the same config.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lensfeed.common.config import LensfeedConfig, load_config
from lensfeed.common.errors import ProducerLostError
from lensfeed.trainer.client import FeedClient
from lensfeed.trainer.train import batch_digest
from tests._util import Procs, make_dataset, python_cmd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CYCLES = 4
Step = tuple[int, int, list[int], str]


def overrides(tmp_path: Path, **extra: object) -> list[str]:
    base: dict[str, object] = {
        "world_size": 1,
        "batch_size": 4,
        "seed": 5,
        "dataset.path": tmp_path / "ds",
        "dataset.on_the_fly.samples_per_regeneration_cycle": 24,
        "training_initial_cache_size_per_rank": 28,
        "feed.endpoint": f"ipc://{tmp_path}/ipc/p{{rank}}.sock",
        "feed.timeout_s": 30,
        "feed.heartbeat_timeout_s": 1,
        "feed.reconnect_timeout_s": 30,
        "feed.exit_on_bye": "true",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


class Rig:
    """One producer process on a fixed endpoint that the test can kill, freeze and restart."""

    def __init__(self, procs: Procs, tmp_path: Path, **extra: object) -> None:
        if not (tmp_path / "ds").exists():
            make_dataset(tmp_path / "ds", rows=37, seq_len=6)
        self.over = overrides(tmp_path, **extra)
        self.cfg: LensfeedConfig = load_config(None, self.over)
        self.procs = procs
        self.proc: subprocess.Popen[str] | None = None
        self.kills = 0

    def start(self) -> None:
        self.proc = self.procs.start(python_cmd("lensfeed.producer", "--rank", "0", *self.over))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL
        self.proc.wait(timeout=10)
        self.kills += 1

    def client(self, **kw: object) -> FeedClient:
        """A client whose credit window is 2 batches: the producer is never far ahead, so a
        fault always lands while the client still needs data from it."""
        kw.setdefault("prefetch", 2)
        return FeedClient.from_config(self.cfg, 0, **kw)  # type: ignore[arg-type]


def run(feed: FeedClient, on_batch: Callable[[int, int], None] | None = None) -> list[Step]:
    """Consume CYCLES cycles; ``on_batch(cycle, batch)`` runs after each batch is recorded."""
    seen: list[Step] = []
    with feed:
        for cycle in feed.cycles(CYCLES):
            for j, batch in enumerate(cycle):
                b = cycle.start_batch + j
                seen.append((cycle.index, b, batch["sample_idx"].tolist(), batch_digest(batch)))
                if on_batch is not None:
                    on_batch(cycle.index, b)
    return seen


@pytest.fixture
def reference(procs: Procs, tmp_path: Path) -> list[Step]:
    """The uninterrupted stream of the config every test here uses."""
    rig = Rig(procs, tmp_path / "ref")
    rig.start()
    stream = run(rig.client(prefetch=1024))
    assert [s[:2] for s in stream][:3] == [(0, 0), (0, 1), (0, 2)]
    assert len(stream) == 7 + 3 * 6
    return stream


def test_kill_mid_cycle_and_manual_restart(procs, tmp_path, reference) -> None:
    rig = Rig(procs, tmp_path / "run")
    rig.start()

    def fault(cycle: int, batch: int) -> None:
        if (cycle, batch) == (1, 2):
            rig.kill()
            rig.start()

    feed = rig.client()
    assert run(feed, fault) == reference
    assert feed.stats.reconnects == 1
    assert feed.stats.recovery_s > 0


def test_kill_at_cycle_boundary_while_next_cycle_is_prepared(procs, tmp_path, reference) -> None:
    rig = Rig(procs, tmp_path / "run", **{"feed.prepare_ahead": "true"})
    rig.start()
    last = {c: (7 if c == 0 else 6) - 1 for c in range(CYCLES)}

    def fault(cycle: int, batch: int) -> None:
        # After the cycle's last batch (its end not read yet; the producer is already building
        # the next cycle ahead), and again right at the start of cycle 2.
        if (cycle, batch) in ((0, last[0]), (2, 0)):
            rig.kill()
            rig.start()

    feed = rig.client()
    assert run(feed, fault) == reference
    assert feed.stats.reconnects == 2


def test_three_kills_in_one_run(procs, tmp_path, reference) -> None:
    rig = Rig(procs, tmp_path / "run")
    rig.start()
    # Each kill is followed by a cycle the killed producer never started, so each needs a
    # reconnect: a kill in the last cycle may come after everything the run still needs was
    # already sent (credits run ahead), and the client rightly reads that before the loss.
    points = {(0, 1), (1, 5), (2, 3)}

    def fault(cycle: int, batch: int) -> None:
        if (cycle, batch) in points:
            rig.kill()
            rig.start()

    feed = rig.client()
    assert run(feed, fault) == reference
    assert rig.kills == 3
    assert feed.stats.reconnects == 3


def test_kill_between_hello_and_welcome(procs, tmp_path, reference) -> None:
    """The producer is frozen when the hello arrives and killed before it answers."""
    rig = Rig(procs, tmp_path / "run")
    rig.start()
    feed = rig.client()
    # Wait until this producer is serving (its socket answers), then freeze it.
    with rig.client() as probe:
        probe.connect()
    assert rig.proc is not None
    os.kill(rig.proc.pid, signal.SIGSTOP)
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            feed.connect()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    t = threading.Thread(target=connect)
    t.start()
    deadline = time.monotonic() + 10
    while feed._session.conn is None and time.monotonic() < deadline:  # the hello is being sent
        t.join(0.01)
    rig.kill()
    rig.start()
    t.join(30)
    assert not t.is_alive()
    assert not errors, errors
    assert run(feed) == reference


def test_sigstop_longer_than_heartbeat_timeout_then_sigcont(procs, tmp_path, reference) -> None:
    rig = Rig(procs, tmp_path / "run")
    rig.start()
    noticed = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "lost the producer" in record.getMessage():
                noticed.set()

    def thaw() -> None:
        noticed.wait(30)  # the client noticed (heartbeat timeout) while the producer is frozen
        assert rig.proc is not None
        os.kill(rig.proc.pid, signal.SIGCONT)

    thawer = threading.Thread(target=thaw)

    def fault(cycle: int, batch: int) -> None:
        if (cycle, batch) == (1, 1):
            assert rig.proc is not None
            os.kill(rig.proc.pid, signal.SIGSTOP)
            thawer.start()

    handler = Watch()
    logging.getLogger("lensfeed.trainer").addHandler(handler)
    try:
        feed = rig.client()
        t0 = time.monotonic()
        assert run(feed, fault) == reference
    finally:
        logging.getLogger("lensfeed.trainer").removeHandler(handler)
        thawer.join(10)
    assert noticed.is_set()
    assert feed.stats.reconnects == 1
    assert time.monotonic() - t0 < 30


def test_a_slow_producer_is_alive_not_lost(procs, tmp_path) -> None:
    """A producer that takes longer than the heartbeat timeout to build a batch is not 'lost':
    its I/O thread answers the heartbeats while Python works."""
    rig = Rig(procs, tmp_path / "run", **{"feed.heartbeat_timeout_s": 0.3})
    fake = python_cmd(
        "lensfeed.producer.fake",
        "--rank",
        "0",
        "--delay-s",
        "0.5",
        *rig.over,
    )
    procs.start(fake)
    with rig.client() as feed:
        cycle = feed.next_cycle()
        for j, _ in enumerate(cycle):
            if j == 2:
                break
        assert feed.stats.reconnects == 0


def test_producer_that_never_comes_back_fails_within_reconnect_timeout(procs, tmp_path) -> None:
    rig = Rig(procs, tmp_path / "run", **{"feed.reconnect_timeout_s": 2})
    rig.start()
    t_kill: list[float] = []

    def fault(cycle: int, batch: int) -> None:
        if (cycle, batch) == (0, 3):
            rig.kill()
            t_kill.append(time.monotonic())

    with pytest.raises(ProducerLostError) as info:
        run(rig.client(), fault)
    elapsed = time.monotonic() - t_kill[0]
    assert elapsed < 2 + 3, elapsed  # reconnect_timeout_s plus a small margin
    msg = str(info.value)
    assert "rank 0" in msg
    assert rig.cfg.endpoint_for(0) in msg
    assert "reconnect_timeout_s" in msg
    assert info.value.code == "producer_lost"
