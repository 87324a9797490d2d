"""Benchmark contamination checks: items planted in training data (verbatim, re-cased and re-punctuated,
re-spaced, inside a long document, with words changed) are found in every format, unrelated items are not, bad
input is reported with file and line, and the index keeps up with real data."""

from __future__ import annotations

import gzip
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from forgeline.errors import ConfigError, DataError, ForgelineError
from forgeline.eval import contamination as cm
from forgeline.eval.contamination import (
    BenchmarkItem,
    NearDuplicateIndex,
    NgramIndex,
    TrainingSource,
    check_contamination,
    check_items,
    normalize,
)
from forgeline.recipes.demo import story

# Random words from a vocabulary the generated stories do not use, so planted items share no 13-word run (or
# 5-word shingle) with the unrelated text or with each other except by design.
VOCAB = (
    "acid atom cell charge climate comet crystal current density electron energy enzyme erosion force fossil "
    "friction galaxy gene glacier gravity habitat isotope lens magnet mantle mass membrane metal mineral molecule "
    "momentum neuron nucleus orbit organ oxygen photon planet plasma pressure protein pulse quartz radiation "
    "reaction sediment signal solvent species spectrum sugar tide tissue torque valve vapor velocity virus voltage "
    "volume wave weight which explains increases decreases because during between within whereas therefore "
    "measured observed predicted constant variable sample heated cooled dissolved reflected absorbed emitted"
).split()


def make_item(rng: random.Random, words: int) -> str:
    question = " ".join(rng.choice(VOCAB) for _ in range(words)).capitalize()
    choices = " ".join(f"{letter}) {' '.join(rng.choice(VOCAB) for _ in range(3))}" for letter in "ABCD")
    return f"{question}? {choices}"


def recase_and_repunctuate(text: str) -> str:
    words = text.replace("?", "").replace(")", ".").split()
    return " ".join(w.upper() + ("," if i % 4 == 3 else "") for i, w in enumerate(words)) + "!!"


def respace(text: str, rng: random.Random) -> str:
    # No blank line: in a text file that would end the paragraph, i.e. the document.
    return "".join(w + rng.choice(["  ", "\t", "\n", " \u00a0 ", " \t "]) for w in text.split())


def change_words(text: str, count: int) -> str:
    words = text.split()
    for k in range(count):
        words[(k + 1) * len(words) // (count + 1)] = f"zzchanged{k}"
    return " ".join(words)


def stories(rng: random.Random, count: int) -> list[str]:
    return [story(rng) for _ in range(count)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_normalize():
    fullwidth_nbsp_ligature = "  \uff28\uff45llo,\u00a0WORLD!\n \ufb01ne   don't \u201cquote\u201d "
    assert normalize(fullwidth_nbsp_ligature) == "hello world fine dont quote"
    assert normalize("A) one; B) two...") == "a one b two"
    assert normalize("!!! ... ---") == ""


# ------------------------------------------------------------------------------------------ planted, every format


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Training data in text, JSONL (plain and gzipped), JSON and Parquet with benchmark items planted in each."""
    pa = pytest.importorskip("pyarrow", reason="Parquet training data needs pyarrow")
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("planted")
    rng = random.Random(7)
    item = {name: make_item(rng, 50) for name in (
        "verbatim", "recased", "respaced", "embedded", "chat", "conversations", "gz", "json", "parquet", "short")}
    item["short"] = "Which gas do plants absorb? Carbon dioxide"  # 7 words: one 7-gram
    # 190 words with two changed: Jaccard near 0.9, a safe margin over 0.8 for a 128-permutation estimate.
    item["edited"] = make_item(rng, 175)
    item["edited_parquet"] = make_item(rng, 175)
    items = [BenchmarkItem("planted", name, text) for name, text in item.items()]
    items.append(BenchmarkItem("planted", "short_absent", "Which gas do plants release? Oxygen"))
    items += [BenchmarkItem("unrelated", f"u{i}", make_item(rng, rng.randint(8, 60))) for i in range(200)]

    paragraphs = stories(rng, 40)
    long_document = " ".join(stories(rng, 25)) + " " + item["embedded"] + " " + " ".join(stories(rng, 25))
    text_docs = paragraphs[:10] + [item["verbatim"]] + paragraphs[10:20] + [recase_and_repunctuate(item["recased"])]
    text_docs += [respace(item["respaced"], rng), long_document, "Plants absorb: which gas do plants absorb? "
                  "Carbon dioxide, mostly."] + paragraphs[20:]
    txt = root / "train.txt"
    txt.write_text("\n\n".join(text_docs) + "\n", encoding="utf-8")
    verbatim_line = 1 + sum(d.count("\n") + 2 for d in text_docs[:10])

    question, choices = item["chat"].split("? ")
    records = [{"text": s} for s in stories(rng, 20)]
    records.insert(5, {"messages": [{"role": "user", "content": question + "?"},
                                    {"role": "assistant", "content": choices}]})
    records.insert(9, {"meta": {"id": 9, "tags": ["x"]}, "conversations": [{"from": "human", "value":
                                                                           item["conversations"]}]})
    records.insert(12, {"prompt": "Answer this.", "completion": change_words(item["edited"], 2)})
    jsonl = root / "sft.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records[:8]) + "\n\n" +
                     "\n".join(json.dumps(r) for r in records[8:]) + "\n", encoding="utf-8")
    with gzip.open(root / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"chosen": item["gz"], "rejected": "no", "score": 1}) + "\n")
    (root / "instruct.json").write_text(json.dumps(
        [{"instruction": s, "input": "", "output": "ok"} for s in stories(rng, 5)]
        + [{"instruction": "Solve:", "input": item["json"], "output": "B"}]), encoding="utf-8")
    pq.write_table(pa.table({
        "id": list(range(12)),
        "prompt": stories(rng, 10) + [item["parquet"], change_words(item["edited_parquet"], 2)],
        "response": ["fine"] * 12,
    }), root / "prefs.parquet")
    return root, items, {"txt": txt, "verbatim_line": verbatim_line, "jsonl": jsonl}


def test_planted_items_are_found_in_every_format(planted):
    root, items, where = planted
    started = time.perf_counter()
    report = check_contamination(items, root)  # a directory: every file in it by suffix
    seconds = time.perf_counter() - started
    flagged = {f.item_id: f for f in report.flagged if f.task == "planted"}

    exact = {"verbatim", "recased", "respaced", "embedded", "chat", "conversations", "gz", "json", "parquet", "short"}
    for name in exact:
        assert name in flagged and flagged[name].exact, (name, flagged.get(name))
    for name in ("verbatim", "recased", "respaced", "embedded", "conversations", "gz", "json", "parquet", "short"):
        assert flagged[name].overlap == 1.0, flagged[name]
    # The chat record splits the item over two messages; the n-grams across the split hold the role name.
    assert 0.5 <= flagged["chat"].overlap < 1.0
    assert "short_absent" not in flagged

    assert flagged["verbatim"].source == f"{where['txt']}:{where['verbatim_line']}"
    assert flagged["chat"].source == f"{where['jsonl']}:6"
    assert flagged["conversations"].source == f"{where['jsonl']}:11"  # a blank line before it still counts
    assert flagged["gz"].source == f"{root / 'more.jsonl.gz'}:1"
    assert flagged["json"].source == f"{root / 'instruct.json'}: record 5"
    assert flagged["parquet"].source == f"{root / 'prefs.parquet'}: row 10"
    # Whole documents that are the item with words changed: near duplicates, with where they are.
    for name, source in (("edited", f"{where['jsonl']}:14"), ("edited_parquet", f"{root / 'prefs.parquet'}: row 11")):
        assert flagged[name].fuzzy and flagged[name].jaccard >= 0.8, flagged[name]
        assert flagged[name].source == source
    # Items inside a longer document are not near duplicates of it as a whole: the exact check finds those.
    assert not flagged["embedded"].fuzzy and flagged["verbatim"].fuzzy

    assert not [f for f in report.flagged if f.task == "unrelated"], "false positives on unrelated items"
    assert report.tasks["unrelated"].items == 200 and report.tasks["unrelated"].either == 0
    summary = report.tasks["planted"]
    assert (summary.items, summary.either) == (13, 12)
    assert summary.exact == len(exact) + 2 and summary.fuzzy >= 2  # light edits keep most 13-grams too
    print(f"\nchecked {len(items)} items against {report.index['ngrams']['bytes']} bytes in {seconds:.2f} s")


def test_report_outputs(planted):
    root, items, _ = planted
    report = check_contamination(items, root, fuzzy=False)
    assert report.settings["fuzzy"] is False
    assert all(not f.fuzzy and f.jaccard is None for f in report.flagged)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["tasks"]["planted"]["flagged_exact"] == report.tasks["planted"].exact
    assert {f["item_id"] for f in data["flagged"]} == report.flagged_ids("planted")
    assert data["index"]["ngrams"]["documents"] > 0

    all_ids = {i.item_id for i in items if i.task == "planted"}
    assert report.clean_ids("planted") == all_ids - report.flagged_ids("planted")
    assert "short_absent" in report.clean_ids("planted")
    assert len(report.clean_ids("unrelated")) == 200
    with pytest.raises(KeyError, match="no task 'mmlu'"):
        report.clean_ids("mmlu")

    markdown = report.to_markdown()
    assert "| task | items | flagged exact | flagged fuzzy | flagged either | clean |" in markdown
    assert "| unrelated | 200 | 0 | 0 | 0 | 200 |" in markdown
    assert "| planted | verbatim | 1.00 |" in markdown


def test_explicit_formats_and_single_files(planted, tmp_path):
    root, items, where = planted
    odd = tmp_path / "corpus.data"
    odd.write_bytes(where["txt"].read_bytes())
    with pytest.raises(DataError, match="cannot tell the format"):
        NgramIndex.build(odd)
    index = NgramIndex.build([TrainingSource(odd, "text"), root / "prefs.parquet"])
    verbatim = next(i for i in items if i.item_id == "verbatim")
    assert index.overlap(verbatim.text)[0] == 1.0
    assert index.source_of(verbatim.text) == f"{odd}:{where['verbatim_line']}"
    with pytest.raises(ConfigError, match="unknown training-data format"):
        TrainingSource(odd, "csv")


# -------------------------------------------------------------------------------------------------- token shards


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory):
    from forgeline.data import prepare_dataset
    from forgeline.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("shards")
    rng = random.Random(11)
    verbatim, edited = make_item(rng, 60), make_item(rng, 175)
    docs = stories(rng, 150)
    docs[40] = verbatim
    docs[90] = change_words(edited, 2)
    docs[120] = " ".join(stories(rng, 30))  # longer than a decode chunk and a shard
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    tokenizer = train_bpe([corpus], vocab_size=400, output_dir=root / "tokenizer", show_progress=False)
    prepare_dataset([corpus], tokenizer=tokenizer, output_dir=root / "data", val_fraction=0.1, shard_tokens=3000,
                    show_progress=False)
    return root / "data", tokenizer, docs, {"verbatim": verbatim, "edited": edited}


def test_token_shards_decode_to_the_documents(shard_data, monkeypatch):
    directory, _, docs, _ = shard_data
    monkeypatch.setattr(cm, "_DECODE_CHUNK_TOKENS", 777)  # documents then cross chunks as well as shards
    decoded = list(cm._iter_shards(directory, None))
    assert sorted(text for text, _, _ in decoded) == sorted(docs)
    assert {prefix for _, prefix, _ in decoded} == {f"{directory}: train document ", f"{directory}: val document "}


def test_planted_items_are_found_in_token_shards(shard_data, monkeypatch):
    directory, tokenizer, _, item = shard_data
    monkeypatch.setattr(cm, "_DECODE_CHUNK_TOKENS", 777)
    rng = random.Random(3)
    items = [BenchmarkItem("t", name, text) for name, text in item.items()]
    items += [BenchmarkItem("t", f"u{i}", make_item(rng, 40)) for i in range(50)]
    report = check_contamination(items, directory, tokenizer=tokenizer)
    flagged = {f.item_id: f for f in report.flagged}
    assert set(flagged) == {"verbatim", "edited"}
    assert flagged["verbatim"].exact and flagged["verbatim"].overlap == 1.0
    assert flagged["edited"].fuzzy and flagged["edited"].jaccard >= 0.8
    for f in flagged.values():
        assert f.source.startswith(f"{directory}: ") and " document " in f.source


def test_token_shards_refuse_another_tokenizer(shard_data, tmp_path):
    from forgeline.tokenizer import train_bpe

    directory, _, _, _ = shard_data
    corpus = write_lines(tmp_path / "other.txt", stories(random.Random(5), 50))
    other = train_bpe([corpus], vocab_size=300, output_dir=tmp_path / "tok", show_progress=False)
    with pytest.raises(DataError, match="another tokenizer"):
        NgramIndex.build(directory, tokenizer=other)


# ------------------------------------------------------------------------------------------------- the n-gram index


def test_overlap_counts_and_document_boundaries():
    index = NgramIndex(n=13)
    first = [f"w{i}" for i in range(14)]
    second = [f"v{i}" for i in range(14)]
    index.add_text(" ".join(first), source="first")
    index.add_text(" ".join(second), source="second")
    assert len(index) == 4
    assert index.overlap(" ".join(first + ["x"] * 6)) == (0.25, 2, 8)
    assert index.source_of(" ".join(first + ["x"] * 6)) == "first"
    # The two documents do not run into each other.
    assert index.overlap(" ".join(first[-6:] + second[:7])) == (0.0, 0, 1)
    assert index.overlap("") == (0.0, 0, 0)
    with pytest.raises(ConfigError, match="short_lengths including 5"):
        index.overlap("only five words right here")


def test_short_lengths():
    index = NgramIndex(n=13, short_lengths=[3])
    index.add_text("the sky is blue today and the grass is green", source="doc")
    assert index.overlap("Grass is GREEN.")[:2] == (1.0, 1)
    assert index.overlap("grass is red")[:2] == (0.0, 0)
    with pytest.raises(ConfigError, match="below n=13"):
        NgramIndex(n=13, short_lengths=[13])


def test_batching_and_merging_do_not_change_the_index(monkeypatch):
    rng = random.Random(2)
    docs = stories(rng, 300) + [make_item(rng, 30) for _ in range(100)]
    reference = NgramIndex(n=8)
    for i, doc in enumerate(docs):
        reference.add_text(doc, source=f"d{i}")
    monkeypatch.setattr(cm, "_BATCH_WORDS", 97)
    monkeypatch.setattr(cm, "_MERGE_MIN", 50)
    small = NgramIndex(n=8)
    for i, doc in enumerate(docs):
        small.add_text(doc, source=f"d{i}")
        if i % 37 == 0:
            len(small)  # a query in the middle of building
    assert len(small) == len(reference) > 0
    assert np.array_equal(small._hashes, reference._hashes)
    assert [small._sources.label(int(d)) for d in small._docs] == [
        reference._sources.label(int(d)) for d in reference._docs]
    assert small.stats.ngrams == reference.stats.ngrams
    # Repeated template n-grams of the stories keep the first story that had them.
    assert small.source_of(docs[7]) == "d7"


def test_near_duplicate_windows_and_long_items():
    rng = random.Random(4)
    index = NearDuplicateIndex(window=50)  # windows of 50 words every 25
    passage = make_item(rng, 120)
    long_doc = " ".join(make_item(rng, 40) for _ in range(4)) + " odd offset " + passage + " " + make_item(rng, 90)
    index.add_text(long_doc, source="long")
    short = make_item(rng, 20)
    index.add_text(short, source="short")
    assert len(index) > 10
    # An item longer than a window and a half is found inside a long document wherever it starts.
    match = index.query(change_words(passage, 1))
    assert match and match[0].source.startswith("long (words ") and match[0].jaccard >= 0.8, match
    # A whole short document is found as itself; a short stretch of a long one is not similar to any window.
    assert [m.source for m in index.query(short.upper())] == ["short"]
    assert index.query(" ".join(passage.split()[10:40])) == []
    assert index.query(make_item(rng, 40)) == []
    with pytest.raises(ConfigError, match="must hold at least one shingle"):
        NearDuplicateIndex(window=3)


def test_missing_datasketch_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasketch", None)
    with pytest.raises(ForgelineError, match=r"pip install 'forgeline\[eval\]'"):
        NearDuplicateIndex()
    corpus = write_lines(tmp_path / "a.txt", ["one two three four five six seven eight nine ten eleven twelve 13"])
    report = check_contamination([BenchmarkItem("t", "1", "one two three four five six seven eight nine ten eleven "
                                                "twelve 13")], corpus, fuzzy=False)
    assert report.flagged_ids("t") == {"1"}


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("bad.jsonl", b'{"text": "a b c"}\n{"text": "d e f"}\n{"text": oops}\n', r"bad\.jsonl:3: malformed JSON"),
        ("bad.txt", b"fine line\nbad \xff byte\n", r"bad\.txt:2: invalid UTF-8"),
        ("bad2.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad2\.jsonl:2: invalid UTF-8"),
        ("bad.json", b'[{"text": "a"},\n {"text": }]', r"bad\.json:2: malformed JSON"),
        ("empty.md", b"\n  \n", r"empty\.md: holds no text"),
        ("blank.jsonl", b'{"n": 1}\n', r"blank\.jsonl: holds no text"),
        ("cut.jsonl.gz", gzip.compress(b'{"text": "a b c"}\n' * 50)[:-20], r"cut\.jsonl\.gz: cannot read"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        NgramIndex.build(path)


def test_missing_and_unusable_sources(tmp_path):
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        NgramIndex.build(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="holds no text, JSONL"):
        (tmp_path / "empty").mkdir()
        NgramIndex.build(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no training data"):
        NgramIndex.build([])
    with pytest.raises(ConfigError, match="two items with id"):
        check_contamination([BenchmarkItem("t", "1", "a"), BenchmarkItem("t", "1", "b")], tmp_path, fuzzy=False)
    with pytest.raises(ConfigError, match="threshold must be"):
        check_items([], NgramIndex(), threshold=0)


# ------------------------------------------------------------------------------------------------ real data, speed


def tinystories_questions(rng: random.Random, count: int) -> list[BenchmarkItem]:
    """Questions in TinyStories' own words (names, toys, places), the hardest case for false positives."""
    names = ["Lily", "Tom", "Ben", "Mia", "Sue", "Max", "Tim", "Anna", "Sam", "Lucy"]
    things = ["ball", "kite", "toy car", "red hat", "big box", "little bird", "cake", "blue boat", "teddy bear", "book"]
    places = ["park", "garden", "kitchen", "forest", "beach", "school", "river", "house", "tree", "shop"]
    reasons = ["she wanted to play", "he was very sad", "it was a sunny day", "her mom said so", "he was hungry",
               "they were friends", "it was raining", "she felt brave", "he lost his toy", "they wanted to share"]
    items = []
    for i in range(count):
        name, thing, place = rng.choice(names), rng.choice(things), rng.choice(places)
        picks = rng.sample(reasons, 4)
        text = (f"In the story, why did {name} take the {thing} to the {place}? "
                + " ".join(f"{letter}. Because {reason}." for letter, reason in zip("ABCD", picks)))
        items.append(BenchmarkItem("stories_qa", str(i), text))
    return items


def test_tinystories_index_speed_and_no_false_positives(shared_data):
    path = shared_data / "tinystories" / "TinyStories-train.first2MiB.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    normalize("warm up")  # the punctuation table is built once per process; not part of indexing
    started = time.perf_counter()
    index = NgramIndex.build(path)
    seconds = time.perf_counter() - started
    stats = index.stats
    assert seconds < 30
    assert stats.documents > 2000 and stats.ngrams > 300_000
    megabytes = path.stat().st_size / 1e6
    print(f"\nTinyStories {megabytes:.2f} MB: {stats.documents} documents, {stats.ngrams} 13-grams "
          f"({len(index)} distinct, {index.nbytes / 1e6:.1f} MB in memory) in {seconds:.2f} s: "
          f"{megabytes / seconds:.1f} MB/s, {stats.ngrams / seconds / 1e6:.2f} M n-grams/s")

    # A story from the file is found, with the line it starts on.
    text = path.read_text(encoding="utf-8")
    chunks = text.split("<|endoftext|>")
    lines = text.split("\n")
    start = [i for i, line in enumerate(lines) if line == "<|endoftext|>"][99] + 1
    while not lines[start].strip():
        start += 1
    line = start + 1
    assert index.overlap(chunks[100])[0] == 1.0
    assert index.source_of(chunks[100]) == f"{path}:{line}"

    rng = random.Random(0)
    items = tinystories_questions(rng, 200)
    items.append(BenchmarkItem("stories_qa", "planted", chunks[500].strip()))
    started = time.perf_counter()
    report = check_contamination(items, path)
    print(f"check of {len(items)} items with both indexes: {time.perf_counter() - started:.2f} s")
    assert report.flagged_ids("stories_qa") == {"planted"}, [f for f in report.flagged if f.item_id != "planted"]
    best = max(index.overlap(item.text)[0] for item in items[:-1])
    assert best < 0.5
