"""A reward model is the decoder with a score head: one scalar per position, read at each sequence's last token.

    scores = model(input_ids)                                    (B, T): the score head at every position
    rewards = pooled_scores(scores, input_ids, pad_token_id)     (B,): each row's score at last_token_index

`last_token_index` is transformers' rule for `*ForSequenceClassification` (the rightmost token that is not the pad
id; the last position without a pad id), so a forgeline reward model and its Hugging Face export read the same
token by construction. With right padding, causal attention keeps the pads out of that token's score. A pad id that
is also a real token (SmolLM2 pads with its end-of-turn `<|im_end|>`) is skipped wherever it ends a sequence, in
both.

`to_reward_model` turns a language model into a reward model: the training side calls it on the model it
initialises from.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .transformer import Transformer, score_init_std

__all__ = ["last_token_index", "pooled_scores", "to_reward_model"]


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B,) index of each row's rightmost token that is not `pad_token_id` (0 for a row of pads only, as
    transformers' argmax gives); with pad_token_id None, the last position."""
    B, T = input_ids.shape
    if pad_token_id is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(T, device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def pooled_scores(scores: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B,) fp32 rewards: each row of the (B, T) per-position scores at its last_token_index."""
    index = last_token_index(input_ids, pad_token_id).to(scores.device)
    return scores.gather(1, index[:, None])[:, 0].float()


def to_reward_model(model: Transformer, pad_token_id: int | None) -> Transformer:
    """Make a language model (head=lm) a reward model, in place, and return it: the output projection is dropped
    (a tied one leaves the embedding as it is), a score head normal(0, 1/sqrt(dim + 1)) is added on the device and
    in the dtype of the model's weights, and the config says head=score with `pad_token_id`.

    A model that already is a reward model is returned as it is, when `pad_token_id` agrees with its own."""
    cfg = model.cfg
    if cfg.head == "score":
        if cfg.pad_token_id != pad_token_id:
            raise ConfigError(f"this reward model reads its score at the last token that is not pad_token_id="
                              f"{cfg.pad_token_id}; pad_token_id={pad_token_id} was asked for")
        return model
    if model.output is None:
        raise ConfigError("to_reward_model takes a whole model; this one has no output projection (a pipeline "
                          "stage?)")
    if pad_token_id is not None and not 0 <= pad_token_id < cfg.vocab_size:
        raise ConfigError(f"pad_token_id={pad_token_id} is outside the vocabulary (size {cfg.vocab_size})")
    reference = model.norm.weight if model.norm is not None else next(model.parameters())
    score = nn.Linear(cfg.dim, 1, bias=False, device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        nn.init.normal_(score.weight, mean=0.0, std=score_init_std(cfg.dim))
    model.output = None
    model.score = score
    # In this order: each assignment is validated, and a score head may be neither tied nor without its pad id
    # while it is an LM.
    cfg.tie_embeddings = False
    cfg.head = "score"
    cfg.pad_token_id = pad_token_id
    return model
