from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._util import Procs


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Start processes with ``procs.start(cmd)``; all are killed at teardown."""
    p = Procs()
    yield p
    p.cleanup()
