"""Autograd functions for training that keep fewer bytes for the backward pass than autograd's composition of the
same operators, with the same products and roundings. Each has a check of where it applies; elsewhere
(adapters, sharded or quantized weights, module hooks, a KV cache, another autocast setting, torch.compile, which
plans what to keep itself) transformer.py takes the plain path.

    linear                nn.Linear under CPU bf16 autocast, keeping the fp32 weight, not autocast's bf16 copy
    swiglu / SwiGLUDown   silu(a) * b, and w2(silu(a) * b), saving only a and b
    Fp32AttentionOfBf16   rotary embedding + the fp32 CPU flash kernel, saving bf16 q, k, v and output

Measured with saved-tensor hooks on SmolLM2-135M's shape (bf16 autocast, 16 rows of 128 tokens): 34 KB saved per
token and layer before, 15 after (with the block norms' bf16 outputs); bench/preference.py's reward-model rows show
what it does to a whole run.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.bf16_matmul import bf16_matmul_mode
from .masks import NO_MASK, BranchMasks
from .rope import rotate_halves

__all__ = ["Bf16Linear", "Fp32AttentionOfBf16", "SwiGLUDown", "cpu_has_amx", "fp32_attention_of_bf16_ok", "linear",
           "swiglu", "swiglu_down_ok"]


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # a private API; without it assume the common case, no AMX
        return False


_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _additive(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The CPU flash kernel takes a float mask (0 to keep, -inf to drop), as SDPA turns a bool one into."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))


class Fp32AttentionOfBf16(torch.autograd.Function):
    """Rotary embedding + attention for bf16 q, k, v (the projections' outputs under CPU autocast) on the CPU flash
    kernel in fp32 (see transformer.py's `attention`), keeping bf16 tensors for the backward pass instead of the kernel's fp32 ones.

    Saved: q, k, v before rotation (exactly the bf16 projection outputs, so the fp32 rotated values are recomputed
    bit for bit), the output in bf16 (which is also the output projection's saved input) and the log-sum-exp: about
    a third of the fp32 path's bytes. The kernel's backward reads the output only for rowsum(dO * O), where the bf16
    rounding is below the bf16 gradients' own. Returns (B, T, H * D) bf16, the output projection's input.
    Branched rows (BranchedRows) take two kernel calls, whose key and value gradients are summed over the prefix.
    """

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, mask):
        B, H, T, D = q.shape
        q32, k32 = rotate_halves(q, cos, sin, dtype=torch.float32), rotate_halves(k, cos, sin, dtype=torch.float32)
        v32 = v.float()
        out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
        if isinstance(mask, BranchMasks):
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
        q32, k32 = rotate_halves(q, cos, sin, dtype=torch.float32), rotate_halves(k, cos, sin, dtype=torch.float32)
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
        gq = rotate_halves(gq, cos, sin, inverse=True).to(q.dtype)
        gk = rotate_halves(gk, cos, sin, inverse=True).to(k.dtype)
        return gq, gk, gv.to(v.dtype), None, None, None


def fp32_attention_of_bf16_ok(q, k, v, cos, sin, mask, kv_cache) -> bool:
    """Where `attention` would run the fp32 kernel on bf16 projections: CPU bf16 autocast without AMX, in training
    or a full forward (no KV cache), with the rotary tables in fp32 and no gradient for them."""
    return (kv_cache is None and mask is not NO_MASK and q.device.type == "cpu" and not torch.compiler.is_compiling()
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not cpu_has_amx()
            and q.dtype == k.dtype == v.dtype == torch.bfloat16 and type(q) is torch.Tensor
            and cos.dtype == sin.dtype == torch.float32 and not (cos.requires_grad or sin.requires_grad)
            and q.shape[-1] % 2 == 0)


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
    if torch.compiler.is_compiling():  # the compiler plans what to keep itself
        return F.silu(a) * b
    if a.dtype != b.dtype:  # the promoted product, as silu(a) * b gives it
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    return _SwiGLU.apply(a, b)


class Bf16Linear(torch.autograd.Function):
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
    if not torch.compiler.is_compiling() and _native_bf16_autocast(x) and _plain_weight(proj) and (proj.bias is None or proj.bias.dtype == torch.float32):
        return Bf16Linear.apply(x, proj.weight, proj.bias)
    return proj(x)


class SwiGLUDown(torch.autograd.Function):
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


def swiglu_down_ok(a: torch.Tensor, b: torch.Tensor, down: nn.Module) -> bool:
    """The down projection is a plain bias-free nn.Linear (no adapter, no sharded or quantized weight, no hooks),
    and its product would be a native GEMM in a's dtype: under CPU bf16 autocast only when bf16 products run on the
    bf16 units; without autocast when the dtypes agree."""
    if (torch.compiler.is_compiling() or type(down) is not nn.Linear or down.bias is not None or type(down.weight.data) is not torch.Tensor
            or down._forward_hooks or down._forward_pre_hooks or a.dtype != b.dtype):
        return False
    device = a.device.type
    if torch.is_autocast_enabled(device):
        return _native_bf16_autocast(a) if device == "cpu" else a.dtype == torch.get_autocast_dtype(device)
    return a.dtype == down.weight.dtype
