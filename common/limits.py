"""Wire limits both sides and the config checks share, in a module without torch (the producer
supervisor loads the config and must stay light); :mod:`lensfeed.common.protocol` applies them.
"""

from __future__ import annotations

#: Largest header frame (msgpack) of any message.
MAX_HEADER_BYTES = 64 * 1024
#: Most tensors one batch message carries.
MAX_TENSORS = 64
#: Highest rank a message may name.
MAX_RANK = (1 << 20) - 1

__all__ = ["MAX_HEADER_BYTES", "MAX_RANK", "MAX_TENSORS"]
