"""Attention masks for training and decoding: the causal default, packed documents, padding, and rows that hold
one prefix with two continuations (a reward model's prompt, chosen and rejected).

A mask here is None (plain causal attention: the fast kernel), NO_MASK (a decoding step attends to every cached
key), a (B, 1, Tq, Tk) bool tensor, or BranchMasks (branched rows, which `attention` runs as two kernel calls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NO_MASK", "BranchMasks", "BranchedRows", "build_attention_mask", "prefix_tree_mask", "query_rows"]

# A sentinel for "attend to every key": a single new token decoding against the cache needs no mask at all.
NO_MASK = object()


@dataclass(frozen=True)
class BranchedRows:
    """Rows that each hold one prefix and two continuations of it, [prefix | first | second], where the second
    continuation attends to the prefix and to itself, never to the first: both continuations are computed exactly
    as if each followed the prefix alone (give the second the positions that follow the prefix), and the prefix is
    computed once. A reward model scores chosen and rejected over one prompt this way.

    prefix: the prefix's length in the rows (prefixes are left-padded to it); first: the first continuation's
    (right-padded); the rest of the row is the second continuation (right-padded). prefix_real (B, prefix): False
    on left padding, None when no row has any.
    """

    prefix: int
    first: int
    prefix_real: torch.Tensor | None = None

    def masks(self, length: int, device) -> "BranchMasks":
        P, S = self.prefix, self.prefix + self.first
        if not 0 <= S <= length:
            raise ValueError(f"prefix {P} + first {self.first} is longer than the rows ({length})")
        R = length - S
        real = self.prefix_real.to(device=device, dtype=torch.bool) if self.prefix_real is not None else None
        first = None  # plain causal: the fast kernel
        if real is not None:
            key_real = torch.cat([real, real.new_ones(real.shape[0], self.first)], 1)
            i = torch.arange(S, device=device)
            # A pad query keeps its own key: a row with every key masked would come out of softmax as NaN, and
            # NaN times a zero weight is still NaN wherever that row is used as a key or value.
            first = (i[None, :] <= i[:, None])[None, None] & (key_real[:, None, None, :] | (i[None, :] == i[:, None]))
        q, k = torch.arange(R, device=device), torch.arange(P + R, device=device)
        second = ((k[None, :] < P) | (k[None, :] - P <= q[:, None]))[None, None]
        if real is not None:
            second = second & torch.cat([real, real.new_ones(real.shape[0], R)], 1)[:, None, None, :]
        return BranchMasks(prefix=P, split=S, first=first, second=second)


@dataclass(frozen=True)
class BranchMasks:
    prefix: int
    split: int
    first: torch.Tensor | None
    second: torch.Tensor

    def full(self, length: int) -> torch.Tensor:
        """The same as one (B or 1, 1, T, T) bool mask."""
        P, S = self.prefix, self.split
        device = self.second.device
        first = self.first
        if first is None:
            i = torch.arange(S, device=device)
            first = (i[None, :] <= i[:, None])[None, None]
        B = max(first.shape[0], self.second.shape[0])
        mask = torch.zeros(B, 1, length, length, dtype=torch.bool, device=device)
        mask[:, :, :S, :S] = first
        mask[:, :, S:, :P] = self.second[..., :P]
        mask[:, :, S:, S:] = self.second[..., P:]
        return mask


def prefix_tree_mask(branch: torch.Tensor, *, prefix_keys: int = 0) -> torch.Tensor:
    """(B, 1, T, prefix_keys + T) bool mask for rows [prefix | continuation 1 | continuation 2 | ...]: `branch`
    (B, T) is 0 on the prefix, k on continuation k and -1 on padding. Each continuation attends to the prefix and to
    its own earlier tokens, never to a sibling, so it is computed as if it followed the prefix alone (given the
    positions that follow the prefix); the prefix is computed once for all of them. `prefix_keys` more keys before
    the rows (a KV cache of a prefix shared by every row) are visible to every query. A padding query keeps its own
    key, so that no softmax row is all masked (NaN)."""
    B, T = branch.shape
    i = torch.arange(T, device=branch.device)
    keys = branch[:, None, :]
    mask = (i[None, :] <= i[:, None])[None] & (keys >= 0) & ((keys == 0) | (keys == branch[:, :, None]))
    mask |= torch.eye(T, dtype=torch.bool, device=branch.device)[None]
    if prefix_keys:
        mask = torch.cat([mask.new_ones(B, T, prefix_keys), mask], dim=2)
    return mask[:, None]


def query_rows(mask, keep: torch.Tensor, length: int) -> torch.Tensor:
    """(B, 1, K, T) bool: the rows of a training mask (None: causal; a bool mask; branched rows) for the query
    positions `keep` (B, K)."""
    if mask is None:
        return (torch.arange(length, device=keep.device)[None, None, :] <= keep[:, :, None])[:, None]
    if mask is NO_MASK:
        raise ValueError("keep (output positions) needs a training mask, not a decoding step's")
    full = mask.full(length) if isinstance(mask, BranchMasks) else mask
    full = full.expand(keep.shape[0], -1, -1, -1)
    return full.gather(2, keep[:, None, :, None].expand(-1, 1, -1, length))


def build_attention_mask(
    query_len: int,
    key_len: int,
    *,
    doc_ids: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    device=None,
):
    """The boolean (B, 1, Tq, Tk) mask SDPA needs, or None when plain causal attention (the fast path) suffices.

    doc_ids (B, T): packed sequences; a token attends only to earlier tokens of its own document.
    key_padding (B, Tk): 1/True for real tokens, 0/False for padding (left-padded prompts in generation).
    Queries are the last `query_len` of the `key_len` positions (decoding against a KV cache).
    """
    offset = key_len - query_len
    if doc_ids is None and key_padding is None:
        if query_len == key_len:
            return None
        if query_len == 1:
            return NO_MASK
    q_pos = torch.arange(offset, key_len, device=device)
    k_pos = torch.arange(key_len, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if doc_ids is not None:
        if offset:
            raise ValueError("doc_ids are only supported without a KV cache")
        if bool((doc_ids == doc_ids[:, :1]).all()):
            mask_docs = None  # one document per row: causal alone is exact and takes the fast kernel
        else:
            mask_docs = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
        if mask_docs is None and key_padding is None:
            return None
        if mask_docs is not None:
            mask = mask & mask_docs
    if key_padding is not None:
        mask = mask & key_padding.bool()[:, None, None, :]
    return mask
