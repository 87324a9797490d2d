"""Log-probabilities of given targets under the LM head, per token and per sequence, without the full logits.

DPO, PPO, GRPO and evaluation all need log p(target | prefix) for chosen tokens, not a loss. Materialising the
(tokens x vocab) logits in fp32 for that costs 4 x T x V bytes per row (1.6 GB for 8 x 1024 tokens of a 49k
vocabulary), which is what makes "DPO runs out of memory" the commonest complaint. Here the logits exist one chunk
of rows at a time: the forward keeps only each row's log-sum-exp, and the backward recomputes the chunk's logits
to form softmax - onehot. When the head is frozen (LoRA, reference models) no weight gradient is computed at all.
"""

from __future__ import annotations

import torch

from .cross_entropy import IGNORE_INDEX, _chunk_rows, _compute_dtype, _is_plain


class LinearTokenLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[row, target[row]] for every row, chunk by chunk.

    Numerically F.linear (in the compute dtype) + fp32 log_softmax + gather. The backward of row r with upstream
    gradient g_r is g_r * (onehot(target_r) - softmax_r) on the logits, recomputed from the stored log-sum-exp.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, chunk_rows):
        n = hidden.shape[0]
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            logits = torch.mm(h[start:end], w.t()).float()
            lse[start:end] = torch.logsumexp(logits, dim=1)
            out[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - lse[start:end]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.compute_dtype, ctx.chunk_rows = compute_dtype, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h = hidden.to(ctx.compute_dtype)
        w = weight.to(ctx.compute_dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_all = grad_out.float()
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            end = min(start + ctx.chunk_rows, hidden.shape[0])
            logits = torch.mm(h[start:end], w.t()).float()
            g = g_all[start:end, None]
            # d logp_target / d logits = onehot - softmax, scaled by the upstream gradient of each row
            grad_logits = torch.exp(logits - lse[start:end, None]).mul_(-g)
            grad_logits.scatter_add_(1, targets[start:end, None], g)
            grad_logits = grad_logits.to(ctx.compute_dtype)
            if need_h:
                grad_h[start:end] = torch.mm(grad_logits, w).to(hidden.dtype)
            if need_w:
                grad_w.add_(torch.mm(grad_logits.t(), h[start:end]).float())
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   chunk_bytes: int | None = None) -> torch.Tensor:
    """Per-token log p(targets) under logits `hidden @ weight.T`, shaped like `targets`, 0 at IGNORE_INDEX.

    hidden (..., d), targets (...): e.g. (B, T, d) and (B, T). Differentiable w.r.t. hidden, and w.r.t. weight only
    when it requires a gradient. Sharded (DTensor) weights take the plain path, which they know how to run.
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden rows but {t.shape[0]} targets")
    out = torch.zeros(t.shape[0], dtype=torch.float32, device=hidden.device)
    valid = t != IGNORE_INDEX
    index = valid.nonzero().squeeze(1)
    if index.numel() == 0:
        return (out + hidden.sum() * 0.0).reshape(targets.shape)  # keeps the graph; zero gradients
    h_sel, t_sel = h.index_select(0, index), t.index_select(0, index)
    if t_sel.min() < 0 or t_sel.max() >= weight.shape[0]:
        raise IndexError(f"targets must lie in [0, {weight.shape[0]}) or be {IGNORE_INDEX}")
    if not (_is_plain(hidden) and _is_plain(weight)):
        logits = torch.nn.functional.linear(h_sel, weight).float()
        selected = torch.log_softmax(logits, dim=-1).gather(1, t_sel[:, None]).squeeze(1)
    else:
        compute_dtype = _compute_dtype(hidden, weight)
        rows = _chunk_rows(h_sel.shape[0], weight.shape[0], chunk_bytes)
        with torch.autocast(hidden.device.type, enabled=False):
            selected = LinearTokenLogprobs.apply(h_sel, weight, t_sel, compute_dtype, rows)
    return out.index_put((index,), selected).reshape(targets.shape)


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                      chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log p(targets) per row of (B, T) targets, and the number of targets per row (IGNORE_INDEX excluded)."""
    per_token = token_logprobs(hidden, weight, targets, chunk_bytes=chunk_bytes)
    return per_token.sum(dim=-1), (targets != IGNORE_INDEX).sum(dim=-1)


def packed_sequence_logprobs(per_token: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor,
                             n_docs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document sums of per-token log-probs in a packed batch: doc_ids (B, T) numbered 0..n_docs-1 over the
    whole batch (a padding token may carry any id: its target is IGNORE_INDEX, so it adds 0)."""
    flat_ids = doc_ids.reshape(-1).long()
    sums = torch.zeros(n_docs, dtype=per_token.dtype, device=per_token.device).index_add(
        0, flat_ids, per_token.reshape(-1))
    counts = torch.zeros(n_docs, dtype=torch.long, device=per_token.device).index_add(
        0, flat_ids, (targets.reshape(-1) != IGNORE_INDEX).long())
    return sums, counts
