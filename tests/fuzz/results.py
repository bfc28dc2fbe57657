"""What an attack found: the limits that define "bounded", each crash and state's result, and
the report (its summary table is what ``python -m tests.fuzz`` prints).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.fuzz.generator import Case


@dataclass
class Limits:
    """What "bounded" means. Log: ``log_slack`` + ``log_per_message`` bytes per message
    (the unthrottled producer logs ~320 bytes per bad message; a rate-limited one a few
    lines a minute). RSS: growth of VmRSS over the state and of VmHWM."""

    rss_growth: int = 200 << 20
    log_slack: int = 64 << 10
    log_per_message: int = 20
    client_timeout_s: float = 20.0
    probe_timeout_s: float = 10.0
    #: how long the producer may take to work through what was sent before it answers
    drain_timeout_s: float = 60.0

    def log_limit(self, messages: int) -> int:
        return self.log_slack + self.log_per_message * messages


@dataclass
class Sent:
    """A message as sent: by which peer (``legit``: the session's own), for a replay."""

    peer: str
    legit: bool
    case: Case


@dataclass
class Crash:
    """The producer died: when, its exit status and last log lines, and (after triage) the
    message it died of."""

    state: str
    message_index: int
    exit_code: int | None
    suspects: list[str]
    log_tail: list[str]
    signature: str = ""
    site: str = ""
    culprit: str = ""
    #: what the culprit needs to kill a fresh producer (see ``Fuzz._alone``)
    reproduces: str = ""
    recent: list[Sent] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        lines = [
            f"[{self.state}] producer died (exit {self.exit_code}) by message #{self.message_index}"
            f"; signature: {self.signature or '?'}",
        ]
        if self.site:
            lines.append(f"  at: {self.site}")
        if self.culprit:
            lines.append(f"  culprit (replayed): {self.culprit}")
            lines.append(f"  kills a fresh producer: {self.reproduces or 'not tried'}")
        lines.append(f"  last messages sent: {', '.join(self.suspects)}")
        lines += [f"  | {line}" for line in self.log_tail]
        return "\n".join(lines)


@dataclass
class StateResult:
    """What one state's attack did to the producer; :meth:`failures` judges it."""

    state: str
    messages: int = 0
    answers: int = 0
    answer_kinds: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    crashes: list[Crash] = field(default_factory=list)
    probes: int = 0
    probe_failures: int = 0
    send_timeouts: int = 0
    #: messages with a frame over the producer's MAXMSGSIZE, dropped by libzmq with their peer's
    #: connection (each from a peer of its own)
    dropped_oversized: int = 0
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    rss_growth: int = 0
    hwm_growth: int = 0
    hwm_end: int = 0
    log_bytes: int = 0
    elapsed_s: float = 0.0
    service_error: str | None = "not checked"
    stream_batches: int = 0
    stream_cycles: int = 0
    stream_error: str | None = None
    #: hellos a conforming producer must refuse that got a welcome (class -> count)
    accepted_invalid: Counter[str] = field(default_factory=Counter)
    #: welcomes to attackers in a state where every hello was made certain to be refused
    unexpected_welcomes: int = 0
    #: what was seen when a probe failed
    notes: list[str] = field(default_factory=list)

    def failures(self, limits: Limits) -> list[str]:
        out = [c.describe() for c in self.crashes]
        if self.probe_failures or self.send_timeouts:
            out.append(
                f"{self.probe_failures} liveness probe(s) got no welcome, {self.send_timeouts} "
                "message(s) were not taken within 5 s (a hang?)"
            )
        if self.rss_growth > limits.rss_growth or self.hwm_growth > limits.rss_growth:
            out.append(
                f"RSS grew {_mib(self.rss_growth)} (VmHWM {_mib(self.hwm_growth)}), "
                f"limit {_mib(limits.rss_growth)}"
            )
        if self.log_bytes > limits.log_limit(self.messages):
            out.append(
                f"log grew {self.log_bytes} bytes for {self.messages} messages "
                f"({self.log_bytes / max(1, self.messages):.0f} B/message), limit "
                f"{limits.log_limit(self.messages)}"
            )
        if self.service_error:
            out.append(f"legitimate client after the attack: {self.service_error}")
        if self.stream_error:
            out.append(f"streaming client during the attack: {self.stream_error}")
        if self.unexpected_welcomes:
            out.append(f"{self.unexpected_welcomes} attacker hello(s) took the session")
        return [f"[{self.state}] {line}" if not line.startswith("[") else line for line in out]


@dataclass
class FuzzReport:
    """The results of every state, with the limits they were judged by."""

    seed: int
    limits: Limits
    results: list[StateResult]
    elapsed_s: float
    producer_starts: int

    @property
    def failures(self) -> list[str]:
        return [f for r in self.results for f in r.failures(self.limits)]

    @property
    def ok(self) -> bool:
        return not self.failures

    def result(self, state: str) -> StateResult:
        return next(r for r in self.results if r.state == state)

    def summary(self) -> str:
        head = (
            f"{'state':10} {'messages':>8} {'answers':>8} {'crashes':>7} {'probes':>7} "
            f"{'RSS start':>9} {'peak':>9} {'growth':>8} {'VmHWM':>9} {'log bytes':>10} "
            f"{'B/msg':>6} {'log limit':>10} {'elapsed':>8} service"
        )
        lines = [f"lensfeed protocol fuzz, seed {self.seed}", head]
        for r in self.results:
            service = "ok" if r.service_error is None else "FAILED"
            lines.append(
                f"{r.state:10} {r.messages:8d} {r.answers:8d} {len(r.crashes):7d} "
                f"{r.probes - r.probe_failures:3d}/{r.probes:<3d} {_mib(r.rss_start):>9} "
                f"{_mib(r.rss_peak):>9} {_mib(r.rss_growth):>8} {_mib(r.hwm_end):>9} "
                f"{r.log_bytes:10d} {r.log_bytes / max(1, r.messages):6.0f} "
                f"{self.limits.log_limit(r.messages):10d} {r.elapsed_s:7.1f}s {service}"
            )
        for r in self.results:
            kinds = ", ".join(f"{k} {n}" for k, n in r.answer_kinds.most_common(8))
            lines.append(f"[{r.state}] answers: {kinds or 'none'}")
            if r.dropped_oversized:
                lines.append(
                    f"[{r.state}] {r.dropped_oversized} message(s) with a frame over 64 KiB: "
                    "dropped by libzmq (MAXMSGSIZE) with their connection, unanswered"
                )
            if r.state == "streaming":
                lines.append(
                    f"[{r.state}] streaming client: {r.stream_batches} batches, "
                    f"{r.stream_cycles} cycles, {r.stream_error or 'every byte right'}"
                )
            if r.accepted_invalid:
                acc = ", ".join(f"{k} x{n}" for k, n in r.accepted_invalid.most_common(10))
                lines.append(f"[{r.state}] non-conforming hellos accepted (welcome): {acc}")
            lines += [f"[{r.state}] note: {note}" for note in r.notes[:10]]
        families = Counter[str]()
        for r in self.results:
            for label, n in r.classes.items():
                families[label.split(":")[0]] += n
        top = ", ".join(f"{k} {n}" for k, n in families.most_common())
        distinct = len({c for r in self.results for c in r.classes})
        lines.append(f"message classes ({distinct} distinct): {top}")
        failures = self.failures
        lines.append(
            f"{sum(r.messages for r in self.results)} messages, "
            f"{sum(len(r.crashes) for r in self.results)} crashes, "
            f"{self.producer_starts} producer start(s), {self.elapsed_s:.1f} s: "
            + ("OK" if not failures else f"{len(failures)} FAILURE(S)")
        )
        lines += failures
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}M"


def _signature(lines: Sequence[str]) -> str:
    """What the producer died of, from its log tail: the exception line of the last traceback
    (``RecursionError: ...``), else its last ERROR line; long numbers become N."""
    for line in reversed(lines):
        m = re.match(r"^([A-Za-z_.]*(Error|Exception)\b.*)", line)
        if m:
            return re.sub(r"\d{3,}", "N", m.group(1))[:160]
    for line in reversed(lines):
        m = re.search(r" (ERROR|CRITICAL) (.*)", line)
        if m:
            return re.sub(r"\d{3,}", "N", m.group(2))[:160]
    return ""
