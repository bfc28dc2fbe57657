"""One complete fuzz run: a fresh producer attacked in each requested state, in a kept or
temporary work directory, summed up in a :class:`FuzzReport`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.fuzz.attack import Fuzz
from tests.fuzz.config import STATES
from tests.fuzz.results import FuzzReport


def run_fuzz(
    *,
    messages: int,
    seed: int = 0,
    states: Sequence[str] = STATES,
    workdir: Path | None = None,
    log: Callable[[str], None] = lambda s: None,
    **options: Any,
) -> FuzzReport:
    """Fuzz a fresh producer with ``messages`` per state in ``states`` (``options``: those of
    :class:`Fuzz`); the report says what failed. A ``workdir`` is kept, a temporary one not."""
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="lf-fuzz-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)  # the producer refuses an ipc directory others could reach
    try:
        with Fuzz(seed=seed, workdir=root, log=log, **options) as fz:
            fz.start_producer()
            results = []
            for state in states:
                log(f"[{state}] attacking with {messages} messages")
                results.append(fz.run_state(state, messages))
                log(f"[{state}] done in {results[-1].elapsed_s:.1f} s")
            elapsed = time.monotonic() - t0
            return FuzzReport(seed, fz.limits, results, elapsed, len(fz.producer.logs))
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
