"""lensfeed: per-rank producers regenerate a cycling cache and stream it to DDP trainer ranks.

The public API is the handful of names below; everything else is reached through its module
(``lensfeed.producer``, ``lensfeed.trainer``, ``lensfeed.common``). Names are imported on first
use, so ``import lensfeed`` (and ``lensfeed --help``) does not pay for torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("lensfeed")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

#: Public name -> module that defines it.
_EXPORTS = {
    "ConfigError": "lensfeed.common.errors",
    "DataSpec": "lensfeed.common.spec",
    "FakeProducer": "lensfeed.producer.fake",
    "FeedClient": "lensfeed.trainer.client",
    "FeedDataset": "lensfeed.trainer.dataset",
    "FeedStats": "lensfeed.trainer.cycles",
    "LensfeedConfig": "lensfeed.common.config",
    "LensfeedError": "lensfeed.common.errors",
    "ProducerTimeoutError": "lensfeed.common.errors",
    "ProtocolError": "lensfeed.common.errors",
    "RemoteError": "lensfeed.common.errors",
    "load_config": "lensfeed.common.config",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # static types for the lazily imported names
    from lensfeed.common.config import LensfeedConfig, load_config  # noqa: F401
    from lensfeed.common.errors import (  # noqa: F401
        ConfigError,
        LensfeedError,
        ProducerTimeoutError,
        ProtocolError,
        RemoteError,
    )
    from lensfeed.common.spec import DataSpec  # noqa: F401
    from lensfeed.producer.fake import FakeProducer  # noqa: F401
    from lensfeed.trainer.client import FeedClient  # noqa: F401
    from lensfeed.trainer.cycles import FeedStats  # noqa: F401
    from lensfeed.trainer.dataset import FeedDataset  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lensfeed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
