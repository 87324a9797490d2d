"""Grow a model's vocabulary, for tokens added to its tokenizer (e.g. a chat template's special tokens).

New rows start at the mean of the existing rows, for the embedding and for the output layer. A random row (the
initialiser's scale) in the output layer would give the new tokens logits unrelated to anything the model has learned,
sometimes far above the real tokens', which derails the first steps; at the mean, a new token's logit is the average
logit, so the model's predictions barely move until training teaches it the token (Hewitt, "Initializing new word
embeddings for pretrained language models", 2021).
"""

from __future__ import annotations

import torch
from torch import nn

from forgeline.errors import ConfigError

__all__ = ["resize_token_embeddings"]


def resize_token_embeddings(model: nn.Module, new_vocab_size: int) -> nn.Module:
    """Grow ``tok_embeddings`` and ``output`` of a forgeline Transformer to ``new_vocab_size`` rows, in place.

    Tied weights stay tied (one new table serves both). ``model.cfg.vocab_size`` is updated, so a saved model
    records the new size. Call it before wrapping the model (DDP, FSDP, adapters) and before building the optimizer:
    the grown layers hold new Parameter objects. Returns the model.
    """
    if isinstance(new_vocab_size, bool) or not isinstance(new_vocab_size, int) or new_vocab_size < 1:
        raise ConfigError(f"new_vocab_size must be a positive integer, got {new_vocab_size!r}")
    if not all(hasattr(model, name) for name in ("cfg", "tok_embeddings", "output")):
        raise TypeError(f"resize_token_embeddings takes a forgeline Transformer, got {type(model).__name__}")
    old = model.cfg.vocab_size
    if new_vocab_size < old:
        raise ConfigError(f"cannot shrink the vocabulary from {old} to {new_vocab_size} tokens: token ids would "
                          "change meaning")
    if new_vocab_size == old:
        return model
    embed, head = model.tok_embeddings, model.output
    if embed is not None and not isinstance(embed, nn.Embedding):
        raise ConfigError(f"the token embedding is a {type(embed).__name__}; resize the vocabulary before adding "
                          "adapters or other wrappers")
    if head is not None and not isinstance(head, nn.Linear):
        raise ConfigError(f"the output layer is a {type(head).__name__}; resize the vocabulary before adding "
                          "adapters or other wrappers")
    tied = embed is not None and head is not None and head.weight is embed.weight
    with torch.no_grad():
        if embed is not None:
            grown = nn.Embedding(new_vocab_size, embed.embedding_dim, device=embed.weight.device,
                                 dtype=embed.weight.dtype)
            grown.weight.copy_(_grow(embed.weight, new_vocab_size))
            grown.weight.requires_grad_(embed.weight.requires_grad)
            model.tok_embeddings = grown
        if head is not None:
            if tied:
                head.weight = model.tok_embeddings.weight
                head.out_features = new_vocab_size
            else:
                grown_head = nn.Linear(head.in_features, new_vocab_size, bias=head.bias is not None,
                                       device=head.weight.device, dtype=head.weight.dtype)
                grown_head.weight.copy_(_grow(head.weight, new_vocab_size))
                if head.bias is not None:
                    grown_head.bias.copy_(_grow(head.bias[:, None], new_vocab_size)[:, 0])
                grown_head.weight.requires_grad_(head.weight.requires_grad)
                model.output = grown_head
    model.cfg.vocab_size = new_vocab_size
    return model


def _grow(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with rows appended up to ``rows``, each the mean of the old rows (computed in fp32)."""
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], dim=0)
