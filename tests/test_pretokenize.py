"""``lensfeed tokenize``: reading, packing, writing, and serving the result."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from lensfeed import pretokenize as T
from lensfeed.cli import main as cli_main
from lensfeed.common.errors import ConfigError, LensfeedError
from lensfeed.producer.shard import load_shard


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    return _write(
        path, "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts))
    )


def test_byte_tokenizer_is_utf8_bytes_with_nul_eos() -> None:
    tok = T.ByteTokenizer()
    assert tok.eos_id == 0
    assert tok.encode("hé").tolist() == [104, 195, 169]
    assert tok.encode("").tolist() == []


def test_packer_concatenates_with_eos_and_cuts_fixed_rows() -> None:
    p = T.Packer(3, eos_id=0)
    first = p.add(np.array([1, 2]))  # stream: 1 2 0
    assert first.tolist() == [[1, 2, 0]]
    assert first.dtype == np.int32
    second = p.add(np.array([3, 4, 5, 6]))  # stream: 3 4 5 | 6 0
    assert second.tolist() == [[3, 4, 5]]
    assert p.dropped == 2
    assert (p.documents, p.tokens) == (2, 8)


def test_packer_rejects_tiny_seq_len() -> None:
    with pytest.raises(ConfigError, match="seq-len"):
        T.Packer(1, eos_id=0)


def test_read_documents_modes(tmp_path: Path) -> None:
    txt = _write(tmp_path / "a.txt", "one\ntwo\n\nthree\n")
    assert list(T.read_documents([txt])) == ["one\ntwo\n\nthree\n"]
    assert list(T.read_documents([txt], txt_mode="line")) == ["one", "two", "three"]
    assert list(T.read_documents([txt], txt_mode="paragraph")) == ["one\ntwo", "three"]
    js = _jsonl(tmp_path / "b.jsonl", ["x", "y"])
    assert list(T.read_documents([txt, js], txt_mode="line")) == ["one", "two", "three", "x", "y"]
    other = _jsonl(tmp_path / "c.jsonl", ["z"], field="content")
    assert list(T.read_documents([other], text_field="content")) == ["z"]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', r"bad\.jsonl:2: not valid JSON"),
        ("nofield.jsonl", '{"body": "x"}\n', r"nofield\.jsonl:1: no field 'text'"),
        ("num.jsonl", '{"text": 3}\n', r"num\.jsonl:1: field 'text' holds int"),
        ("corpus.csv", "a,b\n", r"expected a \.txt or \.jsonl"),
    ],
)
def test_read_documents_errors_name_file_and_line(
    tmp_path: Path, name: str, content: str, match: str
) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(LensfeedError, match=match):
        list(T.read_documents([path]))


def test_tokenize_writes_a_dataset_the_producer_serves(tmp_path: Path) -> None:
    texts = [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(200)]
    corpus = _jsonl(tmp_path / "corpus.jsonl", texts)
    out = tmp_path / "ds"
    info = T.tokenize_corpus([corpus], out, seq_len=16)

    stream = b"".join(t.encode() + b"\0" for t in texts)
    rows = len(stream) // 16
    assert (info.rows, info.tokens, info.dropped_tokens) == (rows, len(stream), len(stream) % 16)
    ds = datasets.load_from_disk(str(out))
    assert ds.features["input_ids"].feature.dtype == "int32"
    expected = np.frombuffer(stream[: rows * 16], dtype=np.uint8).reshape(rows, 16)
    assert np.array_equal(np.asarray(ds.with_format("numpy")["input_ids"][:]), expected)

    shard = load_shard(out, rank=1, world_size=2, columns=["input_ids"])
    assert shard.columns["input_ids"].row_shape == (16,)
    assert shard.num_rows == rows // 2
    assert json.loads((out / T.INFO_FILE).read_text())["seq_len"] == 16

    with pytest.raises(LensfeedError, match="already exists"):
        T.tokenize_corpus([corpus], out, seq_len=16)
    again = T.tokenize_corpus([corpus], out, seq_len=8, overwrite=True)
    assert again.rows == len(stream) // 8


def test_tokenize_in_parts_equals_one_part(tmp_path: Path) -> None:
    docs = [f"text number {i} " * 3 for i in range(50)]
    tok = T.ByteTokenizer()
    one = T.write_packed(iter(docs), tmp_path / "one", tokenizer=tok, seq_len=8)
    parts = T.write_packed(iter(docs), tmp_path / "parts", tokenizer=tok, seq_len=8, part_rows=3)
    assert one.rows == parts.rows
    a = datasets.load_from_disk(str(tmp_path / "one")).with_format("numpy")["input_ids"][:]
    b = datasets.load_from_disk(str(tmp_path / "parts")).with_format("numpy")["input_ids"][:]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_tokenize_refuses_a_corpus_shorter_than_one_row(tmp_path: Path) -> None:
    corpus = _write(tmp_path / "tiny.txt", "hi")
    with pytest.raises(LensfeedError, match="fewer than one row"):
        T.tokenize_corpus([corpus], tmp_path / "out", seq_len=64)
    assert not (tmp_path / "out").exists()


def test_lensfeed_tokenize_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _write(tmp_path / "lines.txt", "\n".join(f"line {i}" for i in range(100)))
    out = tmp_path / "lines"
    code = cli_main(
        ["tokenize", str(corpus), "--output", str(out), "--seq-len", "32", "--txt-docs", "line"]
    )
    assert code == 0
    assert "rows x 32 tokens" in capsys.readouterr().out
    assert datasets.load_from_disk(str(out)).num_rows > 0
    assert cli_main(["tokenize", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x")]) == 1


def test_hf_tokenizer_from_local_files(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="</s>", unk_token="[UNK]"
    ).save_pretrained(str(tmp_path / "tok"))
    corpus = _jsonl(tmp_path / "c.jsonl", ["hello world", "world again hello", "oops"])
    code = cli_main(
        ["tokenize", str(corpus), "-o", str(tmp_path / "ds"), "--seq-len", "4"]
        + ["--tokenizer", str(tmp_path / "tok")]
    )
    assert code == 0
    ids = datasets.load_from_disk(str(tmp_path / "ds")).with_format("numpy")["input_ids"][:]
    # stream: hello world </s> world again hello </s> [UNK] </s>  -> 2 rows of 4, 1 dropped
    assert np.asarray(ids).tolist() == [[2, 3, 1, 3], [4, 2, 1, 0]]

    with pytest.raises(LensfeedError, match="local files"):
        T.load_tokenizer(str(tmp_path / "no-such-tokenizer"))
