"""Rotary position embeddings (RoPE, Su et al.), in Hugging Face Llama's layout: two halves, not interleaved
pairs, so checkpoints convert by renaming alone; with Llama 3's frequency scaling."""

from __future__ import annotations

import math

import torch

from .config import RopeScaling

__all__ = ["apply_rope", "rope_cos_sin", "rope_inverse_frequencies", "rotate", "rotate_halves"]




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


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool = False,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """(x1 c1 - x2 s1, x2 c2 + x1 s2), or with inverse the transposed rotation (x1 c1 + x2 s2, x2 c2 - x1 s1), in
    `dtype` (default x's), keeping x's strides, outside autograd: _Rope's arithmetic, for lean_ops' attention, which
    recomputes the rotation in its backward pass. (_Rope keeps its own copy: under torch.compile the shared helper
    trips an inductor error on CPU.)"""
    out = torch.empty_like(x, dtype=dtype or x.dtype)  # keeps x's (transposed) strides
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
