"""Agreement and win rates over comparison answers.

Every answer becomes pairwise judgments: for the responses in slots s < t of an item, "first" (s is better),
"second", "tie" or "both_bad". A choice between two responses is one judgment; a ranking of k responses is k(k-1)/2.
Agreement is measured on these judgments (the unit is an item and a pair of its responses), so items with two and
with more responses count alike; judgments from one ranking are not independent, which makes the numbers a little
optimistic for rankings.

- Cohen's kappa for each pair of annotators, over the units both judged: (p_o - p_e) / (1 - p_e), with p_e from
  each annotator's own category frequencies on those units.
- Krippendorff's alpha (nominal) over all annotators and every unit judged by two or more: 1 - D_o / D_e from the
  coincidence matrix, which allows for missing judgments (Krippendorff 2011, "Computing Krippendorff's
  alpha-reliability").
- Win rates per model with Wilson score intervals; a tie counts as half a win and half a loss, both-bad judgments
  are left out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from ..stats import wilson_interval  # noqa: F401  (re-exported: the report's intervals)

CATEGORIES = ("first", "second", "tie", "both_bad")
TIE_RULE = "a tie counts as half a win and half a loss; both-bad judgments are excluded"


@dataclass(frozen=True)
class Judgment:
    """One annotator's verdict on one pair of an item's responses (slot_a < slot_b)."""

    item_id: int
    slot_a: int
    slot_b: int
    annotator: str
    verdict: str  # one of CATEGORIES

    @property
    def unit(self) -> tuple[int, int, int]:
        return self.item_id, self.slot_a, self.slot_b


def judgments(item_id: int, annotator: str, kind: str, ranking: Sequence[int] | None, n_responses: int
              ) -> list[Judgment]:
    """The pairwise judgments of one answer (see the module docstring)."""
    if kind in ("tie", "both_bad"):
        return [Judgment(item_id, 0, 1, annotator, kind)]
    place = {slot: i for i, slot in enumerate(ranking or ())}
    return [Judgment(item_id, a, b, annotator, "first" if place[a] < place[b] else "second")
            for a, b in combinations(range(n_responses), 2)]


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two raters' labels on the same units, in order; None when it is undefined (no units, or
    both raters used one and the same category throughout, so chance agreement is already 1)."""
    if len(first) != len(second):
        raise ValueError("both raters need a label for every unit")
    if not first:
        return None
    categories = sorted(set(first) | set(second), key=repr)
    index = {c: i for i, c in enumerate(categories)}
    table = np.zeros((len(categories), len(categories)))
    np.add.at(table, ([index[c] for c in first], [index[c] for c in second]), 1)
    table /= table.sum()
    observed = np.trace(table)
    expected = float(table.sum(axis=1) @ table.sum(axis=0))
    if math.isclose(expected, 1.0):
        return None
    return float((observed - expected) / (1 - expected))


def krippendorff_alpha_nominal(units: Iterable[Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal data. `units` holds each unit's labels from whoever labelled it (missing
    ones simply absent); units with fewer than two labels carry no information and are skipped. None when
    undefined (fewer than two pairable labels, or a single category overall, so no disagreement is expected)."""
    units = [list(u) for u in units if len(u) >= 2]
    categories = sorted({c for u in units for c in u}, key=repr)
    if not units or len(categories) < 2:
        return None
    index = {c: i for i, c in enumerate(categories)}
    coincidences = np.zeros((len(categories), len(categories)))
    for unit in units:
        counts = np.bincount([index[c] for c in unit], minlength=len(categories)).astype(float)
        # every ordered pair of different labellers' values in the unit, weighted 1 / (m_u - 1)
        coincidences += (np.outer(counts, counts) - np.diag(counts)) / (len(unit) - 1)
    n_c = coincidences.sum(axis=1)
    n = n_c.sum()
    disagree_observed = coincidences.sum() - np.trace(coincidences)
    disagree_expected = (n_c.sum() ** 2 - (n_c ** 2).sum()) / (n - 1)
    if disagree_expected == 0:
        return None
    return float(1 - disagree_observed / disagree_expected)


def agreement(all_judgments: Sequence[Judgment]) -> dict:
    """Cohen's kappa per annotator pair and Krippendorff's alpha over every unit judged by two or more."""
    by_unit: dict[tuple[int, int, int], dict[str, str]] = defaultdict(dict)
    for j in all_judgments:
        by_unit[j.unit][j.annotator] = j.verdict
    shared = {unit: verdicts for unit, verdicts in by_unit.items() if len(verdicts) >= 2}
    annotators = sorted({a for verdicts in shared.values() for a in verdicts})
    pairs = []
    for a, b in combinations(annotators, 2):
        both = [(v[a], v[b]) for v in shared.values() if a in v and b in v]
        if both:
            first, second = zip(*both)
            agree = sum(x == y for x, y in both) / len(both)
            pairs.append({"annotators": [a, b], "units": len(both), "observed_agreement": agree,
                          "kappa": cohen_kappa(first, second)})
    return {
        "unit": "one pair of an item's responses (a ranking of k responses gives k(k-1)/2 units)",
        "categories": list(CATEGORIES),
        "items_labelled_by_2_or_more": len({unit[0] for unit in shared}),
        "units_labelled_by_2_or_more": len(shared),
        "cohen_kappa": pairs,
        "krippendorff_alpha_nominal": krippendorff_alpha_nominal([list(v.values()) for v in shared.values()]),
    }


def win_rates(all_judgments: Sequence[Judgment], models_of: Mapping[int, Sequence[str]]) -> dict:
    """Per model (over every opponent) and per ordered pair of models: wins, losses, ties, the win rate with ties
    as half a win, and its Wilson 95% interval. `models_of[item_id][slot]` is the model behind a slot."""
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # wins, losses, ties, both_bad
    head_to_head: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for j in all_judgments:
        a, b = models_of[j.item_id][j.slot_a], models_of[j.item_id][j.slot_b]
        column = {"first": (0, 1), "second": (1, 0), "tie": (2, 2), "both_bad": (3, 3)}[j.verdict]
        tally[a][column[0]] += 1
        tally[b][column[1]] += 1
        head_to_head[(a, b)][column[0]] += 1
        head_to_head[(b, a)][column[1]] += 1

    def summary(counts: list[int]) -> dict:
        wins, losses, ties, both_bad = counts
        n = wins + losses + ties
        score = wins + 0.5 * ties
        low, high = wilson_interval(score, n)
        return {"wins": wins, "losses": losses, "ties": ties, "both_bad": both_bad, "comparisons": n,
                "win_rate": score / n if n else None, "ci95": [low, high] if n else None}

    return {
        "ties": TIE_RULE,
        "interval": "Wilson score interval, 95%",
        "models": {model: summary(counts) for model, counts in sorted(tally.items())},
        "head_to_head": [dict(model=a, opponent=b, **summary(counts))
                         for (a, b), counts in sorted(head_to_head.items())],
    }
