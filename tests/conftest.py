from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests._util import Procs


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Start processes with ``procs.start(cmd)``; all are killed at teardown."""
    p = Procs()
    yield p
    p.cleanup()


@pytest.fixture(autouse=True)
def _restore_lensfeed_logging() -> Iterator[None]:
    """Entry points run in-process (``main([...])``) call ``setup_logging``, which points the
    ``lensfeed`` logger at the test's captured stderr and stops propagation: undo it, so later
    tests' ``caplog`` sees records and no handler writes to a closed stream."""
    logger = logging.getLogger("lensfeed")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
