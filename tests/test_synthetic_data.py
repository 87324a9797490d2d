"""Seeded synthetic arithmetic (forgeline.data.synthetic, `forgeline data synthetic`): determinism, the held-out split,
the difficulty knob, and records that forgeline's own SFT, preference and pre-training readers load."""

import json
import re

import pytest

from forgeline.cli import main
from forgeline.data import iter_file_documents, load_chat_template, load_index, prepare_dataset
from forgeline.data.preference import iter_preference_examples, load_preference_data
from forgeline.data.sft import iter_sft_examples, load_sft_samples
from forgeline.data.synthetic import (
    Difficulty,
    answer_of,
    iter_problems,
    make_problems,
    preference_records,
    rl_records,
    sft_records,
    split_of,
    text_documents,
    write_synthetic,
)
from forgeline.errors import ConfigError
from forgeline.tokenizer import train_bpe

QUESTION = re.compile(r"^What is (.+)\?$")


def _value(expression: str) -> int:
    # the expressions use only digits, spaces, parentheses and + - x, so Python can check the answers
    assert re.fullmatch(r"[0-9 ()+\-x]+", expression)
    return eval(expression.replace("x", "*"))


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------------- generation


def test_the_same_seed_gives_the_same_records_and_a_larger_n_extends_a_smaller_one():
    assert rl_records(50, seed=3) == rl_records(50, seed=3)
    assert rl_records(80, seed=3)[:50] == rl_records(50, seed=3)
    assert rl_records(50, seed=3) != rl_records(50, seed=4)
    assert text_documents(20, seed=3) == text_documents(20, seed=3)
    assert preference_records(30, seed=1) == preference_records(30, seed=1)


def test_every_record_kind_asks_the_same_questions_for_the_same_seed():
    rl = rl_records(40, seed=7)
    sft = sft_records(40, seed=7)
    pref = preference_records(40, seed=7)
    assert [r["prompt"] for r in rl] == [r["messages"][0]["content"] for r in sft] == [r["prompt"] for r in pref]
    assert [r["answer"] for r in rl] == [r["messages"][1]["content"] for r in sft] == [r["chosen"] for r in pref]


def test_train_and_test_share_no_question_whatever_the_seed_and_size():
    difficulty = Difficulty(digits=1, steps=1)  # a small space: collisions would show
    train = {r["prompt"] for seed in range(3) for r in rl_records(200, seed=seed, difficulty=difficulty)}
    test = {r["prompt"] for seed in range(3) for r in rl_records(25, split="test", seed=seed, difficulty=difficulty)}
    assert train and test and not train & test
    assert all(split_of(q) == "train" for q in train) and all(split_of(q) == "test" for q in test)
    questions = [p.question for p in make_problems(3000, seed=0)]
    assert len(set(questions)) == 3000  # distinct within a file too


def test_about_a_tenth_of_all_questions_are_held_out():
    everything = {f"What is {a} {op} {b}?" for a in range(100) for b in range(100) for op in "+-x"}
    share = sum(split_of(q) == "test" for q in everything) / len(everything)
    assert 0.09 < share < 0.11


def test_pretraining_text_holds_only_facts_of_its_split():
    test_questions = {p.question for p in make_problems(20, split="test", difficulty=Difficulty(digits=1))}
    documents = text_documents(300, seed=0, difficulty=Difficulty(digits=1))
    facts = []
    for line in "\n".join(documents).splitlines():
        if match := re.fullmatch(r"(What is (.+)\?) (\d+)\.", line):
            facts.append((match.group(1), int(match.group(3))))
        elif match := re.fullmatch(r"(.+) = (\d+)\.", line):
            facts.append((f"What is {match.group(1)}?", int(match.group(2))))
        else:
            assert re.fullmatch(r"[A-Z][a-z ]+\.", line), line
    assert len(facts) > 100
    for question, answer in facts:
        assert split_of(question) == "train" and question not in test_questions
        assert answer == _value(QUESTION.match(question).group(1))


@pytest.mark.parametrize("digits,steps,ops", [(1, 1, ("+",)), (2, 1, ("+", "-", "x")), (3, 2, ("x", "-")),
                                              (2, 3, ("+", "-"))])
def test_difficulty_sets_digits_steps_and_operations(digits, steps, ops):
    problems = make_problems(60, seed=5, difficulty=Difficulty(digits=digits, steps=steps, ops=ops))
    for p in problems:
        expression = QUESTION.match(p.question).group(1)
        numbers = re.findall(r"\d+", expression)
        assert len(numbers) == steps + 1
        assert all(len(n) == digits for n in numbers)
        assert set(re.findall(r" ([+\-x]) ", expression)) <= set(ops)
        assert expression.count("(") == steps - 1
        assert p.answer == _value(expression) >= 0


def test_two_step_questions_put_the_first_step_in_parentheses():
    questions = [p.question for p in make_problems(20, difficulty=Difficulty(digits=2, steps=2))]
    two_steps = re.compile(r"What is (\(\d+ [+\-x] \d+\) [+\-x] \d+|\d+ - \(\d+ [+\-x] \d+\))\?")
    assert all(two_steps.fullmatch(q) for q in questions)


def test_rejected_answers_are_near_misses():
    for record in preference_records(200, seed=2):
        chosen, rejected = int(record["chosen"]), int(record["rejected"])
        assert rejected != chosen and rejected >= 0 and abs(rejected - chosen) in (1, 2, 10)


@pytest.mark.parametrize("call,message", [
    (lambda: Difficulty(digits=0), "digits must be an integer >= 1"),
    (lambda: Difficulty(steps=0), "steps must be an integer >= 1"),
    (lambda: Difficulty(ops=("+", "/")), "unknown operation '/'"),
    (lambda: Difficulty(ops=()), "ops must be a non-empty list"),
    (lambda: rl_records(0), "n must be an integer >= 1"),
    (lambda: rl_records(5, split="dev"), "split must be one of train, test"),
    (lambda: make_problems(100, split="test", difficulty=Difficulty(digits=1, ops=("+",))),
     "n=100 is more than the test split holds"),
])
def test_bad_values_are_config_errors_naming_the_option(call, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        call()


def test_an_endless_stream_of_one_split():
    stream = iter_problems(split="test", seed=0, difficulty=Difficulty(digits=1, ops=("+",)))
    drawn = [next(stream) for _ in range(200)]  # more than the split's distinct questions: repeats are fine
    assert all(split_of(p.question) == "test" for p in drawn)


@pytest.mark.parametrize("text,answer", [
    ("85", "85"), (" 85", "85"), ("\n 85.", "85"), ("085 and then 12", "85"), ("85\nWhat is 3 + 4? 7", "85"),
    ("-3", "-3"), ("85.5", None), ("85,000", None), ("The answer is 85", None), ("", None), ("x 85", None),
])
def test_answer_of_reads_the_leading_integer(text, answer):
    assert answer_of(text) == answer


# ------------------------------------------------------------------------------------------------ the readers


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_tok")
    corpus = write_synthetic(root / "corpus.txt", "text", 400, seed=0)
    tokenizer = train_bpe([corpus], vocab_size=300, output_dir=root / "tok", show_progress=False)
    return load_chat_template(tokenizer, "chatml", add_special_tokens=True)


def test_sft_records_load_with_the_sft_reader(tmp_path, template):
    path = write_synthetic(tmp_path / "sft.jsonl", "sft", 30, seed=1)
    examples = list(iter_sft_examples(path))
    assert [e.messages for e in examples] == [r["messages"] for r in sft_records(30, seed=1)]
    samples, stats = load_sft_samples(path, template, max_length=64)
    assert len(samples) == 30 and stats.skipped == 0 and stats.truncated == 0
    first = examples[0].messages
    learned = template.tokenizer.decode(samples[0].input_ids[samples[0].loss_mask].tolist())
    assert learned.startswith(first[1]["content"])


def test_preference_records_load_with_the_preference_reader(tmp_path, template):
    path = write_synthetic(tmp_path / "pref.jsonl", "preference", 25, seed=1)
    pairs = list(iter_preference_examples(path))
    records = preference_records(25, seed=1)
    assert [(p.prompt[-1]["content"], p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in records]
    tokenized, stats = load_preference_data(path, template, max_length=64)
    assert len(tokenized) == 25 and stats.identical == 0


def test_text_is_split_into_documents_by_data_prepare(tmp_path, template):
    path = write_synthetic(tmp_path / "text.txt", "text", 40, seed=4)
    assert list(iter_file_documents(path)) == text_documents(40, seed=4)
    index = prepare_dataset([path], tokenizer=template.tokenizer, output_dir=tmp_path / "data", val_fraction=0.1,
                            show_progress=False)
    assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == 40
    assert load_index(tmp_path / "data")["splits"]


def test_rl_records_are_prompts_with_answers(tmp_path):
    path = write_synthetic(tmp_path / "rl.jsonl", "rl", 10, split="test", seed=9)
    assert _jsonl(path) == rl_records(10, split="test", seed=9)
    assert all(set(r) == {"prompt", "answer"} and answer_of(r["answer"]) == r["answer"] for r in _jsonl(path))
    assert [p.name for p in tmp_path.iterdir()] == ["rl.jsonl"]  # the atomic write left no temp file


@pytest.mark.parametrize("kind,name", [("text", "t.jsonl"), ("sft", "s.txt"), ("rl", "r.json")])
def test_a_file_the_readers_would_misread_is_refused(tmp_path, kind, name):
    with pytest.raises(ConfigError, match="out: "):
        write_synthetic(tmp_path / name, kind, 3)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------------ the CLI


def test_cli_writes_the_records(tmp_path, capsys):
    out = tmp_path / "rl.jsonl"
    assert main(["data", "synthetic", "--kind", "rl", "--n", "12", "--split", "test", "--seed", "3", "--digits", "3",
                 "--steps", "2", "--ops", "+", "x", "--out", str(out)]) == 0
    assert _jsonl(out) == rl_records(12, split="test", seed=3, difficulty=Difficulty(digits=3, steps=2, ops=("+", "x")))
    assert "wrote 12 rl records (test split, seed 3)" in capsys.readouterr().out
    text = tmp_path / "corpus.txt"
    assert main(["data", "synthetic", "--kind", "text", "--n", "5", "--ops=+,-", "--out", str(text)]) == 0
    assert list(iter_file_documents(text)) == text_documents(5, difficulty=Difficulty(ops=("+", "-")))
    quoted = tmp_path / "quoted.jsonl"  # --ops "+ -" as one shell word: the same as two
    assert main(["data", "synthetic", "--kind", "rl", "--n", "4", "--ops", "+ -", "--out", str(quoted)]) == 0
    assert _jsonl(quoted) == rl_records(4, difficulty=Difficulty(ops=("+", "-")))


@pytest.mark.parametrize("args,message", [
    (["--n", "0"], "n must be an integer >= 1, got 0"),
    (["--n", "5", "--digits", "0"], "digits must be an integer >= 1, got 0"),
    (["--n", "5", "--ops", "+", "/"], "ops: unknown operation '/'"),
])
def test_cli_bad_values_are_one_error_line(tmp_path, capsys, args, message):
    out = tmp_path / "x.jsonl"
    assert main(["data", "synthetic", "--kind", "sft", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("forgeline: error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
