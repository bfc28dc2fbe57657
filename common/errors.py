"""One exception hierarchy for lensfeed, so callers can catch ``LensfeedError`` once.

Every error message names the thing at fault (key and value, path/rank/column, endpoint and
rank) because the person reading it is usually looking at a log from a remote process.
"""

from __future__ import annotations


class LensfeedError(Exception):
    """Base class of every error lensfeed raises on purpose."""

    #: Stable machine-readable code, also used on the wire in ERROR messages.
    code: str = "error"


class ConfigError(LensfeedError, ValueError):
    """A configuration key has an invalid value, or is unknown."""

    code = "config"


class ShardError(LensfeedError):
    """The dataset or this rank's shard cannot be served (missing, corrupt, empty, wrong column)."""

    code = "shard"


class EmptyShardError(ShardError):
    """This rank's shard has no rows: the original code's ``error_empty_cache_regen``."""

    code = "empty_shard"


class ProtocolError(LensfeedError):
    """A message on the socket is malformed, oversize, or from another protocol version."""

    code = "protocol"


class AuthenticationError(LensfeedError):
    """The CURVE handshake failed: the peer's key is not the pinned or allowlisted one, or one
    side runs without CURVE. A configuration problem, so it is never retried."""

    code = "auth"


class StateMismatchError(LensfeedError):
    """Producer and trainer (or a checkpoint) disagree on what shapes the data."""

    code = "state_mismatch"


class ProducerTimeoutError(LensfeedError, TimeoutError):
    """The producer did not answer within the configured timeout."""

    code = "timeout"


class ProducerLostError(ProducerTimeoutError):
    """The producer died or stopped answering heartbeats, and none came back in time."""

    code = "producer_lost"


class TransformError(LensfeedError):
    """The per-batch transform (e.g. the activation builder) failed."""

    code = "transform"


class RemoteError(LensfeedError):
    """An error the peer reported as an ERROR message; ``code`` is the peer's code."""

    def __init__(self, code: str, message: str, *, rank: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.rank = rank


class RankFailedError(LensfeedError):
    """Another DDP rank failed; raised on every rank so they all stop together."""

    code = "rank_failed"

    def __init__(self, failed_rank: int, code: str, message: str) -> None:
        super().__init__(f"rank {failed_rank} failed ({code}): {message}")
        self.failed_rank = failed_rank
        self.failed_code = code
        self.failed_message = message


class RanksDisagreeError(LensfeedError):
    """The ranks hold different values that must agree (e.g. batches in a cycle, the step to
    resume from): no single rank is at fault, so the status names none (``failed_rank`` -1)."""

    code = "ranks_disagree"
    failed_rank = -1


__all__ = [
    "AuthenticationError",
    "ConfigError",
    "EmptyShardError",
    "LensfeedError",
    "ProducerLostError",
    "ProducerTimeoutError",
    "ProtocolError",
    "RankFailedError",
    "RanksDisagreeError",
    "RemoteError",
    "ShardError",
    "StateMismatchError",
    "TransformError",
]
