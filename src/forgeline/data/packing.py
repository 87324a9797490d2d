"""Batches of tokenized SFT samples: best-fit-decreasing packing, or plain right padding.

A sample is a token list plus a loss mask (:class:`TokenizedSample`). Batches follow the layout the objectives read
(``forgeline.objectives.causal_lm``): ``input_ids`` (B, T), ``targets`` (B, T) already shifted, so that
``targets[b, t]`` is the token position ``t`` must predict, or ``IGNORE_INDEX``; ``n_targets``, the number of
non-ignored targets, by which the trainer normalises the loss; and ``n_tokens``, the real (non-padding) tokens.

Packing puts several samples into one ``seq_len`` row. For the result to equal running the samples one by one,
each sample must see only itself and count positions from 0, so packed batches also carry

* ``doc_ids`` (B, T): the sample index within the row; the model turns it into a block-diagonal causal mask.
* ``position_ids`` (B, T): restarting at 0 for every sample, so RoPE sees the positions the sample has alone.

The last position of every sample gets ``IGNORE_INDEX``: it would predict the first token of the next sample, which
it cannot see. Padding at the end of a row has its own doc id and ignored targets.

Plain padding (``packing=False``) puts one sample per row, right-padded to the longest sample of the micro-batch.
It needs no mask at all: attention is causal, so a real token never looks at the padding to its right, and padded
positions have ignored targets. Its batches carry ``attention_mask`` (1 real, 0 padding) for objectives that need
per-token validity; passing it to the model is allowed (same result) but forces a slower explicit mask.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from forgeline.errors import ConfigError, DataError
from forgeline.kernels.cross_entropy import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "SFTLoader",
    "TokenizedSample",
    "best_fit_decreasing",
    "collate_packed",
    "collate_padded",
]


@dataclass(frozen=True, eq=False)
class TokenizedSample:
    """One training example: token ids and which of them are loss targets.

    ``loss_mask[i]`` says whether token ``i`` is learned (predicted from tokens ``< i``). Token 0 is never a target,
    since nothing precedes it. Stored as int32 / bool numpy arrays (5 bytes a token; a Python list costs ~40):
    a data set is held in memory whole, so that it can be packed.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __post_init__(self) -> None:
        ids = np.asarray(self.input_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
            raise ValueError("token ids must lie in [0, 2**31)")
        ids = ids.astype(np.int32, copy=False)
        mask = np.asarray(self.loss_mask, dtype=bool)
        if ids.ndim != 1 or mask.shape != ids.shape:
            raise ValueError(f"input_ids and loss_mask must be 1-D and equally long, got {ids.shape} and {mask.shape}")
        if ids.size == 0:
            raise ValueError("a sample needs at least one token")
        object.__setattr__(self, "input_ids", ids)
        object.__setattr__(self, "loss_mask", mask)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.loss_mask[1:].sum())

    def targets(self) -> np.ndarray:
        """Shifted targets: position ``i`` predicts token ``i + 1`` if it is learned; the last position predicts
        nothing (inside a packed row it would be the next sample's first token)."""
        out = np.full(len(self), IGNORE_INDEX, dtype=np.int64)
        out[:-1] = np.where(self.loss_mask[1:], self.input_ids[1:], IGNORE_INDEX)
        return out

    def truncated(self, max_length: int) -> TokenizedSample:
        return TokenizedSample(self.input_ids[:max_length], self.loss_mask[:max_length])


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack item indices into bins of ``capacity``: longest item first, each into the fullest bin it still fits.

    BFD uses at most 11/9 OPT + 6/9 bins, close to optimal for the length distributions of SFT data, in
    O(n log n) plus list moves. The result depends only on ``lengths``: ties are broken by index and bins are
    returned in the order they were opened, so the same data always gives the same rows (shuffle them, not this).
    """
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ConfigError(f"capacity must be a positive integer, got {capacity!r}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    # Open bins as (remaining space, bin index), sorted: bisect finds the tightest bin that still fits.
    open_bins: list[tuple[int, int]] = []
    for i in order:
        length = int(lengths[i])
        if length < 1 or length > capacity:
            raise ValueError(f"item {i} has length {length}, outside [1, {capacity}]")
        k = bisect.bisect_left(open_bins, (length, -1))
        if k == len(open_bins):
            bins.append([i])
            remaining, b = capacity - length, len(bins) - 1
        else:
            remaining, b = open_bins.pop(k)
            bins[b].append(i)
            remaining -= length
        if remaining > 0:
            bisect.insort(open_bins, (remaining, b))
    return bins


def collate_packed(rows: Sequence[Sequence[TokenizedSample]], seq_len: int, pad_id: int) -> dict[str, Any]:
    """One batch of ``len(rows)`` x ``seq_len``; each row holds the given samples back to back (see module doc)."""
    B = len(rows)
    input_ids = np.full((B, seq_len), pad_id, dtype=np.int64)
    targets = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, seq_len), dtype=np.int64)
    doc_ids = np.zeros((B, seq_len), dtype=np.int64)
    n_tokens = 0
    for r, samples in enumerate(rows):
        pos = 0
        for d, sample in enumerate(samples):
            n = len(sample)
            if pos + n > seq_len:
                raise ValueError(f"row {r} holds {pos + n} tokens, more than seq_len={seq_len}")
            input_ids[r, pos:pos + n] = sample.input_ids
            targets[r, pos:pos + n] = sample.targets()
            position_ids[r, pos:pos + n] = np.arange(n)
            doc_ids[r, pos:pos + n] = d
            pos += n
        # Padding is a document of its own, so no real token's attention row changes; its positions count from 0.
        doc_ids[r, pos:] = len(samples)
        position_ids[r, pos:] = np.arange(seq_len - pos)
        n_tokens += pos
    t = torch.from_numpy(targets)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "targets": t,
        "position_ids": torch.from_numpy(position_ids),
        "doc_ids": torch.from_numpy(doc_ids),
        "n_targets": int((t != IGNORE_INDEX).sum()),
        "n_tokens": n_tokens,
    }


def collate_padded(
    samples: Sequence[TokenizedSample], pad_id: int, *, length: int | None = None, pad_to_multiple_of: int = 1
) -> dict[str, Any]:
    """One sample per row, right-padded to ``length`` (default: the longest sample, rounded up to
    ``pad_to_multiple_of``). No doc_ids: causal attention alone keeps real tokens off the padding."""
    if not samples:
        raise ValueError("collate_padded needs at least one sample")
    longest = max(len(s) for s in samples)
    if length is None:
        length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    if longest > length:
        raise ValueError(f"a sample has {longest} tokens, more than length={length}")
    B = len(samples)
    input_ids = np.full((B, length), pad_id, dtype=np.int64)
    targets = np.full((B, length), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((B, length), dtype=np.int64)
    for r, sample in enumerate(samples):
        n = len(sample)
        input_ids[r, :n] = sample.input_ids
        targets[r, :n] = sample.targets()
        attention_mask[r, :n] = 1
    t = torch.from_numpy(targets)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "targets": t,
        "position_ids": torch.arange(length, dtype=torch.int64).expand(B, length).contiguous(),
        "attention_mask": torch.from_numpy(attention_mask),
        "n_targets": int((t != IGNORE_INDEX).sum()),
        "n_tokens": int(attention_mask.sum()),
    }


class SFTLoader:
    """An endless, resumable stream of SFT micro-batches (the trainer's ``StatefulLoader``).

    Rows are fixed once: with ``packing`` the best-fit-decreasing bins of the samples, else one sample per row.
    Every epoch visits the rows in an order drawn from ``(seed, epoch)``; rank ``r`` of ``world_size`` takes its own
    ``micro_batch_size`` rows of every global micro-batch, as :class:`~forgeline.data.PackedTokenLoader` does, and
    an epoch ends on a whole optimizer step (``grad_accum_steps``), so no step mixes two epochs.

    ``eval_only`` is for validation sets, which may be smaller than one optimizer step: only
    :meth:`iter_eval_batches` is used, so the data need not fill a step.
    """

    def __init__(
        self,
        samples: Sequence[TokenizedSample],
        *,
        seq_len: int,
        micro_batch_size: int,
        pad_id: int,
        packing: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        grad_accum_steps: int = 1,
        pad_to_multiple_of: int = 1,
        eval_only: bool = False,
    ):
        for name, value, low in (("seq_len", seq_len, 1), ("micro_batch_size", micro_batch_size, 1),
                                 ("world_size", world_size, 1), ("rank", rank, 0), ("seed", seed, 0),
                                 ("grad_accum_steps", grad_accum_steps, 1), ("pad_id", pad_id, 0),
                                 ("pad_to_multiple_of", pad_to_multiple_of, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if rank >= world_size:
            raise ConfigError(f"rank must be below world_size ({world_size}), got {rank}")
        if not samples:
            raise DataError("no SFT samples to train on")
        lengths = [len(s) for s in samples]
        longest = max(lengths)
        if longest > seq_len:
            raise DataError(
                f"a sample has {longest} tokens, more than seq_len={seq_len}; tokenize with max_length <= seq_len"
            )
        self.samples = list(samples)
        self.seq_len, self.micro_batch_size, self.pad_id = seq_len, micro_batch_size, pad_id
        self.packing, self.seed, self.shuffle = bool(packing), seed, bool(shuffle)
        self.rank, self.world_size, self.grad_accum_steps = rank, world_size, grad_accum_steps
        self.pad_to_multiple_of = pad_to_multiple_of
        self.rows: list[list[int]] = (
            best_fit_decreasing(lengths, seq_len) if self.packing else [[i] for i in range(len(samples))]
        )
        self.tokens = int(sum(lengths))
        self.global_batch_size = micro_batch_size * world_size
        step_rows = self.global_batch_size * grad_accum_steps
        self.batches_per_epoch = len(self.rows) // step_rows * grad_accum_steps
        self.eval_only = bool(eval_only)
        if self.batches_per_epoch == 0 and not self.eval_only:
            raise DataError(
                f"{len(self.samples)} samples make {len(self.rows)} rows, fewer than one optimizer step needs "
                f"({micro_batch_size} rows x {world_size} ranks x {grad_accum_steps} accumulation steps); "
                "use more data or a smaller batch"
            )
        self.epoch = 0
        self.batch_in_epoch = 0
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    @property
    def fill(self) -> float:
        """Fraction of row slots holding real tokens (packing efficiency)."""
        return self.tokens / (len(self.rows) * self.seq_len)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.eval_only:
            raise TypeError("an eval_only SFTLoader yields only iter_eval_batches()")
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        first = self.batch_in_epoch * self.global_batch_size + self.rank * self.micro_batch_size
        order = self._order(self.epoch)
        batch = self._collate(order[first:first + self.micro_batch_size].tolist())
        self.batch_in_epoch += 1
        return batch

    def iter_eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, Any]]:
        """Every row once, in fixed order, sharded by rank; the training position is untouched.

        The last global batch may be short; a rank left without rows gets an all-padding batch with no targets, so
        all ranks run the same number of steps (their collectives stay in step) and the loss sum is unchanged.
        """
        count = -(-len(self.rows) // self.global_batch_size)
        if max_batches is not None:
            count = min(count, max_batches)
        for k in range(count):
            first = k * self.global_batch_size + self.rank * self.micro_batch_size
            rows = list(range(first, min(first + self.micro_batch_size, len(self.rows))))
            if rows:
                yield self._collate(rows)
            elif self.packing:
                yield collate_packed([[]], self.seq_len, self.pad_id)
            else:  # as short as a padded batch may be (tensor parallelism splits rows into pad_to_multiple_of)
                n = self.pad_to_multiple_of
                yield {
                    "input_ids": torch.full((1, n), self.pad_id, dtype=torch.int64),
                    "targets": torch.full((1, n), IGNORE_INDEX, dtype=torch.int64),
                    "position_ids": torch.arange(n, dtype=torch.int64)[None],
                    "attention_mask": torch.zeros((1, n), dtype=torch.int64),
                    "n_targets": 0,
                    "n_tokens": 0,
                }

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.rows))
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._perm_epoch = epoch
        return self._perm

    def _collate(self, row_ids: list[int]) -> dict[str, Any]:
        if self.packing:
            return collate_packed([[self.samples[i] for i in self.rows[r]] for r in row_ids], self.seq_len, self.pad_id)
        return collate_padded([self.samples[self.rows[r][0]] for r in row_ids], self.pad_id,
                              pad_to_multiple_of=self.pad_to_multiple_of)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "packing": self.packing,
            "seq_len": self.seq_len,
            "rows": len(self.rows),
            "tokens": self.tokens,
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "grad_accum_steps": self.grad_accum_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off; refuse a state whose row order differs from this loader's (other data,
        seed, packing or seq_len) or whose optimizer step held a different number of rows."""
        keys = ("epoch", "batch_in_epoch", "seed", "shuffle", "packing", "seq_len", "rows", "tokens",
                "micro_batch_size", "world_size", "grad_accum_steps")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise DataError(f"not an SFTLoader state (needs {', '.join(keys)})")
        mine = self.state_dict()
        for key in ("seed", "shuffle", "packing", "seq_len", "rows", "tokens"):
            if state[key] != mine[key]:
                raise DataError(
                    f"the saved data position does not fit this data: {key} was {state[key]!r}, is now {mine[key]!r}"
                )
        saved_step = state["micro_batch_size"] * state["world_size"] * state["grad_accum_steps"]
        step = self.global_batch_size * self.grad_accum_steps
        if saved_step != step:
            raise DataError(f"the saved run took {saved_step} rows per optimizer step, this one takes {step}")
        # The position in rows is what carries over; converted to this loader's micro-batches.
        rows_done = state["batch_in_epoch"] * state["micro_batch_size"] * state["world_size"]
        if rows_done % self.global_batch_size:
            raise DataError("the saved data position does not fall on a whole global micro-batch of this run")
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = rows_done // self.global_batch_size
