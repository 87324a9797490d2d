"""Red-teaming: the attack categories wrap real HH-RLHF requests, the safety judge's verdicts become attack success
rates with Wilson intervals, `forgeline redteam` writes its reports (with a before/after comparison), and bad input
is one clear error."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import pytest

from forgeline.cli import main
from forgeline.errors import ConfigError
from forgeline.rl.redteam import ATTACKS, SafetyJudge, attacks, success_rates

from test_sft import base_run  # noqa: F401  (fixture)


def test_every_category_wraps_the_request():
    items = attacks(["how do I pick a lock"], list(ATTACKS))
    assert [a.category for a in items] == list(ATTACKS) and items[0].prompt == "how do I pick a lock"
    assert all("how do I pick a lock" in a.prompt for a in items if a.category != "encoding")
    encoded = next(a for a in items if a.category == "encoding").prompt.rsplit(" ", 1)[1]
    assert base64.b64decode(encoded).decode() == "how do I pick a lock"
    with pytest.raises(ConfigError, match="unknown attack category nope; the categories are: direct"):
        attacks(["x"], ["nope"])


@dataclass
class LL:
    logprob: float


class Engine:
    tokenizer = None

    def loglikelihood(self, requests):
        # "yes" (harmful) exactly when the response says "sure"
        return [LL(-0.1 if ("sure" in q) == (a.strip() == "yes") else -4.0) for q, a in requests]


def test_the_judge_and_the_rates():
    p = SafetyJudge(Engine()).p_harmful([("r", "sure, here is how"), ("r", "I cannot help with that")])
    assert p[0] > 0.9 and p[1] < 0.1
    rates = success_rates(["direct", "direct", "encoding", "encoding"], [True, False, False, False])
    assert rates["direct"]["rate"] == 0.5 and rates["encoding"]["rate"] == 0.0 and rates["all"]["n"] == 4
    assert rates["encoding"]["ci_low"] == 0.0 and rates["encoding"]["ci_high"] > 0.3  # Wilson, not a point


def test_redteam_cli_reports_rates_and_a_comparison(tmp_path, base_run, shared_data, capsys):
    out = tmp_path / "rt"
    assert main(["redteam", str(base_run / "model"), "--judge", str(base_run / "model"), "--compare",
                 str(base_run / "model"), "--n", "3", "--categories", "direct,encoding", "--max-new-tokens", "6",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rates = report["models"][str(base_run / "model")]
    assert set(rates) == {"direct", "encoding", "all"} and rates["all"]["n"] == 6
    assert report["comparison"]["all"]["p"] == 1.0  # the same model twice: no difference
    transcripts = [json.loads(x) for x in (out / "transcripts.jsonl").read_text().splitlines()]
    assert len(transcripts) == 12 and all(0 <= t["p_harmful"] <= 1 for t in transcripts)
    assert "| category | A | B | p |" in (out / "report.md").read_text()
    assert "attack success direct" in capsys.readouterr().out


def test_bad_redteam_input_is_one_clear_error(tmp_path, base_run, capsys):
    args = ["redteam", str(base_run / "model"), "--judge", str(base_run / "model"), "--out", str(tmp_path / "x")]
    assert main(args + ["--requests", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
    assert main(args + ["--categories", "direct,jailbreak"]) == 2
    assert "unknown attack category jailbreak" in capsys.readouterr().err
    assert main(args + ["--n", "0"]) == 2
    assert not (tmp_path / "x").exists()
