import json
import os
import random
from pathlib import Path

import pytest
import tokenizers

from forgeline.errors import ConfigError, DataError, ForgelineError
from forgeline.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, train_bpe

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 1000

UNICODE_SAMPLES = [
    "Hello, world! Grüße aus Köln — naïve café, 1234567890.",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "Emoji: 👋🏽 👨‍👩‍👧‍👦 🇩🇪 🧪✨ and math ∑∫√∞ ≠ ≤.",
    "Control bytes \x00\x01\x07\x1b[0m tab\tcarriage\r\nnew line\n\n  leading spaces",
    "".join(chr(i) for i in range(256)),
    "Combining: e\u0301 a\u0308 \u200b zero-width \ufeff bom, RTL: שלום مرحبا",
    "",
    " ",
    "<|endoftext|> appears in text",
]


def _corpus_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sha", "te", "vo", "zu", "qui", "bra", "dre", "ph", "st", "ing", "tion"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    words += ["the", "and", "of", "to", "in", "a", "is", "that", "for", "it", "München", "über", "東京", "🙂"]
    lines = []
    for _ in range(n):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
        lines.append(sentence.capitalize() + rng.choice([".", "!", "?", ","]))
    return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(_corpus_lines(4000) + UNICODE_SAMPLES) + "\n", encoding="utf-8")
    assert 150_000 < path.stat().st_size < 1_000_000
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("trained") / "tok"
    return train_bpe([corpus], vocab_size=VOCAB, output_dir=out, show_progress=False)


# --------------------------------------------------------------------- training


def test_trained_vocab_and_special_ids(trained):
    assert trained.vocab_size == VOCAB
    assert trained.token_to_id("<|endoftext|>") == 0
    assert trained.token_to_id("<|pad|>") == 1
    assert trained.bos_id == trained.eos_id == 0
    assert trained.bos_token == trained.eos_token == "<|endoftext|>"
    assert trained.pad_token == "<|pad|>" and trained.pad_id == 1
    # ChatML markers come with the default template
    assert trained.token_to_id("<|im_start|>") == 2 and trained.token_to_id("<|im_end|>") == 3
    assert trained.chat_template == DEFAULT_CHAT_TEMPLATE
    assert trained.model_max_length == 2048


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_roundtrip_arbitrary_unicode(trained, text):
    ids = trained.encode(text)
    assert all(0 <= i < trained.vocab_size for i in ids)
    assert trained.decode(ids) == text


def test_roundtrip_random_codepoints(trained):
    rng = random.Random(1)
    # every code point except surrogates, which a Python str can hold but UTF-8 cannot encode
    pool = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for _ in range(50):
        text = "".join(chr(rng.choice(pool)) for _ in range(rng.randint(1, 40)))
        assert trained.decode(trained.encode(text)) == text


def test_encode_batch_matches_encode(trained):
    texts = UNICODE_SAMPLES + _corpus_lines(20, seed=3)
    assert trained.encode_batch(texts) == [trained.encode(t) for t in texts]
    assert trained.encode_batch(texts, add_bos=True, add_eos=True) == [
        trained.encode(t, add_bos=True, add_eos=True) for t in texts
    ]
    with pytest.raises(TypeError):
        trained.encode_batch("not a list")


def test_bos_eos_never_doubled(trained):
    plain = trained.encode("hello there")
    assert plain[0] != trained.bos_id
    assert trained.encode("hello there", add_bos=True) == [0] + plain
    assert trained.encode("hello there", add_eos=True) == plain + [0]
    assert trained.encode("hello there", add_bos=True, add_eos=True) == [0] + plain + [0]
    # text that already starts (or ends) with the special token string gets no second one
    already = trained.encode("<|endoftext|>hello there<|endoftext|>", add_bos=True, add_eos=True)
    assert already == [0] + plain + [0]
    # BOS == EOS here: an empty text asked for both must still get both
    assert trained.encode("", add_bos=True, add_eos=True) == [0, 0]
    assert trained.encode("") == []


def test_chat_template_chatml(trained):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = trained.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"
    ids = trained.apply_chat_template(messages, tokenize=True)
    assert ids[0] == trained.token_to_id("<|im_start|>") and ids.count(trained.token_to_id("<|im_end|>")) == 2
    assert trained.decode(ids) == trained.apply_chat_template(messages)


def test_autotokenizer_loads_trained(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    directory = trained.save(tmp_path / "saved")
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    sample = "Hello wörld 👋🏽 <|endoftext|> kalomi  \n\tthe end"
    assert hf(sample)["input_ids"] == trained.encode(sample)
    assert hf.decode(trained.encode(sample)) == sample
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (trained.bos_token, trained.eos_token, trained.pad_token)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (trained.bos_id, trained.eos_id, trained.pad_id)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    for gen in (False, True):
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == (
            trained.apply_chat_template(messages, add_generation_prompt=gen)
        )


def test_jsonl_with_custom_field(tmp_path):
    lines = _corpus_lines(800, seed=5)
    path = tmp_path / "data.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"id": i, "body": line}, ensure_ascii=i % 2 == 0) + "\n")
            if i % 100 == 0:
                f.write("\n   \n")  # blank lines are skipped
    tok = train_bpe(
        path,
        vocab_size=400,
        output_dir=tmp_path / "out",
        text_field="body",
        special_tokens=["<eos>", "<pad>", "<extra>"],
        chat_template=None,
        show_progress=False,
    )
    assert tok.vocab_size == 400
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.token_to_id("<extra>")) == (0, 0, 1, 2)
    assert tok.token_to_id("<|im_start|>") is None and tok.chat_template is None
    assert tok.decode(tok.encode(lines[0])) == lines[0]
    assert len(tok.encode(lines[0])) < len(lines[0].encode())  # merges were learned from the "body" field
    with pytest.raises(ForgelineError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_fingerprint_stable_across_saves_and_sensitive_to_changes(trained, tmp_path):
    a = Tokenizer.load(trained.save(tmp_path / "a"))
    b = Tokenizer.load(a.save(tmp_path / "b"))
    assert trained.fingerprint == a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 64

    data = json.loads((tmp_path / "a" / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"][1]["content"] = "<|PAD|>"
    (tmp_path / "a" / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["pad_token"] = "<|PAD|>"
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert Tokenizer.load(tmp_path / "a").fingerprint != trained.fingerprint

    config["pad_token"] = None  # same vocabulary, different special-token roles
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    no_pad = Tokenizer.load(tmp_path / "a")
    assert no_pad.pad_token is None and no_pad.pad_id == no_pad.eos_id
    assert no_pad.fingerprint not in (trained.fingerprint, Tokenizer.load(tmp_path / "b").fingerprint)


def test_save_into_existing_dir_replaces_stale_files(trained, tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"weights")
    (directory / "special_tokens_map.json").write_text('{"eos_token": "<|pad|>"}', encoding="utf-8")
    (directory / "chat_template.jinja").write_text("stale", encoding="utf-8")
    trained.save(directory)
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    loaded = Tokenizer.load(directory)
    assert loaded.eos_token == "<|endoftext|>" and loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    with pytest.raises(DataError, match="not a directory"):
        trained.save(directory / "model.safetensors")


# ------------------------------------------------------------ real tokenizers


def test_gpt2_loads(shared_data):
    for path in (shared_data / "tokenizers/gpt2/tokenizer.json", shared_data / "tokenizers/gpt2"):
        tok = Tokenizer.load(path)
        assert tok.encode("Hello world") == [15496, 995]
        assert tok.vocab_size == 50257
        assert tok.bos_token == tok.eos_token == "<|endoftext|>"
        assert tok.bos_id == tok.eos_id == 50256
        assert tok.pad_token is None and tok.pad_id == 50256  # no pad: falls back to EOS
        assert tok.chat_template is None
        assert tok.decode(tok.encode("Hello world 👋", add_eos=True)) == "Hello world 👋<|endoftext|>"
        assert tok.decode(tok.encode("Hi", add_eos=True), skip_special_tokens=True) == "Hi"


def test_gpt2_resaved_matches_autotokenizer(shared_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.load(shared_data / "tokenizers/gpt2")
    directory = tok.save(tmp_path / "gpt2")
    assert Tokenizer.load(directory).fingerprint == tok.fingerprint
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    sample = "Hello world, it's   a tést 👋\n"
    assert hf(sample)["input_ids"] == tok.encode(sample)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|endoftext|>", "<|endoftext|>", None)


def test_phi3_loads_with_single_bos(shared_data):
    directory = shared_data / "tokenizers/phi-3-mini"
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok = Tokenizer.load(directory)
    assert tok.bos_token == config["bos_token"] == "<s>" and tok.bos_id == 1
    assert tok.eos_token == config["eos_token"] and tok.eos_id == tok.token_to_id(config["eos_token"])
    assert tok.pad_token == config["pad_token"] and tok.pad_id == tok.token_to_id(config["pad_token"])
    assert tok.model_max_length == config["model_max_length"]
    assert tok.vocab_size == 32011

    # the config says add_bos_token: false, and encode never adds one on its own anyway
    assert config["add_bos_token"] is False
    plain = tok.encode("Hello world")
    assert tok.bos_id not in plain
    with_bos = tok.encode("Hello world", add_bos=True)
    assert with_bos == [1] + plain
    # the literal "<s>" string is the BOS token: asking for BOS again must not double it
    assert tok.encode("<s>Hello world", add_bos=True).count(1) == 1
    assert tok.encode_batch(["Hello world", "<s>Hello world"], add_bos=True)[1].count(1) == 1
    assert tok.decode(with_bos, skip_special_tokens=True) == "Hello world"


def test_phi3_chat_template_matches_transformers(shared_data):
    transformers = pytest.importorskip("transformers")
    directory = shared_data / "tokenizers/phi-3-mini"
    tok = Tokenizer.load(directory)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3? 🤔"},
        {"role": "assistant", "content": "6."},
    ]
    for gen in (False, True):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(messages, add_generation_prompt=gen) == expected
        ids = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
        # ids follow tokenizer.json exactly. transformers 5 does not: it rebuilds Llama-family tokenizers with a
        # Metaspace(prepend_scheme="first") pre-tokenizer ("legacy": false), so after a special token it encodes
        # "You" where tokenizer.json's Prepend normalizer gives "▁You".
        assert ids == tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")).encode(
            expected, add_special_tokens=False
        ).ids
        assert ids.count(tok.bos_id) == 0  # this template renders no BOS, so tokenize=True adds none


def test_chat_template_raise_exception_and_bad_messages(trained):
    tok = Tokenizer(
        trained.backend,
        eos_token="<|endoftext|>",
        chat_template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
    )
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ForgelineError, match="first must be user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(DataError, match="list of dicts"):
        trained.apply_chat_template("hello")
    with pytest.raises(DataError, match="message 1"):
        trained.apply_chat_template([{"role": "user", "content": "x"}, "oops"])


# ------------------------------------------------------------------- errors


def _train(files, out, **kw):
    kw.setdefault("vocab_size", 300)
    return train_bpe(files, output_dir=out, show_progress=False, **kw)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file") as e:
        _train([tmp_path / "nope.txt"], tmp_path / "out")
    assert "nope.txt" in str(e.value)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="is empty") as e:
        _train([empty], tmp_path / "out")
    assert str(empty) in str(e.value)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no documents") as e:
        _train([blank], tmp_path / "out")
    assert str(blank) in str(e.value)
    with pytest.raises(ConfigError, match="at least one"):
        _train([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_utf8_names_file_and_line(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first line\nsecond line\n".encode() + "café au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match="invalid UTF-8") as e:
        _train([bad], tmp_path / "out")
    assert e.value.path == str(bad) and e.value.line == 3
    assert str(e.value).startswith(f"{bad}:3: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', "malformed JSON"),
        ('["a", "list"]', "expected a JSON object"),
        ('{"content": "no text field"}', "missing field 'text'"),
        ('{"text": 42}', "must be a string"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n' + line + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as e:
        _train([path], out)
    assert str(e.value).startswith(f"{path}:4: ")
    # a failed train leaves nothing behind: no output dir, no temp dir beside it
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_bad_training_config(corpus, tmp_path):
    with pytest.raises(ConfigError, match="vocab_size") as e:
        _train([corpus], tmp_path / "out", vocab_size=259)  # 256 bytes + 4 default specials do not fit
    assert ">= 260" in str(e.value)
    for bad in (0, "1000", 1000.0, True):
        with pytest.raises(ConfigError, match="vocab_size"):
            _train([corpus], tmp_path / "out", vocab_size=bad)
    with pytest.raises(ConfigError, match="duplicates"):
        _train([corpus], tmp_path / "out", special_tokens=["<a>", "<a>"])
    assert not (tmp_path / "out").exists()


def test_json_and_parquet_inputs_read_like_data_prepare(tmp_path):
    """One reader for tokenizer training and data preparation: JSON arrays and Parquet train the same tokenizer as
    the same documents in JSONL, and their errors name the file the same way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _corpus_lines(600, seed=3)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    array = tmp_path / "docs.json"
    array.write_text(json.dumps([{"body": d} for d in docs]), encoding="utf-8")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": docs}), parquet, row_group_size=100)
    vocabs = []
    for path in (jsonl, array, parquet):
        tok = _train([path], tmp_path / f"tok-{path.suffix[1:]}", vocab_size=400, text_field="body")
        vocabs.append(tok.backend.get_vocab())
        assert tok.decode(tok.encode(docs[0])) == docs[0]
    assert vocabs[0] == vocabs[1] == vocabs[2] and len(vocabs[0]) == 400
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"body": "fine"}, {"text": "no body"}]), encoding="utf-8")
    with pytest.raises(DataError, match="record 1: missing field 'body'") as e:
        _train([bad], tmp_path / "out", text_field="body")
    assert str(e.value).startswith(f"{bad}: ")
    with pytest.raises(DataError, match="has no column 'text'"):
        _train([parquet], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_errors(tmp_path, trained):
    with pytest.raises(DataError, match="no such tokenizer") as e:
        Tokenizer.load(tmp_path / "missing")
    assert "missing" in str(e.value)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no tokenizer.json") as e:
        Tokenizer.load(tmp_path / "empty_dir")
    assert "empty_dir" in str(e.value)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"not": "a tokenizer"}', encoding="utf-8")
    with pytest.raises(DataError, match="not a valid Hugging Face tokenizer.json"):
        Tokenizer.load(broken)

    directory = trained.save(tmp_path / "tok")
    (directory / "tokenizer_config.json").write_text('{"bos_token": "<s>",\n oops}', encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON") as e:
        Tokenizer.load(directory)
    assert str(e.value).startswith(f"{directory / 'tokenizer_config.json'}:2: ")
    (directory / "tokenizer_config.json").write_text('{"bos_token": "<s>"}', encoding="utf-8")
    with pytest.raises(DataError, match="not in the vocabulary"):
        Tokenizer.load(directory)
    # dict-valued special tokens, as older transformers wrote them
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"__type": "AddedToken", "content": "<|pad|>"}}), encoding="utf-8"
    )
    assert Tokenizer.load(directory).bos_id == 1
    (directory / "tokenizer.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(DataError, match="UTF-8") as e:
        Tokenizer.load(directory)
    assert "tokenizer.json" in str(e.value)


def test_no_bos_is_a_clear_error(trained):
    tok = Tokenizer(trained.backend)
    assert tok.bos_id is None and tok.pad_id is None
    with pytest.raises(ConfigError, match="no BOS"):
        tok.encode("x", add_bos=True)
    with pytest.raises(ConfigError, match="not in the tokenizer's vocabulary"):
        Tokenizer(trained.backend, eos_token="<nope>")


def test_tinyshakespeare_training(shared_data, tmp_path):
    source = shared_data / "tinyshakespeare/input.txt"
    tok = _train([source], tmp_path / "shakespeare", vocab_size=600)
    text = source.read_text(encoding="utf-8")[:5000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # BPE actually compresses
