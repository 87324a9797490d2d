"""A Llama-family decoder-only transformer, top to bottom.

    tokens -> embedding -> L x [x + Attention(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> head

The head is the output projection to the vocabulary (`cfg.head="lm"`, a language model) or a reward model's score
head (`cfg.head="score"`): one scalar per position, which model/heads.py pools at each sequence's last token.

Attention is grouped-query (n_kv_heads < n_heads; MHA and MQA are the two ends) with rotary position embeddings and,
optionally, Qwen2-style biases on the q/k/v projections. Weight names and the rotary layout (two halves, not
interleaved pairs) match Hugging Face's Llama so checkpoints convert by renaming alone.

This file holds no parallelism. Distributed wrappers (DDP, FSDP2, tensor and pipeline parallel) act on the modules
from outside; the only concession is that the layers live in a ModuleDict and the embedding, final norm and output
may be None, so a pipeline stage can drop the parts it does not own.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kernels.bf16_matmul import bf16_matmul_mode
from .config import ModelConfig, RopeScaling

# ---------------------------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------------------------


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """1 / theta^(2i/d) for i < d/2, with Llama-3.1 scaling of the long wavelengths when asked for."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float()
    # Wavelengths longer than the original context / low_freq_factor are stretched by `factor`; shorter than
    # original / high_freq_factor are untouched; in between the two are blended linearly in frequency.
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(is_medium, blended, scaled).float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each repeated over the two halves of the head dimension."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class _Rope(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, half by half: (x1 c1 - x2 s1, x2 c2 + x1 s2). The same products and sums as
    the plain expression, without its negated copy, concatenation and full-size temporaries, and a backward pass
    that is the transposed rotation (gx1 = g1 c1 + g2 s2, gx2 = g2 c2 - g1 s1) instead of five autograd nodes."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))  # keeps x's (transposed) strides
        x1, x2 = x.chunk(2, dim=-1)
        c1, c2 = cos.chunk(2, dim=-1)
        s1, s2 = sin.chunk(2, dim=-1)
        o1, o2 = out.chunk(2, dim=-1)
        torch.mul(x1, c1, out=o1).addcmul_(x2, s1, value=-1)
        torch.mul(x2, c2, out=o2).addcmul_(x1, s2)
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        gx = torch.empty_like(grad)
        g1, g2 = grad.chunk(2, dim=-1)
        c1, c2 = cos.chunk(2, dim=-1)
        s1, s2 = sin.chunk(2, dim=-1)
        o1, o2 = gx.chunk(2, dim=-1)
        torch.mul(g1, c1, out=o1).addcmul_(g2, s2)
        torch.mul(g2, c2, out=o2).addcmul_(g1, s1, value=-1)
        return gx.to(ctx.x_dtype), None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope without the final cast: the result has the promoted dtype of x and cos (fp32 for bf16 activations
    under autocast), which the attention takes as it is."""
    if cos.requires_grad or sin.requires_grad or cos.dtype != sin.dtype:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
    return _Rope.apply(x, cos, sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x1, x2) halves of each head by the position's angle. x: (B, H, T, D); cos/sin: (B or 1, 1, T, D)."""
    return rotate(x, cos, sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


class _RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)).to(x.dtype), the normalisation in fp32: the forward pass is F.rms_norm's arithmetic
    (x.pow(2).mean + eps, rsqrt, multiply); the backward pass is written out (two reductions, three elementwise
    passes) instead of autograd's walk through pow, mean, add, rsqrt and two multiplications."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = xf * rstd
        out = weight * y.to(x.dtype)
        if out_dtype is not None:
            out = out.to(out_dtype)
            # The gradient comes back in out_dtype as well: y kept at that precision halves the norm's saved bytes,
            # with a rounding of the gradient's own size.
            y = y.to(out_dtype)
        ctx.save_for_backward(y, rstd, weight)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        y, rstd, weight = ctx.saved_tensors
        y = y.float()
        x_dtype = ctx.x_dtype
        dim = y.shape[-1]
        grad_w = None
        if x_dtype == torch.float32 and grad.dtype == torch.float32 and weight.dtype == torch.float32:
            gy_y = grad * y  # d loss / d weight per row; (gy * y) summed over the row is this times weight
            if ctx.needs_input_grad[1]:
                grad_w = gy_y.reshape(-1, dim).sum(0)
            mean_gy_y = torch.matmul(gy_y, weight).unsqueeze(-1).div_(dim)
            grad_x = (grad * weight).addcmul_(y, mean_gy_y, value=-1).mul_(rstd)
            return grad_x if ctx.needs_input_grad[0] else None, grad_w, None, None
        yc = y.to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad * yc).reshape(-1, dim).sum(0).to(weight.dtype)
        gy = (grad * weight).to(x_dtype).float()
        mean_gy_y = (gy * y).mean(-1, keepdim=True)
        grad_x = gy.addcmul_(y, mean_gy_y, value=-1).mul_(rstd)
        return grad_x.to(x_dtype), grad_w, None, None


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the activation dtype (bf16 variance is too coarse).

    feeds_autocast: the output only feeds linear layers, so under autocast it leaves in autocast's dtype. Each
    linear would cast it anyway, but separately: the attention norm's output would be cast and saved for backward
    three times (q, k, v), the feed-forward norm's twice (gate, up). The values are the same either way."""

    def __init__(self, dim: int, eps: float, *, feeds_autocast: bool = False):
        super().__init__()
        self.eps = eps
        self.feeds_autocast = feeds_autocast
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        out_dtype = (torch.get_autocast_dtype(device)
                     if self.feeds_autocast and torch.is_autocast_enabled(device) else None)
        return _RMSNorm.apply(x, self.weight, self.eps, out_dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to `max_len` positions.

    `length` is the number of positions already written; the model advances it once per forward, after all layers
    have appended their keys and values for the new tokens.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *, dtype: torch.dtype, device):
        shape = (batch_size, cfg.kv_heads, max_len, cfg.head_size)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} are needed")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (in that order): drops finished sequences."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


@functools.lru_cache(maxsize=None)
def _cpu_has_amx() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # a private API; without it assume the common case, no AMX
        return False


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """SDPA over (B, H, T, D) queries and (B, H_kv, S, D) keys/values; mask: None (causal), NO_MASK or a bool mask.

    Grouped-query heads go to the kernel as they are (enable_gqa): no repeated copies of the keys and values.
    Under bf16 autocast on a CPU without AMX the attention runs in fp32: there the CPU flash kernel's bf16 backward
    is about 2x slower than its fp32 one (AVX-512 has no bf16 arithmetic beyond dot products), and fp32 is the more
    accurate of the two. GPUs and AMX CPUs keep autocast's choice (bf16).
    """
    if (q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not _cpu_has_amx()):
        with torch.autocast("cpu", enabled=False):
            return attention(q.float(), k.float(), v.float(), mask)
    if isinstance(mask, _BranchMasks):
        # Two kernel calls instead of one masked one: the prefix and first branch keep the causal kernel (which
        # skips the blocks above the diagonal), and the second branch attends to the prefix's keys and its own.
        P, S = mask.prefix, mask.split
        first = attention(q[:, :, :S], k[:, :, :S], v[:, :, :S], mask.first)
        if S == q.shape[2]:
            return first
        keys, values = torch.cat([k[:, :, :P], k[:, :, S:]], 2), torch.cat([v[:, :, :P], v[:, :, S:]], 2)
        return torch.cat([first, attention(q[:, :, S:], keys, values, mask.second)], 2)
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if mask is NO_MASK:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _rotate_raw(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """_Rope's rotation (or its transpose, the gradient's) in fp32, outside autograd."""
    out = torch.empty_like(x, dtype=torch.float32)
    x1, x2 = x.chunk(2, dim=-1)
    c1, c2 = cos.chunk(2, dim=-1)
    s1, s2 = sin.chunk(2, dim=-1)
    o1, o2 = out.chunk(2, dim=-1)
    if inverse:
        torch.mul(x1, c1, out=o1).addcmul_(x2, s2)
        torch.mul(x2, c2, out=o2).addcmul_(x1, s1, value=-1)
    else:
        torch.mul(x1, c1, out=o1).addcmul_(x2, s1, value=-1)
        torch.mul(x2, c2, out=o2).addcmul_(x1, s2)
    return out


def _additive(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The CPU flash kernel takes a float mask (0 to keep, -inf to drop), as SDPA turns a bool one into."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))


class _Fp32AttentionOfBf16(torch.autograd.Function):
    """Rotary embedding + attention for bf16 q, k, v (the projections' outputs under CPU autocast) on the CPU flash
    kernel in fp32 (see `attention`), keeping bf16 tensors for the backward pass instead of the kernel's fp32 ones.

    Saved: q, k, v before rotation (exactly the bf16 projection outputs, so the fp32 rotated values are recomputed
    bit for bit), the output in bf16 (which is also the output projection's saved input) and the log-sum-exp: about
    a third of the fp32 path's bytes. The kernel's backward reads the output only for rowsum(dO * O), where the bf16
    rounding is below the bf16 gradients' own. Returns (B, T, H * D) bf16, the output projection's input.
    Branched rows (BranchedRows) take two kernel calls, whose key and value gradients are summed over the prefix.
    """

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, mask):
        B, H, T, D = q.shape
        q32, k32 = _rotate_raw(q, cos, sin), _rotate_raw(k, cos, sin)
        v32 = v.float()
        out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
        if isinstance(mask, _BranchMasks):
            P, S = mask.prefix, mask.split
            plan = [(slice(0, S), None, _additive(mask.first))]
            if S < T:
                plan.append((slice(S, T), P, _additive(mask.second)))
        else:
            plan = [(slice(0, T), None, _additive(mask))]
        lses = []
        for rows, prefix, additive in plan:
            keys, values = (k32[:, :, rows], v32[:, :, rows]) if prefix is None else (
                torch.cat([k32[:, :, :prefix], k32[:, :, rows]], 2), torch.cat([v32[:, :, :prefix], v32[:, :, rows]], 2))
            o, lse = _flash_forward(q32[:, :, rows], keys, values, 0.0, additive is None, attn_mask=additive)
            out[:, rows] = o.transpose(1, 2)
            lses.append(lse)
        out = out.view(B, T, H * D)
        ctx.plan = [(rows, prefix) for rows, prefix, _ in plan]
        ctx.masks = [additive for _, _, additive in plan]
        ctx.save_for_backward(q, k, v, cos, sin, out, *lses)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, cos, sin, out, *lses = ctx.saved_tensors
        B, H, T, D = q.shape
        q32, k32 = _rotate_raw(q, cos, sin), _rotate_raw(k, cos, sin)
        v32 = v.float()
        g32 = grad.view(B, T, H, D).transpose(1, 2).float()
        o32 = out.view(B, T, H, D).transpose(1, 2).float()
        if len(ctx.plan) == 1:
            gq, gk, gv = _flash_backward(g32, q32, k32, v32, o32, lses[0], 0.0, ctx.masks[0] is None,
                                         attn_mask=ctx.masks[0])
        else:  # branched rows: the first call covers [0, S), the second the rest with the prefix's keys again
            (first, _), (second, P) = ctx.plan
            gq, gk, gv = torch.empty_like(q32), torch.empty_like(k32), torch.empty_like(v32)
            dq, dk, dv = _flash_backward(g32[:, :, first], q32[:, :, first], k32[:, :, first], v32[:, :, first],
                                         o32[:, :, first], lses[0], 0.0, ctx.masks[0] is None, attn_mask=ctx.masks[0])
            gq[:, :, first], gk[:, :, first], gv[:, :, first] = dq, dk, dv
            keys = torch.cat([k32[:, :, :P], k32[:, :, second]], 2)
            values = torch.cat([v32[:, :, :P], v32[:, :, second]], 2)
            dq, dk, dv = _flash_backward(g32[:, :, second], q32[:, :, second], keys, values, o32[:, :, second],
                                         lses[1], 0.0, False, attn_mask=ctx.masks[1])
            gq[:, :, second] = dq
            gk[:, :, :P] += dk[:, :, :P]
            gv[:, :, :P] += dv[:, :, :P]
            gk[:, :, second], gv[:, :, second] = dk[:, :, P:], dv[:, :, P:]
        gq = _rotate_raw(gq, cos, sin, inverse=True).to(q.dtype)
        gk = _rotate_raw(gk, cos, sin, inverse=True).to(k.dtype)
        return gq, gk, gv.to(v.dtype), None, None, None


def _fp32_attention_of_bf16_ok(q, k, v, cos, sin, mask, kv_cache) -> bool:
    """Where `attention` would run the fp32 kernel on bf16 projections: CPU bf16 autocast without AMX, in training
    or a full forward (no KV cache), with the rotary tables in fp32 and no gradient for them."""
    return (kv_cache is None and mask is not NO_MASK and q.device.type == "cpu"
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not _cpu_has_amx()
            and q.dtype == k.dtype == v.dtype == torch.bfloat16 and type(q) is torch.Tensor
            and cos.dtype == sin.dtype == torch.float32 and not (cos.requires_grad or sin.requires_grad)
            and q.shape[-1] % 2 == 0)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.head_size
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_size, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_size, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_size, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_size, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # Head counts come from the weights' (possibly tensor-parallel local) output size, hence -1.
        q = linear(self.wq, x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = linear(self.wk, x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = linear(self.wv, x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if _fp32_attention_of_bf16_ok(q, k, v, cos, sin, mask, kv_cache):
            return linear(self.wo, _Fp32AttentionOfBf16.apply(q, k, v, cos, sin, mask))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_id, k, v)
        out = attention(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def forward_at(self, x, cos, sin, mask, keep: torch.Tensor) -> torch.Tensor:
        """The attention output at the (B, K) positions `keep` only: keys and values from every position, queries
        and the output projection at K. The last block of a reward model needs no more."""
        B, T, dim = x.shape
        K = keep.shape[1]
        k = rotate(self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2), cos, sin)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        x_kept = x.gather(1, keep[..., None].expand(-1, -1, dim))
        at = keep[:, None, :, None].expand(-1, 1, -1, cos.shape[-1])
        cos_kept = cos.expand(B, -1, -1, -1).gather(2, at)
        sin_kept = sin.expand(B, -1, -1, -1).gather(2, at)
        q = rotate(self.wq(x_kept).view(B, K, -1, self.head_dim).transpose(1, 2), cos_kept, sin_kept)
        out = attention(q, k, v, _query_rows(mask, keep, T))
        return self.wo(out.transpose(1, 2).reshape(B, K, -1))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        for proj in (self.wq, self.wk, self.wv):
            nn.init.normal_(proj.weight, mean=0.0, std=init_std)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        nn.init.normal_(self.wo.weight, mean=0.0, std=out_std)


class _SwiGLU(torch.autograd.Function):
    """silu(a) * b saving only a and b: autograd's silu-then-multiply would also keep silu(a), a third tensor of the
    block's widest shape. The backward pass recomputes it (one elementwise pass) and uses the fused silu gradient."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = torch.ops.aten.silu_backward(grad * b, a) if ctx.needs_input_grad[0] else None
        grad_b = grad * F.silu(a) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype != b.dtype:  # the promoted product, as silu(a) * b gives it
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    return _SwiGLU.apply(a, b)


class _Bf16Linear(torch.autograd.Function):
    """F.linear under CPU bf16 autocast, keeping the fp32 weight (the parameter itself) for the backward pass and
    casting it again there, instead of keeping autocast's bf16 copy of every weight until the backward pass reaches
    it. Same products and roundings as autocast's F.linear; one more weight cast per step."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = torch.matmul(x, weight.to(x.dtype).t())
        return out if bias is None else out + bias.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_x = torch.matmul(grad, weight.to(x.dtype)) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.matmul(grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


def _plain_weight(proj: nn.Module) -> bool:
    """A plain nn.Linear holding an ordinary fp32 weight (no adapter, no sharded or quantized weight, no hooks)."""
    return (type(proj) is nn.Linear and type(proj.weight.data) is torch.Tensor and proj.weight.dtype == torch.float32
            and not proj._forward_hooks and not proj._forward_pre_hooks)


def _native_bf16_autocast(x: torch.Tensor) -> bool:
    """CPU bf16 autocast with bf16 products on the bf16 units (kernels/bf16_matmul.py routes F.linear elsewhere
    otherwise), x already in bf16."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and bf16_matmul_mode(x.device) == "native")


def linear(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """proj(x), through _Bf16Linear where that computes the same thing."""
    if _native_bf16_autocast(x) and _plain_weight(proj) and (proj.bias is None or proj.bias.dtype == torch.float32):
        return _Bf16Linear.apply(x, proj.weight, proj.bias)
    return proj(x)


class _SwiGLUDown(torch.autograd.Function):
    """w2(silu(a) * b) for a plain bias-free down projection, keeping only a and b for the backward pass: the
    product (the projection's input, as wide as a and b) is recomputed there instead of kept, and the weight is
    cast again instead of its autocast copy being kept. Same products and roundings as the module path."""

    @staticmethod
    def forward(ctx, a, b, weight):
        h = F.silu(a) * b
        ctx.save_for_backward(a, b, weight)
        return torch.matmul(h, weight.to(h.dtype).t())

    @staticmethod
    def backward(ctx, grad):
        a, b, weight = ctx.saved_tensors
        grad = grad.to(a.dtype)
        silu_a = F.silu(a)
        grad_w = None
        if ctx.needs_input_grad[2]:
            h = silu_a * b
            grad_w = torch.matmul(grad.reshape(-1, grad.shape[-1]).t(), h.reshape(-1, h.shape[-1])).to(weight.dtype)
        grad_h = torch.matmul(grad, weight.to(a.dtype))
        grad_a = torch.ops.aten.silu_backward(grad_h * b, a) if ctx.needs_input_grad[0] else None
        grad_b = grad_h * silu_a if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, grad_w


def _fused_down_ok(a: torch.Tensor, b: torch.Tensor, down: nn.Module) -> bool:
    """The down projection is a plain bias-free nn.Linear (no adapter, no sharded or quantized weight, no hooks),
    and its product would be a native GEMM in a's dtype: under CPU bf16 autocast only when bf16 products run on the
    bf16 units; without autocast when the dtypes agree."""
    if (type(down) is not nn.Linear or down.bias is not None or type(down.weight.data) is not torch.Tensor
            or down._forward_hooks or down._forward_pre_hooks or a.dtype != b.dtype):
        return False
    device = a.device.type
    if torch.is_autocast_enabled(device):
        return _native_bf16_autocast(a) if device == "cpu" else a.dtype == torch.get_autocast_dtype(device)
    return a.dtype == down.weight.dtype


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = linear(self.w1, x), linear(self.w3, x)
        if _fused_down_ok(a, b, self.w2):
            return _SwiGLUDown.apply(a, b, self.w2.weight)
        return self.w2(swiglu(a, b))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.w3.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.w2.weight, mean=0.0, std=out_std)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, feeds_autocast=True)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, feeds_autocast=True)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None = None, keep: torch.Tensor | None = None
                ) -> torch.Tensor:
        """keep (B, K): only these positions' outputs are wanted (the last block of a reward model): queries, the
        output projection and the feed-forward run on K positions instead of T (keys and values on all)."""
        if keep is None:
            h = x + self.attention(self.attention_norm(x), cos, sin, mask, kv_cache)
        else:
            if kv_cache is not None:
                raise ValueError("keep (output positions) takes no KV cache")
            x_kept = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
            h = x_kept + self.attention.forward_at(self.attention_norm(x), cos, sin, mask, keep)
        return h + self.feed_forward(self.ffn_norm(h))


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

    def masks(self, length: int, device) -> "_BranchMasks":
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
        return _BranchMasks(prefix=P, split=S, first=first, second=second)


@dataclass(frozen=True)
class _BranchMasks:
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


def _query_rows(mask, keep: torch.Tensor, length: int) -> torch.Tensor:
    """(B, 1, K, T) bool: the rows of a training mask (None: causal; a bool mask; branched rows) for the query
    positions `keep` (B, K)."""
    if mask is None:
        return (torch.arange(length, device=keep.device)[None, None, :] <= keep[:, :, None])[:, None]
    if mask is NO_MASK:
        raise ValueError("keep (output positions) needs a training mask, not a decoding step's")
    full = mask.full(length) if isinstance(mask, _BranchMasks) else mask
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


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # One head: `output` (vocabulary logits) for an LM, `score` (one scalar) for a reward model; the other is
        # None, and a pipeline stage that does not hold the head has it set to None too.
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if cfg.head == "lm" else None
        self.score = nn.Linear(cfg.dim, 1, bias=False) if cfg.head == "score" else None
        if self.output is not None and cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer(
            "inv_freq", rope_inverse_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(init_std) everywhere; the projections that write into the residual stream (attention output and
        MLP down) get init_std / sqrt(2 * n_layers) so the residual's variance does not grow with depth (GPT-2)."""
        cfg = self.cfg
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=cfg.init_std)
        for block in self.layers.values():
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
            block.attention.reset_parameters(cfg.init_std, out_std)
            block.feed_forward.reset_parameters(cfg.init_std, out_std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, mean=0.0, std=cfg.init_std)
        if self.score is not None:
            nn.init.normal_(self.score.weight, mean=0.0, std=score_init_std(cfg.dim))
        self.inv_freq = rope_inverse_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling).to(
            self.inv_freq.device
        )

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
        branches: BranchedRows | None = None,
        output_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab); a reward model's score at every position (B, T); or, with return_hidden, the final
        normed hidden states (B, T, dim), which are also what a pipeline stage without the head returns.

        tokens: (B, T) ids, or (B, T, dim) hidden states when this module is a pipeline stage without embeddings.
        position_ids: (B, T); default: consecutive positions after what the KV cache already holds.
        doc_ids: (B, T) document index of each packed token (training); attention never crosses documents.
        attention_mask: (B, cache length + T) with 1 for real tokens and 0 for padding (generation).
        branches: rows of one prefix and two continuations (BranchedRows), instead of doc_ids or attention_mask.
        output_positions: (B, K) the positions whose outputs are wanted: the result is (B, K, ...) and the last
        block's feed-forward runs on those positions only.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        B, T = h.shape[0], h.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=h.device)[None]
        cos, sin = rope_cos_sin(position_ids, self.inv_freq)
        cos, sin = cos[:, None].to(h.dtype), sin[:, None].to(h.dtype)
        if branches is not None:
            if doc_ids is not None or attention_mask is not None or kv_cache is not None:
                raise ValueError("branched rows take neither doc_ids, attention_mask nor a KV cache")
            mask = branches.masks(T, h.device)
        else:
            mask = build_attention_mask(T, past + T, doc_ids=doc_ids, key_padding=attention_mask, device=h.device)
        layers = list(self.layers.values())
        for i, layer in enumerate(layers):
            if output_positions is not None and i == len(layers) - 1:
                h = layer(h, cos, sin, mask, kv_cache, keep=output_positions.to(h.device))
            else:
                h = layer(h, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        if self.norm is not None:
            h = self.norm(h)
        if return_hidden:
            return h
        # The config says which head, not which attribute is set: a pipeline stage's view of an LM
        # (parallel/apply.py's stage_view) has no `score` attribute at all.
        if self.cfg.head == "score":
            return h if self.score is None else self.score(h).squeeze(-1)
        return h if self.output is None else self.output(h)

    def lm_head_weight(self) -> torch.Tensor:
        """The (vocab, dim) matrix that turns final hidden states into logits. Objectives take it from here for their
        chunked losses and log-probs (calling the head would materialise every logit); an adapter on the head
        changes what this returns, not the objectives."""
        require_lm_head(self, "compute logits with")
        if self.output is None:
            raise RuntimeError("this pipeline stage holds no LM head")
        return self.output.weight

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        weight = next(self.parameters())
        return KVCache(
            self.cfg, batch_size, max_len or self.cfg.max_seq_len, dtype=dtype or weight.dtype, device=weight.device
        )

    def num_params(self) -> int:
        """Parameters actually held (a tied table counted once)."""
        return sum(p.numel() for p in self.parameters())


def score_init_std(dim: int) -> float:
    """A new score head's weights are normal(0, 1/sqrt(dim + 1)), as TRL's reward models start: the initial rewards
    have about unit variance for unit-RMS final hidden states."""
    return 1.0 / math.sqrt(dim + 1)


def require_lm_head(model: Transformer, action: str) -> None:
    """The clear error for asking a reward model for what only a language model has (generation, logits, GGUF)."""
    if model.cfg.head == "score":
        raise ConfigError(f"a reward model (head=score) has no LM head to {action}")


def build_model(cfg: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Build and initialise; device='meta' allocates nothing (shape checks and planning for 7B/70B)."""
    with torch.device(device):
        model = Transformer(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model
