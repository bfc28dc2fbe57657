"""The real client against a producer that breaks the protocol (tests/rogue_producer.py).

Whatever a producer sends, the client must end, soon, with a :class:`LensfeedError` that says
what went wrong: never a TypeError or RecursionError from deep inside, a MemoryError, a hang, or a
cycle completed with wrong data. Its memory must stay within the RCVHWM messages libzmq may
queue (a few beyond the credit window) of at most the maximum size each. The one exception, a
multipart message that never ends, is the last test. The client runs in its own process so that
its peak RSS is its own (see ``run_client``).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests._util import Procs, ipc_endpoint, python_cmd
from tests.rogue_producer import (
    CLIENT_DEADLINE_S,
    CLIENT_KWARGS,
    CLOSE_S,
    HANG_MARK,
    MODES,
    RESULT_PREFIX,
)
from tests.zmtp_rogue import frame_header

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

#: Peak RSS growth allowed: the credit window (prefetch_bytes, 32 MiB) + one message of the
#: maximum size (max_message_bytes, 64 MiB) + slack for allocator and libzmq overhead.
RSS_BOUND_MIB = 256
_WINDOW_PLUS_MESSAGE = CLIENT_KWARGS["prefetch_bytes"] + CLIENT_KWARGS["max_message_bytes"]
assert _WINDOW_PLUS_MESSAGE < RSS_BOUND_MIB << 20


@dataclass(frozen=True)
class Case:
    """One rogue mode, the exception classes that are a correct answer to it (by name, matched
    against the raised class's MRO so subclasses count), words that name the problem, and extra
    arguments of the client process."""

    mode: str
    expected: tuple[str, ...]
    problem: str
    client_args: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.mode


PROTOCOL = ("ProtocolError",)
CASES = [
    # Slow first steps (8 x 0.25 s, the credit window) let the ~800 MiB sent beyond the credits
    # arrive before the client consumes up to them: only a bounded receive queue keeps it out.
    Case("credit_overrun", PROTOCOL, r"credit", ("--slow-steps", "8", "--step-s", "0.25")),
    # libzmq's ZMQ_MAXMSGSIZE drops the connection before allocating the frame: the client only
    # sees a lost producer, reconnects, meets the same frame and gives up after the reconnect
    # timeout. Refusing it as a protocol violation is just as good.
    Case("oversize_frame", ("ProducerLostError", "ProtocolError"), r"size|large|limit|bytes"),
    Case("wrong_names", PROTOCOL, r"evil|input_ids|name|column|tensor"),
    Case("wrong_dtype", PROTOCOL, r"dtype|float|int"),
    Case("wrong_trailing_shape", PROTOCOL, r"shape"),
    Case("shape_overflow", PROTOCOL, r"shape|overflow|bytes"),
    Case("error_flood", PROTOCOL, r"error"),
    Case("garbage", PROTOCOL, r"msgpack|header|map|empty"),
    Case("wrong_version", PROTOCOL, r"version"),
    Case("wrong_fingerprint", PROTOCOL, r"fingerprint|welcome"),
    Case("silent", ("ProducerTimeoutError",), r"answer|within|timeout"),
    Case("huge_ints", PROTOCOL, r"count|batch|seq|cycle|range"),
    Case("deep_nesting", PROTOCOL, r"nest|deep|depth|tensor|descriptor|msgpack"),
    Case("extra_frames", PROTOCOL, r"frame"),
    Case("wrong_cycle_end", PROTOCOL, r"end of cycle"),
]
assert {c.mode for c in CASES} == set(MODES)


#: In reconnect_timeout_s (3 s), with the backoff between fruitless recoveries.
MAX_RECONNECTS = 12
MAX_WARNINGS = 12


def _result(out: str) -> dict[str, Any] | None:
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return None


def _exit_status(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def _stop(procs: Procs, rogue: subprocess.Popen[str]) -> tuple[bool, str]:
    """Whether the rogue was still serving (it never exits by itself), and what it printed."""
    alive = rogue.poll() is None
    if alive:
        rogue.kill()
    _, out = procs.wait(rogue, timeout=10)
    return alive, out


def _problems(case: Case, res: dict[str, Any], endpoint: str) -> list[str]:
    """Every way the client's ending falls short for ``case`` (empty: it is correct)."""
    problems = []
    if res["error"] is None:
        problems.append(f"completed without an error after {res['batches']} batches")
    else:
        if not res["lensfeed"]:
            problems.append(f"raised {res['error']}, not a LensfeedError")
        if not set(case.expected) & set(res["mro"]):
            problems.append(f"raised {res['error']}, expected {' or '.join(case.expected)}")
        if endpoint not in res["message"] and not re.search(case.problem, res["message"], re.I):
            problems.append("the message names neither the endpoint nor the problem")
    # A producer that drops every session at once (oversize_frame) must not make the client
    # reconnect in a tight loop, logging each time (it did: 3,102 reconnects in 3 s).
    if res["reconnects"] > MAX_RECONNECTS or res["warnings"] > MAX_WARNINGS:
        problems.append(
            f"{res['reconnects']} reconnects and {res['warnings']} warnings (limits "
            f"{MAX_RECONNECTS}, {MAX_WARNINGS}): a storm"
        )
    if res["elapsed_s"] > CLIENT_DEADLINE_S:
        problems.append(f"took {res['elapsed_s']:.1f} s (limit {CLIENT_DEADLINE_S:g} s)")
    growth_mib = (res["peak_rss_kib"] - res["baseline_rss_kib"]) / 1024
    if growth_mib >= RSS_BOUND_MIB:
        problems.append(f"peak RSS grew by {growth_mib:.0f} MiB (limit {RSS_BOUND_MIB} MiB)")
    return problems


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rogue_producer_is_refused(case: Case, procs: Procs, tmp_path: Path) -> None:
    endpoint = ipc_endpoint(tmp_path).format(rank=0)
    rogue = procs.start(python_cmd("tests.rogue_producer", endpoint, case.mode))
    client = procs.start(
        python_cmd("tests.rogue_producer", "--client", endpoint, *case.client_args)
    )
    # The client kills itself when hung (CLIENT_DEADLINE_S + CLOSE_S); the rest is start-up
    # (two torch imports on two cores).
    rc, out = procs.wait(client, timeout=CLIENT_DEADLINE_S + CLOSE_S + 30)
    alive, rogue_out = _stop(procs, rogue)
    assert alive, f"{case.mode}: the rogue producer itself died:\n{rogue_out}"
    res = _result(out)
    if res is None and HANG_MARK in out:
        pytest.fail(
            f"{case.mode}: the client hung (no end within {CLIENT_DEADLINE_S:g} s, or no close "
            f"within {CLOSE_S:g} s more); "
            f"its stacks:\n{out[out.index(HANG_MARK) :][:4000]}\n{rogue_out[-2000:]}"
        )
    assert res is not None, (
        f"{case.mode}: the client process died ({_exit_status(rc)}) without a result:\n"
        f"{out[-4000:]}\n{rogue_out[-2000:]}"
    )
    growth_mib = (res["peak_rss_kib"] - res["baseline_rss_kib"]) / 1024
    summary = (
        f"{case.mode}: {res['error']} after {res['elapsed_s']:.2f} s, RSS +{growth_mib:.0f} MiB, "
        f"{res['batches']} batches, {res['warnings']} warnings, {res['reconnects']} reconnects: "
        f"{res['message'][:300]!r}"
        + (f" (first warning: {res['first_warning']!r})" if res["first_warning"] else "")
    )
    print(summary)
    problems = _problems(case, res, endpoint)
    assert not problems, f"{summary}\n  " + "\n  ".join(problems) + f"\n{rogue_out[-2000:]}"


#: What tests/zmtp_rogue.py sends: 1 MiB frames, all of one message that never ends, 64 MiB.
UNFINISHED_FRAME_BYTES = 1 << 20
UNFINISHED_BYTES = 64 << 20
#: Time allowed past the client's timeout_s for it to notice and raise.
TIMEOUT_MARGIN_S = 5.0


def test_unfinished_multipart_message_ends_at_the_timeout(procs: Procs, tmp_path: Path) -> None:
    """A peer that speaks ZMTP by hand (tests/zmtp_rogue.py) and, after the hello, sends 64 MiB
    of frames of one multipart message, every one with MORE set, never the last, then idles
    (answering heartbeats, so the connection stays alive).

    This is the one input libzmq does not bound: MAXMSGSIZE limits each frame and RCVHWM counts
    complete messages, but the frames of an unfinished message are held in the receiving pipe
    without limit, since libzmq delivers a multipart message only whole. The client never sees
    a message, so it cannot refuse one: its memory grows with what such a peer sends (the
    frames' bytes, and at least 64 bytes per frame: 32 times the bytes on the wire with empty
    frames) until ``timeout_s`` ends the session and the closed socket frees it. What is checked
    is that the timeout does end it, with a LensfeedError; the growth is recorded, bounded
    loosely by what was sent plus the usual slack.
    """
    endpoint = ipc_endpoint(tmp_path).format(rank=0)
    rogue = procs.start(
        python_cmd(
            "tests.zmtp_rogue",
            endpoint,
            "--frame-bytes",
            str(UNFINISHED_FRAME_BYTES),
            "--total-bytes",
            str(UNFINISHED_BYTES),
        )
    )
    client = procs.start(python_cmd("tests.rogue_producer", "--client", endpoint))
    rc, out = procs.wait(client, timeout=CLIENT_DEADLINE_S + CLOSE_S + 30)
    # The rogue exits by itself once the client's socket is closed (it was, or its process ended).
    rogue_rc, rogue_out = procs.wait(rogue, timeout=10)
    res = _result(out)
    if res is None and HANG_MARK in out:
        pytest.fail(f"the client hung; its stacks:\n{out[out.index(HANG_MARK) :][:4000]}")
    assert res is not None, (
        f"the client process died ({_exit_status(rc)}) without a result:\n{out[-4000:]}\n"
        f"{rogue_out[-2000:]}"
    )
    sent = (
        UNFINISHED_BYTES
        // UNFINISHED_FRAME_BYTES
        * (UNFINISHED_FRAME_BYTES + len(frame_header(UNFINISHED_FRAME_BYTES)))
    )
    # The input really was delivered: the rogue wrote all of it (the client read it all).
    assert rogue_rc == 0, rogue_out[-2000:]
    assert f"streamed {sent} bytes" in rogue_out, rogue_out[-2000:]
    growth_mib = (res["peak_rss_kib"] - res["baseline_rss_kib"]) / 1024
    summary = (
        f"unfinished multipart message ({sent >> 20} MiB sent): {res['error']} after "
        f"{res['elapsed_s']:.2f} s, RSS +{growth_mib:.0f} MiB: {res['message'][:300]!r}"
    )
    print(summary)
    limit_s = CLIENT_KWARGS["timeout_s"] + TIMEOUT_MARGIN_S
    assert res["lensfeed"], summary
    assert "ProducerTimeoutError" in res["mro"], summary
    assert res["elapsed_s"] <= limit_s, f"{summary}\n  limit {limit_s:g} s"
    assert growth_mib < (UNFINISHED_BYTES >> 20) + RSS_BOUND_MIB, summary
