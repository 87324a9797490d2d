"""SFT records -> conversations -> tokenized samples (forgeline.data.sft), on real Alpaca and GSM8K data."""

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgeline.data import load_chat_template
from forgeline.data.sft import (
    ALPACA_PROMPT,
    SFTFields,
    SFTStats,
    iter_sft_examples,
    load_sft_samples,
    tokenize_examples,
)
from forgeline.errors import ConfigError, DataError
from forgeline.tokenizer import train_bpe

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_tok")
    rng = random.Random(0)
    words = ["what", "is", "the", "answer", "to", "two", "plus", "three", "five", "a", "question", "hello"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)) + "\n")
    tokenizer = train_bpe([corpus], vocab_size=300, output_dir=root / "tok", show_progress=False)
    return load_chat_template(tokenizer, "chatml")


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


MESSAGES = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "and 2+2?"},
    {"role": "assistant", "content": "4"},
]}
SHAREGPT = {"conversations": [
    {"from": "system", "value": "You are terse."},
    {"from": "human", "value": "2+3?"},
    {"from": "gpt", "value": "5"},
    {"from": "human", "value": "and 2+2?"},
    {"from": "gpt", "value": "4"},
]}


# ------------------------------------------------------------------------------------------------ formats


def test_alpaca_json_array(shared_data, chat):
    path = shared_data / "alpaca" / "alpaca_5000.json"
    examples = list(iter_sft_examples(path))
    assert len(examples) == 5000
    records = json.loads(path.read_text(encoding="utf-8"))
    with_input = next(i for i, r in enumerate(records) if r["input"].strip())
    without = next(i for i, r in enumerate(records) if not r["input"])
    r = records[with_input]
    assert examples[with_input].messages == [
        {"role": "user", "content": ALPACA_PROMPT.format(instruction=r["instruction"], input=r["input"])},
        {"role": "assistant", "content": r["output"]},
    ]
    assert examples[with_input].where == f"{path}: item {with_input}"
    assert "### Input:" not in examples[without].messages[0]["content"]
    assert examples[without].messages[0]["content"].endswith(f"{records[without]['instruction']}\n\n### Response:")
    plain = next(iter_sft_examples(path, instruction_style="plain", system_prompt="Be helpful."))
    assert plain.messages == [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": f"{records[0]['instruction']}\n\n{records[0]['input']}"},
        {"role": "assistant", "content": records[0]["output"]},
    ]
    samples, stats = load_sft_samples(path, chat, max_length=4096)
    assert stats.records == 5000 and stats.samples == len(samples) == 5000 - stats.dropped_no_targets
    assert stats.truncated == 0 and stats.skipped == 0
    assert all(s.n_targets > 0 for s in samples)


def test_gsm8k_jsonl_with_renamed_fields(shared_data, chat, tmp_path):
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    fields = {"instruction": "question", "output": "answer"}
    with pytest.raises(DataError, match=r"gsm8k.jsonl:1: cannot tell the format.*'question', 'answer'"):
        list(iter_sft_examples(path))
    examples = list(iter_sft_examples(path, fields=fields, instruction_style="plain"))
    first = json.loads(lines[0])
    assert examples[0].messages == [{"role": "user", "content": first["question"]},
                                    {"role": "assistant", "content": first["answer"]}]
    full, stats = load_sft_samples(path, chat, max_length=100_000, fields=fields, instruction_style="plain")
    assert stats.samples == 40 and stats.truncated == 0
    cut = sorted(len(s) for s in full)[20]
    samples, stats = load_sft_samples(path, chat, max_length=cut, fields=fields, instruction_style="plain")
    assert stats.truncated == sum(len(s) > cut for s in full) > 0 and all(len(s) <= cut for s in samples)
    assert stats.samples + stats.dropped_no_targets == 40


def test_messages_and_sharegpt_give_the_same_conversation(chat, tmp_path):
    a = list(iter_sft_examples(_jsonl(tmp_path / "m.jsonl", [MESSAGES])))
    b = list(iter_sft_examples(_jsonl(tmp_path / "s.jsonl", [SHAREGPT])))
    assert a[0].messages == b[0].messages == MESSAGES["messages"]
    # a configured system prompt never replaces the record's own
    c = list(iter_sft_examples(tmp_path / "m.jsonl", system_prompt="other"))
    assert c[0].messages[0]["content"] == "You are terse."
    samples = tokenize_examples(a + b, chat, max_length=512)
    assert samples[0].input_ids.tolist() == samples[1].input_ids.tolist()


def test_parquet_messages_and_instruction_columns(chat, tmp_path):
    pq.write_table(pa.Table.from_pylist([MESSAGES, MESSAGES]), tmp_path / "chat.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"instruction": "Say hi", "input": None, "output": "hi"},
        {"instruction": "Add", "input": "2 3", "output": "5"},
    ]), tmp_path / "inst.parquet")
    examples = list(iter_sft_examples([tmp_path / "chat.parquet", tmp_path / "inst.parquet"]))
    assert [e.messages for e in examples[:2]] == [MESSAGES["messages"]] * 2
    assert examples[2].messages[0]["content"].endswith("### Instruction:\nSay hi\n\n### Response:")
    assert "### Input:\n2 3\n\n" in examples[3].messages[0]["content"]
    assert examples[3].where.endswith("inst.parquet: row 1")
    pq.write_table(pa.Table.from_pylist([MESSAGES, {"messages": [{"role": "user", "content": "no answer"}]}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: row 1: field 'messages' has no assistant message"):
        list(iter_sft_examples(tmp_path / "bad.parquet"))


def test_auto_detects_the_format_per_file(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [MESSAGES])
    _jsonl(tmp_path / "b.jsonl", [SHAREGPT])
    _jsonl(tmp_path / "c.jsonl", [{"instruction": "x", "output": "y"}])
    examples = list(iter_sft_examples(tmp_path))  # a directory, read in sorted order
    assert [len(e.messages) for e in examples] == [5, 5, 2]


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("record,message", [
    ({"instruction": "x"}, r"missing field 'messages' \(fields present: 'instruction'\)"),
    ({"messages": []}, "field 'messages' must be a non-empty list of messages, got an empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\].role is 'robot'; expected one of"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\].content must be a string, is missing"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, r"messages\[1\] is a system message"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "observation", "value": "b"}]},
     r"conversations\[1\].from is 'observation'"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"messages": [', "malformed JSON"),
])
def test_a_bad_record_names_file_line_and_field(tmp_path, record, message):
    first = SHAREGPT if isinstance(record, dict) and "conversations" in record else MESSAGES  # fixes the format
    path = _jsonl(tmp_path / "data.jsonl", [first, "", record])
    with pytest.raises(DataError, match=f"data.jsonl:3: {message}"):
        list(iter_sft_examples(path))


def test_instruction_field_errors_and_json_item_index(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 3},
                                {"instruction": " ", "output": "b"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"data.json: item 1: field 'output' must be a string, got int"):
        list(iter_sft_examples(path))
    stats = SFTStats()
    examples = list(iter_sft_examples(path, on_error="skip", stats=stats))
    assert len(examples) == 1 and stats.skipped == 2 and stats.records == 3
    assert stats.skip_reasons == {"field 'output' must be a string, got int": 1, "field 'instruction' is empty": 1}
    assert stats.skip_examples[0].endswith("data.json: item 1: field 'output' must be a string, got int")


def test_skip_policy_counts_and_reports(chat, tmp_path, caplog):
    no_answer = {"messages": [{"role": "user", "content": "q"}]}
    path = _jsonl(tmp_path / "data.jsonl", [MESSAGES, '{"messages": [', no_answer, SHAREGPT | {"messages": None}])
    with pytest.raises(DataError, match="data.jsonl:2: malformed JSON"):
        load_sft_samples(path, chat, max_length=512)
    samples, stats = load_sft_samples(path, chat, max_length=512, on_error="skip")
    assert len(samples) == 1 and stats.records == 4 and stats.skipped == 3
    assert "3 skipped" in stats.summary() and "3 skipped" in caplog.text
    reasons = stats.to_dict()["skip_reasons"]
    assert reasons["field 'messages' has no assistant message, so there is nothing to learn"] == 1
    only_bad = _jsonl(tmp_path / "bad.jsonl", ['{"x": 1}'])
    with pytest.raises(DataError, match="no usable SFT samples: 1 records -> 0 samples"):
        load_sft_samples(only_bad, chat, max_length=512, on_error="skip")


def test_invalid_utf8_is_an_error_naming_the_line_even_when_skipping(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(MESSAGES).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: invalid UTF-8 \(byte b'\\xe9' at column 18\)"):
        list(iter_sft_examples(path, on_error="skip"))
    array = tmp_path / "data.json"
    array.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "caf\xe9", "output": "b"}]')
    with pytest.raises(DataError, match=r"data.json:3: invalid UTF-8"):
        list(iter_sft_examples(array))


def test_unusable_files_and_options(tmp_path):
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(DataError, match="SFT data must be JSONL"):
        list(iter_sft_examples(tmp_path / "data.txt"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: file holds no records"):
        list(iter_sft_examples(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="no such file or directory"):
        list(iter_sft_examples(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="fields.prompt is not a known field; known: instruction, input"):
        SFTFields.from_config({"prompt": "q"})
    with pytest.raises(ConfigError, match="format must be one of auto, instruction, messages, sharegpt"):
        list(iter_sft_examples(tmp_path / "empty.jsonl", format="alpaca"))
    with pytest.raises(ConfigError, match="on_error must be one of raise, skip"):
        list(iter_sft_examples(tmp_path / "empty.jsonl", on_error="ignore"))


# ---------------------------------------------------------------------------------------------- max_length


def test_overlong_samples_are_truncated_or_dropped_and_counted(chat, tmp_path, caplog):
    long_answer = " ".join(["five"] * 200)
    path = _jsonl(tmp_path / "data.jsonl", [
        MESSAGES,
        {"messages": [{"role": "user", "content": "count"}, {"role": "assistant", "content": long_answer}]},
        {"messages": [{"role": "user", "content": " ".join(["two"] * 200)}, {"role": "assistant", "content": "x"}]},
    ])
    cut = len(chat.encode(MESSAGES["messages"]))  # the first fits exactly; the others are over 200 tokens
    samples, stats = load_sft_samples(path, chat, max_length=cut)
    # the third one's answer lies beyond the cut: nothing left to learn, so it is dropped (and counted)
    assert (stats.samples, stats.truncated, stats.dropped_no_targets) == (2, 2, 1)
    assert [len(s) for s in samples] == [cut, cut] and "2 truncated to max_length" in caplog.text
    samples, stats = load_sft_samples(path, chat, max_length=cut, overlong="drop")
    assert (stats.samples, stats.dropped_too_long, stats.truncated) == (1, 2, 0)
    assert stats.tokens == len(samples[0]) and stats.target_tokens == samples[0].n_targets
    with pytest.raises(ConfigError, match="max_length must be an integer >= 2"):
        load_sft_samples(path, chat, max_length=0)
