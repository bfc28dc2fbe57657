"""Seeded protocol fuzzer that attacks a real ``python -m lensfeed.producer`` process.

Garbage on the wire must never take a producer down, grow its memory or its log without bound,
or stop it serving its trainer: the producer trusts nothing it receives (docs/protocol.md 3.1,
5). This package generates hostile messages from a ``random.Random(seed)`` (mutated messages of
every kind, wrong types, huge ints, deep nesting, oversized strings, broken msgpack, odd
framing, floods from many peers), sends them from several DEALERs in three protocol states
(``idle``: no session; ``session``: a trainer said hello and sends bad messages itself;
``streaming``: a FeedClient is receiving batches meanwhile), and after each state checks that
the process is alive, its RSS and log grew within bounds and a fresh FeedClient still gets a
full cycle whose bytes match the dataset (docs/protocol.md 8, computed here independently).

Nothing waits unboundedly: every receive polls with a timeout, an answer to a bad message is
never waited for (the producer may rate-limit them), and the producer is killed at the end.

    python -m tests.fuzz --messages 100000 --seed 0 [--states idle,session,streaming]

``tests/producer/test_fuzz.py`` runs a short version in CI.

Modules: ``config`` (states, dataset shape, producer overrides), ``encoding`` (raw msgpack),
``values`` (hostile field values and their class names), ``generator`` (the hostile messages),
``oracle`` (the expected bytes), ``processes`` (the producer process), ``peers`` (raw DEALERs
and legitimate clients), ``results`` (limits, crashes, the report), ``attack`` (:class:`Fuzz`),
``run`` (:func:`run_fuzz`) and ``__main__`` (the command line).
"""

from __future__ import annotations

from tests.fuzz.attack import Fuzz
from tests.fuzz.config import ROWS, SEQ_LEN, STATES, fuzz_overrides
from tests.fuzz.encoding import Raw, pack, pack_pairs
from tests.fuzz.generator import Case, Generator
from tests.fuzz.oracle import Oracle
from tests.fuzz.peers import Peer, Streamer, check_service, hello_frames, is_answer
from tests.fuzz.processes import ProducerProcess
from tests.fuzz.results import Crash, FuzzReport, Limits, Sent, StateResult
from tests.fuzz.run import run_fuzz

__all__ = [
    "ROWS",
    "SEQ_LEN",
    "STATES",
    "Case",
    "Crash",
    "Fuzz",
    "FuzzReport",
    "Generator",
    "Limits",
    "Oracle",
    "Peer",
    "ProducerProcess",
    "Raw",
    "Sent",
    "StateResult",
    "Streamer",
    "check_service",
    "fuzz_overrides",
    "hello_frames",
    "is_answer",
    "pack",
    "pack_pairs",
    "run_fuzz",
]
