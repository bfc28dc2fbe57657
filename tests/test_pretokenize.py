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
    first = p.add(np.array([1, 2]), [2])  # stream: 1 2 0
    assert first.tolist() == [[1, 2, 0]]
    assert first.dtype == np.int32
    second = p.add(np.array([3, 4, 5, 6]), [4])  # stream: 3 4 5 | 6 0
    assert second.tolist() == [[3, 4, 5]]
    assert p.dropped == 2
    assert (p.documents, p.tokens) == (2, 8)
    # several documents at once (one Dataset.map batch), an empty one among them
    third = p.add(np.array([7, 8, 9]), [1, 0, 2])  # stream: (6 0) 7 | 0 0 8 | 9 0
    assert third.tolist() == [[6, 0, 7], [0, 0, 8]]
    assert (p.documents, p.tokens, p.dropped) == (5, 14, 2)
    with pytest.raises(LensfeedError, match="int32"):
        p.add(np.array([2**31]), [1])


def test_packer_rejects_tiny_seq_len_and_an_eos_id_out_of_range() -> None:
    with pytest.raises(ConfigError, match="seq-len"):
        T.Packer(1, eos_id=0)
    for eos in (-1, 2**31):
        with pytest.raises(ConfigError, match=r"--eos-id must be a token id in \[0, 2\*\*31 - 1\]"):
            T.Packer(8, eos_id=eos)


def test_a_directory_given_as_corpus_is_named_as_one(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    with pytest.raises(LensfeedError, match=r"corpus file .*notes is a directory: pass its"):
        T.tokenize_corpus([tmp_path / "notes"], tmp_path / "ds")


def test_overwrite_replaces_only_a_tokenized_dataset(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text to pack into rows\n")
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "precious").write_text("keep me")
    for out in (tmp_path / "file", tmp_path / "dir"):
        with pytest.raises(LensfeedError, match="not a dataset written by lensfeed tokenize"):
            T.tokenize_corpus([corpus], out, seq_len=4, overwrite=True)
    assert (tmp_path / "file").read_text() == (tmp_path / "dir" / "precious").read_text()


def test_read_documents_modes(tmp_path: Path) -> None:
    def read(paths: list[Path], **kw: str) -> list[str]:
        return T.read_documents(paths, cache_dir=tmp_path / "cache", **kw)["text"][:]

    txt = _write(tmp_path / "a.txt", "one\ntwo\n\nthree\n")
    assert read([txt]) == ["one\ntwo\n\nthree\n"]
    assert read([txt], txt_mode="line") == ["one", "two", "three"]
    assert read([txt], txt_mode="paragraph") == ["one\ntwo", "three"]
    js = _jsonl(tmp_path / "b.jsonl", ["x", "y"])
    lines = ["one", "two", "three"]
    assert read([txt, js, txt], txt_mode="line") == [*lines, "x", "y", *lines]  # in file order
    other = _jsonl(tmp_path / "c.jsonl", ["z"], field="content")
    assert read([other], text_field="content") == ["z"]
    # paragraphs are split at empty lines, as load_dataset(sample_by="paragraph") does: extra
    # newlines around one are dropped, a line holding only spaces is part of the paragraph
    para = _write(tmp_path / "p.txt", "\n\na\r\nb\n\n\n\nc\n  \nd\n\n\n")
    assert read([para], txt_mode="paragraph") == ["a\nb", "c\n  \nd"]
    # empty files: one empty document per .txt file, none for .jsonl or in line/paragraph mode
    empty_txt, empty_js = _write(tmp_path / "e.txt", ""), _write(tmp_path / "e.jsonl", "")
    blank_js = _write(tmp_path / "blank.jsonl", "\n \n")
    assert read([empty_txt, empty_js, blank_js]) == [""]
    assert read([empty_txt], txt_mode="line") == []
    assert read([_write(tmp_path / "nl.txt", "\n\n\n")], txt_mode="paragraph") == []
    # JSON lines that newer datasets would read as agent traces stay plain text records
    trace = _write(tmp_path / "t.jsonl", '{"type": "a", "message": {"k": 1}, "text": "hi"}\n')
    assert read([trace]) == ["hi"]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', r"bad\.jsonl:2: not valid JSON"),
        ("nofield.jsonl", '{"body": "x"}\n', r"nofield\.jsonl:1: no field 'text'"),
        ("some.jsonl", '{"text": "a"}\n\n{"body": "x"}\n', r"some\.jsonl:3: no field 'text'"),
        ("num.jsonl", '{"text": 3}\n', r"num\.jsonl:1: field 'text' holds int"),
        ("mixed.jsonl", '{"text": "a"}\n{"text": 3}\n', r"mixed\.jsonl:2: field 'text' holds int"),
        ("list.jsonl", '{"text": "a"}\n["b"]\n', r"list\.jsonl:2: no field 'text'"),
        ("corpus.csv", "a,b\n", r"expected a \.txt or \.jsonl"),
    ],
)
def test_read_documents_errors_name_file_and_line(
    tmp_path: Path, name: str, content: str, match: str
) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(LensfeedError, match=match):
        T.read_documents([path], cache_dir=tmp_path / "cache")


def test_read_documents_other_errors(tmp_path: Path) -> None:
    with pytest.raises(LensfeedError, match=r"corpus file not found: .*missing\.txt"):
        T.read_documents([tmp_path / "missing.txt"])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(LensfeedError, match=r"latin1\.txt: cannot read: UnicodeDecodeError"):
        T.read_documents([latin1], cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="--txt-docs"):
        T.read_documents([latin1], txt_mode="sentence")


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

    # datasets' Arrow copy of the corpus and the intermediate files are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "ds"]

    with pytest.raises(LensfeedError, match="already exists"):
        T.tokenize_corpus([corpus], out, seq_len=16)
    again = T.tokenize_corpus([corpus], out, seq_len=8, overwrite=True)
    assert again.rows == len(stream) // 8


def test_tokenize_in_batches_and_processes_equals_one_batch(tmp_path: Path) -> None:
    docs = [f"text number {i} " * 3 for i in range(50)]
    tok = T.ByteTokenizer()
    stream = np.frombuffer(b"".join(d.encode() + b"\0" for d in docs), dtype=np.uint8)
    expected = stream[: len(stream) // 8 * 8].reshape(-1, 8)
    for name, kw in [("one", {}), ("batches", {"batch_size": 3}), ("procs", {"num_proc": 2})]:
        info = T.write_packed(iter(docs), tmp_path / name, tokenizer=tok, seq_len=8, **kw)
        ids = datasets.load_from_disk(str(tmp_path / name)).with_format("numpy")["input_ids"][:]
        assert np.array_equal(np.asarray(ids), expected), name
        assert (info.rows, info.documents) == (len(expected), 50)
        assert info.dropped_tokens == len(stream) % 8


def test_tokenize_refuses_a_corpus_shorter_than_one_row(tmp_path: Path) -> None:
    corpus = _write(tmp_path / "tiny.txt", "hi")
    with pytest.raises(LensfeedError, match="fewer than one row"):
        T.tokenize_corpus([corpus], tmp_path / "out", seq_len=64)
    assert not (tmp_path / "out").exists()
    empty = _write(tmp_path / "empty.jsonl", "")
    with pytest.raises(LensfeedError, match="has 0 tokens, fewer than one row"):
        T.tokenize_corpus([empty], tmp_path / "out", seq_len=64)
    with pytest.raises(ConfigError, match="seq-len"):
        T.tokenize_corpus([corpus], tmp_path / "out", seq_len=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "tiny.txt"]


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
    bad = _write(tmp_path / "bad.jsonl", '{"body": "x"}\n')
    assert cli_main(["tokenize", str(bad), "-o", str(tmp_path / "x")]) == 1
    assert cli_main(["tokenize", str(corpus), "-o", str(out), "--seq-len", "32"]) == 1  # exists
    code = cli_main(
        ["tokenize", str(corpus), "-o", str(out), "--seq-len", "16", "--num-proc", "2"]
        + ["--overwrite"]
    )
    assert code == 0
    assert "rows x 16 tokens" in capsys.readouterr().out


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
    with pytest.raises(ConfigError, match=r"--eos-id 5 is not a token of .*ids are 0..4"):
        T.load_tokenizer(str(tmp_path / "tok"), eos_id=5)
