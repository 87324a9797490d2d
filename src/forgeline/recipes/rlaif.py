"""`forgeline rlaif label`: preference labels from an AI judge (rl/judge.py), in the preference data format that
`forgeline rm` and `forgeline dpo` train on.

Two sources of pairs:
* `--pairs FILE`: existing pairs (any format `forgeline dpo` reads: {prompt, chosen, rejected}, HH-RLHF, ranked).
  Their `chosen` is a human's (or `forgeline label`'s) preference, so the judge's agreement with it is reported,
  with its 95% Wilson interval; the output holds the pairs ordered as the judge prefers them.
* `--policy MODEL --prompts FILE`: two sampled responses of the policy per prompt ({"prompt": text or messages}),
  ordered by the judge.
Pairs the judge finds inconsistent (its verdict changes with the order) are left out, and counted.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError
from ..files import atomic_write_text


@dataclass
class LabelReport:
    pairs: int
    decided: int  # the judge's verdict was the same in both orders
    written: int
    agreement: dict[str, float] | None  # with the input's chosen, over the decided pairs (--pairs only)

    def summary(self) -> str:
        line = (f"{self.pairs} pairs judged in both orders: {self.decided} consistent, {self.pairs - self.decided} "
                f"inconsistent (left out); {self.written} written")
        if self.agreement:
            a = self.agreement
            line += (f"; agreement with the given preferences {a['rate']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
                     f" over the {self.decided} consistent pairs ({a['all_rate']:.3f} counting ties as misses)")
        return line


def label(judge_model: str, out: str | Path, *, pairs: str | None = None, policy: str | None = None,
          prompts: str | None = None, rubric: str | None = None, chat: bool = False, limit: int | None = None,
          max_new_tokens: int = 128, temperature: float = 0.8, seed: int = 0, batch_size: int = 8,
          report=print) -> LabelReport:
    from ..eval.engine import RequestEngine
    from ..eval.run import wilson
    from ..rl.judge import DEFAULT_RUBRIC, AIJudge, conversation_text
    from .adapted import load_for_generation

    if (pairs is None) == (policy is None or prompts is None):
        raise ConfigError("give --pairs FILE, or --policy MODEL with --prompts FILE")
    if pairs is not None:
        items = _read_pairs(pairs, limit)
    else:
        items = _sample_pairs(policy, prompts, limit=limit, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed, batch_size=batch_size, report=report)
    loaded = load_for_generation(judge_model, dtype="float32", report=None)
    judge = AIJudge(RequestEngine(loaded.model, loaded.tokenizer, batch_size=batch_size),
                    rubric=rubric or DEFAULT_RUBRIC, chat=chat)
    verdicts = judge.compare([(conversation_text(p), a, b) for p, a, b in items])
    records = []
    agree = 0
    for (prompt, a, b), verdict in zip(items, verdicts):
        if verdict.winner == "tie":
            continue
        chosen, rejected = (a, b) if verdict.winner == "a" else (b, a)
        agree += verdict.winner == "a"
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                        "judge": {"p_a_first": round(verdict.p_a_first, 6), "p_a_second": round(verdict.p_a_second, 6),
                                  "model": str(judge_model)}})
    decided = len(records)
    agreement = None
    if pairs is not None and items:
        rate = agree / decided if decided else 0.0
        low, high = wilson(rate, decided) if decided else (0.0, 1.0)
        agreement = {"rate": rate, "ci_low": low, "ci_high": high, "n": decided, "all_rate": agree / len(items)}
    out = Path(out)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    result = LabelReport(pairs=len(items), decided=decided, written=len(records), agreement=agreement)
    report(result.summary())
    report(f"labels written to {out}")
    return result


def _read_pairs(path: str, limit: int | None) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, chosen text, rejected text) of the pairs; a response of several messages is joined."""
    from ..data.preference import PreferencePair, iter_preference_examples

    items = []
    for example in iter_preference_examples([path]):
        if not isinstance(example, PreferencePair):
            raise DataError(f"{example.where}: the judge compares pairs, not single labelled completions")
        items.append((list(example.prompt), _text(example.chosen), _text(example.rejected)))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise DataError(f"{path}: no pairs to judge")
    return items


def _text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def _sample_pairs(policy: str, prompts: str, *, limit, max_new_tokens, temperature, seed, batch_size, report
                  ) -> list[tuple[list[dict], str, str]]:
    from ..data.sft import RecordError, iter_file_records
    from ..data.sources import resolve_inputs
    from ..model.inference.generate import GenerationConfig, default_stop_ids, generate
    from .adapted import load_for_generation

    if temperature <= 0:
        raise ConfigError("--temperature must be > 0: two greedy responses to one prompt are the same response")
    loaded = load_for_generation(policy, dtype="float32", report=None)
    tokenizer = loaded.tokenizer
    conversations: list[list[dict]] = []
    for path in resolve_inputs([prompts]):
        for line, where, record in iter_file_records(path):
            place = f"{path}:{line}" if line is not None else f"{path} ({where})"
            if isinstance(record, RecordError) or not isinstance(record, dict) or "prompt" not in record:
                raise DataError(f"{place}: a prompt record is an object with a 'prompt' (text or chat messages)")
            prompt = record["prompt"]
            conversations.append([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
            if limit is not None and len(conversations) >= limit:
                break
    if tokenizer.chat_template is None:
        raise ConfigError(f"{policy}: the policy's tokenizer has no chat template to render the prompts with")
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    stop = sorted(default_stop_ids(tokenizer, loaded.generation_config))
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                              stop_token_ids=stop, seed=seed)
    rng = random.Random(seed)
    items = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        ids = [tokenizer.encode(t) for t in chunk for _ in range(2)]
        done = generate(loaded.model, ids, config, tokenizer=tokenizer)
        for j, conversation in enumerate(conversations[start:start + batch_size]):
            a, b = (done[2 * j].text or "").strip(), (done[2 * j + 1].text or "").strip()
            if a == b:
                continue  # nothing to prefer
            items.append((conversation, a, b) if rng.random() < 0.5 else (conversation, b, a))
    report(f"sampled two responses to each of {len(conversations)} prompts; {len(items)} pairs differ")
    if not items:
        raise DataError(f"{prompts}: every pair of sampled responses was identical; raise --temperature")
    return items
