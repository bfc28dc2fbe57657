"""The attack itself: :class:`Fuzz` runs one producer through the protocol states, sends the
generator's messages from several peers, probes and measures it, and replays a crash to
find its culprit.
"""

from __future__ import annotations

import functools
import random
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import zmq

from lensfeed.common import protocol as P
from lensfeed.common.config import load_config
from lensfeed.common.spec import DataSpec
from tests._util import make_dataset
from tests.fuzz.config import ROWS, SEQ_LEN, STATES, fuzz_overrides
from tests.fuzz.encoding import pack
from tests.fuzz.generator import Case, Generator
from tests.fuzz.oracle import Oracle
from tests.fuzz.peers import (
    BARRIER,
    Peer,
    Streamer,
    _is_barrier_answer,
    check_service,
    hello_frames,
    is_answer,
)
from tests.fuzz.processes import ProducerProcess
from tests.fuzz.results import Crash, Limits, Sent, StateResult, _signature

BARRIER_LABEL = "<barrier>"
Owners = dict[int, tuple[str, bool | None]]  # session number -> (label, valid hello) of its message


class Fuzz:
    """One producer, attacked state by state. Use as a context manager: the producer and
    every socket are gone afterwards, also after an exception."""

    def __init__(
        self,
        *,
        seed: int,
        workdir: Path,
        limits: Limits | None = None,
        max_crashes: int = 1,
        triage: bool = False,
        probe_every: int = 500,
        peers: int = 4,
        only: str | None = None,
        skip: str | None = None,
        log: Callable[[str], None] = lambda s: None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.limits = limits or Limits()
        self.max_crashes = max_crashes
        self.triage = triage
        self.probe_every = probe_every
        self.n_peers = peers
        self.only = re.compile(only) if only else None
        self.skip = re.compile(skip) if skip else None
        self.say = log
        shutil.rmtree(workdir / "ds", ignore_errors=True)  # a kept directory is reused
        data = make_dataset(workdir / "ds", rows=ROWS, seq_len=SEQ_LEN)
        self.overrides = fuzz_overrides(data, workdir)
        cfg = load_config(None, self.overrides)
        self.spec = DataSpec.from_config(cfg)
        self.oracle = Oracle.from_config(cfg)
        self.endpoint = cfg.endpoint_for(0)
        self.producer = ProducerProcess(self.overrides, workdir)
        self.ctx = zmq.Context()
        self.triaged: set[str] = set()
        self._base = (0, 0, 0)  # (pid, VmRSS, VmHWM) growth is measured from
        self._survived_traceback = 0  # pid of a producer that logged a traceback and lived
        self._peer_count = 0

    def __enter__(self) -> Fuzz:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.producer.kill()
        self.ctx.destroy(linger=0)

    # ---------------------------------------------------------------- producer

    def start_producer(self) -> None:
        """(Re)start the producer and wait (bounded) until it serves a correct cycle."""
        self.producer.start()
        error = check_service(self.endpoint, self.spec, self.oracle, timeout_s=60.0)
        if error is not None:
            tail = "\n".join(self.producer.log_tail())
            raise RuntimeError(f"the producer did not start serving: {error}\n{tail}")
        self._rebase()

    def _rebase(self) -> None:
        """Memory baseline of the running process: growth is only measured within one."""
        self._base = (self.producer.pid, *self.producer.memory())

    def _sample(self, res: StateResult) -> None:
        rss, hwm = self.producer.memory()
        pid, rss0, hwm0 = self._base
        if pid != self.producer.pid or not rss:
            return
        res.rss_peak = max(res.rss_peak, rss)
        res.rss_growth = max(res.rss_growth, rss - rss0)
        res.hwm_growth = max(res.hwm_growth, hwm - hwm0)
        res.rss_end, res.hwm_end = rss, hwm

    def _peer(self, prefix: str = "a") -> Peer:
        self._peer_count += 1
        rid = None
        if self.rng.random() < 0.2:  # an explicit routing id, up to the longest (255 bytes)
            # Long enough never to collide: the ROUTER would refuse a second peer with one.
            size = self.rng.choice((4, 16, 255))
            rid = bytes([self.rng.randrange(1, 256)]) + self.rng.randbytes(size - 1)
        return Peer(self.ctx, self.endpoint, f"{prefix}{self._peer_count}", rid)

    # ---------------------------------------------------------------- one state

    def run_state(self, state: str, messages: int) -> StateResult:
        """Attack in ``state`` until ``messages`` were sent (on a restarted producer after a
        crash, at most ``max_crashes`` times), then check liveness, memory, log and service.

        Log growth counts the attack and the check, not restarts or triage replays.
        """
        if state not in STATES:
            raise ValueError(f"unknown state {state!r} (known: {', '.join(STATES)})")
        res = StateResult(state)
        t0 = time.monotonic()
        if not self.producer.alive():
            self.start_producer()
        self._rebase()
        res.rss_start = res.rss_peak = res.rss_end = self._base[1]
        while res.messages < messages:
            crash = self._attack(state, messages - res.messages, res)
            if crash is None:
                break
            self._triage(crash)
            self.start_producer()
            if len(res.crashes) >= self.max_crashes:
                self.say(f"[{state}] moving on after {len(res.crashes)} crash(es)")
                break
        log0 = self.producer.log_bytes()
        if self.producer.alive() or not self._settle_dead():
            res.service_error = check_service(
                self.endpoint, self.spec, self.oracle, self.limits.client_timeout_s
            )
        if res.service_error is not None and self._settle_dead():
            self._crash(state, res, [])
        res.log_bytes += self.producer.log_bytes() - log0
        if res.service_error is not None and not self.producer.alive():
            self.start_producer()
        elif res.service_error is not None:
            res.service_error += " (the producer is alive)"
        self._sample(res)
        res.elapsed_s = time.monotonic() - t0
        return res

    def _settle_dead(self) -> bool:
        """Whether the producer is exiting: after a crash it takes a moment to close."""
        return self.producer.exit_code(wait_s=5.0) is not None

    def _dying(self, res: StateResult) -> bool:
        """A traceback in the log is the first sign of a crash, seconds before the process has
        exited: wait for that exit then. A producer that logs one and lives on (a contained
        error) is noted, and from then on only its exit counts."""
        if self._survived_traceback == self.producer.pid or not self.producer.new_traceback():
            return False
        if self._settle_dead():
            return True
        self._survived_traceback = self.producer.pid
        site = self.producer.crash_site()
        res.notes.append(f"the producer logged a traceback and lived on (at {site})")
        return False

    def _attack(self, state: str, budget: int, res: StateResult) -> Crash | None:
        """Send up to ``budget`` messages in ``state``; the crash if the producer died."""
        gen = Generator(
            self.rng, self.spec, must_refuse=state != "session", only=self.only, skip=self.skip
        )
        recent: deque[Sent] = deque(maxlen=4000)
        owners: Owners = {}
        attackers = [self._peer() for _ in range(self.n_peers)]
        legit: Peer | None = None
        streamer: Streamer | None = None
        log0 = self.producer.log_bytes()
        try:
            if state == "session":
                legit = Peer(self.ctx, self.endpoint, "L")
                if not self._probe(gen, res, owners, legit):
                    return self._crash(state, res, recent) if self._settle_dead() else None
            elif state == "streaming":
                streamer = Streamer(
                    self.endpoint, self.spec, self.oracle, self.limits.client_timeout_s
                )
                streamer.start()
                if not streamer.mid_cycle.wait(30.0) or streamer.error:
                    res.stream_error = streamer.error or "no batch within 30 s"
                    return None
            flood: tuple[Peer, Callable[[], Case], int] | None = None
            sent = 0
            while sent < budget:
                if flood is None and self.rng.random() < 0.004:
                    flood = (self.rng.choice(attackers), gen.family(), self.rng.randint(100, 500))
                if flood is not None:  # hundreds from one peer, answers unread
                    peer, make, left = flood
                    case = make()
                    flood = (peer, make, left - 1) if left > 1 else None
                elif legit is not None and self.rng.random() < 0.35:
                    peer, case = legit, gen.case()
                else:
                    peer, case = self.rng.choice(attackers), gen.case()
                oversized = max(map(len, case.frames), default=0) > P.MAX_HEADER_BYTES
                if oversized:
                    # libzmq drops a frame over the producer's MAXMSGSIZE, and the connection
                    # with it, before the producer sees it: sent from a peer of its own, so no
                    # other peer's connection (and what it had in flight) goes with it.
                    peer = self._peer("x")
                    res.dropped_oversized += 1
                if case.session is not None:
                    owners[case.session] = (case.label, case.valid_hello)
                recent.append(Sent(peer.name, peer is legit, case))
                res.classes[case.label] += 1
                sent += 1
                res.messages += 1
                if not peer.send(case.frames):
                    if self._settle_dead():
                        return self._crash(state, res, recent)
                    res.send_timeouts += 1
                    res.notes.append(
                        f"{peer.name}: message {res.messages} not taken within 5 s; producer "
                        f"threads {self.producer.thread_states()}"
                    )
                if oversized:
                    peer.close(linger_ms=1000)  # sent before the socket goes
                if flood is not None and sent < budget:
                    continue
                if sent % 32 == 0 or sent == budget:
                    for p in attackers:
                        self._drain(p, res, owners)
                    if legit is not None:
                        self._drain(legit, res, owners, legit=True)
                    self._sample(res)
                    if not self.producer.alive() or self._dying(res):
                        return self._crash(state, res, recent)
                if sent % 256 == 0:  # new identities each round
                    for i in self.rng.sample(range(len(attackers)), k=2):
                        # Where attackers' hellos may be accepted, what a closed peer still
                        # had queued would take the session over later: let it be handled.
                        old = attackers[i]
                        if legit is not None and not self._barrier([old], gen, res, owners):
                            return self._crash(state, res, recent) if self._settle_dead() else None
                        old.close()
                        attackers[i] = self._peer()
                probe_due = sent % self.probe_every == 0 or sent == budget
                if probe_due and not self._probe(gen, res, owners, legit, streamer):
                    return self._crash(state, res, recent) if self._settle_dead() else None
            if streamer is not None and self._stop(streamer, res) and self._settle_dead():
                return self._crash(state, res, recent)
            if not self._barrier([*attackers, *([legit] if legit else [])], gen, res, owners):
                return self._crash(state, res, recent) if self._settle_dead() else None
            return None
        except Exception:
            if self.producer.alive():
                raise
            return self._crash(state, res, recent)
        finally:
            for p in attackers:
                self._drain(p, res, owners)
                p.close()
            if legit is not None:
                self._drain(legit, res, owners, legit=True)
                legit.close()
            if streamer is not None:
                self._stop(streamer, res)
            res.log_bytes += self.producer.log_bytes() - log0

    def _stop(self, streamer: Streamer, res: StateResult) -> bool:
        """Let the streaming client finish its cycle (bounded); True if it failed."""
        if not streamer.stop.is_set():
            streamer.stop.set()
            streamer.join(self.limits.client_timeout_s + 15)
            res.stream_batches += streamer.batches
            res.stream_cycles += streamer.cycles
            if streamer.is_alive():
                res.stream_error = "the streaming client did not finish its cycle"
            elif streamer.error and res.stream_error is None:
                res.stream_error = streamer.error
        return res.stream_error is not None

    def _drain(self, peer: Peer, res: StateResult, owners: Owners, *, legit: bool = False) -> None:
        for h in peer.answers():
            self._count(h, res, owners, legit=legit)

    def _count(
        self, h: dict[str, Any], res: StateResult, owners: Owners, *, legit: bool = False
    ) -> None:
        """Count an answer; a welcome is matched to its hello by the echoed session."""
        kind = str(h.get("kind"))
        res.answers += 1
        res.answer_kinds[f"{kind}/{h.get('code')}" if kind == "error" else kind] += 1
        if kind != "welcome":
            return
        label, valid = owners.get(h.get("session"), ("?", True))  # type: ignore[arg-type]
        if valid is False:
            res.accepted_invalid[label] += 1
        if res.state != "session" and not legit and label != BARRIER_LABEL:
            res.unexpected_welcomes += 1

    def _barrier(
        self, peers: Sequence[Peer], gen: Generator, res: StateResult, owners: Owners
    ) -> bool:
        """Wait (bounded) until the producer has handled all that each peer sent, so that its
        log and memory are measured after the attack, not halfway through its backlog: a
        valid hello is answered (welcome: never rate-limited) after the peer's earlier
        messages. Where no attacker can hold the session, a bye then ends it again."""
        for peer in peers:
            s = gen.next_session()
            owners[s] = (BARRIER_LABEL, True)
            seen = functools.partial(self._count, res=res, owners=owners, legit=peer.name == "L")
            t0 = time.monotonic()
            failed = "its hello could not be queued"
            if peer.send(hello_frames(self.spec, s, credits=0)):
                failed = "no welcome"
                wait = self.limits.drain_timeout_s
                if peer.wait_for(is_answer("welcome", s), wait, seen, self.producer.alive):
                    if res.state == "session":
                        continue  # another's queued hello may take over any moment: no bye
                    failed = "no bye"
                    peer.send([msgpack.packb({"v": 1, "kind": "bye", "session": s})])
                    wait = self.limits.probe_timeout_s
                    if peer.wait_for(is_answer("bye", s), wait, seen, self.producer.alive):
                        continue
            if self.producer.alive():
                res.probe_failures += 1
                rid = peer.routing_id.hex()[:20] if peer.routing_id else "automatic"
                res.notes.append(
                    f"barrier by {peer.name} (routing id {rid}) after {res.messages} messages: "
                    f"{failed} within {time.monotonic() - t0:.1f} s; producer threads "
                    f"{self.producer.thread_states()}"
                )
            return False
        return True

    def _probe(
        self,
        gen: Generator,
        res: StateResult,
        owners: Owners,
        legit: Peer | None = None,
        streamer: Streamer | None = None,
    ) -> bool:
        """Is the producer still serving? A hello is always answered (only answers to bad
        messages may be rate-limited): in ``session`` the legitimate peer says hello again
        (it may have lost the session to an attacker or said a fuzzed bye); in ``idle`` a
        fresh peer says hello and bye; in ``streaming`` the streaming client must be fine."""
        if streamer is not None:
            return streamer.error is None
        res.probes += 1
        s = gen.next_session()
        owners[s] = (BARRIER_LABEL, True)
        peer = legit or Peer(self.ctx, self.endpoint, "probe")
        seen = functools.partial(self._count, res=res, owners=owners, legit=True)
        cpu0, t0 = self.producer.cpu_s(), time.monotonic()
        try:
            wait, alive = self.limits.probe_timeout_s, self.producer.alive
            queued = ok = peer.send(hello_frames(self.spec, s, credits=8 if legit else 0))
            ok = ok and peer.wait_for(is_answer("welcome", s), wait, seen, alive)
            if ok and legit is None:
                peer.send([msgpack.packb({"v": 1, "kind": "bye", "session": s})])
                ok = peer.wait_for(is_answer("bye", s), wait, seen, alive)
        finally:
            if legit is None:
                peer.close()
        if not ok and self.producer.alive():
            res.probe_failures += 1
            busy = (self.producer.cpu_s() - cpu0) / max(1e-3, time.monotonic() - t0)
            res.notes.append(
                f"probe {res.probes} by {peer.name} after {res.messages} messages: "
                f"{'no welcome' if queued else 'the hello could not be queued'} within "
                f"{time.monotonic() - t0:.1f} s; producer CPU {busy:.0%} meanwhile, "
                f"threads {self.producer.thread_states()}"
            )
        return ok

    def _crash(self, state: str, res: StateResult, recent: Sequence[Sent]) -> Crash:
        """Record that the producer died (waiting briefly for its exit and last words)."""
        self._settle_dead()
        tail = self.producer.log_tail(15)
        suspects = [f"{s.peer}:{s.case.label}" for s in list(recent)[-12:]]
        crash = Crash(state, res.messages, self.producer.exit_code(), suspects, tail)
        crash.signature = _signature(tail)
        crash.site = self.producer.crash_site()
        crash.recent = list(recent)
        res.crashes.append(crash)
        self.say(f"[{state}] CRASH by message {res.messages}: {crash.signature or 'exit'}")
        return crash

    # ---------------------------------------------------------------- triage

    def _triage(self, crash: Crash) -> None:
        """Replay the messages sent before a crash one by one on a fresh producer, each
        followed by a barrier from the same peer (a wrong-version message, answered after it),
        to find the one the producer died of. Once per crash signature; needs ``triage``."""
        if not self.triage or not crash.recent or crash.signature in self.triaged:
            return
        self.triaged.add(crash.signature)
        self.say(f"[{crash.state}] triage: replaying up to {len(crash.recent)} messages")
        self.start_producer()
        peers: dict[str, Peer] = {}
        silent = 0
        try:
            if any(s.legit for s in crash.recent):
                peers["L"] = Peer(self.ctx, self.endpoint, "L")
                peers["L"].send(hello_frames(self.spec, 1))
                peers["L"].wait_for(is_answer("welcome", 1), self.limits.probe_timeout_s)
            for sent in crash.recent:
                name = "L" if sent.legit else sent.peer
                if name not in peers:
                    peers[name] = Peer(self.ctx, self.endpoint, name)
                peers[name].send(sent.case.frames)
                peers[name].send([BARRIER])
                if peers[name].wait_for(_is_barrier_answer, 1.0):
                    silent = 0
                    continue
                if self._settle_dead():
                    who = "the session" if sent.legit else "an attacker"
                    crash.culprit = (
                        f"{sent.case.label} from {who}: {sent.case.frames[0][:100]!r}"
                        f"{'...' if len(sent.case.frames[0]) > 100 else ''} "
                        f"({len(sent.case.frames[0])} bytes, {len(sent.case.frames)} frame(s))"
                    )
                    crash.reproduces = self._alone(sent)
                    if crash.reproduces == "no":  # e.g. a regeneration thread's failure
                        crash.culprit = f"(timing-dependent) last handled: {crash.culprit}"
                    return
                silent += 1
                if silent > 20:
                    crash.culprit = "(triage gave up: barriers unanswered)"
                    return
            crash.culprit = "(not reproduced by replaying the recent messages)"
        finally:
            for p in peers.values():
                p.close()

    def _alone(self, sent: Sent) -> str:
        """What it takes ``sent`` to kill a fresh producer: nothing ("alone"), its sender's
        session ("after a valid hello") or more ("no": it needs the preceding messages)."""
        for hello_first in (False, True):
            self.start_producer()
            peer = Peer(self.ctx, self.endpoint, "alone")
            try:
                if hello_first:
                    peer.send(hello_frames(self.spec, 1))
                    peer.wait_for(is_answer("welcome", 1), self.limits.probe_timeout_s)
                    peer.send([pack({"v": 1, "kind": "next_cycle", "cycle": 0, "batch": 0})])
                peer.send(sent.case.frames)
                peer.send([BARRIER])
                if not peer.wait_for(_is_barrier_answer, 2.0) and self._settle_dead():
                    return "after a valid hello" if hello_first else "alone"
            finally:
                peer.close()
        return "no"
