"""A/B comparison of two evaluations on the same documents, with paired significance.

Each side is an evaluation directory (`forgeline eval --out DIR`: report.json and samples.jsonl); the documents
both sides scored are paired by (task, document id). Per task and metric:

* the difference of the means (B - A) with a 95% paired-bootstrap interval (documents resampled with replacement,
  both sides together, seeded);
* a p-value: McNemar's exact test for metrics that are 0 or 1 per document (acc, exact match, pass@1 with one
  sample): only the documents the two sides disagree on count, and under "no difference" each disagreement goes
  either way with probability 1/2; otherwise the paired bootstrap's two-sided p-value.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["compare_dirs", "comparison_markdown", "mcnemar_p", "paired_bootstrap"]


def _samples(directory: Path) -> dict[tuple[str, str], dict[str, float]]:
    path = directory / "samples.jsonl"
    if not path.is_file():
        raise ConfigError(f"{directory} has no samples.jsonl: give a directory `forgeline eval --out` wrote")
    out = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            out[(record["task"], str(record["doc_id"]))] = record["metrics"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}:{i}: not a forgeline eval sample record ({exc})") from None
    return out


def mcnemar_p(a: list[float], b: list[float]) -> float:
    """Two-sided exact McNemar p-value of paired 0/1 outcomes."""
    only_a = sum(1 for x, y in zip(a, b) if x > y)
    only_b = sum(1 for x, y in zip(a, b) if y > x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: list[float], b: list[float], *, resamples: int = 10000, seed: int = 0
                     ) -> tuple[float, float, float]:
    """(low, high) of the 95% interval of mean(b) - mean(a), and the two-sided p-value of "no difference"."""
    rng = random.Random(seed)
    n = len(a)
    diffs = [y - x for x, y in zip(a, b)]
    stats = []
    for _ in range(resamples):
        stats.append(sum(diffs[rng.randrange(n)] for _ in range(n)) / n)
    stats.sort()
    low, high = stats[int(0.025 * resamples)], stats[min(int(0.975 * resamples), resamples - 1)]
    below = sum(1 for s in stats if s <= 0) / resamples
    above = sum(1 for s in stats if s >= 0) / resamples
    return low, high, min(1.0, 2 * min(below, above))


def compare_dirs(a: str | Path, b: str | Path, *, resamples: int = 10000, seed: int = 0) -> list[dict[str, Any]]:
    left, right = _samples(Path(a)), _samples(Path(b))
    common = sorted(set(left) & set(right))
    if not common:
        raise ConfigError(f"{a} and {b} share no (task, document) pairs: evaluate the same tasks and documents")
    rows = []
    for task in sorted({t for t, _ in common}):
        keys = [k for k in common if k[0] == task]
        metrics = sorted(set(left[keys[0]]) & set(right[keys[0]]))
        for metric in metrics:
            x = [float(left[k][metric]) for k in keys]
            y = [float(right[k][metric]) for k in keys]
            low, high, p_boot = paired_bootstrap(x, y, resamples=resamples, seed=seed)
            binary = all(v in (0.0, 1.0) for v in x + y)
            rows.append({"task": task, "metric": metric, "n": len(keys), "a": sum(x) / len(x), "b": sum(y) / len(y),
                         "diff": (sum(y) - sum(x)) / len(x), "ci_low": low, "ci_high": high,
                         "test": "McNemar (exact)" if binary else "paired bootstrap",
                         "p": mcnemar_p(x, y) if binary else p_boot})
    return rows


def comparison_markdown(rows: list[dict[str, Any]], a: str, b: str) -> str:
    lines = [f"A = {a}", f"B = {b}", "", "| task | metric | n | A | B | B - A | 95% CI | test | p |",
             "|---|---|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {r['n']} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} | "
                     f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['test']} | {r['p']:.4g} |")
    return "\n".join(lines) + "\n"
