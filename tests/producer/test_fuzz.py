"""A CI-sized protocol fuzz of a real producer process (the fuzzer is ``tests/fuzz/``).

About 3,000 hostile messages per protocol state (no session, a session that misbehaves itself,
a trainer streaming meanwhile), from one fixed seed: the producer must not die, its memory and
log must stay bounded, and a trainer must then get exactly the bytes of the dataset. For a long
run: ``python -m tests.fuzz --messages 100000``.
"""

from __future__ import annotations

import random
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lensfeed.common.config import load_config
from lensfeed.common.spec import DataSpec
from tests._util import REPO, child_env, python_cmd
from tests.fuzz import STATES, Fuzz, FuzzReport, Generator, Oracle, check_service, run_fuzz

MESSAGES = 3000
SEED = 0


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> FuzzReport:
    """One producer attacked in every state in turn (a crash ends that state's attack and the
    next state gets a fresh producer, so each state is judged on its own)."""
    return run_fuzz(
        messages=MESSAGES, seed=SEED, workdir=tmp_path_factory.mktemp("fuzz"), max_crashes=1
    )


@pytest.mark.slow
@pytest.mark.timeout(120)  # the first test runs the shared fuzz: ~5 s, ~20 s with crashes
@pytest.mark.parametrize("state", STATES)
def test_producer_survives_hostile_messages(report: FuzzReport, state: str) -> None:
    result = report.result(state)
    if result.failures(report.limits):
        pytest.fail(report.summary(), pytrace=False)
    assert result.messages == MESSAGES
    assert not result.crashes
    assert result.service_error is None
    if state == "streaming":
        assert result.stream_batches > 0
        assert result.stream_error is None


def small_spec(tmp_path: Path) -> DataSpec:
    over = [f"dataset.path={tmp_path}", "batch_size=4", "world_size=1"]
    return DataSpec.from_config(load_config(None, over))


def test_generator_is_seeded_and_covers_every_class_of_attack(tmp_path: Path) -> None:
    """The same seed gives the same bytes (a failure can be replayed), and every class of
    hostile message the fuzzer is meant to send is among the first 10,000 (the CI run sends
    3,000 per state, the stress run many more)."""
    spec = small_spec(tmp_path)

    def run(seed: int, n: int = 10000) -> list[tuple[str, list[bytes]]]:
        gen = Generator(random.Random(seed), spec, must_refuse=False)
        return [(c.label, c.frames) for c in (gen.case() for _ in range(n))]

    first = run(SEED)
    assert first == run(SEED)
    assert first[:100] != run(SEED + 1, 100)
    labels = Counter(label for label, _ in first)
    families = {label.split(":")[0].split(".")[0] for label in labels}
    kinds = ["hello", "next_cycle", "credit", "bye", "welcome", "cycle_start", "batch"]
    kinds += ["cycle_end", "error"]
    assert set(kinds) <= families
    for needle in [
        "beyond-int64",  # 2**63 .. 2**64-1
        "int64-min",
        "negative-int",
        "float-nan",
        "float-inf",
        "bool-true",
        "hello.spec:string",  # a string where a map is wanted
        "deep-list-600",
        "deep-map-5000",
        "hello.spec.shuffle:int-1",
        "hello.spec.seed:float-",
        "hello.spec.columns:str-",
        "hello.spec:extra-key",
        "hello.spec.",  # ... and missing keys
        ":missing",
        "big-str-60000",
        "big-str-70000",
        "garbage:truncated",
        "garbage:random-",
        "garbage:bit-flip",
        "non-map:",
        "frames:empty",
        "+extra",
        "+1000-frames",
        "version:",
        "kind:",
        "session:",
        "keys:duplicate-",
        "batch.tensors:",
    ]:
        assert any(needle in label for label in labels), needle


def test_must_refuse_never_lets_an_attacker_hello_through(tmp_path: Path) -> None:
    """In the states that keep their session, every fuzzed hello fails the producer's checks."""
    gen = Generator(random.Random(SEED), small_spec(tmp_path), must_refuse=True)
    assert not any(gen.case().valid_hello for _ in range(MESSAGES))
    h, _ = gen.template("hello")
    assert gen.valid_hello(h)  # the oracle accepts a good hello (so the check above means it)


def test_oracle_matches_the_worked_example_of_the_protocol() -> None:
    """docs/protocol.md 8.5: B 3, S0 10, S 7, seed 0, shuffled, 5 rows."""
    oracle = Oracle(3, 7, 10, 0, True, shard_rows=5)
    rows = [[oracle.sample_idx(k, j).tolist() for j in range(oracle.batches(k))] for k in (0, 1)]
    assert rows == [[[4, 0, 2], [1, 3, 3], [2, 0, 1]], [[0, 3, 4], [2, 1, 4]]]
    plain = Oracle(3, 7, 10, 0, False, shard_rows=5)
    np.testing.assert_array_equal(plain.sample_idx(1, 1), [2, 3, 4])  # positions 12..14


#: What tests/zmtp_rogue.py --connect sends the producer: 64 KiB frames (its MAXMSGSIZE) of one
#: message that never ends, 64 MiB in all.
UNFINISHED_BYTES = 64 << 20


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_unfinished_message_costs_memory_but_never_the_service(tmp_path: Path) -> None:
    """A peer that speaks ZMTP by hand streams the producer frames of one multipart message,
    every one with MORE set, then idles, answering heartbeats. libzmq holds such frames without
    limit (it delivers a message only whole; RCVHWM counts whole messages): the one input it
    does not bound, so the producer's memory grows with what the peer sends (see
    docs/protocol.md, section 11: only a peer that can speak to the socket can do it, which
    ipc's 0700 directory and CURVE restrict). What must hold: the producer never sees a
    message, keeps serving a legitimate trainer byte for byte while the peer holds its
    unfinished message and after it leaves, and its growth stays within what was sent.
    """
    with Fuzz(seed=SEED, workdir=tmp_path) as fuzz:
        fuzz.start_producer()
        rss0, _ = fuzz.producer.memory()
        rogue = subprocess.Popen(
            python_cmd(
                "tests.zmtp_rogue",
                fuzz.endpoint,
                "--connect",
                "--frame-bytes",
                str(64 << 10),
                "--total-bytes",
                str(UNFINISHED_BYTES),
            ),
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert rogue.stdout is not None
            lines = []
            for line in rogue.stdout:  # ends when the rogue has streamed everything (or died)
                lines.append(line)
                if "; idle" in line:
                    break
            assert any("; idle" in x for x in lines), "".join(lines)
            rss1, _ = fuzz.producer.memory()
            during = check_service(fuzz.endpoint, fuzz.spec, fuzz.oracle, timeout_s=30.0)
        finally:
            rogue.kill()
            rogue.wait(timeout=10)
        after = check_service(fuzz.endpoint, fuzz.spec, fuzz.oracle, timeout_s=30.0)
        growth_mib = (rss1 - rss0) / 2**20
        print(f"producer RSS +{growth_mib:.0f} MiB for {UNFINISHED_BYTES >> 20} MiB of frames")
        assert fuzz.producer.alive(), fuzz.producer.log_tail()
        assert during is None, during
        assert after is None, after
        assert growth_mib < (UNFINISHED_BYTES >> 20) + 64
