"""Batches of preference data: pairs (reward models, DPO, ORPO) and unpaired completions (KTO).

A pair's chosen and rejected sequences go into one batch, chosen rows first, so one forward pass scores both (the
"concatenated forward" of DPO implementations). Rows are right-padded: with causal attention no real token attends
to the padding after it, so no attention mask is needed and positions are plain 0..T-1.

Every batch carries `index` (the items' positions in the data set, -1 for filler) and `weight` (1 for real items, 0
for filler): evaluation passes give a rank that has run out of items a filler batch, so that every rank runs the
same number of forward passes (FSDP2's all-gathers stay in step) while the sums are unchanged. A loader can carry a
per-item `reference` array (the reference model's log-probs, computed once before training), which its batches
then carry as `ref_logps`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .packing import TokenizedSample, collate_padded
from .preference import TokenizedCompletion, TokenizedPair

__all__ = ["PreferenceLoader", "collate_branched_pairs", "collate_pairs", "collate_unpaired", "kl_partners"]


def _with_bookkeeping(batch: dict[str, Any], index: Sequence[int], weight: Sequence[float],
                      reference: np.ndarray | None, columns: int) -> dict[str, Any]:
    batch["index"] = torch.tensor(list(index), dtype=torch.int64)
    batch["weight"] = torch.tensor(list(weight), dtype=torch.float32)
    if reference is not None:
        rows = reference[np.maximum(np.asarray(index), 0)]
        if rows.shape[1] != columns:
            raise ValueError(f"reference has {rows.shape[1]} columns, these batches need {columns}")
        # chosen rows then rejected rows (pairs), or completion rows then KL rows (unpaired): the batch's row order
        batch["ref_logps"] = torch.from_numpy(np.ascontiguousarray(rows.T.reshape(-1)).astype(np.float32))
    return batch


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int, *, index: Sequence[int], weight: Sequence[float],
                  reference: np.ndarray | None = None, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """2B right-padded rows (B chosen, then B rejected); targets only on the responses' tokens; `margin` per pair
    (0 where the data gives none); `n_pairs` the real pairs."""
    batch = collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id,
                           pad_to_multiple_of=pad_to_multiple_of)
    batch["margin"] = torch.tensor([p.margin if p.margin is not None else 0.0 for p in pairs], dtype=torch.float32)
    batch["n_pairs"] = int(round(sum(weight)))
    return _with_bookkeeping(batch, index, weight, reference, 2)


def collate_branched_pairs(pairs: Sequence[TokenizedPair], pad_id: int | None, *, index: Sequence[int],
                           weight: Sequence[float], reference: np.ndarray | None = None) -> dict[str, Any]:
    """B rows, one per pair, for a reward model: the tokens chosen and rejected share (the prompt, at least) once,
    then the rest of chosen, then the rest of rejected (model/transformer.py's BranchedRows: the rejected tokens
    attend to the shared ones and their own, never to chosen's). A quarter fewer tokens than 2B rows when prompt
    and responses are of one length, and the same rewards.

    `reward_positions` (B, 2): where chosen's and rejected's scores are read, by model/heads.py's rule (the last
    token that is not `pad_id`) applied to each sequence alone, then mapped into the row. Shared tokens are
    left-padded (so both continuations start at one column), the continuations right-padded; `position_ids` are
    each sequence's own."""
    shared = [_common_prefix(p.chosen.input_ids, p.rejected.input_ids) for p in pairs]
    P = max(shared)
    C = max(len(p.chosen) - n for p, n in zip(pairs, shared))
    R = max(len(p.rejected) - n for p, n in zip(pairs, shared))
    B, fill = len(pairs), pad_id if pad_id is not None else 0
    ids = np.full((B, P + C + R), fill, dtype=np.int64)
    positions = np.zeros((B, P + C + R), dtype=np.int64)
    prefix_real = np.zeros((B, P), dtype=bool)
    reward_positions = np.zeros((B, 2), dtype=np.int64)
    for r, (pair, n) in enumerate(zip(pairs, shared)):
        chosen, rejected = pair.chosen.input_ids, pair.rejected.input_ids
        ids[r, P - n:P] = chosen[:n]
        positions[r, P - n:P] = np.arange(n)
        prefix_real[r, P - n:] = True
        for seq, start in ((chosen, P), (rejected, P + C)):
            rest = len(seq) - n
            ids[r, start:start + rest] = seq[n:]
            width = C if start == P else R
            positions[r, start:start + width] = np.arange(n, n + width)
        for column, (seq, start) in enumerate(((chosen, P), (rejected, P + C))):
            last = _last_token(seq, pad_id)
            reward_positions[r, column] = P - n + last if last < n else start + last - n
    batch: dict[str, Any] = {
        "input_ids": torch.from_numpy(ids),
        "position_ids": torch.from_numpy(positions),
        "prefix_length": P,
        "prefix_real": None if prefix_real.all() else torch.from_numpy(prefix_real),
        "first_length": C,
        "reward_positions": torch.from_numpy(reward_positions),
        "margin": torch.tensor([p.margin if p.margin is not None else 0.0 for p in pairs], dtype=torch.float32),
        "n_pairs": int(round(sum(weight))),
        "n_tokens": int(sum(len(p.chosen) + len(p.rejected) - n for p, n in zip(pairs, shared))),
    }
    return _with_bookkeeping(batch, index, weight, reference, 2)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


def _last_token(ids: np.ndarray, pad_id: int | None) -> int:
    """model/heads.py's last_token_index for one unpadded sequence."""
    if pad_id is None:
        return len(ids) - 1
    real = np.flatnonzero(np.asarray(ids) != pad_id)
    return int(real[-1]) if len(real) else 0


def kl_partners(n: int, seed: int) -> np.ndarray:
    """For KTO's KL estimate, each prompt is scored with another example's completion: item i's partner, fixed for
    the run (a seeded derangement), so that the reference's log-probs of the mismatched pairs can be cached."""
    if n < 2:
        raise DataError("KTO needs at least two examples (its KL term pairs each prompt with another completion)")
    order = np.random.default_rng([seed, 0x4B7]).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)  # a cycle through a random order: nobody is their own partner
    return partner


def mismatched(prompt_of: TokenizedCompletion, completion_of: TokenizedCompletion, max_length: int
               ) -> TokenizedSample:
    """One example's prompt followed by another's completion, cut to max_length from the right."""
    p = prompt_of.prompt_length
    c = completion_of.prompt_length
    ids = np.concatenate([prompt_of.sample.input_ids[:p], completion_of.sample.input_ids[c:]])[:max_length]
    mask = np.concatenate([np.zeros(p, dtype=bool), completion_of.sample.loss_mask[c:]])[:max_length]
    if not mask[1:].any():  # the prompt fills max_length: keep one completion token so the row has a target
        ids = np.concatenate([prompt_of.sample.input_ids[:max_length - 1], completion_of.sample.input_ids[c:c + 1]])
        mask = np.zeros(len(ids), dtype=bool)
        mask[-1] = True
    return TokenizedSample(ids, mask)


def collate_unpaired(examples: Sequence[TokenizedCompletion], partners: Sequence[TokenizedCompletion], pad_id: int,
                     *, max_length: int, index: Sequence[int], weight: Sequence[float],
                     reference: np.ndarray | None = None, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """2B rows: the B completions, then the B mismatched rows (prompt i, the completion of i's partner); `labels`
    (True: desirable); `n_examples` the real ones."""
    kl_rows = [mismatched(e, p, max_length) for e, p in zip(examples, partners)]
    batch = collate_padded([e.sample for e in examples] + kl_rows, pad_id, pad_to_multiple_of=pad_to_multiple_of)
    batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    batch["n_examples"] = int(round(sum(weight)))
    return _with_bookkeeping(batch, index, weight, reference, 2)


class PreferenceLoader:
    """An endless, resumable stream of preference micro-batches (the trainer's StatefulLoader), one item (pair or
    example) per slot.

    Every epoch visits the items in an order drawn from (seed, epoch); rank r of world_size takes its own
    micro_batch_size items of every global micro-batch; an epoch ends on a whole optimizer step. `collate(items,
    index, weight, reference)` makes the batch.
    """

    def __init__(self, items: Sequence[Any], collate: Callable[..., dict[str, Any]], *, micro_batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True, grad_accum_steps: int = 1,
                 eval_only: bool = False, what: str = "pairs"):
        for name, value, low in (("micro_batch_size", micro_batch_size, 1), ("world_size", world_size, 1),
                                 ("rank", rank, 0), ("seed", seed, 0), ("grad_accum_steps", grad_accum_steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if rank >= world_size:
            raise ConfigError(f"rank must be below world_size ({world_size}), got {rank}")
        if not items:
            raise DataError(f"no {what} to train on")
        self.items, self.collate, self.what = list(items), collate, what
        self.micro_batch_size, self.seed, self.shuffle = micro_batch_size, seed, bool(shuffle)
        self.rank, self.world_size, self.grad_accum_steps = rank, world_size, grad_accum_steps
        self.global_batch_size = micro_batch_size * world_size
        self.batches_per_epoch = len(self.items) // (self.global_batch_size * grad_accum_steps) * grad_accum_steps
        self.eval_only = bool(eval_only)
        if self.batches_per_epoch == 0 and not self.eval_only:
            raise DataError(f"{len(self.items)} {what} are fewer than one optimizer step needs ({micro_batch_size} "
                            f"x {world_size} ranks x {grad_accum_steps} accumulation steps); use more data or a "
                            "smaller batch")
        self.reference: np.ndarray | None = None  # (items, columns) reference log-probs, once computed
        self.epoch = 0
        self.batch_in_epoch = 0
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.eval_only:
            raise TypeError("an eval_only PreferenceLoader yields only iter_eval_batches()")
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        first = self.batch_in_epoch * self.global_batch_size + self.rank * self.micro_batch_size
        ids = self._order(self.epoch)[first:first + self.micro_batch_size].tolist()
        self.batch_in_epoch += 1
        return self.collate([self.items[i] for i in ids], index=ids, weight=[1.0] * len(ids),
                            reference=self.reference)

    def iter_eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, Any]]:
        """Every item once, in data-set order, sharded by rank; the training position is untouched. A rank past the
        end gets a filler batch (item 0, weight 0), so all ranks run the same number of forward passes."""
        count = -(-len(self.items) // self.global_batch_size)
        if max_batches is not None:
            count = min(count, max_batches)
        for k in range(count):
            first = k * self.global_batch_size + self.rank * self.micro_batch_size
            ids = list(range(first, min(first + self.micro_batch_size, len(self.items))))
            if ids:
                yield self.collate([self.items[i] for i in ids], index=ids, weight=[1.0] * len(ids),
                                   reference=self.reference)
            else:
                yield self.collate([self.items[0]], index=[-1], weight=[0.0], reference=self.reference)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.items))
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
            self._perm_epoch = epoch
        return self._perm

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "shuffle": self.shuffle, "items": len(self.items), "micro_batch_size": self.micro_batch_size,
                "world_size": self.world_size, "grad_accum_steps": self.grad_accum_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off; refuse other data, another seed, or another number of items a step."""
        keys = ("epoch", "batch_in_epoch", "seed", "shuffle", "items", "micro_batch_size", "world_size",
                "grad_accum_steps")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise DataError(f"not a PreferenceLoader state (needs {', '.join(keys)})")
        mine = self.state_dict()
        for key in ("seed", "shuffle", "items"):
            if state[key] != mine[key]:
                raise DataError(f"the saved data position does not fit this data: {key} was {state[key]!r}, is "
                                f"now {mine[key]!r}")
        saved_step = state["micro_batch_size"] * state["world_size"] * state["grad_accum_steps"]
        if saved_step != self.global_batch_size * self.grad_accum_steps:
            raise DataError(f"the saved run took {saved_step} {self.what} per optimizer step, this one takes "
                            f"{self.global_batch_size * self.grad_accum_steps}")
        done = state["batch_in_epoch"] * state["micro_batch_size"] * state["world_size"]
        if done % self.global_batch_size:
            raise DataError("the saved data position does not fall on a whole global micro-batch of this run")
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = done // self.global_batch_size
