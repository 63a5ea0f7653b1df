"""The data pipeline: sources, cleaning, prepare (shards + index + val.txt), TokenShards, PackedLoader.

Tokenizers here are small stand-ins for the protocol (`encode_batch`, `eos_token_id`, `vocab_size`).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lmforge.atomic
from lmforge.data import (
    Document,
    PackedLoader,
    TokenShards,
    clean_documents,
    iter_documents,
    position_ids,
    prepare,
    sequential_batches,
    split_indices,
)
from lmforge.data import shards as shards_module
from lmforge.errors import LmforgeError


# --- Stand-in tokenizers -------------------------------------------------------------------------------
class ByteTokenizer:
    """ids = UTF-8 bytes, EOS 256."""

    eos_token_id = 256
    vocab_size = 257

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8")


class WideByteTokenizer(ByteTokenizer):
    """Bytes shifted above 65535, so that ids need uint32."""

    eos_token_id = 69_999
    vocab_size = 70_000
    OFFSET = 65_536

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[b + self.OFFSET for b in t.encode("utf-8")] for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.OFFSET for i in ids).decode("utf-8")


class NumberTokenizer:
    """ "3 4 5" -> [3, 4, 5]: lets a test build a stream whose windows are all different."""

    eos_token_id = 9_999
    vocab_size = 10_000

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[int(w) for w in t.split()] for t in texts]


def split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """A token stream -> the documents in it; asserts the stream ends with EOS."""
    assert len(tokens) and tokens[-1] == eos
    out, cur = [], []
    for t in tokens.tolist():
        if t == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


def raw_split(data_dir: Path, split: str) -> np.ndarray:
    """A split's tokens read straight from the shard files named in index.json (not through TokenShards)."""
    index = json.loads((data_dir / "index.json").read_text())
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    parts = [np.fromfile(data_dir / s["file"], dtype=dtype) for s in index["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


DOCS = [f"document {i}: café ☕ naïve {'x' * (i % 7)} end" for i in range(30)]


def write_corpus(root: Path, docs: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return root


# --- prepare: shards, index, val.txt ---------------------------------------------------------------
def test_prepare_shards_decode_to_cleaned_documents(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", [*DOCS, DOCS[0], "line one\r\nline two\x07"])
    out = tmp_path / "data"
    tok = ByteTokenizer()
    report = prepare([str(corpus)], tok, out, val_fraction=0.2, seed=3, shard_tokens=100, progress=False)
    expected = [*DOCS, "line one\nline two"]  # the duplicate dropped, CRLF and BEL cleaned

    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "lmforge-tokens-v1"
    assert index["dtype"] == "uint16" and index["vocab_size"] == 257 and index["eos_token_id"] == 256
    assert index["clean"]["removed_documents"]["exact_duplicate"] == 1

    decoded: dict[str, list[str]] = {}
    for split in ("train", "val"):
        info = index["splits"][split]
        tokens = raw_split(out, split)
        assert len(tokens) == info["tokens"] == sum(s["tokens"] for s in info["shards"])
        assert all(s["tokens"] == 100 for s in info["shards"][:-1])  # full shards but the last
        docs = [tok.decode(d) for d in split_docs(tokens, tok.eos_token_id)]
        assert len(docs) == info["documents"] == sum(s["documents"] for s in info["shards"])
        assert info["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
        # Input order is kept within a split.
        assert docs == [d for d in expected if d in docs]
        decoded[split] = docs
    assert len(index["splits"]["train"]["shards"]) > 1
    assert sorted(decoded["train"] + decoded["val"]) == sorted(expected)
    assert len(decoded["val"]) == round(len(expected) * 0.2)
    assert (out / "val.txt").read_bytes() == "\n".join(decoded["val"]).encode("utf-8")

    assert report.tokens == index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"]
    assert report.bytes == sum(len(d.encode("utf-8")) for d in expected)
    assert report.splits["val"].bytes_per_token == pytest.approx(
        index["splits"]["val"]["bytes"] / index["splits"]["val"]["tokens"]
    )
    text = report.format()
    assert "train" in text and "val" in text and "exact duplicate" in text and f"{report.tokens:,}" in text


def test_uint32_shards_for_large_vocab(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", DOCS[:5])
    out = tmp_path / "data"
    tok = WideByteTokenizer()
    prepare([str(corpus)], tok, out, val_fraction=0.0, progress=False)
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint32"
    shard = out / index["splits"]["train"]["shards"][0]["file"]
    assert shard.stat().st_size == 4 * index["splits"]["train"]["tokens"]
    ts = TokenShards(out, "train")
    stream = ts.read(0, ts.num_tokens)
    assert stream.dtype == np.int64 and stream.max() == tok.eos_token_id
    assert [tok.decode(d) for d in split_docs(stream, tok.eos_token_id)] == DOCS[:5]


def test_split_is_seeded_and_keeps_one_val_document() -> None:
    assert split_indices(2, 0.01, 0)[1] != [] and len(split_indices(2, 0.01, 0)[1]) == 1
    assert split_indices(1, 0.5, 0) == ([0], [])
    assert split_indices(10, 0.0, 0) == (list(range(10)), [])
    train, val = split_indices(100, 0.1, seed=1)
    assert (train, val) == split_indices(100, 0.1, seed=1)
    assert val != split_indices(100, 0.1, seed=2)[1]
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    with pytest.raises(LmforgeError, match="val_fraction"):
        split_indices(10, 1.0, 0)


def test_prepare_shows_progress_and_reruns_replace_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = write_corpus(tmp_path / "corpus", DOCS[:6])
    out = tmp_path / "data"
    prepare([str(corpus)], ByteTokenizer(), out, progress=True)
    err = capsys.readouterr().err
    assert "tokenize" in err and "doc/s" in err and "tok_per_s" in err
    (corpus / "doc000.txt").unlink()
    report = prepare([str(corpus)], ByteTokenizer(), out, progress=False)
    assert report.documents == 5 and json.loads((out / "index.json").read_text())["clean"]["kept_documents"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "data"]  # no temp or old dirs left


def test_prepare_never_reads_its_own_output(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path, DOCS[:6])
    first = prepare([str(corpus)], ByteTokenizer(), tmp_path / "data", progress=False)
    second = prepare([str(corpus)], ByteTokenizer(), tmp_path / "data", progress=False)
    assert first.clean.input_documents == second.clean.input_documents == 6


def test_prepare_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", DOCS[:3])
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.md").write_text("keep me")
    with pytest.raises(LmforgeError, match="will not replace"):
        prepare([str(corpus)], ByteTokenizer(), foreign, progress=False)
    assert (foreign / "notes.md").read_text() == "keep me"


def test_prepare_failure_leaves_old_output_and_no_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_corpus(tmp_path / "corpus", DOCS)
    out = tmp_path / "data"
    prepare([str(corpus)], ByteTokenizer(), out, shard_tokens=200, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_write = shards_module._ShardWriter.write
    calls = {"n": 0}

    def failing_write(self, *args, **kwargs):  # fail after some shards are already on disk
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(shards_module, "ENCODE_BATCH_DOCS", 4)
    monkeypatch.setattr(shards_module._ShardWriter, "write", failing_write)
    (corpus / "new.txt").write_text("a new document")
    with pytest.raises(RuntimeError, match="disk full"):
        prepare([str(corpus)], ByteTokenizer(), out, shard_tokens=200, progress=False)
    assert calls["n"] == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "data"]

    calls["n"] = 0  # a first run that fails creates nothing at all
    with pytest.raises(RuntimeError):
        prepare([str(corpus)], ByteTokenizer(), tmp_path / "fresh", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "data"]


def test_failed_swap_restores_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_corpus(tmp_path / "corpus", DOCS[:4])
    out = tmp_path / "data"
    prepare([str(corpus)], ByteTokenizer(), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def exchange(a, b):  # the swap of the new output for the old one fails
        raise OSError("rename failed")

    monkeypatch.setattr(lmforge.atomic, "exchange", exchange)
    with pytest.raises(OSError, match="rename failed"):
        prepare([str(corpus)], ByteTokenizer(), out, val_fraction=0.5, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "data"]


def test_prepare_rejects_out_of_range_ids_and_empty_corpus(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", DOCS[:3])

    class TooSmall(ByteTokenizer):
        vocab_size = 200  # bytes of "é" and "☕" are >= 200

        eos_token_id = 0

    with pytest.raises(LmforgeError, match="outside"):
        prepare([str(corpus)], TooSmall(), tmp_path / "data", progress=False)
    with pytest.raises(LmforgeError, match="no documents left"):
        prepare([str(corpus)], ByteTokenizer(), tmp_path / "data", min_chars=10_000, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


# --- Cleaning ------------------------------------------------------------------------------------------
def test_unicode_normalization() -> None:
    text = "cafe\u0301 \ufb01 \u2460"  # e + combining acute, the fi ligature, circled 1
    assert clean_documents([text], normalize="NFC")[0] == ["caf\u00e9 \ufb01 \u2460"]
    assert clean_documents([text], normalize="NFKC")[0] == ["caf\u00e9 fi 1"]
    assert clean_documents([text], normalize="none")[0] == [text]
    with pytest.raises(LmforgeError, match="NFKC"):
        clean_documents([text], normalize="NFKD")


def test_control_characters_and_line_endings() -> None:
    kept, _ = clean_documents(["a\x00b\x07c\td\r\ne\x7f\x85f\rg\x0c\ud800h"])
    assert kept == ["abc\td\nef\ngh"]


def test_exact_dedup_after_cleaning() -> None:
    docs = ["one\r\ntwo", "three", "one\ntwo", "three", "three"]
    kept, report = clean_documents(docs)
    assert kept == ["one\ntwo", "three"]
    assert report.removed_documents["exact_duplicate"] == 3
    assert report.removed_bytes["exact_duplicate"] == len("one\ntwo") + 2 * len("three")
    assert report.kept_documents == 2 and report.kept_bytes == len("one\ntwo") + len("three")
    assert report.input_documents == 5
    assert "removed 3 exact duplicate" in report.format()
    assert clean_documents(docs, dedup=False)[0] == ["one\ntwo", "three", "one\ntwo", "three", "three"]


def test_near_dedup_removes_near_copy_keeps_distinct() -> None:
    pytest.importorskip("datasketch", reason="near-dedup needs datasketch (extra lmforge[data])")
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(2000)]
    base = rng.choice(vocab, 300).tolist()
    near = list(base)
    near[150] = "changed"  # one word: ~5 of ~296 shingles differ
    other = rng.choice(vocab, 300).tolist()
    docs = [" ".join(base), " ".join(near), " ".join(other)]
    kept, report = clean_documents(docs, near_dedup=True)
    assert kept == [docs[0], docs[2]]
    assert report.removed_documents["near_duplicate"] == 1
    assert clean_documents(docs, near_dedup=False)[0] == docs


def test_length_filters() -> None:
    docs = ["", "  \n ", "abc", "abcdefgh", "abcdefghijklmnop"]
    kept, report = clean_documents(docs, min_chars=5, max_chars=10)
    assert kept == ["abcdefgh"]
    assert report.removed_documents["too_short"] == 3 and report.removed_documents["too_long"] == 1
    assert clean_documents(docs)[0] == ["abc", "abcdefgh", "abcdefghijklmnop"]  # whitespace-only counts as empty


def test_missing_optional_packages_name_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasketch", None)  # makes `import datasketch` raise ImportError
    with pytest.raises(LmforgeError, match="pip install datasketch"):
        clean_documents(["a"], near_dedup=True)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(LmforgeError, match=r"pip install pyarrow.*lmforge\[data\]"):
        list(iter_documents([str(tmp_path / "t.parquet")]))


# --- Sources ---------------------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "sub" / "b.py").write_text("B")
    (tmp_path / "sub" / "notes.md").write_text("N")
    (tmp_path / "sub" / "deeper" / "c.py").write_text("C")
    (tmp_path / ".git" / "config.py").write_text("hidden")
    return tmp_path


def test_directory_recursion_and_include(tree: Path) -> None:
    assert [d.text for d in iter_documents([str(tree)])] == ["A", "B", "N", "C"]
    docs = list(iter_documents([str(tree)], include=["*.py"]))
    assert [d.text for d in docs] == ["B", "C"]
    assert docs[1].source == str(tree / "sub" / "deeper" / "c.py")
    # A file named twice (directly and through its directory) is read once.
    assert [d.text for d in iter_documents([str(tree / "a.txt"), str(tree)], include=["*.txt"])] == ["A"]


def test_glob_pattern(tree: Path) -> None:
    assert [d.text for d in iter_documents([str(tree / "**" / "*.py")])] == ["B", "C"]
    assert [d.text for d in iter_documents([str(tree / "su*")], include=["*.md"])] == ["N"]


def test_jsonl_text_field_and_gzip(tmp_path: Path) -> None:
    lines = [json.dumps({"id": i, "content": f"row {i}"}) for i in range(3)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:2]) + "\n\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(lines[2] + "\n")
    docs = list(iter_documents([str(tmp_path)], text_field="content"))
    assert [d.text for d in docs] == ["row 0", "row 1", "row 2"]
    assert docs[1].source == f"{tmp_path / 'a.jsonl'}:2"
    with pytest.raises(LmforgeError, match=r"a\.jsonl:1: no 'text' field .*'content'"):
        list(iter_documents([str(tmp_path)]))
    with pytest.raises(LmforgeError, match=r"a\.jsonl:1: field 'id' is int"):
        list(iter_documents([str(tmp_path)], text_field="id"))


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": \n')
    stream = iter_documents([str(path)])
    assert next(stream).text == "ok"
    with pytest.raises(LmforgeError, match=r"bad\.jsonl:3: malformed JSON"):
        list(stream)


def test_binary_and_non_utf8_files_are_skipped_and_reported(tmp_path: Path) -> None:
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "nul.dat").write_bytes(b"valid utf-8\x00with a NUL")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("\ufefffine")  # a BOM is dropped
    stream = iter_documents([str(tmp_path)])
    kept, report = clean_documents(stream)
    assert kept == ["fine"]
    assert sorted(Path(s.path).name for s in stream.skipped) == ["img.png", "latin1.txt", "nul.dat"]
    assert report.skipped_files == 3 and report.skipped_bytes == 16 + 4 + 22
    assert "skipped 3 binary" in report.format()


def test_nothing_matched_says_what_was_searched(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("A")
    with pytest.raises(LmforgeError, match=r"no input files found: searched .*\*\.rs.* matching \['\*\.py'\]"):
        iter_documents([str(tmp_path), str(tmp_path / "*.rs")], include=["*.py"])
    with pytest.raises(LmforgeError, match="does not exist"):
        iter_documents([str(tmp_path / "missing.txt")])


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="parquet input needs pyarrow (extra lmforge[data])")
    import pyarrow.parquet as pq

    table = pa.table({"body": ["first", "second", "third"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    docs = list(iter_documents([str(tmp_path / "t.parquet")], text_field="body"))
    assert [d.text for d in docs] == ["first", "second", "third"]
    with pytest.raises(LmforgeError, match="no column 'text'.*body"):
        list(iter_documents([str(tmp_path / "t.parquet")]))
    with pytest.raises(LmforgeError, match="expected a string column"):
        list(iter_documents([str(tmp_path / "t.parquet")], text_field="n"))


# --- TokenShards ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def number_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train split of 30 documents of distinct numbers (so no two windows are equal), in shards of 37."""
    corpus = tmp_path_factory.mktemp("numbers")
    start = 0
    for i in range(30):
        n = 3 + (i * 7) % 11  # 3..13 tokens: documents shorter and longer than the windows below
        (corpus / f"d{i:02d}.txt").write_text(" ".join(str(k) for k in range(start, start + n)))
        start += n
    out = corpus / "data"
    prepare([str(corpus)], NumberTokenizer(), out, val_fraction=0.0, shard_tokens=37, progress=False)
    return out


def test_token_shards_read_across_shards(number_data: Path) -> None:
    ts = TokenShards(number_data)
    raw = raw_split(number_data, "train")
    assert ts.num_tokens == len(raw) and ts.num_documents == 30 and len(ts._maps) > 3
    assert ts.vocab_size == 10_000 and ts.eos_token_id == 9_999 and ts.dtype == np.dtype("<u2")
    assert np.array_equal(ts.read(0, ts.num_tokens), raw)
    assert np.array_equal(ts.read(30, 50), raw[30:80])  # spans shards 0, 1 and 2
    assert ts.read(37, 0).shape == (0,)
    with pytest.raises(IndexError):
        ts.read(ts.num_tokens - 1, 2)
    assert ts.num_bytes == json.loads((number_data / "index.json").read_text())["splits"]["train"]["bytes"]


def test_token_shards_errors(number_data: Path, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="does not exist.*lmforge prepare"):
        TokenShards(tmp_path / "nope")
    with pytest.raises(LmforgeError, match="no index.json"):
        TokenShards(tmp_path)
    with pytest.raises(LmforgeError, match="no split 'valid'.*Did you mean: val"):
        TokenShards(number_data, "valid")
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in number_data.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    shard = copy / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(LmforgeError, match="train-00001.bin has 72 bytes.*37 uint16 tokens"):
        TokenShards(copy)
    shard.unlink()
    with pytest.raises(LmforgeError, match="train-00001.bin listed in index.json is missing"):
        TokenShards(copy)


# --- PackedLoader ----------------------------------------------------------------------------------------------
def window_index(ts: TokenShards, seq_len: int) -> dict[bytes, int]:
    """Window contents -> window number, for identifying the windows in a batch."""
    n = (ts.num_tokens - 1) // seq_len
    index = {ts.read(i * seq_len, seq_len + 1).tobytes(): i for i in range(n)}
    assert len(index) == n  # all windows distinct, so identification is unambiguous
    return index


def windows_of(batch: dict[str, torch.Tensor], index: dict[bytes, int]) -> list[int]:
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy()
    return [index[row.tobytes()] for row in full]


def test_loader_shapes_and_shifted_labels(number_data: Path) -> None:
    ts = TokenShards(number_data)
    loader = PackedLoader(ts, batch_size=3, seq_len=8)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 8)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    index = window_index(ts, 8)
    for row, w in zip(batch["input_ids"], windows_of(batch, index), strict=True):
        assert torch.equal(row, torch.from_numpy(ts.read(w * 8, 8)))  # inputs start at window * seq_len


def test_every_window_once_per_epoch_in_seeded_order(number_data: Path) -> None:
    ts = TokenShards(number_data)
    loader = PackedLoader(ts, batch_size=4, seq_len=8, seed=5)
    w = loader.windows_per_epoch
    assert w == (ts.num_tokens - 1) // 8 and w % 4 != 0  # batches straddle the epoch end
    index = window_index(ts, 8)
    seen: list[int] = []
    while len(seen) < 3 * w:
        seen += windows_of(next(loader), index)
    epochs = [seen[e * w : (e + 1) * w] for e in range(3)]
    for e, order in enumerate(epochs):
        assert sorted(order) == list(range(w))
        assert order == np.random.default_rng((5, e)).permutation(w).tolist()
    assert epochs[0] != epochs[1] != epochs[2]
    assert (loader.epoch, loader.position) == divmod(len(seen), w)
    ordered = PackedLoader(ts, batch_size=4, seq_len=8, shuffle=False)
    assert windows_of(next(ordered), index) + windows_of(next(ordered), index) == list(range(8))


@pytest.mark.parametrize("k", [5, 9, 14])  # mid-epoch, just before the epoch end, in epoch 1
def test_exact_resume(number_data: Path, k: int) -> None:
    ts = TokenShards(number_data)
    make = lambda: PackedLoader(ts, batch_size=4, seq_len=8, seed=1, mask_documents=True)  # noqa: E731
    uninterrupted = make()
    reference = [next(uninterrupted) for _ in range(k + 6)]
    first = make()
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    resumed = make()
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (first.epoch, first.position)
    for expected in reference[k:]:
        got = next(resumed)
        assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert (resumed.epoch, resumed.position) == (uninterrupted.epoch, uninterrupted.position)
    assert uninterrupted.epoch >= 1  # the compared batches reached the next epoch


def test_resume_with_other_settings_raises(number_data: Path, tmp_path: Path) -> None:
    ts = TokenShards(number_data)
    loader = PackedLoader(ts, batch_size=4, seq_len=8, seed=1)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(LmforgeError, match="batch_size was 4, now 2"):
        PackedLoader(ts, batch_size=2, seq_len=8, seed=1).load_state_dict(state)
    with pytest.raises(LmforgeError, match="seed was 1, now 2.*seq_len|seq_len.*seed"):
        PackedLoader(ts, batch_size=4, seq_len=9, seed=2).load_state_dict(state)
    other = prepare(
        [str(number_data.parent / "d00.txt")], NumberTokenizer(), tmp_path / "d", val_fraction=0, progress=False
    )
    small = PackedLoader(TokenShards(tmp_path / "d"), batch_size=4, seq_len=2, seed=1)
    with pytest.raises(LmforgeError, match="num_tokens"):
        small.load_state_dict({**state, "seq_len": 2})
    assert other.tokens == small.shards.num_tokens


def test_position_ids_reset_after_eos(number_data: Path) -> None:
    e = 9
    ids = np.array([[5, 6, e, 7, 8, e, e, 1], [e, 1, 2, 3, 4, 5, 6, 7]])
    assert position_ids(ids, e).tolist() == [[0, 1, 2, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5, 6]]
    ts = TokenShards(number_data)
    batch = next(PackedLoader(ts, batch_size=16, seq_len=8, mask_documents=True))
    ids, pos = batch["input_ids"], batch["position_ids"]
    assert pos.shape == ids.shape and pos.dtype == torch.int64
    eos_inside = ids[:, :-1] == ts.eos_token_id
    assert eos_inside.any()  # the check below is not vacuous
    assert (pos[:, 0] == 0).all()
    expected_next = torch.where(eos_inside, torch.zeros_like(pos[:, 1:]), pos[:, :-1] + 1)
    assert torch.equal(pos[:, 1:], expected_next)


def test_too_few_tokens_error(number_data: Path) -> None:
    ts = TokenShards(number_data)
    with pytest.raises(LmforgeError, match=rf"has {ts.num_tokens:,} tokens.*shorter seq_len"):
        PackedLoader(ts, batch_size=1, seq_len=ts.num_tokens)
    assert PackedLoader(ts, batch_size=1, seq_len=ts.num_tokens - 1).windows_per_epoch == 1


def test_sequential_batches_cover_all_windows(number_data: Path) -> None:
    ts = TokenShards(number_data)
    batches = list(sequential_batches(ts, batch_size=5, seq_len=8))
    n = (ts.num_tokens - 1) // 8
    assert [len(b["input_ids"]) for b in batches] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    assert n % 5  # the last batch is a smaller one
    index = window_index(ts, 8)
    assert [w for b in batches for w in windows_of(b, index)] == list(range(n))


def test_document_objects_and_strings_both_clean() -> None:
    kept, report = clean_documents([Document("x\r\ny", "a.txt"), "x\ny"])
    assert kept == ["x\ny"] and report.removed_documents["exact_duplicate"] == 1
