"""The demo dataset: Python's own standard-library source as byte-level tokens.

Offline and deterministic for a given Python version; made once under ``dataset.path`` and
reused (a marker file records the recipe, so a changed recipe rebuilds it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lensfeed.common.errors import LensfeedError

#: Standard-library modules whose source makes up the demo corpus, in this order.
DEMO_MODULES: tuple[str, ...] = (
    "argparse",
    "ast",
    "calendar",
    "collections",
    "contextlib",
    "dataclasses",
    "difflib",
    "enum",
    "functools",
    "inspect",
    "json.decoder",
    "logging",
    "pathlib",
    "random",
    "shutil",
    "string",
    "textwrap",
    "threading",
    "typing",
)
DEMO_SEQ_LEN = 128
DEMO_MARKER = "lensfeed_demo.json"


def demo_documents(modules: Sequence[str] = DEMO_MODULES) -> Iterator[tuple[str, str]]:
    """(module, text) for each module whose source ships with this Python."""
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = getattr(spec, "origin", None)
        if not origin or not origin.endswith(".py") or not Path(origin).is_file():
            continue  # e.g. a stripped-down Python without sources: skip, the marker says so
        yield (
            name,
            f"# Python {sys.version_info[0]}.{sys.version_info[1]} module {name}\n"
            + (Path(origin).read_text(encoding="utf-8")),
        )


def _demo_recipe(seq_len: int) -> dict[str, Any]:
    return {
        "modules": list(DEMO_MODULES),
        "seq_len": seq_len,
        "tokenizer": "bytes",
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
    }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside ``path``: producers in several containers may prepare at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_demo_data(path: str | Path, *, seq_len: int = DEMO_SEQ_LEN) -> dict[str, Any]:
    """Create the demo dataset at ``path`` unless a dataset is already there; returns its info.

    An existing directory is never touched unless it is an earlier demo dataset made with
    another recipe (seq_len or Python version), which is rebuilt.
    """
    from lensfeed.pretokenize import INFO_FILE, write_packed
    from lensfeed.tokenizer import ByteTokenizer

    out = Path(path)
    with _locked(out):
        marker = out / DEMO_MARKER
        recipe = _demo_recipe(seq_len)
        if out.exists():
            if not marker.is_file():
                return {"path": str(out), "created": False, "note": "not a demo dataset"}
            info = json.loads(marker.read_text())
            if info.get("recipe") == recipe:
                return {**info, "path": str(out), "created": False}
        t0 = time.perf_counter()
        docs = list(demo_documents())
        if not docs:
            raise LensfeedError(
                "cannot build the demo dataset: this Python ships no standard-library sources"
            )
        tok = ByteTokenizer()
        written = write_packed(
            (text for _, text in docs),
            out,
            tokenizer=tok,
            seq_len=seq_len,
            overwrite=True,
            sources=[name for name, _ in docs],
            extra={"recipe": recipe},
        )
        digest = _rows_digest(out)
        info = {
            "recipe": recipe,
            "modules_found": [name for name, _ in docs],
            "rows": written.rows,
            "tokens": written.tokens,
            "sha256": digest,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        (out / DEMO_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        assert (out / INFO_FILE).is_file()
        return {**info, "path": str(out), "created": True}


def _rows_digest(path: Path) -> str:
    """sha256 of the dataset's token bytes (proves two builds are identical)."""
    import datasets

    ds = datasets.load_from_disk(str(path)).with_format("numpy")
    return hashlib.sha256(ds["input_ids"][:].astype("<i4").tobytes()).hexdigest()[:16]


__all__ = ["DEMO_MARKER", "DEMO_MODULES", "DEMO_SEQ_LEN", "demo_documents", "prepare_demo_data"]
