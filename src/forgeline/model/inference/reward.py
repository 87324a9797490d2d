"""Scoring token sequences with a reward model (head=score): one fp32 reward per sequence.

Sequences are batched longest first (a batch's rows have about one length, so little of it is padding), right-padded
with the pad id and read at model/heads.py's last_token_index: causal attention keeps the padding out of the token
that is read, so a sequence's reward does not depend on the batch it is scored in (up to float summation order),
and equals what transformers' ForSequenceClassification gives the exported model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import ConfigError, ForgelineError
from ..heads import last_token_index
from ..transformer import Transformer

__all__ = ["score_sequences"]


def score_sequences(
    model: Transformer,
    sequences: Sequence[Sequence[int]],
    *,
    pad_token_id: int | None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """(N,) fp32 rewards of `sequences` (token ids), in their order, on the CPU.

    pad_token_id: the id the reward model pools by, which must be its own (`model.cfg.pad_token_id`) when it has
    one; None reads each sequence at its last token. device: where the batches go (default: the model's).
    """
    cfg = model.cfg
    if cfg.head != "score":
        raise ConfigError("score_sequences needs a reward model (head=score); this model is a language model "
                          "(model.heads.to_reward_model makes one of it, to train)")
    if cfg.pad_token_id is not None and pad_token_id != cfg.pad_token_id:
        raise ConfigError(f"this reward model reads its score at the last token that is not pad_token_id="
                          f"{cfg.pad_token_id}; pad_token_id={pad_token_id} was given")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    seqs = [list(map(int, s)) for s in sequences]
    for i, s in enumerate(seqs):
        if not s:
            raise ForgelineError(f"sequence {i} is empty; a reward needs at least one token")
        if len(s) > cfg.max_seq_len:
            raise ForgelineError(f"sequence {i} has {len(s)} tokens; the model's context is {cfg.max_seq_len}")
        bad = [t for t in s if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ForgelineError(f"sequence {i}: token id {bad[0]} is outside the vocabulary (size {cfg.vocab_size})")
    device = torch.device(device) if device is not None else model.inv_freq.device
    rewards = torch.empty(len(seqs), dtype=torch.float32)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    filler = pad_token_id if pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                lengths = torch.tensor([len(seqs[i]) for i in rows])
                batch = torch.full((len(rows), int(lengths.max())), filler, dtype=torch.long)
                for b, i in enumerate(rows):
                    batch[b, : len(seqs[i])] = torch.tensor(seqs[i])
                if pad_token_id is None:
                    index = lengths - 1  # each sequence's own last token, not the filler after it
                else:
                    index = last_token_index(batch, pad_token_id)  # the filler is pad: skipped like any pad
                scores = model(batch.to(device))
                rewards[rows] = scores.gather(1, index.to(scores.device)[:, None])[:, 0].float().cpu()
    finally:
        model.train(was_training)
    return rewards
