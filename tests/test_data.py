"""Data pipeline: raw documents -> token shards -> packed batches."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from forgeline.data import (
    PackedTokenLoader,
    check_tokenizer,
    iter_documents,
    load_index,
    prepare_dataset,
    resolve_inputs,
    token_dtype,
)
from forgeline.data import shards as shards_module
from forgeline.data import sources as sources_module
from forgeline.errors import ConfigError, DataError
from forgeline.tokenizer import Tokenizer, train_bpe

WORDS = (
    "the a little girl boy dog cat ran jumped over under happy sad tree house river sun moon played with friend "
    "café naïve über déjà vu 東京 🙂 big small red blue green day night saw found said looked"
).split()


def make_docs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 40) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        docs.append(f"Story {i}: " + " ".join(words) + ".")
    return docs


def write_text(path: Path, docs: list[str], sep: str = "\n\n") -> Path:
    path.write_text(sep.join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_parquet(path: Path, docs: list[str], column: str = "text", row_group_size: int = 7) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: docs, "n": list(range(len(docs)))}), path, row_group_size=row_group_size)
    return path


def read_split(directory: Path, index: dict, split: str) -> np.ndarray:
    dtype = np.dtype("<u2") if index["dtype"] == "uint16" else np.dtype("<u4")
    parts = [np.fromfile(directory / s["file"], dtype=dtype) for s in index["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


@pytest.fixture(scope="session")
def tok(tmp_path_factory) -> Tokenizer:
    """A small byte-level BPE trained in well under a second, so the tests need no shared data."""
    root = tmp_path_factory.mktemp("tok")
    corpus = write_text(root / "corpus.txt", make_docs(400, seed=123))
    return train_bpe([corpus], vocab_size=400, output_dir=root / "tokenizer", show_progress=False)


@pytest.fixture
def prepare(tok, tmp_path):
    """prepare_dataset with test defaults: quiet, into tmp_path/"ds"."""

    def run(inputs, output_dir=None, **kwargs):
        kwargs.setdefault("tokenizer", tok)
        kwargs.setdefault("show_progress", False)
        return prepare_dataset(inputs, output_dir=output_dir or tmp_path / "ds", **kwargs)

    return run


@pytest.fixture
def stream_dataset(prepare, tmp_path):
    """A train-only dataset of 300 documents in several shards, plus the full token stream for comparison."""
    docs = make_docs(300, seed=5)
    index = prepare(write_text(tmp_path / "docs.txt", docs), val_fraction=0.0, shard_tokens=997)
    directory = Path(index["dir"])
    return directory, read_split(directory, index, "train").astype(np.int64)


# ----------------------------------------------------------------------------------------------------- sources


def test_text_split_on_separator_drops_blank_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first para\nline two\n\n\n\nsecond\n\n   \n\n  indented third\n", encoding="utf-8")
    assert list(iter_documents(path)) == ["first para\nline two", "second", "  indented third"]
    crlf = tmp_path / "b.md"
    crlf.write_bytes(b"one\r\n\r\ntwo\r\nstill two\r\n")
    assert list(iter_documents(crlf)) == ["one", "two\nstill two"]
    stories = tmp_path / "stories.txt"
    stories.write_text("Once.\n<|endoftext|>\nTwice.\n<|endoftext|>\n", encoding="utf-8")
    assert list(iter_documents(stories, text_separator="<|endoftext|>")) == ["Once.", "Twice."]


def test_text_is_streamed_in_chunks_with_separators_across_chunk_boundaries(tmp_path, monkeypatch):
    docs = make_docs(60, seed=1)
    path = write_text(tmp_path / "s.txt", docs, sep="<|endoftext|>")
    monkeypatch.setattr(sources_module, "_CHUNK_CHARS", 7)  # separators straddle chunks everywhere
    assert list(iter_documents(path, text_separator="<|endoftext|>")) == docs
    short = tmp_path / "short.txt"
    short.write_text("ab<|endoftext|>cd\n<|endoftext|>e<|endoftext|>", encoding="utf-8")
    for size in range(1, 20):
        monkeypatch.setattr(sources_module, "_CHUNK_CHARS", size)
        assert list(iter_documents(short, text_separator="<|endoftext|>")) == ["ab", "cd", "e"], size
    one_doc = tmp_path / "one.txt"
    one_doc.write_text("x" * 1000, encoding="utf-8")
    assert list(iter_documents(one_doc)) == ["x" * 1000]


def test_text_is_not_read_whole(tmp_path, monkeypatch):
    path = write_text(tmp_path / "big.txt", make_docs(3000))
    opened = []

    def spy(p):
        opened.append(open(p, "rb"))
        return opened[-1]

    monkeypatch.setattr(sources_module, "_open_binary", spy)
    monkeypatch.setattr(sources_module, "_CHUNK_CHARS", 1000)
    docs = iter_documents(path)
    assert next(docs).startswith("Story 0:")
    assert opened[0].tell() < path.stat().st_size / 10


def test_jsonl_json_parquet_and_gzip(tmp_path):
    docs = make_docs(20)
    jsonl = write_jsonl(tmp_path / "d.jsonl", docs, field="body")
    jsonl.write_text("\n" + jsonl.read_text() + "\n   \n", encoding="utf-8")  # blank lines are skipped
    assert list(iter_documents(jsonl, text_field="body")) == docs

    records = [{"text": d} for d in docs]
    (tmp_path / "a.json").write_text(json.dumps(records), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"version": 2, "data": records}), encoding="utf-8")
    assert list(iter_documents(tmp_path / "a.json")) == docs
    assert list(iter_documents(tmp_path / "b.json")) == docs

    parquet = write_parquet(tmp_path / "d.parquet", docs, column="content")
    assert list(iter_documents(parquet, text_field="content")) == docs

    with gzip.open(tmp_path / "z.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert list(iter_documents(tmp_path / "z.jsonl.gz")) == docs


def test_directories_and_globs_expand_to_sorted_files(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    write_text(root / "b.txt", ["B"])
    write_jsonl(root / "a.jsonl", ["A"])
    write_text(root / "sub" / "c.txt", ["C"])
    write_text(root / ".hidden.txt", ["H"])
    assert list(iter_documents(root)) == ["A", "B", "C"]
    assert list(iter_documents(str(root / "*.txt"))) == ["B"]
    assert [p.name for p in resolve_inputs([root / "sub" / "c.txt", root / "b.txt"])] == ["c.txt", "b.txt"]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.txt", None, r"missing\.txt: no such file"),
        ("empty.txt", b"", r"empty\.txt: file is empty"),
        ("blank.txt", b"  \n\n \n", r"blank\.txt: file holds no documents"),
        ("bad.txt", b"ok line\n\nsecond\n\xff\xfe bad\n", r"bad\.txt:4: invalid UTF-8"),
        ("bad.jsonl", b'{"text": "a"}\n\n{"text": "\xc3("}\n', r"bad\.jsonl:3: invalid UTF-8"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": "b"\n', r"broken\.jsonl:2: malformed JSON"),
        ("field.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"field\.jsonl:2: missing field 'text' \(fields present: 'body'\)"),
        ("type.jsonl", b'{"text": 3}\n', r"type\.jsonl:1: field 'text' must be a string, got int"),
        ("list.jsonl", b'["text"]\n', r"list\.jsonl:1: expected a JSON object"),
        ("top.json", b'{"a": 1, "b": 2}', r"top\.json: expected a top-level array"),
        ("rec.json", b'[{"text": "a"}, {"txt": "b"}]', r"rec\.json: record 1: missing field 'text'"),
        ("syntax.json", b'[\n{"text": "a"},\n{oops}\n]', r"syntax\.json:3: malformed JSON"),
        ("bad.json", b'[\n{"text": "\xff"}]', r"bad\.json:2: invalid UTF-8"),
        ("junk.parquet", b"not parquet at all", r"junk\.parquet: not a readable Parquet file"),
    ],
)
def test_source_errors_name_file_and_line(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        list(iter_documents(path))


def test_non_utf8_line_is_found_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_module, "_CHUNK_CHARS", 5)
    path = tmp_path / "late.txt"
    path.write_bytes("ünïcödé\n".encode() * 30 + b"fine\nbroken \xe2\x82 here\n")
    with pytest.raises(DataError, match=r"late\.txt:32: invalid UTF-8") as err:
        list(iter_documents(path))
    assert err.value.line == 32 and err.value.path == str(path)


def test_parquet_missing_column_lists_the_columns(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", ["a", "b"], column="content")
    with pytest.raises(DataError, match=r"d\.parquet: Parquet file has no column 'text' \(columns: 'content', 'n'\)"):
        list(iter_documents(path))
    with pytest.raises(DataError, match="has type int64, expected a string column"):
        list(iter_documents(path, text_field="n"))


def test_missing_inputs(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="input directory holds no files"):
        list(iter_documents(tmp_path / "empty_dir"))
    with pytest.raises(DataError, match="glob pattern matches no files"):
        list(iter_documents(str(tmp_path / "*.nothing")))
    with pytest.raises(ConfigError, match="no input files"):
        list(iter_documents([]))


# ------------------------------------------------------------------------------------------------------ shards


def test_index_contents_and_self_describing_tokenizer(prepare, tok, tmp_path):
    docs = make_docs(200, seed=2)
    index = prepare(write_jsonl(tmp_path / "d.jsonl", docs), val_fraction=0.1, shard_tokens=1000, seed=7)
    directory = tmp_path / "ds"
    assert index == {**json.loads((directory / "index.json").read_text()), "dir": str(directory)}
    assert index["format"] == "forgeline-token-shards" and index["version"] == 1
    assert index["dtype"] == "uint16"
    assert (index["vocab_size"], index["eos_id"], index["bos_id"]) == (tok.vocab_size, tok.eos_id, tok.bos_id)
    assert index["tokenizer_fingerprint"] == tok.fingerprint
    assert (index["text_field"], index["text_separator"], index["val_fraction"], index["seed"]) == ("text", "\n\n", 0.1, 7)

    train, val = index["splits"]["train"], index["splits"]["val"]
    assert train["documents"] + val["documents"] == len(docs)
    assert train["bytes"] + val["bytes"] == sum(len(d.encode()) for d in docs)
    assert 5 <= val["documents"] <= 40
    expected_tokens = sum(len(tok.encode(d, add_eos=True)) for d in docs)
    assert train["tokens"] + val["tokens"] == expected_tokens
    for split in (train, val):
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
        assert split["documents"] == sum(s["documents"] for s in split["shards"])
        assert split["bytes"] == sum(s["bytes"] for s in split["shards"])
        assert all(s["tokens"] == 1000 for s in split["shards"][:-1])
        for s in split["shards"]:
            assert (directory / s["file"]).stat().st_size == 2 * s["tokens"]
    assert [s["file"] for s in train["shards"]][:2] == ["train_00000.bin", "train_00001.bin"]
    eos_in_train = int((read_split(directory, index, "train") == tok.eos_id).sum())
    assert eos_in_train == train["documents"]

    copy = Tokenizer.load(directory / "tokenizer")
    assert copy.fingerprint == tok.fingerprint
    assert load_index(directory) == index
    check_tokenizer(index, copy)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_roundtrip_decode_reproduces_documents(prepare, tok, tmp_path):
    docs = make_docs(50, seed=3)
    index = prepare(write_text(tmp_path / "d.txt", docs), val_fraction=0.0, shard_tokens=300)
    stream = read_split(tmp_path / "ds", index, "train")
    expected = [i for d in docs for i in tok.encode(d, add_eos=True)]
    assert stream.tolist() == expected
    assert tok.decode(stream.tolist()) == "".join(d + "<|endoftext|>" for d in docs)
    assert index["splits"]["val"] == {"tokens": 0, "documents": 0, "bytes": 0, "shards": []}


def test_mixed_inputs_in_order(prepare, tok, tmp_path):
    a, b, c = make_docs(10, seed=10), make_docs(10, seed=11), make_docs(10, seed=12)
    inputs = [write_text(tmp_path / "a.txt", a), write_jsonl(tmp_path / "b.jsonl", b), write_parquet(tmp_path / "c.parquet", c)]
    index = prepare(inputs, val_fraction=0.0)
    assert index["inputs"] == [str(p) for p in inputs]
    stream = read_split(tmp_path / "ds", index, "train")
    assert stream.tolist() == [i for d in a + b + c for i in tok.encode(d, add_eos=True)]


def test_val_split_is_deterministic_and_independent_of_workers(prepare, tmp_path):
    path = write_text(tmp_path / "d.txt", make_docs(400, seed=4))
    runs = [prepare(path, output_dir=tmp_path / f"run{w}", val_fraction=0.2, shard_tokens=700, num_workers=w)
            for w in (1, 3, None)]
    files = sorted(p.name for p in (tmp_path / "run1").glob("*.bin"))
    assert any(name.startswith("val_") for name in files)
    for run in runs[1:]:
        directory = Path(run["dir"])
        assert sorted(p.name for p in directory.glob("*.bin")) == files
        for name in files:
            assert (directory / name).read_bytes() == (tmp_path / "run1" / name).read_bytes()
        assert run["splits"] == runs[0]["splits"]
    val_docs = runs[0]["splits"]["val"]["documents"]
    assert 50 <= val_docs <= 110
    other_seed = prepare(path, output_dir=tmp_path / "seed1", val_fraction=0.2, seed=1)
    assert read_split(tmp_path / "seed1", other_seed, "val").tolist() != read_split(tmp_path / "run1", runs[0], "val").tolist()


def test_small_datasets_get_one_val_document(prepare, tmp_path):
    index = prepare(write_text(tmp_path / "three.txt", ["alpha one", "beta two", "gamma three"]), val_fraction=0.01)
    assert index["splits"]["val"]["documents"] == 1 and index["splits"]["train"]["documents"] == 2
    # Nearly everything hashes into val: train must still get a document.
    index = prepare(write_text(tmp_path / "two.txt", ["alpha one", "beta two"]), output_dir=tmp_path / "b", val_fraction=0.999)
    assert index["splits"]["val"]["documents"] == 1 and index["splits"]["train"]["documents"] == 1
    single = write_text(tmp_path / "one.txt", ["only one document"])
    with pytest.raises(DataError, match="one.txt: the inputs hold a single document"):
        prepare(single, output_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert prepare(single, output_dir=tmp_path / "d", val_fraction=0.0)["splits"]["train"]["documents"] == 1


class CharTokenizer:
    """A fake tokenizer with a vocabulary above 65536, to exercise uint32 shards."""

    vocab_size = 70_000
    eos_id = 69_999
    bos_id = None
    fingerprint = "f" * 64

    def encode_batch(self, texts, *, add_bos=False, add_eos=False):
        return [[66_000 + ord(c) % 3000 for c in t] + ([self.eos_id] if add_eos else []) for t in texts]

    def save(self, directory):
        Path(directory).mkdir()
        (Path(directory) / "tokenizer.json").write_text("{}")


def test_dtype_choice_and_uint32_shards(prepare, tmp_path):
    assert token_dtype(50257) == np.dtype("<u2") and token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")
    with pytest.raises(ConfigError):
        token_dtype(0)
    docs = make_docs(30)
    index = prepare(write_text(tmp_path / "d.txt", docs), tokenizer=CharTokenizer(), val_fraction=0.0)
    assert index["dtype"] == "uint32"
    stream = read_split(tmp_path / "ds", index, "train")
    assert stream.tolist() == [i for d in docs for i in CharTokenizer().encode_batch([d], add_eos=True)[0]]
    batch = next(PackedTokenLoader(tmp_path / "ds", seq_len=16, micro_batch_size=2, shuffle=False))
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].min() >= 66_000
    assert batch["input_ids"][0].tolist() == stream[:16].tolist()


def test_progress_bar_goes_to_stderr(prepare, tmp_path, capsys):
    prepare(write_text(tmp_path / "d.txt", make_docs(20)), val_fraction=0.0, show_progress=True)
    assert capsys.readouterr().out == ""


def test_existing_output_needs_overwrite(prepare, tmp_path):
    first = write_text(tmp_path / "a.txt", make_docs(20, seed=1))
    second = write_text(tmp_path / "b.txt", make_docs(30, seed=2))
    prepare(first, val_fraction=0.0)
    with pytest.raises(DataError, match=r"ds: already holds a prepared dataset .*overwrite=True"):
        prepare(second, val_fraction=0.0)
    assert load_index(tmp_path / "ds")["splits"]["train"]["documents"] == 20
    assert prepare(second, val_fraction=0.0, overwrite=True)["splits"]["train"]["documents"] == 30
    assert load_index(tmp_path / "ds")["splits"]["train"]["documents"] == 30
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty and is not a forgeline dataset"):
        prepare(first, output_dir=tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_leaves_no_output_and_keeps_the_old_dataset(prepare, tmp_path):
    good = [write_text(tmp_path / "a.txt", make_docs(20)), write_jsonl(tmp_path / "b.jsonl", make_docs(20))]
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl:3: malformed JSON"):
        prepare(good + [bad], shard_tokens=50)
    assert not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    prepare(good[0])
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir() if p.is_file()}
    with pytest.raises(DataError):
        prepare(good + [bad], overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir() if p.is_file()} == before


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupt_during_tokenizing_leaves_nothing(prepare, tmp_path, monkeypatch, workers):
    monkeypatch.setattr(shards_module, "_BATCH_DOCS", 10)
    calls = []

    class Interrupting(CharTokenizer):
        def encode_batch(self, texts, **kwargs):
            calls.append(len(texts))
            if len(calls) == 3:
                raise KeyboardInterrupt
            return super().encode_batch(texts, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        prepare(write_text(tmp_path / "d.txt", make_docs(100)), tokenizer=Interrupting(), num_workers=workers)
    assert not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_load_index_errors(prepare, tmp_path):
    with pytest.raises(DataError, match="not a forgeline token-shard dataset: no index.json"):
        load_index(tmp_path)
    index = prepare(write_text(tmp_path / "d.txt", make_docs(100)), val_fraction=0.0, shard_tokens=500)
    directory = tmp_path / "ds"
    shard = directory / index["splits"]["train"]["shards"][1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"train_00001\.bin: train shard has 998 bytes, index.json expects 1000"):
        load_index(directory)
    with pytest.raises(DataError, match="train_00001.bin"):
        PackedTokenLoader(directory, seq_len=8, micro_batch_size=2)
    shard.unlink()
    with pytest.raises(DataError, match=r"train_00001\.bin: train shard is missing"):
        load_index(directory)
    shard.write_bytes(data)
    raw = json.loads((directory / "index.json").read_text())
    (directory / "index.json").write_text(json.dumps({**raw, "version": 99}))
    with pytest.raises(DataError, match="unsupported dataset version 99"):
        load_index(directory)
    (directory / "index.json").write_text(json.dumps({**raw, "format": "something-else"}))
    with pytest.raises(DataError, match="not a forgeline token-shard dataset"):
        load_index(directory)


def test_tokenizer_mismatch(prepare, tok, tmp_path):
    index = prepare(write_text(tmp_path / "d.txt", make_docs(20)))
    check_tokenizer(index, tok)
    other = SimpleNamespace(fingerprint="0123456789abcdef" * 4)
    with pytest.raises(DataError, match=rf"ds: .*another tokenizer \(dataset {tok.fingerprint[:12]}, this tokenizer 0123456789ab\)"):
        check_tokenizer(load_index(tmp_path / "ds"), other)


def test_bad_arguments_are_config_errors(prepare, tmp_path):
    path = write_text(tmp_path / "d.txt", make_docs(5))
    for kwargs in ({"val_fraction": 1.0}, {"shard_tokens": 0}, {"seed": -1}, {"num_workers": 0}, {"text_separator": ""}):
        with pytest.raises(ConfigError):
            prepare(path, **kwargs)
    assert not (tmp_path / "ds").exists()


# ------------------------------------------------------------------------------------------------------ loader


def expected_batch(stream: np.ndarray, samples, seq_len: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([stream[s * seq_len : s * seq_len + seq_len + 1] for s in samples]))


def test_batches_are_windows_of_the_stream_across_shards(stream_dataset):
    directory, stream = stream_dataset
    index = load_index(directory)
    assert len(index["splits"]["train"]["shards"]) >= 4
    seq_len = 64
    loader = PackedTokenLoader(directory, seq_len=seq_len, micro_batch_size=3, shuffle=False)
    assert loader.tokens == len(stream)
    assert loader.samples_per_epoch == (len(stream) - 1) // seq_len
    assert loader.batches_per_epoch == loader.samples_per_epoch // 3
    crossed = False
    for k in range(loader.batches_per_epoch):
        batch = next(loader)
        windows = expected_batch(stream, range(3 * k, 3 * k + 3), seq_len)
        assert torch.equal(batch["input_ids"], windows[:, :-1]) and torch.equal(batch["targets"], windows[:, 1:])
        assert batch["n_targets"] == 3 * seq_len
        crossed |= any((3 * k + r) * seq_len // 997 != ((3 * k + r) * seq_len + seq_len) // 997 for r in range(3))
    assert crossed
    assert loader.epoch == 0
    again = next(loader)  # the next epoch starts over (identity order)
    assert loader.epoch == 1 and torch.equal(again["input_ids"], expected_batch(stream, range(3), seq_len)[:, :-1])


def test_doc_ids_start_a_segment_at_every_eos(stream_dataset, tok):
    directory, _ = stream_dataset
    loader = PackedTokenLoader(directory, seq_len=48, micro_batch_size=4, seed=3)
    for _ in range(3):
        batch = next(loader)
        assert batch["doc_ids"].dtype == torch.int64
        for row, ids in zip(batch["doc_ids"].tolist(), batch["input_ids"].tolist()):
            segment, expected = 0, []
            for token in ids:
                segment += token == tok.eos_id
                expected.append(segment)
            assert row == expected
        eos_rows = (batch["input_ids"] == tok.eos_id).nonzero().tolist()
        assert eos_rows, "a 48-token window should contain a document boundary"
        for r, t in eos_rows:
            assert t == 0 or batch["doc_ids"][r, t] == batch["doc_ids"][r, t - 1] + 1
            # the token before EOS predicts EOS within its own document
            assert t == 0 or batch["targets"][r, t - 1] == tok.eos_id


def test_shuffle_is_deterministic_for_a_seed(stream_dataset):
    directory, stream = stream_dataset

    def first_batches(seed, n=4):
        loader = PackedTokenLoader(directory, seq_len=32, micro_batch_size=4, seed=seed)
        return [next(loader)["input_ids"] for _ in range(n)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    loader = PackedTokenLoader(directory, seq_len=32, micro_batch_size=4, seed=0)
    perm = np.random.default_rng([0, 0]).permutation(loader.samples_per_epoch)
    assert torch.equal(next(loader)["input_ids"], expected_batch(stream, perm[:4], 32)[:, :-1])


def test_ranks_and_accumulation_see_the_same_samples_as_one_big_batch(stream_dataset):
    directory, _ = stream_dataset
    B, W, A, T = 2, 2, 3, 40
    single = PackedTokenLoader(directory, seq_len=T, micro_batch_size=B * W * A, seed=9)
    ranks = [PackedTokenLoader(directory, seq_len=T, micro_batch_size=B, rank=r, world_size=W, seed=9,
                               grad_accum_steps=A) for r in range(W)]
    steps = single.batches_per_epoch + 2  # past an epoch boundary
    assert all(r.batches_per_epoch == A * single.batches_per_epoch for r in ranks)
    for _ in range(steps):
        big = next(single)["input_ids"]
        rows = [next(ranks[r])["input_ids"] for _ in range(A) for r in range(W)]
        # micro-batch a of rank r holds rows [(a * W + r) * B, ... + B) of the big batch
        assert torch.equal(torch.cat(rows), big)
    assert single.epoch == 1 and all(r.epoch == 1 for r in ranks)

    two = [PackedTokenLoader(directory, seq_len=T, micro_batch_size=B, rank=r, world_size=2) for r in range(2)]
    one = PackedTokenLoader(directory, seq_len=T, micro_batch_size=2 * B)
    for _ in range(5):
        assert torch.equal(torch.cat([next(two[0])["input_ids"], next(two[1])["input_ids"]]), next(one)["input_ids"])


def test_resume_is_exact_and_o1_across_epoch_boundaries(stream_dataset):
    directory, stream = stream_dataset
    make = lambda **kw: PackedTokenLoader(directory, seq_len=32, micro_batch_size=4, seed=5, **kw)  # noqa: E731
    original = make()
    for _ in range(original.batches_per_epoch - 2):
        next(original)
    for _ in range(5):  # resume at every position around the end of epoch 0
        state = json.loads(json.dumps(original.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        expected = next(original)
        got = next(resumed)
        assert all(torch.equal(expected[k], got[k]) for k in ("input_ids", "targets", "doc_ids"))
        assert resumed.state_dict() == original.state_dict()
    assert original.epoch == 1

    far = make()
    far.load_state_dict({**far.state_dict(), "epoch": 10**6, "batch_in_epoch": 3})  # no replay of a million epochs
    perm = np.random.default_rng([5, 10**6]).permutation(far.samples_per_epoch)
    assert torch.equal(next(far)["input_ids"], expected_batch(stream, perm[12:16], 32)[:, :-1])
    assert far.state_dict()["batch_in_epoch"] == 4


def test_resume_with_another_world_size(stream_dataset):
    directory, _ = stream_dataset
    two = [PackedTokenLoader(directory, seq_len=32, micro_batch_size=2, rank=r, world_size=2, seed=1) for r in range(2)]
    for _ in range(3):
        for loader in two:
            next(loader)
    one = PackedTokenLoader(directory, seq_len=32, micro_batch_size=4, seed=1)
    one.load_state_dict(two[0].state_dict())
    assert torch.equal(next(one)["input_ids"], torch.cat([next(two[0])["input_ids"], next(two[1])["input_ids"]]))
    accum = PackedTokenLoader(directory, seq_len=32, micro_batch_size=2, seed=1, grad_accum_steps=2)
    accum.load_state_dict(one.state_dict())
    assert accum.batch_in_epoch == 2 * one.batch_in_epoch


@pytest.mark.parametrize(
    "change, match",
    [
        ({"seq_len": 16}, r"seq_len 16 -> 32"),
        ({"micro_batch_size": 8}, r"micro_batch_size x world_size x grad_accum_steps 8 -> 4"),
        ({"seed": 2}, r"seed 2 -> 0"),
        ({"tokens": 123}, r"tokens 123 -> \d+"),
        ({"split": "val"}, r"split 'val' -> 'train'"),
    ],
)
def test_resume_refuses_a_different_sample_order(stream_dataset, change, match):
    directory, _ = stream_dataset
    loader = PackedTokenLoader(directory, seq_len=32, micro_batch_size=4)
    with pytest.raises(DataError, match=match):
        loader.load_state_dict({**loader.state_dict(), **change})


def test_eval_batches_are_sequential_finite_and_leave_training_alone(prepare, tmp_path):
    index = prepare(write_text(tmp_path / "d.txt", make_docs(400, seed=8)), val_fraction=0.3)
    stream = read_split(tmp_path / "ds", index, "val").astype(np.int64)
    val = PackedTokenLoader(tmp_path / "ds", split="val", seq_len=16, micro_batch_size=4, shuffle=False)
    next(val)
    state = val.state_dict()
    batches = list(val.iter_eval_batches())
    assert len(batches) == val.batches_per_epoch == ((len(stream) - 1) // 16) // 4
    for k, batch in enumerate(batches):
        assert torch.equal(batch["input_ids"], expected_batch(stream, range(4 * k, 4 * k + 4), 16)[:, :-1])
    assert len(list(val.iter_eval_batches(max_batches=2))) == 2
    assert val.state_dict() == state
    ranks = [PackedTokenLoader(tmp_path / "ds", split="val", seq_len=16, micro_batch_size=2, rank=r, world_size=2,
                               shuffle=False) for r in range(2)]
    for big, r0, r1 in zip(batches, *(r.iter_eval_batches() for r in ranks)):
        assert torch.equal(torch.cat([r0["input_ids"], r1["input_ids"]]), big["input_ids"])


def test_split_too_small(prepare, tmp_path):
    prepare(write_text(tmp_path / "d.txt", make_docs(40)), val_fraction=0.01)
    with pytest.raises(DataError, match=r"the val split has \d+ tokens, fewer than one global batch needs"):
        PackedTokenLoader(tmp_path / "ds", split="val", seq_len=512, micro_batch_size=8)
    with pytest.raises(ConfigError):
        PackedTokenLoader(tmp_path / "ds", split="test", seq_len=8, micro_batch_size=1)
    with pytest.raises(ConfigError):
        PackedTokenLoader(tmp_path / "ds", seq_len=8, micro_batch_size=1, rank=2, world_size=2)


# --------------------------------------------------------------------------------------------------- real data


def test_tinyshakespeare_with_gpt2(shared_data, tmp_path):
    gpt2 = Tokenizer.load(shared_data / "tokenizers" / "gpt2" / "tokenizer.json")
    source = shared_data / "tinyshakespeare" / "input.txt"
    index = prepare_dataset(source, tokenizer=gpt2, output_dir=tmp_path / "shakespeare", val_fraction=0.05,
                            show_progress=False)
    train, val = index["splits"]["train"], index["splits"]["val"]
    total = train["tokens"] + val["tokens"]
    assert index["dtype"] == "uint16" and index["eos_id"] == 50256
    assert 280_000 < total < 380_000
    documents = train["documents"] + val["documents"]
    assert 5_000 < documents < 10_000  # speeches separated by blank lines
    assert 0.03 < val["documents"] / documents < 0.07
    assert 1_000_000 < train["bytes"] + val["bytes"] <= source.stat().st_size
    loader = PackedTokenLoader(tmp_path / "shakespeare", seq_len=128, micro_batch_size=4)
    text = gpt2.decode(next(loader)["input_ids"][0].tolist())
    assert len(text) > 200


def test_resume_rejects_a_malformed_state_or_a_split_position(stream_dataset):
    directory, _ = stream_dataset
    loader = PackedTokenLoader(directory, seq_len=32, micro_batch_size=2, seed=0)
    with pytest.raises(DataError, match="not a PackedTokenLoader state"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(DataError, match="batch_in_epoch must be an integer >= 0"):
        loader.load_state_dict({**loader.state_dict(), "batch_in_epoch": -1})
    next(loader)  # one micro-batch of 2: half of a global micro-batch of 4 below
    wider = PackedTokenLoader(directory, seq_len=32, micro_batch_size=1, world_size=4, grad_accum_steps=1, seed=0)
    halves = {**loader.state_dict(), "grad_accum_steps": 2}
    with pytest.raises(DataError, match="not a whole number of global micro-batches of 4"):
        wider.load_state_dict(halves)
