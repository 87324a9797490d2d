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
from ..objectives.policy_gradient import rollout_logps
from ..train.distributed import all_reduce_sum, reshard_fsdp, unwrap
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
        self._copy: torch.nn.Module | None = None  # the FSDP2 policy's whole copy that generates

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

    def _generator(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The model that samples: the policy itself, or under FSDP2 (whose forward is collective, while ranks stop
        generating at different steps) a whole copy on every rank, refreshed from the current weights for every
        batch of rollouts, so that it is never stale."""
        if not any(hasattr(p, "full_tensor") for p in policy.parameters()):
            return policy
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from ..model import build_model

        state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
        if self._copy is None:
            self._copy = build_model(policy.cfg).to(self.device).eval().requires_grad_(False)
        self._copy.load_state_dict(state)
        return self._copy

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
        completions = generate(self._generator(policy), [p.ids for p in rows], config, tokenizer=self.tokenizer)
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
        micro_batches = [self._tree(rows[i:i + self.micro_batch_size], completions[i:i + self.micro_batch_size])
                         for i in range(0, len(rows), self.micro_batch_size)]
        need_old = s.epochs > 1 or (s.estimator == "rloo" and s.reward_kl_beta > 0)
        olds, refs = [], []
        with torch.no_grad(), autocast_context(self.device, self.precision):
            was_training = policy.training
            policy.eval()
            try:
                for mb in micro_batches:
                    olds.append(rollout_logps(policy, mb).float().cpu() if need_old else None)
                    refs.append(self.reference(policy, mb).float().cpu() if self.reference is not None else None)
            finally:
                policy.train(was_training)
                reshard_fsdp(policy)
        rewards = torch.tensor(total, dtype=torch.float32)
        if s.estimator == "rloo":
            penalised = rewards
            if s.reward_kl_beta > 0:
                kl = torch.cat([((old - ref) * (mb["targets"] != IGNORE_INDEX)).sum(-1)
                                for mb, old, ref in zip(micro_batches, olds, refs)])
                penalised = rewards - s.reward_kl_beta * kl
                self._add("kl", float(kl.sum()), len(rows))
            advantages = rloo_advantages(penalised, s.group_size, normalize=s.normalize)
        else:
            advantages = group_advantages(rewards, s.group_size, scale=s.scale)
        start = 0
        for mb, old, ref in zip(micro_batches, olds, refs):
            n = mb["targets"].shape[0]
            mb["advantages"] = advantages[start:start + n]
            start += n
            if old is not None and s.epochs > 1:
                mb["old_logps"] = old
            if ref is not None and s.estimator != "rloo":
                mb["ref_logps"] = ref
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
        return _Rollout(micro_batches=micro_batches, passes_left=s.epochs - 1)

    def _tree(self, rows: list[Prompt], completions) -> dict[str, Any]:
        """One micro-batch in prefix-tree form: consecutive completions of one prompt share one row,
        [prompt | completion 1 | completion 2 | ...] (each completion without its last token, which is only
        predicted), so the prompt runs once per group (objectives/policy_gradient.rollout_logps). `targets` (N, Tc)
        are the completions' tokens; `gather` the row position that predicts each."""
        groups: list[tuple[Prompt, list]] = []
        for prompt, completion in zip(rows, completions):
            if groups and groups[-1][0] is prompt:
                groups[-1][1].append(list(completion.tokens))
            else:
                groups.append((prompt, [list(completion.tokens)]))
        lengths = [len(p.ids) + sum(max(len(c) - 1, 0) for c in cs) for p, cs in groups]
        R, T = len(groups), max(lengths)
        N, Tc = len(rows), max(len(c.tokens) for c in completions)
        input_ids = torch.full((R, T), self.pad_id, dtype=torch.long)
        positions = torch.zeros((R, T), dtype=torch.long)
        branch = torch.full((R, T), -1, dtype=torch.long)
        gather = torch.full((N, Tc), -1, dtype=torch.long)
        targets = torch.full((N, Tc), IGNORE_INDEX, dtype=torch.long)
        n = 0
        for r, (prompt, cs) in enumerate(groups):
            P = len(prompt.ids)
            input_ids[r, :P] = torch.tensor(prompt.ids)
            positions[r, :P] = torch.arange(P)
            branch[r, :P] = 0
            at = P
            for k, tokens in enumerate(cs, start=1):
                body = tokens[:-1]
                input_ids[r, at:at + len(body)] = torch.tensor(body, dtype=torch.long)
                positions[r, at:at + len(body)] = torch.arange(P, P + len(body))
                branch[r, at:at + len(body)] = k
                # token 0 is predicted by the prompt's last position, token j by completion token j - 1
                gather[n, :len(tokens)] = r * T + torch.tensor([P - 1] + list(range(at, at + len(body))))
                targets[n, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                at += len(body)
                n += 1
        real = targets != IGNORE_INDEX
        return {"input_ids": input_ids, "position_ids": positions, "branch": branch, "gather": gather,
                "targets": targets, "weight": torch.ones(N),
                "n_units": int(real.sum()) if self.settings.averaging == "token" else N,
                "n_tokens": int(sum(lengths))}

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
