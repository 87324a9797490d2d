"""`forgeline label export`: a project's answers as preference pairs (JSONL) and a report (JSON).

One line per ordered pair an answer implies: a choice between two responses is one pair, a ranking of k responses
k(k-1)/2 pairs (every better one over every worse one); a tie or a both-bad answer gives none and is only counted.
The lines are the ``prompt`` / ``chosen`` / ``rejected`` records preference training reads, plus where each came
from.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Any

from ..errors import ForgelineError
from ..files import atomic_write_text
from .stats import agreement, judgments, win_rates
from .store import KINDS, AnswerRecord, project_answers


def preference_pairs(records: list[AnswerRecord]) -> list[dict[str, Any]]:
    pairs = []
    for r in records:
        if r.ranking is None:
            continue
        for better, worse in combinations(r.ranking, 2):
            (chosen_model, chosen), (rejected_model, rejected) = r.responses[better], r.responses[worse]
            pairs.append({"prompt": r.prompt, "chosen": chosen, "rejected": rejected, "item": r.item_id,
                          "annotator": r.annotator, "chosen_model": chosen_model, "rejected_model": rejected_model})
    return pairs


def build_report(project: dict[str, Any], records: list[AnswerRecord], pairs_written: int) -> dict[str, Any]:
    all_judgments = [j for r in records for j in judgments(r.item_id, r.annotator, r.kind, r.ranking,
                                                           len(r.responses))]
    models_of = {r.item_id: [model for model, _ in r.responses] for r in records}
    kinds = Counter(r.kind for r in records)
    per_annotator = Counter(r.annotator for r in records)
    return {
        "project": project["project"],
        "items": project["items"],
        "answers": len(records),
        "answers_per_annotator": {name: per_annotator.get(name, 0) for name in project["annotators"]},
        "choices": {kind: kinds.get(kind, 0) for kind in KINDS},
        "pairs_written": pairs_written,
        "no_pair": {"tie": kinds.get("tie", 0), "both_bad": kinds.get("both_bad", 0)},
        "agreement": agreement(all_judgments),
        "win_rates": win_rates(all_judgments, models_of),
    }


def export_project(conn: sqlite3.Connection, project: str, out: str | Path) -> dict[str, Any]:
    """Write the project's preference pairs to `out` (atomically) and return the report."""
    summary, records = project_answers(conn, project)
    pairs = preference_pairs(records)
    try:
        atomic_write_text(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    except OSError as exc:
        raise ForgelineError(f"cannot write {out}: {exc.strerror or exc}") from None
    return build_report(summary, records, len(pairs))


def _number(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report for a terminal: counts, agreement, win rates."""
    choices = report["choices"]
    lines = [
        f"project {report['project']}: {report['answers']} answers on {report['items']} items "
        f"({', '.join(f'{name} {n}' for name, n in report['answers_per_annotator'].items()) or 'no annotators'})",
        f"choices: preferred {choices['preferred']}, ranked {choices['ranked']}, tie {choices['tie']}, "
        f"both bad {choices['both_bad']} -> {report['pairs_written']} preference pairs",
    ]
    agree = report["agreement"]
    if agree["units_labelled_by_2_or_more"]:
        lines.append(f"agreement on {agree['items_labelled_by_2_or_more']} items labelled by 2+ annotators "
                     f"({agree['units_labelled_by_2_or_more']} response pairs): Krippendorff's alpha "
                     f"{_number(agree['krippendorff_alpha_nominal'])}")
        for pair in agree["cohen_kappa"]:
            lines.append(f"  Cohen's kappa {pair['annotators'][0]} / {pair['annotators'][1]}: "
                         f"{_number(pair['kappa'])} on {pair['units']} pairs "
                         f"(raw agreement {pair['observed_agreement']:.1%})")
    else:
        lines.append("agreement: no item has answers from two annotators yet")
    wins = report["win_rates"]
    if wins["models"]:
        lines.append(f"win rates ({wins['ties']}; {wins['interval']}):")
        width = max(len(m) for m in wins["models"])
        for model, s in wins["models"].items():
            if s["comparisons"]:
                lines.append(f"  {model:<{width}}  {s['win_rate']:.1%}  [{s['ci95'][0]:.1%}, {s['ci95'][1]:.1%}]"
                             f"  ({s['wins']} W / {s['losses']} L / {s['ties']} T, {s['both_bad']} both bad)")
            else:
                lines.append(f"  {model:<{width}}  n/a  (no comparison but both bad: {s['both_bad']})")
    return lines
