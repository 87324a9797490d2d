"""Rollouts inside the loop: the data source of the online RL stages (GRPO, RLOO).

The trainer asks its loader for micro-batches; here the loader is a `RolloutSource` that sees the policy being
trained. For each optimizer step it takes the next prompts (this data-parallel rank's share), samples
`group_size` completions of each with the current weights (batched KV-cache generation, the same generator as
`forgeline generate`; no stale copy), scores them with the reward, turns the rewards into advantages within each
prompt's group, computes the per-token log-probs the objective needs that do not change during the step (the
reference's, and the generating policy's when the batch is optimised more than once), and hands the rows out as
micro-batches. With `epochs` > 1 the same rollouts are optimised for that many consecutive optimizer steps.

Rows are [prompt | completion] right-padded, `targets` the completion's tokens at the positions that predict them.
Everything a resumed run needs to continue exactly is in `state_dict()` (JSON): the prompt order and position, the
generation counter that seeds the sampling, and the rollouts still to be optimised.

A reward that raises or returns a non-finite value or the wrong number of values skips that batch (on every
rank) with one printed line; the next prompts are rolled out instead, and three failures in a row stop the run.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data.prompts import Prompt
from ..errors import ForgelineError
from ..kernels.cross_entropy import IGNORE_INDEX
from ..model.inference.generate import GenerationConfig, generate
from ..objectives.policy_gradient import policy_logps
from ..train.distributed import all_reduce_sum, unwrap
from ..train.executor import autocast_context
from .advantages import group_advantages, rloo_advantages

MAX_FAILED_BATCHES = 3

# (prompts, completions, records) -> (one total per completion, {part name: values}, None) or (..., error text)
ScoreFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]],
                   tuple[list[float] | None, dict[str, list[float]], str | None]]
# (unwrapped policy, batch) -> (B, T) per-token log-probs of the reference
ReferenceFn = Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]


@dataclass
class RolloutSettings:
    prompts_per_step: int  # over all data-parallel ranks
    group_size: int  # completions per prompt
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's end-of-text (a chat template adds its own)
    epochs: int = 1  # optimizer steps on each batch of rollouts
    estimator: str = "group"  # "group" (GRPO) or "rloo"
    scale: str = "group"  # group advantages: "group", "batch" or "none"
    normalize: bool = False  # rloo: standardise the advantages over the batch
    reward_kl_beta: float = 0.0  # rloo: beta x sum_t (log pi_old - log ref) taken off each reward
    averaging: str = "token"  # what the objective averages over: "token" or "sequence"


@dataclass
class _Rollout:
    micro_batches: list[dict[str, Any]]
    passes_left: int


@dataclass
class _Metrics:
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)


class RolloutSource:
    def __init__(self, model: torch.nn.Module, tokenizer, prompts: list[Prompt], score: ScoreFn,
                 settings: RolloutSettings, *, reference: ReferenceFn | None, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, pad_id: int = 0,
                 device: torch.device | None = None, precision: str = "fp32", shuffle: bool = True,
                 log: Callable[[str], None] | None = None):
        if settings.prompts_per_step % dp_size:
            raise ForgelineError(f"rollout.prompts_per_step={settings.prompts_per_step} does not divide over "
                                 f"{dp_size} data-parallel ranks")
        if len(prompts) < settings.prompts_per_step:
            raise ForgelineError(f"{len(prompts)} prompts, fewer than rollout.prompts_per_step="
                                 f"{settings.prompts_per_step}")
        self.model, self.tokenizer, self.prompts, self.score = model, tokenizer, prompts, score
        self.settings, self.reference = settings, reference
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seed, self.pad_id, self.precision, self.shuffle = seed, pad_id, precision, shuffle
        self.device = device or torch.device("cpu")
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.per_rank = settings.prompts_per_step // dp_size
        rows = self.per_rank * settings.group_size
        self.grad_accum_steps = math.ceil(rows / micro_batch_size)
        self.epoch, self.position, self.generation, self.skipped = 0, 0, 0, 0
        self._order = self._permutation(0)
        self._current: _Rollout | None = None
        self._queue: list[dict[str, Any]] = []
        self._metrics = _Metrics()

    # -- the loader protocol ---------------------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if not self._queue:
            if self._current is not None and self._current.passes_left > 0:
                self._current.passes_left -= 1
            else:
                self._current = self._roll_out()
            self._queue = list(self._current.micro_batches)
        return self._queue.pop(0)

    def state_dict(self) -> dict[str, Any]:
        current = None
        if self._current is not None and self._current.passes_left > 0:
            current = {"passes_left": self._current.passes_left,
                       "micro_batches": [_to_json(b) for b in self._current.micro_batches]}
        return {"epoch": self.epoch, "position": self.position, "generation": self.generation,
                "skipped": self.skipped, "current": current, "queued": len(self._queue)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("queued"):
            raise ForgelineError("a rollout state saved in the middle of an optimizer step cannot be resumed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.generation, self.skipped = int(state["generation"]), int(state.get("skipped", 0))
        self._order = self._permutation(self.epoch)
        current = state.get("current")
        self._current = None if current is None else _Rollout(
            micro_batches=[_from_json(b) for b in current["micro_batches"]], passes_left=int(current["passes_left"]))
        self._queue = []

    def pop_metrics(self) -> dict[str, float]:
        """Means over every rank's rollouts since the last call (rewards, lengths, ...), for the step's log line."""
        names = sorted(self._metrics.sums)
        if not names:
            return {}
        local = torch.tensor([self._metrics.sums[n] for n in names] + [self._metrics.counts[n] for n in names],
                             dtype=torch.float64)
        summed = all_reduce_sum(local).tolist()
        k = len(names)
        self._metrics = _Metrics()
        return {n: summed[i] / summed[k + i] for i, n in enumerate(names) if summed[k + i] > 0}

    # -- one batch of rollouts -------------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.prompts)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts)).tolist()

    def _next_prompts(self) -> list[Prompt]:
        step = self.settings.prompts_per_step
        if self.position + step > len(self._order):  # the tail that does not fill a step waits for the next epoch
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        chosen = self._order[self.position:self.position + step]
        self.position += step
        mine = chosen[self.dp_rank * self.per_rank:(self.dp_rank + 1) * self.per_rank]
        return [self.prompts[i] for i in mine]

    def _roll_out(self) -> _Rollout:
        for _ in range(MAX_FAILED_BATCHES):
            prompts = self._next_prompts()
            self.generation += 1
            rollout = self._try(prompts)
            if rollout is not None:
                return rollout
        raise ForgelineError(f"the reward failed on {MAX_FAILED_BATCHES} batches of rollouts in a row; the run "
                             "stops (the lines above say why)")

    def _try(self, prompts: list[Prompt]) -> _Rollout | None:
        s = self.settings
        policy = unwrap(self.model)
        started = time.perf_counter()
        rows = [p for p in prompts for _ in range(s.group_size)]
        config = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=True, temperature=s.temperature,
                                  top_p=s.top_p, top_k=s.top_k, stop_strings=tuple(s.stop),
                                  stop_token_ids=[] if s.ignore_eos else (
                                      None if s.stop_token_ids is None else list(s.stop_token_ids)),
                                  seed=(self.seed * 1_000_003 + self.generation * 1009 + self.dp_rank) % 2**62)
        completions = generate(policy, [p.ids for p in rows], config, tokenizer=self.tokenizer)
        generated = time.perf_counter()
        texts = [c.text or "" for c in completions]
        total, parts, error = self.score([p.text for p in rows], texts, [p.record for p in rows])
        failed = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64)
        if float(all_reduce_sum(failed)) > 0:  # every rank skips, so that the ranks stay in step
            self.skipped += 1
            self._add("skipped_batches", 1.0)
            self.log(f"rollouts of generation {self.generation} skipped: "
                     f"{error or 'the reward failed on another rank'}")
            return None
        batch = self._rows(rows, completions)
        with torch.no_grad(), autocast_context(self.device, self.precision):
            was_training = policy.training
            policy.eval()
            try:
                need_old = s.epochs > 1 or (s.estimator == "rloo" and s.reward_kl_beta > 0)
                old = policy_logps(policy, batch["input_ids"], batch["targets"]).float() if need_old else None
                ref = self.reference(policy, batch).float() if self.reference is not None else None
            finally:
                policy.train(was_training)
        mask = (batch["targets"] != IGNORE_INDEX).float()
        rewards = torch.tensor(total, dtype=torch.float32)
        if s.estimator == "rloo":
            penalised = rewards
            if s.reward_kl_beta > 0:
                kl = ((old - ref) * mask).sum(-1).cpu()
                penalised = rewards - s.reward_kl_beta * kl
                self._add("kl", float(kl.sum()), len(rows))
            advantages = rloo_advantages(penalised, s.group_size, normalize=s.normalize)
        else:
            advantages = group_advantages(rewards, s.group_size, scale=s.scale)
        batch["advantages"] = advantages
        if old is not None and s.epochs > 1:
            batch["old_logps"] = old.cpu()
        if ref is not None and s.estimator != "rloo":
            batch["ref_logps"] = ref.cpu()
        scored = time.perf_counter()
        lengths = [len(c.tokens) for c in completions]
        self._add("reward", float(rewards.sum()), len(rows))
        self._add("reward_std", float(rewards.view(-1, s.group_size).std(dim=1).sum()) if s.group_size > 1 else 0.0,
                  len(prompts))
        for name, values in parts.items():
            self._add(f"reward/{name}", float(sum(values)), len(values))
        self._add("completion_length", float(sum(lengths)), len(rows))
        self._add("terminated", float(sum(c.finish_reason == "stop" for c in completions)), len(rows))
        self._add("generation_s", generated - started, 1)
        self._add("scoring_s", scored - generated, 1)
        self._add("rollouts_per_s", len(rows) / max(generated - started, 1e-9), 1)
        return _Rollout(micro_batches=self._split(batch), passes_left=s.epochs - 1)

    def _rows(self, rows: list[Prompt], completions) -> dict[str, Any]:
        """[prompt | completion] without the completion's last token (only predicted), right-padded."""
        seqs = [p.ids + list(c.tokens) for p, c in zip(rows, completions)]
        T = max(len(q) for q in seqs) - 1
        input_ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        targets = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
        for i, (p, q) in enumerate(zip(rows, seqs)):
            n = len(q) - 1
            input_ids[i, :n] = torch.tensor(q[:-1])
            if len(q) > len(p.ids):
                targets[i, len(p.ids) - 1:n] = torch.tensor(q[len(p.ids):])
        return {"input_ids": input_ids, "targets": targets, "length": torch.tensor([len(q) - 1 for q in seqs])}

    def _split(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        B = batch["input_ids"].shape[0]
        for start in range(0, B, self.micro_batch_size):
            part = {k: v[start:start + self.micro_batch_size] for k, v in batch.items()}
            real = part["targets"] != IGNORE_INDEX
            width = int(real.any(0).nonzero().max()) + 1 if bool(real.any()) else 1
            part["input_ids"], part["targets"] = part["input_ids"][:, :width], part["targets"][:, :width]
            for key in ("old_logps", "ref_logps"):
                if key in part:
                    part[key] = part[key][:, :width]
            rows = part["input_ids"].shape[0]
            part["weight"] = torch.ones(rows)
            part["n_units"] = int(real.sum()) if self.settings.averaging == "token" else rows
            part["n_tokens"] = int(part["length"].sum())
            out.append(part)
        return out

    def _add(self, name: str, value: float, count: float = 1.0) -> None:
        self._metrics.sums[name] = self._metrics.sums.get(name, 0.0) + value
        self._metrics.counts[name] = self._metrics.counts.get(name, 0.0) + count


def _to_json(batch: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = {"dtype": str(value.dtype).removeprefix("torch."), "data": value.tolist()}
        else:
            out[key] = value
    return out


def _from_json(batch: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if isinstance(value, dict) and "dtype" in value:
            out[key] = torch.tensor(value["data"], dtype=getattr(torch, value["dtype"]))
        else:
            out[key] = value
    return out
