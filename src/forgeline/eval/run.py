"""Running tasks on a model: documents -> requests -> the engine -> per-document metrics -> a report.

Every document's record (prompt, per-choice log-likelihoods or the generated text, the extracted answer, its
metrics) goes to a JSONL log; the report gives each metric's mean with its standard error (the sample standard
deviation over sqrt(n), as lm-evaluation-harness reports it), and, when only a sample of the documents was
evaluated (`limit` or `sample`), the 95% interval of the full set's score it estimates.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import atomic_write_text
from .engine import GenerationRequest, RequestEngine
from .tasks import Doc, GenerationTask, MultipleChoiceTask, Task, get_task

__all__ = ["TaskResult", "add_contamination", "evaluate", "select_docs", "training_data_of", "write_report"]


@dataclass
class TaskResult:
    task: str
    version: int
    num_fewshot: int
    n: int  # documents evaluated
    total: int  # documents in the benchmark's files
    metrics: dict[str, dict[str, float]]  # metric -> {"mean", "stderr", "ci_low", "ci_high"}
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    per_doc: list[tuple[str, dict[str, float]]] = field(default_factory=list, repr=False)  # (doc id, metrics)
    contamination: dict[str, Any] | None = None  # add_contamination's counts and clean-subset scores

    def to_dict(self) -> dict[str, Any]:
        out = {"task": self.task, "version": self.version, "num_fewshot": self.num_fewshot, "n": self.n,
               "total": self.total, "metrics": self.metrics, "extra": self.extra, "seconds": self.seconds}
        if self.contamination is not None:
            out["contamination"] = self.contamination
        return out


def select_docs(docs: list[Doc], *, limit: int | None, sample: int | None, seed: int) -> list[Doc]:
    """The first `limit` documents, or a stratified random `sample` (by group where a task has groups, MMLU's
    subjects: each gets its share, at least one), or all of them."""
    if limit is not None and sample is not None:
        raise ConfigError("give --limit or --sample, not both")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {limit}")
        return docs[:limit]
    if sample is None or sample >= len(docs):
        return docs
    if sample < 1:
        raise ConfigError(f"--sample must be >= 1, got {sample}")
    rng = random.Random(seed)
    groups: dict[str, list[Doc]] = {}
    for doc in docs:
        groups.setdefault(doc.group, []).append(doc)
    chosen: list[Doc] = []
    for name in sorted(groups):
        members = groups[name]
        share = max(1, round(sample * len(members) / len(docs)))
        chosen += rng.sample(members, min(share, len(members)))
    keep = {id(d) for d in chosen}
    return [d for d in docs if id(d) in keep]


def _summary(values: list[float], total: int) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    stderr = math.sqrt(var / n)
    if n < total:  # a sample of a finite set: the finite-population correction
        stderr *= math.sqrt((total - n) / max(total - 1, 1))
    if all(v in (0.0, 1.0) for v in values):
        # A rate (accuracy, exact match): Wilson's interval, which stays inside [0, 1] and does not shrink to a
        # point at 0 or n successes; a sample of a finite set counts as n (N - 1) / (N - n) draws.
        n_eff = n * (total - 1) / (total - n) if n < total else float(n)
        low, high = wilson(mean, n_eff)
    else:
        low, high = mean - 1.96 * stderr, mean + 1.96 * stderr
        if all(0.0 <= v <= 1.0 for v in values):
            low, high = max(low, 0.0), min(high, 1.0)
    return {"mean": mean, "stderr": stderr, "ci_low": low, "ci_high": high}


def wilson(rate: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval of a proportion observed as `rate` over `n` trials."""
    if n <= 0:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(engine: RequestEngine, task_names: Sequence[str], *, data: dict[str, str] | None = None,
             num_fewshot: int | None = None, limit: int | None = None, sample: int | None = None,
             seed: int = 1234, log_path: str | Path | None = None, task_options: dict[str, dict] | None = None,
             chat_template: bool = False, report=print) -> list[TaskResult]:
    """Run each task; per-document records to `log_path` (JSONL). task_options: extra constructor arguments per
    task (HumanEval's samples, temperature, top_p). chat_template: prompts through the model's chat template (the
    harness's --apply_chat_template), answers right after the assistant's header."""
    if chat_template and getattr(engine.tokenizer, "chat_template", None) is None:
        raise ConfigError("--chat-template: the model's tokenizer has no chat template")
    data, task_options = data or {}, task_options or {}
    tasks: list[Task] = [get_task(name, path=data.get(name), num_fewshot=num_fewshot, seed=seed,
                                  **task_options.get(name, {})) for name in task_names]
    log = open(log_path, "w", encoding="utf-8") if log_path is not None else None
    results = []
    try:
        for task in tasks:
            started = time.perf_counter()
            docs = task.docs()
            if not docs:
                raise ConfigError(f"{task.name}: {task.path} holds no documents")
            pool = task.fewshot_pool(docs)
            chosen = select_docs(docs, limit=limit, sample=sample, seed=seed)
            task.start_fewshot_draw()
            prompts = [task.chat_prompt(doc, pool, engine.tokenizer) if chat_template else task.prompt(doc, pool)
                       for doc in chosen]
            records: list[dict[str, float]] = []
            if isinstance(task, MultipleChoiceTask):
                delimiter = "" if chat_template else task.target_delimiter
                requests = [(prompt, delimiter + choice)
                            for prompt, doc in zip(prompts, chosen) for choice in doc.choices]
                scored = iter(engine.loglikelihood(requests))
                for prompt, doc in zip(prompts, chosen):
                    lls = [next(scored) for _ in doc.choices]
                    metrics = task.score(doc, [r.logprob for r in lls], [r.is_greedy for r in lls])
                    records.append(metrics)
                    if log:
                        log.write(json.dumps({"task": task.name, "doc_id": doc.id, "prompt": prompt,
                                              "choices": doc.choices, "gold": doc.gold,
                                              "loglikelihoods": [r.logprob for r in lls],
                                              "is_greedy": [r.is_greedy for r in lls], "metrics": metrics}) + "\n")
            elif isinstance(task, GenerationTask):
                n = task.samples
                texts = engine.generate_until([
                    GenerationRequest(p, task.until, task.max_new_tokens, temperature=task.temperature,
                                      top_p=task.top_p, seed=None if task.temperature == 0 else seed * 1000 + j)
                    for p in prompts for j in range(n)])
                for i, (prompt, doc) in enumerate(zip(prompts, chosen)):
                    generated = texts[i * n:(i + 1) * n]
                    metrics = task.score_samples(doc, generated)
                    records.append(metrics)
                    if log:
                        log.write(json.dumps({"task": task.name, "doc_id": doc.id, "prompt": prompt,
                                              "generated": generated[0] if n == 1 else generated,
                                              "extracted": task.extract(generated[0]),
                                              "metrics": metrics}) + "\n")
            metrics = {m: _summary([r[m] for r in records], len(docs)) for m in task.metrics}
            result = TaskResult(task=task.name, version=task.version, num_fewshot=task.num_fewshot, n=len(chosen),
                                total=len(docs), metrics=metrics, extra=task.aggregate(chosen, records),
                                seconds=time.perf_counter() - started,
                                per_doc=[(doc.id, r) for doc, r in zip(chosen, records)])
            results.append(result)
            if report:
                headline = ", ".join(f"{m} {v['mean']:.4f} ± {v['stderr']:.4f}" for m, v in metrics.items())
                report(f"{task.label}: {headline} (n={len(chosen)} of {len(docs)}, {result.seconds:.1f} s)")
    finally:
        if log:
            log.close()
    return results


def training_data_of(model: str | Path) -> list[Path]:
    """The training data a model's run names in its config (pre-training's token-shard dataset, or the data.train
    files of SFT and preference stages), when MODEL is a run directory, its `model/` or one of its checkpoints;
    [] otherwise."""
    from ..config import read_yaml

    path = Path(model)
    for candidate in (path, path.parent, path.parent.parent):
        config = candidate / "config.yaml"
        if config.is_file():
            data = (read_yaml(config) or {}).get("data") or {}
            found = [data["dataset"]] if data.get("dataset") else list(data.get("train") or [])
            return [Path(p) for p in found if Path(p).exists()]
    return []


def add_contamination(results: Sequence[TaskResult], tasks: Sequence[Task], sources: Sequence[str | Path], *,
                      fuzzy: bool = False, report=print) -> Any:
    """Check every evaluated task's documents against `sources` (eval/contamination.py) and give each result its
    counts and its scores on the clean subset (the documents not flagged)."""
    from .contamination import BenchmarkItem, check_contamination

    items = []
    for result, task in zip(results, tasks):
        evaluated = {doc_id for doc_id, _ in result.per_doc}
        items += [BenchmarkItem(task=task.name, item_id=doc.id, text=task.contamination_text(doc))
                  for doc in task.docs() if doc.id in evaluated]
    found = check_contamination(items, list(sources), fuzzy=fuzzy)
    for result in results:
        clean = found.clean_ids(result.task)
        kept = [m for doc_id, m in result.per_doc if doc_id in clean]
        result.contamination = {
            "flagged": result.n - len(kept), "clean": len(kept),
            "clean_metrics": {m: _summary([r[m] for r in kept], len(kept)) for m in result.metrics} if kept else {}}
        if report:
            scores = ", ".join(f"{m} {v['mean']:.4f}" for m, v in result.contamination["clean_metrics"].items())
            report(f"{result.task}: {result.n - len(kept)} of {result.n} documents found in the training data"
                   + (f"; clean subset {scores}" if kept else ""))
    return found


def markdown(results: Sequence[TaskResult], *, model: str) -> str:
    lines = [f"# Evaluation of {model}", "", "| task | version | shots | metric | value | stderr | n |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in results:
        for metric, v in r.metrics.items():
            lines.append(f"| {r.task} | {r.version} | {r.num_fewshot} | {metric} | {v['mean']:.4f} | "
                         f"{v['stderr']:.4f} | {r.n} of {r.total} |")
    checked = [r for r in results if r.contamination is not None]
    if checked:
        lines += ["", "## Contamination (documents found in the model's training data)", "",
                  "| task | flagged | clean | metric | full set | clean subset |", "|---|---:|---:|---|---:|---:|"]
        for r in checked:
            c = r.contamination
            for metric, v in r.metrics.items():
                clean = c["clean_metrics"].get(metric)
                lines.append(f"| {r.task} | {c['flagged']} | {c['clean']} | {metric} | {v['mean']:.4f} | "
                             f"{clean['mean']:.4f} |" if clean else f"| {r.task} | {c['flagged']} | 0 | {metric} | "
                             f"{v['mean']:.4f} | - |")
    for r in results:
        if r.extra.get("categories"):
            lines += ["", f"## {r.task} by category", "", "| category | acc | n |", "|---|---:|---:|"]
            lines += [f"| {c} | {v['acc']:.4f} | {v['n']} |" for c, v in r.extra["categories"].items()]
            lines.append(f"| (macro average over subjects) | {r.extra['acc_macro']:.4f} | |")
    return "\n".join(lines) + "\n"


def write_report(results: Sequence[TaskResult], out_dir: str | Path, *, model: str, settings: dict[str, Any],
                 engine_stats: dict[str, Any]) -> tuple[Path, Path]:
    """report.json and report.md in out_dir, each written whole or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": model, "settings": settings, "engine": engine_stats,
               "results": [r.to_dict() for r in results]}
    json_path, md_path = out / "report.json", out / "report.md"
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(md_path, markdown(results, model=model))
    return json_path, md_path
