"""Corpus -> pretokenized, fixed-length Arrow dataset: what a producer serves.

``lensfeed tokenize`` reads ``.txt`` files (a document per file, non-blank line or paragraph)
and ``.jsonl`` files (field ``text``), tokenizes them and *packs* the tokens: documents joined
with one EOS after each, cut every ``seq_len`` tokens (lensfeed rejects ragged rows; the partial
last row is dropped), saved (``save_to_disk``) as one ``int32`` ``input_ids`` column.
``datasets`` reads, batches and writes; ours are the packing (a partial row carries over from
batch to batch) and errors naming the file and line at fault. Tokenizer ``bytes`` (ids = UTF-8
bytes, EOS = 0) needs nothing; any other is loaded by ``transformers`` from local files only
(:mod:`lensfeed.tokenizer`).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.packaged_modules.json.json import JsonConfig

from lensfeed.common.errors import ConfigError, LensfeedError
from lensfeed.common.logs import setup_logging

# The tokenizers live in lensfeed.tokenizer; this module's names for them stay valid.
from lensfeed.tokenizer import BYTE_EOS as BYTE_EOS
from lensfeed.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

log = logging.getLogger("lensfeed.tokenize")

#: Marker written next to the Arrow files: how the dataset was made.
INFO_FILE = "lensfeed_tokenize.json"
#: ``--txt-docs`` value -> ``load_dataset("text", sample_by=...)``.
_SAMPLE_BY = {"file": "document", "line": "line", "paragraph": "paragraph"}
_TEXT = datasets.Features({"text": datasets.Value("string")})
_IDS = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))})
_ROWS = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
# Newer datasets read JSON lines with "type"/"message" fields as agent traces; a corpus is text.
_JSON_OPTIONS = {"parse_agent_traces": False} if hasattr(JsonConfig, "parse_agent_traces") else {}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars or library error logs: our errors say it once, naming the file."""
    bars, level = datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if not bars:
            datasets.enable_progress_bars()


def read_documents(
    paths: Iterable[str | Path],
    *,
    text_field: str = "text",
    txt_mode: str = "file",
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """The documents of ``.txt`` / ``.jsonl`` files in order, as a ``text`` dataset: one
    ``load_dataset`` per run of same-type files, cached in ``cache_dir`` (default: datasets')."""
    if txt_mode not in _SAMPLE_BY:
        raise ConfigError(f"--txt-docs must be one of {', '.join(_SAMPLE_BY)} (got {txt_mode!r})")
    files = [Path(p) for p in paths]
    for path in files:
        if path.is_dir():
            raise LensfeedError(
                f"corpus file {path} is a directory: pass its .txt/.jsonl files (e.g. {path}/*.txt)"
            )
        if not path.is_file():
            raise LensfeedError(f"corpus file not found: {path}")
        if path.suffix not in (".txt", ".jsonl"):
            raise LensfeedError(f"{path}: expected a .txt or .jsonl corpus file")
    parts: list[datasets.Dataset] = []
    for suffix, run in itertools.groupby(files, key=lambda p: p.suffix):
        # load_dataset("json") fails on an empty file, which holds no documents anyway
        if group := [p for p in run if suffix == ".txt" or p.stat().st_size]:
            parts.append(_load(group, suffix, txt_mode, text_field, cache_dir))
    if len(parts) > 1:
        return datasets.concatenate_datasets(parts)
    return parts[0] if parts else datasets.Dataset.from_dict({"text": []}, features=_TEXT)


def _load(
    files: list[Path], suffix: str, txt_mode: str, text_field: str, cache_dir: str | Path | None
) -> datasets.Dataset:
    """Same-type files as a ``text`` column; JSONL that ``load_dataset`` refuses or mistypes is
    scanned for the line at fault, which its errors do not name."""
    jsonl, where = suffix == ".jsonl", ", ".join(map(str, files))
    config = _JSON_OPTIONS if jsonl else {"sample_by": _SAMPLE_BY[txt_mode], "features": _TEXT}
    with _quiet():
        try:
            ds = datasets.load_dataset(
                "json" if jsonl else "text",
                data_files=[glob.escape(str(p.resolve())) for p in files],  # no globbing
                split="train",
                cache_dir=None if cache_dir is None else str(cache_dir),
                **config,
            )
        except Exception as exc:  # DatasetGenerationError wraps the parser's error
            cause = exc.__cause__ or exc
            if isinstance(cause, ValueError) and "corresponds to no data" in str(cause):
                # datasets cannot load a split of zero rows (files of blank lines)
                return datasets.Dataset.from_dict({"text": []}, features=_TEXT)
            raise (jsonl and _bad_line(files, text_field)) or LensfeedError(
                f"{where}: cannot read: {type(cause).__name__}: {cause}"
            ) from None
        if not jsonl:
            if txt_mode == "file":
                return ds
            return ds.map(_drop_blank, batched=True, remove_columns=["text"], features=_TEXT)
        column = ds.data.column(text_field) if text_field in ds.column_names else None
        if column is None or column.type != pa.string() or column.null_count:
            raise _bad_line(files, text_field) or LensfeedError(
                f"{where}: field {text_field!r} is not text in every record"
            )
        ds = ds.select_columns([text_field])
        return ds if text_field == "text" else ds.rename_column(text_field, "text")


def _drop_blank(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    """``load_dataset`` keeps blank lines, and the newlines around a paragraph after 3+ of them."""
    return {"text": [t.strip("\n") for t in batch["text"] if t.strip()]}


def _bad_line(files: list[Path], text_field: str) -> LensfeedError | None:
    """An error naming the first JSONL line that is not an object with text in ``text_field``."""
    for path in files:
        with path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    text = json.loads(line)[text_field] if line.strip() else ""
                    kind = None if isinstance(text, str) else type(text).__name__
                    problem = kind and f"field {text_field!r} holds {kind}, not text"
                except ValueError as exc:
                    problem = f"not valid JSON ({exc})"
                except (KeyError, TypeError):
                    problem = f"no field {text_field!r} (use --text-field to pick another)"
                if problem:
                    return LensfeedError(f"{path}:{lineno}: {problem}")
    return None


class Packer:
    """Concatenates documents (each followed by EOS) and cuts the stream into ``seq_len`` rows.

    Stateful: a batch's partial last row starts the next, so batches must come once, in order.
    """

    def __init__(self, seq_len: int, eos_id: int) -> None:
        if seq_len < 2:
            raise ConfigError(f"--seq-len must be >= 2 (got {seq_len})")
        if not 0 <= eos_id <= np.iinfo(np.int32).max:  # before the corpus is read, not after
            raise ConfigError(f"--eos-id must be a token id in [0, 2**31 - 1] (got {eos_id})")
        self.seq_len, self.eos_id = seq_len, eos_id
        self.documents = self.tokens = self.dropped = 0  # dropped: tokens in the partial row
        self._rest = np.empty(0, dtype=np.int64)

    def add(self, flat: np.ndarray, lengths: Sequence[int] | np.ndarray) -> np.ndarray:
        """Append documents given end to end in ``flat``; returns the rows they completed."""
        ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
        docs = np.insert(np.asarray(flat, dtype=np.int64), ends, self.eos_id)
        stream = np.concatenate([self._rest, docs])
        self.documents += len(ends)
        self.tokens += len(docs)
        cut = len(stream) // self.seq_len * self.seq_len
        self._rest = stream[cut:]
        self.dropped = len(self._rest)
        rows = stream[:cut].reshape(-1, self.seq_len)
        if rows.size and (rows.min() < 0 or rows.max() > np.iinfo(np.int32).max):
            raise LensfeedError("token ids do not fit in int32")
        return rows.astype(np.int32)

    def pack_batch(self, batch: pa.Table) -> dict[str, np.ndarray]:
        """``Dataset.map`` function over an Arrow-formatted batch of ``ids`` lists."""
        ids = batch.column("ids").combine_chunks()
        rows = self.add(ids.flatten().to_numpy(), pc.list_value_length(ids).to_numpy())
        return {"input_ids": rows}


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


def _check_output(out: Path, overwrite: bool) -> None:
    """``--overwrite`` replaces only a dataset this command wrote: a mistyped ``--output``
    (a home directory, a file) must not be deleted."""
    if not out.exists():
        return
    if not overwrite:
        raise LensfeedError(f"{out} already exists; pass --overwrite to replace it")
    if not (out / INFO_FILE).is_file():
        raise LensfeedError(
            f"{out} is not a dataset written by lensfeed tokenize (no {INFO_FILE} in it); "
            "--overwrite replaces only those: remove it yourself or choose another --output"
        )


def write_packed(
    documents: datasets.Dataset | Iterable[str],
    output: str | Path,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    overwrite: bool = False,
    sources: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    num_proc: int | None = None,
    batch_size: int = 1000,
) -> TokenizeInfo:
    """Tokenize ``documents`` (a ``text`` dataset, or strings) in ``num_proc`` processes, pack
    and ``save_to_disk`` to a temporary directory beside ``output``, renamed once complete."""
    out = Path(output)
    _check_output(out, overwrite)
    packer = Packer(seq_len, tokenizer.eos_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    batching = {"batched": True, "batch_size": batch_size, "load_from_cache_file": False}
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp, _quiet():
        if not isinstance(documents, datasets.Dataset):
            documents = datasets.Dataset.from_dict({"text": list(documents)}, features=_TEXT)
        ds = documents.map(
            lambda batch: {"ids": tokenizer.encode_batch(batch["text"])},
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            remove_columns=documents.column_names,
            features=_IDS,
            cache_file_name=f"{tmp}/ids.arrow",
            **batching,
        )
        if len(ds):  # (a map of no rows returns no columns)
            ds = ds.with_format("arrow").map(
                packer.pack_batch,
                remove_columns=["ids"],
                features=_ROWS,
                cache_file_name=f"{tmp}/rows.arrow",
                **batching,
            )
        if len(ds) == 0:
            raise LensfeedError(
                f"the corpus has {packer.tokens} tokens, fewer than one row of --seq-len "
                f"{seq_len}; nothing to write"
            )
        final = Path(tmp, "dataset")
        ds.with_format(None).save_to_disk(str(final))
        counts = (packer.documents, packer.tokens, len(ds), packer.dropped)
        info = TokenizeInfo(tokenizer.name, seq_len, tokenizer.eos_id, *counts)
        info.sources, info.extra = [str(s) for s in sources], dict(extra or {})
        (final / INFO_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        final.rename(out)
        return info


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
    num_proc: int | None = None,
) -> TokenizeInfo:
    """Read ``inputs`` (.txt/.jsonl), tokenize, pack into ``seq_len`` rows, save to ``output``.
    The corpus' Arrow copy goes to a temporary directory beside ``output``, not the HF cache."""
    if not inputs:
        raise ConfigError("no corpus files given")
    out = Path(output)
    _check_output(out, overwrite)
    tok = load_tokenizer(tokenizer, eos_id=eos_id)
    Packer(seq_len, tok.eos_id)  # checks --seq-len
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.read-", dir=out.parent) as cache:
        docs = read_documents(inputs, text_field=text_field, txt_mode=txt_mode, cache_dir=cache)
        kw = {"seq_len": seq_len, "overwrite": overwrite, "num_proc": num_proc}
        return write_packed(docs, out, tokenizer=tok, sources=list(map(str, inputs)), **kw)


def parser() -> argparse.ArgumentParser:
    """The ``lensfeed tokenize`` arguments; ``dest`` names are :func:`tokenize_corpus`'s."""
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
        dest="txt_mode",
        choices=tuple(_SAMPLE_BY),
        default="file",
        help="how a .txt file splits into documents (default: the whole file is one)",
    )
    p.add_argument("--num-proc", type=int, default=1, help="processes that tokenize (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``lensfeed tokenize``: 0 on success, 1 (after logging the error) on a named failure."""
    args = vars(parser().parse_args(argv))
    inputs, output = args.pop("inputs"), args.pop("output")
    setup_logging("tokenize")
    t0 = time.perf_counter()
    try:
        info = tokenize_corpus(inputs, output, **args)
    except LensfeedError as exc:
        log.error("%s", exc)
        return 1
    print(
        f"wrote {output}: {info.rows} rows x {info.seq_len} tokens (int32 input_ids) "
        f"from {info.documents} documents, {info.tokens} tokens incl. EOS={info.eos_id}, "
        f"{info.dropped_tokens} dropped in the last partial row; tokenizer {info.tokenizer}; "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


__all__ = ["INFO_FILE", "ByteTokenizer", "HFTokenizer", "Packer", "TokenizeInfo", "Tokenizer"]
__all__ += ["load_tokenizer", "main", "parser", "read_documents", "tokenize_corpus", "write_packed"]
