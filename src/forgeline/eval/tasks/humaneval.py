"""HumanEval (Chen et al.), lm-evaluation-harness's `humaneval`: the function's signature and docstring as the
prompt, a completion until a Codex stop sequence, and the program prompt + completion + test + check(entry_point)
run in the code sandbox (eval/sandbox.py): passed when it exits 0 in time.

Greedy decoding gives pass@1. With `samples` n > 1 (sampling at `temperature`, `top_p`), pass@k for every k <= n in
(1, 10, 100) comes from the unbiased estimator 1 - C(n - c, k) / C(n, k) over the c passing samples of each problem,
averaged over problems."""

from __future__ import annotations

from math import comb
from pathlib import Path

from . import Doc, GenerationTask
from ._files import field, jsonl_records


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of P(at least one of k samples passes) from c passing of n (Chen et al., eq. 1)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


class HumanEval(GenerationTask):
    name = "humaneval"
    version = 1
    default_path = "humaneval/HumanEval.first10pct.jsonl.gz"
    until = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    max_new_tokens = 512
    target_delimiter = ""

    def __init__(self, path=None, *, num_fewshot=None, seed=1234, samples: int = 1, temperature: float = 0.0,
                 top_p: float | None = None, limits=None):
        from ...errors import ConfigError

        super().__init__(path, num_fewshot=num_fewshot, seed=seed)
        if samples < 1:
            raise ConfigError(f"humaneval: samples must be >= 1, got {samples}")
        if samples > 1 and temperature <= 0:
            raise ConfigError("humaneval: several samples per problem need sampling (temperature > 0)")
        self.samples, self.temperature, self.top_p = samples, temperature, top_p
        self.ks = [k for k in (1, 10, 100) if k <= samples]
        self.metrics = tuple(f"pass@{k}" for k in self.ks)
        self.limits = limits

    def read(self, path: Path) -> list[Doc]:
        docs = []
        for line, record in jsonl_records(path):
            docs.append(Doc(id=field(record, "task_id", str, path, line), fields={
                key: field(record, key, str, path, line)
                for key in ("prompt", "test", "entry_point", "canonical_solution")}))
        return docs

    def text(self, doc: Doc) -> str:
        return doc.fields["prompt"]

    def target(self, doc: Doc) -> str:
        return doc.fields["canonical_solution"]

    def contamination_text(self, doc: Doc) -> str:
        return doc.fields["prompt"] + doc.fields["canonical_solution"]

    def run(self, doc: Doc, completion: str):
        from ..sandbox import SandboxLimits, check_completion

        f = doc.fields
        return check_completion(f["prompt"], completion, f["test"], f["entry_point"], self.limits or SandboxLimits())

    def score(self, doc: Doc, text: str) -> dict[str, float]:
        return self.score_samples(doc, [text])

    def score_samples(self, doc: Doc, texts: list[str]) -> dict[str, float]:
        passed = sum(self.run(doc, text).passed for text in texts)
        return {f"pass@{k}": pass_at_k(len(texts), passed, k) for k in self.ks}
