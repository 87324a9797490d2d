"""forgeline.label.stats against hand-computed textbook values, and the export's pair expansion and report."""

from __future__ import annotations

import math

import pytest

from forgeline.label.export import build_report, preference_pairs
from forgeline.label.stats import cohen_kappa, judgments, krippendorff_alpha_nominal, wilson_interval, win_rates
from forgeline.label.store import AnswerRecord


def test_cohen_kappa_textbook_examples():
    # Wikipedia's example: 50 proposals, yes/yes 20, yes/no 5, no/yes 10, no/no 15: p_o = 0.7, p_e = 0.5 -> 0.4
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    # three categories: p_o = 4/6; marginals (2, 2, 2) and (2, 3, 1): p_e = 12/36 -> (2/3 - 1/3) / (2/3) = 0.5
    assert cohen_kappa(list("aabbcc"), list("abbbca")) == pytest.approx(0.5)
    assert cohen_kappa(list("abab"), list("abab")) == pytest.approx(1.0)
    assert cohen_kappa(list("aaaa"), list("aaaa")) is None  # chance agreement is already 1
    assert cohen_kappa([], []) is None


def test_krippendorff_alpha_textbook_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", the 4 observers x 12 units example with
    # missing values: nominal alpha = 0.743
    observers = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[o[u] for o in observers if o[u] is not None] for u in range(12)]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_alpha_by_hand():
    # two coders, units (a,a) (a,b) (b,b) (b,b): n = 8, n_a = 3, n_b = 5, o_ab = o_ba = 1
    # alpha = 1 - (n - 1) * 2 / (2 * 3 * 5) = 1 - 14/30
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "b"], ["b", "b"], ["b", "b"]]) == pytest.approx(16 / 30)
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)
    assert krippendorff_alpha_nominal([["a", "a"], ["a"]]) is None  # one category: no disagreement expected
    assert krippendorff_alpha_nominal([["a"], ["b"]]) is None  # no unit has two values


def test_wilson_interval():
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _record(item, who, kind, ranking, models=("m1", "m2")):
    return AnswerRecord(item_id=item, annotator=who, kind=kind, ranking=ranking, comment="", prompt=f"p{item}",
                        responses=tuple((m, f"{m} answers p{item}") for m in models))


def test_a_ranking_expands_to_every_ordered_pair():
    three = ("m1", "m2", "m3")
    records = [_record(1, "alice", "ranked", (2, 0, 1), three), _record(2, "alice", "preferred", (1, 0)),
               _record(3, "alice", "tie", None), _record(4, "alice", "both_bad", None)]
    pairs = preference_pairs(records)
    assert [(p["item"], p["chosen_model"], p["rejected_model"]) for p in pairs] == [
        (1, "m3", "m1"), (1, "m3", "m2"), (1, "m1", "m2"), (2, "m2", "m1")]
    assert pairs[0] == {"prompt": "p1", "chosen": "m3 answers p1", "rejected": "m1 answers p1", "item": 1,
                        "annotator": "alice", "chosen_model": "m3", "rejected_model": "m1"}
    assert [j.verdict for j in judgments(1, "alice", "ranked", (2, 0, 1), 3)] == ["first", "second", "second"]


def test_report_counts_agreement_and_win_rates():
    records = [
        _record(1, "alice", "preferred", (0, 1)), _record(1, "bob", "preferred", (0, 1)),
        _record(2, "alice", "preferred", (1, 0)), _record(2, "bob", "tie", None),
        _record(3, "alice", "both_bad", None), _record(3, "bob", "both_bad", None),
        _record(4, "alice", "preferred", (0, 1)),
    ]
    project = {"project": "p", "items": 4, "annotators": ["alice", "bob", "carol"], "settings": {}}
    report = build_report(project, records, pairs_written=len(preference_pairs(records)))
    assert report["choices"] == {"preferred": 4, "ranked": 0, "tie": 1, "both_bad": 2}
    assert report["pairs_written"] == 4
    assert report["answers_per_annotator"] == {"alice": 4, "bob": 3, "carol": 0}
    agree = report["agreement"]
    assert agree["items_labelled_by_2_or_more"] == 3
    (pair,) = agree["cohen_kappa"]
    # alice: first, second, both_bad; bob: first, tie, both_bad -> p_o = 2/3, p_e = 2/9 -> (2/3 - 2/9) / (7/9)
    assert pair["annotators"] == ["alice", "bob"] and pair["units"] == 3
    assert pair["kappa"] == pytest.approx((2 / 3 - 2 / 9) / (7 / 9))
    assert agree["krippendorff_alpha_nominal"] == pytest.approx(
        krippendorff_alpha_nominal([["first", "first"], ["second", "tie"], ["both_bad", "both_bad"]]))
    wins = report["win_rates"]
    assert "half" in wins["ties"] and "excluded" in wins["ties"]
    m1 = wins["models"]["m1"]
    # m1 beat m2 on item 1 (twice) and item 4, lost item 2 once, tied once: (3 + 0.5) / 5
    assert (m1["wins"], m1["losses"], m1["ties"], m1["both_bad"]) == (3, 1, 1, 2)
    assert m1["win_rate"] == pytest.approx(3.5 / 5)
    assert m1["ci95"] == pytest.approx(list(wilson_interval(3.5, 5)))
    assert wins["models"]["m2"]["win_rate"] == pytest.approx(1.5 / 5)
    assert math.isclose(wins["head_to_head"][0]["win_rate"] + wins["head_to_head"][1]["win_rate"], 1.0)


def test_win_rates_skip_models_only_in_both_bad_answers():
    report = win_rates(judgments(7, "alice", "both_bad", None, 2), {7: ["m1", "m2"]})
    assert report["models"]["m1"]["comparisons"] == 0 and report["models"]["m1"]["win_rate"] is None
