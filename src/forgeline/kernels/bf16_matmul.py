"""bf16 matrix products on the fp32 units, for CPUs whose fp32 arithmetic is faster than their bf16 dot products.

A bf16 GEMM (oneDNN's, or a GPU's) multiplies bf16 values exactly into fp32 and sums in fp32. An fp32 GEMM over the
same bf16 values, upcast (exactly), computes the same products and fp32 sums, in another order. On CPUs with
AVX512-BF16 but no AMX the bf16 dot-product instruction can be the slower of the two: on the project's Intel Xeon
`vdpbf16ps` issues once per two cycles, so oneDNN's bf16 GEMM peaks near 160 GFLOP/s on 2 cores while fp32 FMA
reaches 250-320. There, under bf16 autocast, forgeline computes each linear layer's three products (forward, input
gradient, weight gradient) as fp32 GEMMs on bf16-rounded operands and rounds the results to bf16 where the bf16
path does: the model still trains "in bf16" (same rounding points, same saved bf16 activations), only faster.
Where bf16 is the faster unit (AMX, Zen 4, GPUs) nothing changes.

`bf16_matmul_mode()` decides once per process: "native" (bf16 GEMMs) or "fp32" (this module), from a short
measurement of both on a 512^3 product, unless `configure("native" | "fp32")` (the `train.bf16_matmul` setting)
fixes it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_setting = "auto"


def configure(mode: str) -> None:
    """"auto" (measure), "native" (bf16 GEMMs) or "fp32" (bf16 values multiplied on the fp32 units)."""
    global _setting
    if mode not in ("auto", "native", "fp32"):
        raise ValueError(f"bf16_matmul must be auto, native or fp32, got {mode!r}")
    _setting = mode


def _matmul_seconds(size: int = 512, repeats: int = 7) -> tuple[float, float]:
    """The best of `repeats` 512^3 products in bf16 and in fp32, taken in turn: a load that comes or goes during the
    measurement (another process on the cores) then slows both alike instead of flipping the verdict."""
    a32, b32 = torch.randn(size, size), torch.randn(size, size)
    a16, b16 = a32.to(torch.bfloat16), b32.to(torch.bfloat16)
    a16 @ b16
    a32 @ b32
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, (a, b) in enumerate(((a16, b16), (a32, b32))):
            start = time.perf_counter()
            a @ b
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


@functools.lru_cache(maxsize=None)
def _fp32_units_faster(threads: int) -> bool:
    bf16, fp32 = _matmul_seconds()
    faster = bf16 > 1.25 * fp32
    log.info("bf16 matmul %.1f ms, fp32 %.1f ms (512^3, %d threads): bf16 products on the %s units",
             bf16 * 1e3, fp32 * 1e3, threads, "fp32" if faster else "bf16")
    return faster


def bf16_matmul_mode(device: torch.device) -> str:
    if device.type != "cpu":
        return "native"
    if _setting != "auto":
        return _setting
    return "fp32" if _fp32_units_faster(torch.get_num_threads()) else "native"


class Bf16LinearOnFp32Units(torch.autograd.Function):
    """F.linear under bf16 autocast (x and W rounded to bf16, output bf16, gradients bf16 then the weight's fp32),
    with every product computed by an fp32 GEMM on the bf16 values."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        # a frozen weight (an adapter's base) needs no weight gradient, so its input need not outlive the forward
        ctx.save_for_backward(xb if ctx.needs_input_grad[1] else None, wb)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.has_bias = bias is not None
        with torch.autocast("cpu", enabled=False):
            bias32 = None if bias is None else bias.to(torch.bfloat16).float()
            out = F.linear(xb.float(), wb.float(), bias32)
        return out.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad.to(torch.bfloat16).float().reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:
                gx = (g @ wb.float()).to(torch.bfloat16).reshape(*grad.shape[:-1], wb.shape[1]).to(x_dtype)
            if ctx.needs_input_grad[1]:
                gw = (g.t() @ xb.reshape(-1, xb.shape[-1]).float()).to(torch.bfloat16).to(w_dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = g.sum(0).to(torch.bfloat16).to(b_dtype)
        return gx, gw, gb


def _plain_cpu(t: torch.Tensor | None) -> bool:
    return t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                         and t.dtype in (torch.float32, torch.bfloat16))


class _LinearsOnFp32Units(TorchFunctionMode):
    """Routes F.linear to Bf16LinearOnFp32Units while CPU bf16 autocast is on. Sharded (DTensor) or quantized
    weights, and anything else, take their usual path."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _plain_cpu(x) and _plain_cpu(weight) and _plain_cpu(bias):
                return Bf16LinearOnFp32Units.apply(x, weight, bias)
        return func(*args, **kwargs)


@contextlib.contextmanager
def bf16_autocast(device: torch.device):
    """torch.autocast(bf16) on `device`, with the linear layers on the fp32 units where bf16_matmul_mode says so."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        if bf16_matmul_mode(device) == "fp32":
            with _LinearsOnFp32Units():
                yield
        else:
            yield
