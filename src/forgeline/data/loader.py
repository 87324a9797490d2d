"""The pre-training data loader: fixed-length windows over a split's packed token stream.

The shards of a split are memory-mapped once and read as one stream of N tokens. Sample ``i`` is the window of
``seq_len + 1`` tokens starting at ``i * seq_len``; its first ``seq_len`` tokens are the inputs and its last
``seq_len`` the targets, so consecutive samples share one boundary token and every token is a target exactly once
per epoch. A window may cross from one shard into the next.

Order is a pure function of ``(seed, epoch, batch index)``: epoch ``e`` visits samples in the order of
``np.random.default_rng([seed, e]).permutation`` (identity without shuffling), global micro-batch ``k`` takes the
next ``micro_batch_size * world_size`` of them and rank ``r`` the ``r``-th run of ``micro_batch_size``. Hence

* ``world_size`` ranks with micro-batch B see together exactly what one process with micro-batch ``B * world_size``
  sees, step for step, and A consecutive micro-batches of B (gradient accumulation) cover exactly the samples of
  one micro-batch of ``A * B``;
* resuming is O(1): the position is ``(epoch, batch_in_epoch)``, and restoring it recomputes that epoch's
  permutation instead of replaying batches. A run may resume with a different ``world_size`` as long as
  ``micro_batch_size * world_size`` is unchanged, because then the global order is identical (more generally, as
  long as the samples per optimizer step ``micro_batch_size * world_size * grad_accum_steps`` are unchanged and the
  saved position falls on a whole global micro-batch of the new layout).

The tail of an epoch that does not fill a whole optimizer step (``grad_accum_steps`` global micro-batches, one by
default) is skipped, so all ranks take the same number of steps, and a run with accumulation crosses epoch
boundaries exactly where the equivalent run with A times the micro-batch does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forgeline.errors import ConfigError, DataError

from .shards import _DTYPES, SPLITS, load_index
from .sources import PathLike

__all__ = ["PackedTokenLoader"]


class PackedTokenLoader:
    """Yields ``{"input_ids", "targets", "doc_ids", "n_targets"}`` batches of ``micro_batch_size x seq_len``.

    ``doc_ids`` number the packed documents within each row: a new segment starts at every EOS in ``input_ids``,
    because the EOS that ends one document is the start token of the next. The last token of a document thus still
    predicts EOS from its own document's context, and the EOS predicts the next document's first token attending
    only to itself. Use it to build a block-diagonal causal mask (or ignore it for plain causal attention).

    ``grad_accum_steps`` only aligns the end of each epoch to whole optimizer steps; every call still returns one
    micro-batch.
    """

    def __init__(
        self,
        dataset_dir: PathLike,
        *,
        split: str = "train",
        seq_len: int,
        micro_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        grad_accum_steps: int = 1,
    ):
        for name, value, low in (("seq_len", seq_len, 1), ("micro_batch_size", micro_batch_size, 1),
                                 ("world_size", world_size, 1), ("rank", rank, 0), ("seed", seed, 0),
                                 ("grad_accum_steps", grad_accum_steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if rank >= world_size:
            raise ConfigError(f"rank must be below world_size ({world_size}), got {rank}")
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")

        self.index = load_index(dataset_dir)
        self.dataset_dir = Path(dataset_dir)
        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, bool(shuffle)
        self.grad_accum_steps = grad_accum_steps
        self.eos_id = int(self.index["eos_id"])

        dtype = _DTYPES[self.index["dtype"]]
        shards = [s for s in self.index["splits"][split]["shards"] if int(s["tokens"]) > 0]
        self._shards = [np.memmap(self.dataset_dir / s["file"], dtype=dtype, mode="r") for s in shards]
        lengths = np.array([len(m) for m in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.tokens = int(self._starts[-1])

        self.samples_per_epoch = max(0, (self.tokens - 1) // seq_len)
        self.global_batch_size = micro_batch_size * world_size
        self.step_samples = self.global_batch_size * grad_accum_steps
        self.batches_per_epoch = self.samples_per_epoch // self.step_samples * grad_accum_steps
        if self.batches_per_epoch == 0:
            needed = self.step_samples * seq_len + 1
            raise DataError(
                f"the {split} split has {self.tokens} tokens, fewer than one global batch needs "
                f"({micro_batch_size} sequences x {world_size} ranks x {grad_accum_steps} accumulation steps "
                f"x {seq_len} tokens + 1 = {needed}); use more data, a shorter seq_len or a smaller batch",
                self.dataset_dir,
            )

        self.epoch = 0
        self.batch_in_epoch = 0
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    # ------------------------------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        """The next micro-batch of this rank; never ends (the next epoch follows)."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        batch = self._make_batch(self._sample_ids(self.epoch, self.batch_in_epoch, self.shuffle))
        self.batch_in_epoch += 1
        return batch

    def iter_eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, Any]]:
        """Evaluation batches: from the start of the split in stream order, rank-sharded, finite, deterministic.

        The order is sequential even on a loader made with ``shuffle=True``, and the training position is untouched.
        """
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < 0):
            raise ConfigError(f"max_batches must be a non-negative integer or None, got {max_batches!r}")
        count = self.batches_per_epoch if max_batches is None else min(max_batches, self.batches_per_epoch)
        for k in range(count):
            yield self._make_batch(self._sample_ids(0, k, shuffle=False))

    def _sample_ids(self, epoch: int, k: int, shuffle: bool) -> np.ndarray:
        first = k * self.global_batch_size + self.rank * self.micro_batch_size
        if not shuffle:
            return np.arange(first, first + self.micro_batch_size, dtype=np.int64)
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.samples_per_epoch)
            self._perm_epoch = epoch
        return self._perm[first : first + self.micro_batch_size]

    def _make_batch(self, sample_ids: np.ndarray) -> dict[str, Any]:
        T = self.seq_len
        windows = np.empty((len(sample_ids), T + 1), dtype=np.int64)
        for row, sample in enumerate(sample_ids.tolist()):
            self._read_into(windows[row], sample * T)
        input_ids = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
        targets = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
        doc_ids = torch.cumsum(input_ids == self.eos_id, dim=1)
        return {"input_ids": input_ids, "targets": targets, "doc_ids": doc_ids, "n_targets": targets.numel()}

    def _read_into(self, out: np.ndarray, start: int) -> None:
        """Copy tokens ``[start, start + len(out))`` of the stream, crossing shard boundaries as needed."""
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < len(out):
            offset = start + filled - int(self._starts[shard])
            take = min(len(out) - filled, len(self._shards[shard]) - offset)
            out[filled : filled + take] = self._shards[shard][offset : offset + take]
            filled += take
            shard += 1

    # ------------------------------------------------------------------------------------------- resuming

    def state_dict(self) -> dict[str, Any]:
        """The position plus what defines the sample order; small and JSON-serializable."""
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "split": self.split,
            "tokens": self.tokens,
            "shuffle": self.shuffle,
            "grad_accum_steps": self.grad_accum_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off, in O(1).

        Refuses a state whose sample order differs from this loader's: another split, seed, seq_len, token count
        (the data changed) or global micro-batch ``micro_batch_size * world_size``. A different ``world_size`` with
        the same global micro-batch is fine: the global order is the same, each rank just takes another slice.
        With gradient accumulation the invariant is the samples per optimizer step, ``micro_batch_size *
        world_size * grad_accum_steps``, and the saved position must fall on a whole global micro-batch.
        """
        required = ("epoch", "batch_in_epoch", "seed", "seq_len", "micro_batch_size", "world_size", "split", "tokens")
        if not isinstance(state, dict) or any(key not in state for key in required):
            raise DataError(f"not a PackedTokenLoader state (needs {', '.join(required)})")
        for key in ("epoch", "batch_in_epoch", "micro_batch_size", "world_size", "grad_accum_steps"):
            value, low = state.get(key, 1), 0 if "epoch" in key else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DataError(f"invalid loader state: {key} must be an integer >= {low}, got {value!r}")
        saved_global = state["micro_batch_size"] * state["world_size"]
        saved_step = saved_global * state.get("grad_accum_steps", 1)
        differences = [
            f"{name} {saved!r} -> {now!r}"
            for name, saved, now in (
                ("split", state["split"], self.split),
                ("seed", state["seed"], self.seed),
                ("seq_len", state["seq_len"], self.seq_len),
                ("tokens", state["tokens"], self.tokens),
                ("shuffle", state.get("shuffle", self.shuffle), self.shuffle),
                ("micro_batch_size x world_size x grad_accum_steps", saved_step, self.step_samples),
            )
            if saved != now
        ]
        if differences:
            raise DataError(
                "cannot resume the data loader: the saved state has a different sample order "
                f"({'; '.join(differences)})",
                self.dataset_dir,
            )
        epoch, batch = state["epoch"], state["batch_in_epoch"]
        position = batch * saved_global  # samples of the epoch already consumed
        if position % self.global_batch_size:
            raise DataError(
                f"cannot resume the data loader: the saved position ({position} samples into epoch {epoch}) is not a "
                f"whole number of global micro-batches of {self.global_batch_size}; resume from a checkpoint taken "
                "at an optimizer step",
                self.dataset_dir,
            )
        batch = position // self.global_batch_size
        if batch > self.batches_per_epoch:
            raise DataError(
                f"invalid loader state: batch_in_epoch {batch} is beyond the {self.batches_per_epoch} batches per epoch"
            )
        self.epoch, self.batch_in_epoch = epoch, batch
