"""The feed cursor, ``(cycle, batch)`` of the next batch the loop will consume, and its
checkpoint form (``FeedClient.state_dict``).

A module of its own because the cursor outlives any client or connection: it is saved in every
rank's checkpoint, checked against the data configuration and rank when a run resumes, and is
what each hello carries, the first one and every one after a reconnect
(:class:`~lensfeed.trainer.reconnect.Reconnector`).
"""

from __future__ import annotations

from typing import Any

from lensfeed.common.errors import StateMismatchError
from lensfeed.common.spec import DataSpec

#: ``(cycle, batch)``: the next batch to consume.
Cursor = tuple[int, int]


def resume_point(spec: DataSpec, cursor: Cursor) -> Cursor:
    """``cursor`` with a finished cycle rolled over to ``(cycle + 1, 0)``."""
    cycle, batch = cursor
    if batch >= spec.batches_in_cycle(cycle):
        return cycle + 1, 0
    return cycle, batch


def cursor_state(spec: DataSpec, rank: int, cursor: Cursor = (0, 0)) -> dict[str, Any]:
    """The ``state_dict`` of rank ``rank``'s feed at ``cursor`` (a fresh run: ``(0, 0)``)."""
    return {
        "cycle": cursor[0],
        "batch": cursor[1],
        "fingerprint": spec.fingerprint(),
        "rank": rank,
        "world_size": spec.world_size,
    }


def state_cursor(state: dict[str, Any], spec: DataSpec, rank: int) -> Cursor:
    """The cursor a saved ``state`` resumes at; :class:`StateMismatchError` if ``state`` was
    saved for another data configuration or rank, or its cursor is invalid."""
    for key, ours in (
        ("fingerprint", spec.fingerprint()),
        ("rank", rank),
        ("world_size", spec.world_size),
    ):
        if state.get(key) != ours:
            raise StateMismatchError(
                f"feed state was saved with {key}={state.get(key)!r}, found {ours!r} now; "
                "the checkpoint belongs to another data configuration or rank"
            )
    cycle, batch = int(state["cycle"]), int(state["batch"])
    if cycle < 0 or not 0 <= batch < spec.batches_in_cycle(cycle):
        raise StateMismatchError(f"feed state cursor (cycle {cycle}, batch {batch}) is invalid")
    return cycle, batch


__all__ = ["Cursor", "cursor_state", "resume_point", "state_cursor"]
