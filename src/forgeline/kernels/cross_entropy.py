"""Summed cross-entropy of given targets under the LM head, without the full (tokens x vocab) fp32 logits.

The loss every next-token objective (pre-training, SFT, ORPO's NLL term) is made of. Targets equal to IGNORE_INDEX
(prompt tokens, padding, sample boundaries in packed rows) contribute nothing.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .bf16_matmul import bf16_matmul_mode

IGNORE_INDEX = -100

# The fused loss walks the rows in chunks of CHUNK_BYTES of fp32 logits (8 MiB: 256 rows of a 8192-token vocabulary).
# Measured on 2 CPU cores (forward + backward of the loss alone, 2048-4096 rows, vocabularies of 8192-16384), 4-32 MiB
# chunks were within a few percent of each other and 1.2-1.7x faster than materialising all the logits. In low
# precision (bf16) the gradient of the logits is kept in bf16 for a group of rows of up to LOW_PRECISION_GROUP_BYTES
# (the fp32 logits never are), so that the weight and hidden gradients are one large bf16 matmul per group, rounded
# once like the unfused reference, instead of one small matmul plus an fp32 add per chunk.
CHUNK_BYTES = 8 * 1024 * 1024
LOW_PRECISION_GROUP_BYTES = 256 * 1024 * 1024
MIN_CHUNK_ROWS = 16


def _chunk_rows(n_rows: int, vocab: int, chunk_bytes: int | None) -> int:
    rows = max(MIN_CHUNK_ROWS, (chunk_bytes or CHUNK_BYTES) // (4 * vocab))
    return max(1, min(n_rows, rows))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype F.linear would use here: the autocast dtype when autocast is on, else the inputs' own."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `targets` under `hidden @ weight.T`, without materialising the (tokens x vocab) logits.

    The forward pass walks the rows in chunks: the chunk's logits (matmul in the compute dtype, then fp32), their
    log-softmax and loss, and at once the gradient of the summed loss, softmax - onehot, which becomes the chunk's
    (or, in low precision, the group's) gradient w.r.t. hidden and its share of the gradient w.r.t. weight,
    accumulated in fp32. The backward pass only scales the stored gradients by grad_output. Numerically this is
    F.linear + fp32 F.cross_entropy(reduction="sum"), with the matmuls in the same dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, chunk_rows, fp32_units=False):
        # hidden (N, d) holding only rows with a target, weight (V, d), targets (N,)
        # fp32_units: bf16 products computed by fp32 GEMMs on the bf16 values (kernels/bf16_matmul.py), results rounded
        # to bf16 where the bf16 GEMMs round them.
        n, vocab = hidden.shape[0], weight.shape[0]
        device = hidden.device
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        low_precision = compute_dtype != torch.float32
        fp32_units = fp32_units and low_precision
        if fp32_units:
            h, w = h.float(), w.float()
        chunk = chunk_rows
        group = chunk
        # A frozen head (adapters train, the LM head does not) needs no weight gradient: no V x d product per
        # group, and since each row's hidden gradient depends on that row alone, chunks need no grouping either
        need_weight_grad = ctx.needs_input_grad[1]
        if low_precision and need_weight_grad:
            group_rows = LOW_PRECISION_GROUP_BYTES // (vocab * (4 if fp32_units else h.element_size()))
            group = min(n, max(chunk, group_rows // chunk * chunk))
        # Buffers reused by every chunk (fresh multi-megabyte CPU tensors cost page faults each time): `grad_buf`
        # holds a group's logits, then their gradient, in the compute dtype; fp32 scratch for the softmax.
        grad_buf = torch.empty((group, vocab), dtype=compute_dtype, device=device)
        logits32 = torch.empty((chunk, vocab), dtype=torch.float32, device=device) if low_precision else None
        logp_buf = torch.empty((chunk, vocab), dtype=torch.float32, device=device)
        minus_one = torch.full((chunk, 1), -1.0, dtype=torch.float32, device=device)
        loss = torch.zeros((), dtype=torch.float32, device=device)
        grad_h = torch.empty_like(h, dtype=compute_dtype)
        grad_w = None
        for g_start in range(0, n, group):
            g_end = min(g_start + group, n)
            for start in range(g_start, g_end, chunk):
                end = min(start + chunk, g_end)
                c = end - start
                rows = grad_buf[start - g_start:end - g_start]
                t_c = targets[start:end, None]
                if fp32_units:  # fp32 logits rounded to bf16 (as the bf16 GEMM writes them), then back to fp32
                    logits = logits32[:c].copy_(rows.copy_(torch.mm(h[start:end], w.t(), out=logits32[:c])))
                else:
                    logits = torch.mm(h[start:end], w.t(), out=rows)
                if low_precision and not fp32_units:
                    logits = logits32[:c].copy_(logits)
                logp = torch.log_softmax(logits, dim=1, out=logp_buf[:c])
                loss -= logp.gather(1, t_c).sum()
                if low_precision:  # softmax - onehot in fp32, rounded once into the compute dtype
                    rows.copy_(logp.exp_().scatter_add_(1, t_c, minus_one[:c]))
                else:
                    torch.exp(logp, out=rows).scatter_add_(1, t_c, minus_one[:c])
            g = grad_buf[:g_end - g_start]
            if not need_weight_grad:
                if fp32_units:
                    grad_h[g_start:g_end].copy_(torch.mm(g.float(), w))
                else:
                    torch.mm(g, w, out=grad_h[g_start:g_end])
                continue
            if fp32_units:
                g32 = g.float()
                grad_h[g_start:g_end].copy_(torch.mm(g32, w))
                part = torch.mm(g32.t(), h[g_start:g_end]).to(compute_dtype)
                del g32
                if grad_w is None:
                    grad_w = part.float()
                else:
                    grad_w.add_(part)
                continue
            torch.mm(g, w, out=grad_h[g_start:g_end])
            if grad_w is None:
                grad_w = torch.mm(g.t(), h[g_start:g_end]).float()
            elif low_precision:
                grad_w.add_(torch.mm(g.t(), h[g_start:g_end]))
            else:
                grad_w.addmm_(g.t(), h[g_start:g_end])
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = gw = None
        if ctx.needs_input_grad[0]:
            gh = (grad_h * grad_output.to(grad_h.dtype)).to(h_dtype)
        if ctx.needs_input_grad[1]:
            gw = (grad_w * grad_output).to(w_dtype)
        return gh, gw, None, None, None, None


def _is_plain(t: torch.Tensor) -> bool:
    # DTensor (tensor-parallel / FSDP2 shards) and other subclasses keep the plain path, which they know how to run
    return type(t) in (torch.Tensor, nn.Parameter) and type(t.data) is torch.Tensor


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_bytes: int | None = None
) -> torch.Tensor:
    """Summed cross-entropy of `targets` under logits `hidden @ weight.T` (IGNORE_INDEX positions ignored),
    computed chunk by chunk; differentiable w.r.t. hidden and weight. Same value as `F.linear` + fp32
    `F.cross_entropy(..., reduction="sum")`, with the same matmul dtype (autocast's when it is on)."""
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden rows but {t.shape[0]} targets")
    compute_dtype = _compute_dtype(hidden, weight)
    valid = t != IGNORE_INDEX
    index = None
    if not bool(valid.all()):
        index = valid.nonzero().squeeze(1)
        h, t = h.index_select(0, index), t.index_select(0, index)
    if h.shape[0] == 0:
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).float()  # keeps the graph; zero loss and gradients
    if t.min() < 0 or t.max() >= weight.shape[0]:
        raise IndexError(f"targets must lie in [0, {weight.shape[0]}) or be {IGNORE_INDEX}")
    chunk_rows = _chunk_rows(h.shape[0], weight.shape[0], chunk_bytes)
    fp32_units = compute_dtype == torch.bfloat16 and bf16_matmul_mode(hidden.device) == "fp32"
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearCrossEntropy.apply(h, weight, t, compute_dtype, chunk_rows, fp32_units)


def _plain_cross_entropy_sum(hidden, weight, targets) -> torch.Tensor:
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight)
    return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def _chunked_cross_entropy_no_grad(hidden, weight, targets, chunk_bytes=None) -> torch.Tensor:
    """Evaluation: the same loss, chunk by chunk, no gradient (the logits are never all held at once)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    rows = _chunk_rows(h.shape[0], weight.shape[0], chunk_bytes)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, h.shape[0], rows):
        total += _plain_cross_entropy_sum(h[start:start + rows], weight, t[start:start + rows])
    return total


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `targets` under logits `hidden @ weight.T`, ignoring IGNORE_INDEX positions.

    Logits are upcast to fp32 before the softmax: bf16 log-probabilities lose the small differences the loss
    is made of. When the logits are larger than one chunk (CHUNK_BYTES in fp32) the loss and its gradient are
    computed chunk by chunk (fused_linear_cross_entropy), so the full logits and their gradient never exist at once.
    Smaller logits, and sharded (DTensor) weights, take the plain F.linear + F.cross_entropy path: for the former
    there is nothing to save, the latter only the plain ops know how to run.
    """
    n_rows = hidden.numel() // max(1, hidden.shape[-1])
    if n_rows * weight.shape[0] * 4 <= CHUNK_BYTES or not (_is_plain(hidden) and _is_plain(weight)):
        return _plain_cross_entropy_sum(hidden, weight, targets)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return fused_linear_cross_entropy(hidden, weight, targets)
    return _chunked_cross_entropy_no_grad(hidden, weight, targets)
