"""The AI judge and `forgeline rlaif label`: verdicts from both orders (a position-biased judge gives ties, not
labels), preference data out, agreement with the given preferences, and bad input as one clear error."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from forgeline.cli import main
from forgeline.errors import ConfigError
from forgeline.rl.judge import AIJudge, conversation_text

from test_sft import base_run  # noqa: F401  (fixture)


@dataclass
class LL:
    logprob: float
    is_greedy: bool = False
    tokens: int = 1


class FakeEngine:
    """A judge whose log-probabilities come from a rule on the question text."""

    tokenizer = None

    def __init__(self, rule):
        self.rule = rule
        self.questions = []

    def loglikelihood(self, requests):
        self.questions += [q for q, _ in requests]
        return [LL(self.rule(q, a)) for q, a in requests]


def prefers_good(question, answer):
    """P("1") high when response 1 is the GOOD one."""
    first_is_good = question.index("GOOD") < question.index("BAD")
    return -0.1 if (answer.strip() == "1") == first_is_good else -3.0


def always_first(question, answer):
    return -0.1 if answer.strip() == "1" else -3.0


def test_both_orders_decide_and_a_position_bias_gives_ties():
    items = [("User: hi", "GOOD answer", "BAD answer"), ("User: hi", "BAD answer", "GOOD answer")]
    engine = FakeEngine(prefers_good)
    verdicts = AIJudge(engine).compare(items)
    assert [v.winner for v in verdicts] == ["a", "b"]
    assert verdicts[0].p_a_first > 0.9 and verdicts[0].p_a_second > 0.9 and verdicts[0].consistent
    assert len(engine.questions) == 8  # 2 pairs x 2 orders x the answers " 1" and " 2"
    assert "Response 1:\nGOOD answer" in engine.questions[0] and "Response 1:\nGOOD answer" in engine.questions[6]
    biased = AIJudge(FakeEngine(always_first)).compare(items)
    assert [v.winner for v in biased] == ["tie", "tie"] and biased[0].confidence == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="rubric is empty"):
        AIJudge(engine, rubric="  ")


def test_conversation_text_is_a_plain_transcript():
    assert conversation_text([{"role": "system", "content": "Be kind."}, {"role": "user", "content": " Hi "}]) == \
        "System: Be kind.\nUser: Hi"


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {a} plus {a}?", "chosen": f"It is {2 * a}.", "rejected": "No idea."}
            for a in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rlaif_label_writes_preference_data_and_reports_agreement(tmp_path, base_run, pairs_file, capsys):
    out = tmp_path / "labels.jsonl"
    assert main(["rlaif", "label", "--judge", str(base_run / "model"), "--pairs", str(pairs_file),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "6 pairs judged in both orders" in printed and "agreement with the given preferences" in printed
    records = [json.loads(x) for x in out.read_text().splitlines()]
    decided = int(printed.split("judged in both orders: ")[1].split(" consistent")[0])
    assert len(records) == decided
    for r in records:  # the judge's order, either way round, of the same two responses
        assert {r["chosen"], r["rejected"]} == {"No idea.", "It is " + str(2 * int(r["prompt"][0][
            "content"].split()[2])) + "."}
        assert 0 <= r["judge"]["p_a_first"] <= 1
    if decided:  # the labels are preference data dpo reads (a tiny random judge may find every pair a tie)
        from forgeline.data.preference import iter_preference_examples

        assert len(list(iter_preference_examples([out]))) == decided


def test_rlaif_label_samples_pairs_from_a_policy(tmp_path, base_run, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Tell a story.", "Say hi.", "Count."]))
    out = tmp_path / "labels.jsonl"
    assert main(["rlaif", "label", "--judge", str(base_run / "model"), "--policy", str(base_run / "model"),
                 "--prompts", str(prompts), "--max-new-tokens", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sampled two responses to each of 3 prompts" in printed and out.exists()


def test_bad_rlaif_input_is_one_clear_error(tmp_path, base_run, pairs_file, capsys):
    assert main(["rlaif", "label", "--judge", str(base_run / "model"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "give --pairs FILE, or --policy MODEL with --prompts FILE" in capsys.readouterr().err
    assert main(["rlaif", "label", "--judge", str(base_run / "model"), "--pairs", str(pairs_file), "--rubric",
                 "@" + str(tmp_path / "none.txt"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "none.txt does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "chosen": "b"}\n')
    assert main(["rlaif", "label", "--judge", str(base_run / "model"), "--pairs", str(broken),
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "broken.jsonl:1" in err and "Traceback" not in err
    assert not (tmp_path / "x.jsonl").exists()
