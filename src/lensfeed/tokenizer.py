"""Tokenizers for ``lensfeed tokenize``: what packing needs from one (:class:`Tokenizer`), the
byte tokenizer that needs no vocabulary, and a Hugging Face tokenizer from local files.

A module of its own so that the corpus pipeline (:mod:`lensfeed.pretokenize`: reading, packing
and writing with ``datasets``) depends on nothing but the two members of :class:`Tokenizer`:
choosing and loading a tokenizer, with its own failures (``transformers`` missing, a tokenizer
that is not on disk, no EOS), happens here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from lensfeed.common.errors import ConfigError, LensfeedError

BYTE_EOS = 0


class Tokenizer(Protocol):
    """What packing needs from a tokenizer."""

    name: str
    eos_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; EOS is 0 (NUL). Needs no vocabulary file."""

    name = "bytes"
    vocab_size = 256

    def __init__(self, eos_id: int = BYTE_EOS) -> None:
        self.eos_id = eos_id

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]


class HFTokenizer:
    """A Hugging Face tokenizer from local files (``transformers`` is imported only here)."""

    def __init__(self, name_or_path: str, *, eos_id: int | None = None) -> None:
        try:
            import transformers
        except ImportError:
            raise ConfigError(
                f"--tokenizer {name_or_path!r} needs the transformers package "
                "(pip install 'lensfeed[models]'), or use --tokenizer bytes"
            ) from None
        transformers.logging.set_verbosity_error()  # long documents are fine: we pack them
        try:
            tok = transformers.AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        except Exception as exc:
            raise LensfeedError(
                f"cannot load tokenizer {name_or_path!r} from local files (nothing is "
                f"downloaded; pass a directory holding tokenizer.json or a name already in the "
                f"Hugging Face cache): {type(exc).__name__}: {exc}"
            ) from None
        eos = tok.eos_token_id if eos_id is None else eos_id
        if eos is None:
            raise ConfigError(f"tokenizer {name_or_path!r} has no eos_token_id; pass --eos-id")
        if not 0 <= int(eos) < len(tok):
            raise ConfigError(
                f"--eos-id {eos} is not a token of {name_or_path!r} (its ids are 0..{len(tok) - 1})"
            )
        self.name = str(name_or_path)
        self.eos_id = int(eos)
        self._tok = tok

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = self._tok(list(texts), add_special_tokens=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int64) for ids in out]


def load_tokenizer(name: str = "bytes", *, eos_id: int | None = None) -> Tokenizer:
    """``bytes`` -> :class:`ByteTokenizer`; anything else -> :class:`HFTokenizer`."""
    if name in ("bytes", "byte"):
        return ByteTokenizer(BYTE_EOS if eos_id is None else eos_id)
    return HFTokenizer(name, eos_id=eos_id)


__all__ = ["BYTE_EOS", "ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer"]
