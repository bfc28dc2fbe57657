"""Corpus -> pretokenized, fixed-length Arrow dataset: what a producer serves.

``lensfeed tokenize corpus.jsonl --output data/corpus --seq-len 128`` reads documents from
``.txt`` files (each file one document, or one per line / per blank-line paragraph) and
``.jsonl`` files (one JSON object per line, text in field ``text``), tokenizes them, and *packs*
the token stream into rows of exactly ``seq_len`` tokens: documents are concatenated in input
order with one EOS token after each, and the stream is cut every ``seq_len`` tokens (a document
may span two rows; the last, incomplete row is dropped). The result is a
``datasets.Dataset.save_to_disk`` directory with one ``input_ids`` column of ``int32`` sequences,
all of the same length, because lensfeed rejects ragged sequences instead of padding them.

Tokenizers: ``bytes`` (the default) maps UTF-8 bytes to ids 0..255 with EOS = 0 (the NUL byte,
which text does not contain), so it needs nothing installed; any other ``--tokenizer`` value is a
Hugging Face tokenizer name or directory loaded with ``transformers`` from *local files only*
(no download at run time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lensfeed.common.errors import ConfigError, LensfeedError

log = logging.getLogger("lensfeed.tokenize")

#: Marker written next to the Arrow files: how the dataset was made.
INFO_FILE = "lensfeed_tokenize.json"
BYTE_EOS = 0
_TXT_MODES = ("file", "line", "paragraph")
#: Rows per intermediate part; bounds memory at ``rows * seq_len * 4`` bytes.
_PART_ROWS = 1 << 20
_ENCODE_BATCH = 256


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
            raise ConfigError(
                f"tokenizer {name_or_path!r} has no eos_token_id; pass --eos-id to choose the "
                "separator token"
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


# --------------------------------------------------------------------------- reading


def read_documents(
    paths: Iterable[str | Path], *, text_field: str = "text", txt_mode: str = "file"
) -> Iterator[str]:
    """Documents of ``.txt`` / ``.jsonl`` files in order; errors name the file and line."""
    if txt_mode not in _TXT_MODES:
        raise ConfigError(f"--txt-docs must be one of {', '.join(_TXT_MODES)} (got {txt_mode!r})")
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise LensfeedError(f"corpus file not found: {path}")
        if path.suffix == ".jsonl":
            yield from _read_jsonl(path, text_field)
        elif path.suffix == ".txt":
            yield from _read_txt(path, txt_mode)
        else:
            raise LensfeedError(f"{path}: expected a .txt or .jsonl corpus file")


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise LensfeedError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise LensfeedError(
                    f"{path}:{lineno}: no field {text_field!r} (use --text-field to pick another)"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise LensfeedError(
                    f"{path}:{lineno}: field {text_field!r} holds {type(text).__name__}, not text"
                )
            yield text


def _read_txt(path: Path, mode: str) -> Iterator[str]:
    if mode == "file":
        yield path.read_text(encoding="utf-8")
        return
    if mode == "line":
        with path.open(encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
        return
    para: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                para.append(line)
            elif para:
                yield "".join(para).rstrip("\r\n")
                para = []
    if para:
        yield "".join(para).rstrip("\r\n")


# --------------------------------------------------------------------------- packing


class Packer:
    """Concatenates documents (each followed by EOS) and cuts the stream into ``seq_len`` rows."""

    def __init__(self, seq_len: int, eos_id: int) -> None:
        if seq_len < 2:
            raise ConfigError(f"--seq-len must be >= 2 (got {seq_len})")
        self.seq_len = seq_len
        self.eos = np.array([eos_id], dtype=np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.documents = 0
        self.tokens = 0

    def add(self, ids: np.ndarray) -> np.ndarray:
        """Append one document; returns the rows it completed, shape ``(k, seq_len)``."""
        ids = np.asarray(ids, dtype=np.int64)
        self.documents += 1
        self.tokens += len(ids) + 1
        self._pending += [ids, self.eos]
        self._pending_len += len(ids) + 1
        if self._pending_len < self.seq_len:
            return np.empty((0, self.seq_len), dtype=np.int32)
        flat = np.concatenate(self._pending)
        k = len(flat) // self.seq_len
        rest = flat[k * self.seq_len :]
        self._pending = [rest] if len(rest) else []
        self._pending_len = len(rest)
        return _to_int32(flat[: k * self.seq_len].reshape(k, self.seq_len))

    @property
    def dropped(self) -> int:
        """Tokens in the incomplete last row (not written)."""
        return self._pending_len


def _to_int32(rows: np.ndarray) -> np.ndarray:
    if rows.size and (rows.min() < 0 or rows.max() > np.iinfo(np.int32).max):
        raise LensfeedError("token ids do not fit in int32")
    return rows.astype(np.int32)


@dataclass
class TokenizeInfo:
    """What :func:`tokenize_corpus` wrote (also saved as ``lensfeed_tokenize.json``)."""

    tokenizer: str
    seq_len: int
    eos_id: int
    documents: int = 0
    tokens: int = 0
    rows: int = 0
    dropped_tokens: int = 0
    sources: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _save_rows(rows: np.ndarray, path: Path) -> None:
    import datasets

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    datasets.Dataset.from_dict({"input_ids": rows}, features=features).save_to_disk(str(path))


def write_packed(
    documents: Iterable[str],
    output: str | Path,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    overwrite: bool = False,
    sources: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    part_rows: int = _PART_ROWS,
) -> TokenizeInfo:
    """Tokenize, pack and ``save_to_disk`` to ``output`` (written to a temp dir, then renamed)."""
    import datasets

    out = Path(output)
    if out.exists() and not overwrite:
        raise LensfeedError(f"{out} already exists; pass --overwrite to replace it")
    packer = Packer(seq_len, tokenizer.eos_id)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bars = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        parts: list[Path] = []
        rows_total = 0
        chunks: list[np.ndarray] = []
        buffered = 0

        def flush() -> None:
            nonlocal chunks, buffered, rows_total
            if buffered:
                part = tmp / f"part-{len(parts):05d}"
                _save_rows(np.concatenate(chunks), part)
                parts.append(part)
                rows_total += buffered
            chunks, buffered = [], 0

        for batch in _batched(documents, _ENCODE_BATCH):
            for ids in tokenizer.encode_batch(batch):
                rows = packer.add(ids)
                if len(rows):
                    chunks.append(rows)
                    buffered += len(rows)
            if buffered >= part_rows:
                flush()
        flush()
        if rows_total == 0:
            raise LensfeedError(
                f"the corpus has {packer.tokens} tokens, fewer than one row of --seq-len "
                f"{seq_len}; nothing to write"
            )
        final = tmp / "dataset"
        if len(parts) == 1:
            parts[0].rename(final)
        else:
            merged = datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in parts])
            merged.save_to_disk(str(final))
        info = TokenizeInfo(
            tokenizer=tokenizer.name,
            seq_len=seq_len,
            eos_id=tokenizer.eos_id,
            documents=packer.documents,
            tokens=packer.tokens,
            rows=rows_total,
            dropped_tokens=packer.dropped,
            sources=[str(s) for s in sources],
            extra=dict(extra or {}),
        )
        (final / INFO_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        final.rename(out)
        return info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not bars:
            datasets.enable_progress_bars()


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_corpus(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    seq_len: int = 128,
    tokenizer: str = "bytes",
    eos_id: int | None = None,
    text_field: str = "text",
    txt_mode: str = "file",
    overwrite: bool = False,
) -> TokenizeInfo:
    """Read ``inputs`` (.txt/.jsonl), tokenize, pack into ``seq_len`` rows, save to ``output``."""
    if not inputs:
        raise ConfigError("no corpus files given")
    tok = load_tokenizer(tokenizer, eos_id=eos_id)
    docs = read_documents(inputs, text_field=text_field, txt_mode=txt_mode)
    return write_packed(
        docs,
        output,
        tokenizer=tok,
        seq_len=seq_len,
        overwrite=overwrite,
        sources=[str(p) for p in inputs],
    )


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lensfeed tokenize",
        description="Turn .txt / .jsonl corpus files into a pretokenized, fixed-length Arrow "
        "dataset (datasets.save_to_disk) with one int32 'input_ids' column. Documents are "
        "packed: concatenated with an EOS token after each and cut every --seq-len tokens "
        "(the incomplete last row is dropped).",
    )
    p.add_argument("inputs", nargs="+", metavar="FILE", help=".txt or .jsonl corpus files")
    p.add_argument("--output", "-o", required=True, help="dataset directory to create")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (default 128)")
    p.add_argument(
        "--tokenizer",
        default="bytes",
        help="'bytes' (UTF-8 bytes, EOS 0; default) or a Hugging Face tokenizer name/directory "
        "loaded from local files with transformers",
    )
    p.add_argument("--eos-id", type=int, default=None, help="separator token id (default: EOS)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument(
        "--txt-docs",
        choices=_TXT_MODES,
        default="file",
        help="how a .txt file splits into documents (default: the whole file is one)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from lensfeed.common.logs import setup_logging

    setup_logging("tokenize")
    t0 = time.perf_counter()
    try:
        info = tokenize_corpus(
            args.inputs,
            args.output,
            seq_len=args.seq_len,
            tokenizer=args.tokenizer,
            eos_id=args.eos_id,
            text_field=args.text_field,
            txt_mode=args.txt_docs,
            overwrite=args.overwrite,
        )
    except LensfeedError as exc:
        log.error("%s", exc)
        return 1
    print(
        f"wrote {args.output}: {info.rows} rows x {info.seq_len} tokens (int32 input_ids) from "
        f"{info.documents} documents, {info.tokens} tokens incl. EOS={info.eos_id}, "
        f"{info.dropped_tokens} dropped in the last partial row; tokenizer {info.tokenizer}; "
        f"{time.perf_counter() - t0:.1f} s",
        file=sys.stdout,
    )
    return 0


__all__ = [
    "INFO_FILE",
    "ByteTokenizer",
    "HFTokenizer",
    "Packer",
    "TokenizeInfo",
    "Tokenizer",
    "load_tokenizer",
    "main",
    "parser",
    "read_documents",
    "tokenize_corpus",
    "write_packed",
]
