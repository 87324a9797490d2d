"""QLoRA's 4-bit NormalFloat (NF4) base weights (Dettmers et al., 2023), in plain PyTorch.

NF4 stores each weight as a 4-bit index into 16 fixed levels in [-1, 1] (`NF4_CODES`). The levels are quantiles of
a standard normal distribution, rescaled so the outermost is +-1, with an exact 0: trained weights are roughly
normal, so equal-probability levels waste fewer codes on the tails than 16 evenly spaced ones would. The flattened
weight is cut into blocks of `block_size` (64) values; each block is divided by its absolute maximum, every value
goes to its nearest level, and two indices share a byte (the first of the pair in the high nibble, as in
bitsandbytes and torchao).

The per-block absmax scales are quantized again ("double quantization"): their mean is subtracted and the
deviations, in groups of `scaler_block_size` (256) blocks, become int8 codes times one fp32 step per group. The
memory per weight is therefore 0.5 byte (the index) + 1/64 byte (the int8 scale) + 4/(64*256) byte (the group step)
~= 0.516 byte, against 2 bytes in bf16 (26%) and 0.5 + 4/64 = 0.5625 byte without double quantization.

The number of blocks of a layer need not be a multiple of `scaler_block_size`: the last group may be shorter
(SmolLM2-135M's 192 x 576 key/value projections have 1728 blocks, 6.75 groups of 256), which torchao's NF4Tensor
refuses. Where torchao does accept a shape, this module differs from it in two deliberate ways, both far below the
4-bit error: the levels are bitsandbytes' float32 values (torchao rounds them to 4 decimals), and the absmax
deviations map to [-127, 127] symmetrically (torchao scales by 128 / absmax and clips the largest to 127).

Why not import torchao: torchao 0.18's compiled extensions do not load on torch 2.13, and its NF4 module has moved
between releases; the whole algorithm is a few tensor operations. torchao is only the tests' reference.

Training keeps the quantized data only: `NF4Linear.forward` dequantizes the weight for its matmul and again in
backward, so no dense copy of a frozen weight outlives the op. The cost is one byte-to-pair table lookup and one
multiply per weight per pass: measured on one CPU thread under bf16 autocast, a 1536 x 576 layer on 2048 tokens
takes ~16% longer forward+backward than the same frozen nn.Linear (0.95 ms per dequantization against ~8 ms per
matmul).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

# bitsandbytes' float32 NF4 levels (the ones NF4 checkpoints are quantized with): the normal quantiles at 8 evenly
# spaced probabilities from 0.5 to 0.9677083 for the positive side and 7 for the negative side, plus 0, each
# divided by the largest. The asymmetry (8 positive, 7 negative) is what lets 0 be a level.
NF4_CODES = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=torch.float32,
)
# a value goes to the level whose interval between neighbouring midpoints holds it; at a midpoint, the lower level
_MIDPOINTS = (NF4_CODES[1:] + NF4_CODES[:-1]) / 2
# byte -> (level of its high nibble, level of its low nibble): one gather decodes two weights, no shifts or masks
_BYTE_TO_PAIR = torch.stack([NF4_CODES.repeat_interleave(16), NF4_CODES.repeat(16)], dim=1)
_INT8_MAX = 127

# the quantized buffers of one weight, in state_dict order
BUFFER_NAMES = ("nf4_data", "absmax_codes", "absmax_steps", "absmax_mean")
# the floating ones: scales that must stay float32 whatever dtype the model is cast to (see NF4Linear._apply)
_FP32_BUFFERS = ("absmax_steps", "absmax_mean")

_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _device_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(_MIDPOINTS, _BYTE_TO_PAIR) on `device`, copied there once."""
    tables = _tables.get(device)
    if tables is None:
        tables = _tables[device] = (_MIDPOINTS.to(device), _BYTE_TO_PAIR.to(device))
    return tables


def _check_block_sizes(block_size: int, scaler_block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ConfigError(f"NF4 block_size must be a positive even integer (two 4-bit codes share a byte), "
                          f"got {block_size!r}")
    if not isinstance(scaler_block_size, int) or scaler_block_size < 1:
        raise ConfigError(f"NF4 scaler_block_size must be a positive integer, got {scaler_block_size!r}")


def nf4_shape_problem(shape: tuple[int, ...] | torch.Size, block_size: int = 64) -> str | None:
    """Why a weight of `shape` cannot be quantized to NF4 blocks of `block_size`, or None if it can."""
    numel = math.prod(shape)
    if numel == 0 or numel % block_size:
        return (f"its {numel} values do not split into whole blocks of {block_size} "
                f"(NF4 needs the number of weights to be a multiple of block_size)")
    return None


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, block_size: int = 64, scaler_block_size: int = 256) -> dict[str, torch.Tensor]:
    """The NF4 buffers of `weight` (any shape whose size is a multiple of `block_size`), on its device:

    nf4_data      uint8 (numel / 2)               two level indices per byte, first of a pair in the high nibble
    absmax_codes  int8  (n_blocks)                each block's absmax minus their mean, in steps of its group
    absmax_steps  fp32  (ceil(n_blocks / scaler_block_size))  one step per group of scaler_block_size blocks
    absmax_mean   fp32  ()                        the mean of all block absmaxes
    """
    _check_block_sizes(block_size, scaler_block_size)
    problem = nf4_shape_problem(weight.shape, block_size)
    if problem:
        raise ConfigError(f"cannot quantize a {tuple(weight.shape)} weight to NF4: {problem}")
    midpoints, _ = _device_tables(weight.device)
    blocks = weight.detach().reshape(-1, block_size).float()
    absmax = blocks.abs().amax(dim=1)
    if not weight.is_meta and not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"cannot quantize a {tuple(weight.shape)} weight to NF4: it holds inf or NaN values")

    # an all-zero block (absmax 0) divides by 1 instead, so it stays all zeros (level 7 is exactly 0)
    normalized = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    index = torch.bucketize(normalized, midpoints, out_int32=True)
    nf4_data = (index[:, 0::2] << 4 | index[:, 1::2]).to(torch.uint8).reshape(-1)

    # double quantization: the absmaxes cluster around their mean, so int8 steps of the deviations lose little.
    # A ragged last group is padded with zero deviations, which never raise its absmax, and the padding is dropped.
    n_blocks = absmax.numel()
    n_groups = -(-n_blocks // scaler_block_size)
    mean = absmax.mean()
    deviation = F.pad(absmax - mean, (0, n_groups * scaler_block_size - n_blocks)).view(n_groups, scaler_block_size)
    steps = deviation.abs().amax(dim=1) / _INT8_MAX
    safe_steps = torch.where(steps > 0, steps, torch.ones_like(steps))  # a group of equal absmaxes: codes 0
    codes = (deviation / safe_steps[:, None]).round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return {
        "nf4_data": nf4_data,
        "absmax_codes": codes.reshape(-1)[:n_blocks].contiguous(),
        "absmax_steps": steps,
        "absmax_mean": mean,
    }


def _block_absmax(q: dict[str, torch.Tensor], scaler_block_size: int) -> torch.Tensor:
    codes = q["absmax_codes"]
    steps = q["absmax_steps"].float().repeat_interleave(scaler_block_size)[: codes.numel()]
    return codes.float() * steps + q["absmax_mean"].float()


def dequantize_nf4(q: dict[str, torch.Tensor], shape: tuple[int, ...] | torch.Size,
                   dtype: torch.dtype = torch.float32, *, scaler_block_size: int = 256) -> torch.Tensor:
    """The dense weight of `shape` that `q` (from `quantize_nf4`) encodes, in `dtype`. The products are formed in
    float32 and rounded once to `dtype`, so a bf16 result is the bf16 rounding of the float32 one.
    `scaler_block_size` must be the one `q` was quantized with (block_size follows from the buffer sizes)."""
    data, codes, steps = q["nf4_data"], q["absmax_codes"], q["absmax_steps"]
    numel, n_blocks = math.prod(shape), codes.numel()
    if (numel != 2 * data.numel() or n_blocks == 0 or numel % n_blocks
            or steps.numel() != -(-n_blocks // scaler_block_size)):
        raise ValueError(f"NF4 buffers ({data.numel()} bytes, {n_blocks} block scales, {steps.numel()} groups) "
                         f"do not encode a {tuple(shape)} weight with scaler_block_size={scaler_block_size}")
    _, byte_to_pair = _device_tables(data.device)
    # index_select with int32 indices is several times faster on CPU than advanced indexing with int64 ones
    pairs = byte_to_pair.index_select(0, data.int()).view(n_blocks, numel // n_blocks)
    out = torch.empty(pairs.shape, dtype=dtype, device=data.device)
    torch.mul(pairs, _block_absmax(q, scaler_block_size)[:, None], out=out)  # one pass, rounding on the write
    return out.view(shape)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...): never under autocast
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized from NF4 in forward and again in backward: only the quantized buffers are
    saved, so a frozen base layer costs ~0.52 byte per weight through the whole step. W gets no gradient."""

    @staticmethod
    def forward(ctx, x, bias, nf4_data, absmax_codes, absmax_steps, absmax_mean, shape, dtype, scaler_block_size):
        q = dict(zip(BUFFER_NAMES, (nf4_data, absmax_codes, absmax_steps, absmax_mean)))
        weight = dequantize_nf4(q, shape, dtype, scaler_block_size=scaler_block_size)
        ctx.save_for_backward(nf4_data, absmax_codes, absmax_steps, absmax_mean)
        ctx.nf4_meta = (shape, dtype, scaler_block_size)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        shape, dtype, scaler_block_size = ctx.nf4_meta
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            q = dict(zip(BUFFER_NAMES, ctx.saved_tensors))
            grad_x = grad_out.matmul(dequantize_nf4(q, shape, dtype, scaler_block_size=scaler_block_size))
        if ctx.needs_input_grad[1]:  # only if someone unfroze the bias
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None, None, None, None, None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is held in NF4 (QLoRA's base layer). It exposes what an adapter needs
    from its base: `in_features`, `out_features`, `weight` (the dense dequantized weight), `bias` and `forward`.

    `compute_dtype` is the dtype the weight dequantizes to outside autocast: the base layer's dtype, following
    later `.to(dtype)` casts of the module as the base's weight would have. Under autocast the weight dequantizes
    to the autocast dtype and the input and bias are cast to it, as autocast does for `F.linear`."""

    def __init__(self, base: nn.Linear, block_size: int = 64, scaler_block_size: int = 256):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.block_size, self.scaler_block_size = block_size, scaler_block_size
        self.compute_dtype = base.weight.dtype
        for name, tensor in quantize_nf4(base.weight, block_size, scaler_block_size).items():
            self.register_buffer(name, tensor)
        # a frozen Parameter, as the bias of a frozen nn.Linear: it moves and casts with the model like one
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)

    def _buffers_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in BUFFER_NAMES}

    def _dtype(self, device_type: str) -> torch.dtype:
        return _autocast_dtype(device_type) or self.compute_dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, dequantized anew on each access (no gradient)."""
        return dequantize_nf4(self._buffers_dict(), (self.out_features, self.in_features),
                              self._dtype(self.nf4_data.device.type), scaler_block_size=self.scaler_block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        dtype = _autocast_dtype(x.device.type)
        if dtype is not None and x.is_floating_point():
            # autocast's casts for F.linear, made before the Function so that x's gradient flows back through
            # them to x's dtype, and the dtype is fixed for backward, which may run after autocast has ended
            x = x.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        else:
            dtype = self.compute_dtype
        return _NF4LinearFunction.apply(x, bias, self.nf4_data, self.absmax_codes, self.absmax_steps,
                                        self.absmax_mean, (self.out_features, self.in_features), dtype,
                                        self.scaler_block_size)

    def quantized_bytes(self) -> int:
        """Bytes of the quantized weight: NF4 data and every scale (the bias not included)."""
        return sum(t.numel() * t.element_size() for t in self._buffers_dict().values())

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .bfloat16() cast every floating buffer. The uint8/int8 codes are safe (casts
        # skip integer tensors), but the fp32 absmax steps and mean would be rounded to 8 significant bits in bf16,
        # an error per block scale far above the int8 double quantization's. So they follow the device only,
        # and the cast's dtype becomes compute_dtype, the dtype of the weight the cast would have produced.
        # (to_empty's fn keeps dtypes and allocates on the new device, so its result stands as it is.)
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.nf4_data.device))
        kept = {name: self._buffers[name] for name in _FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            if self._buffers[name].dtype != tensor.dtype:
                self._buffers[name] = tensor.to(device=self._buffers[name].device)
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, scaler_block_size={self.scaler_block_size}, "
                f"compute_dtype={self.compute_dtype}")


def quantize_linear_layers(model: nn.Module, names: tuple[str, ...] | None = None, *, block_size: int = 64,
                           scaler_block_size: int = 256) -> list[str]:
    """Replace linear layers of the transformer blocks (`model.layers`; the whole module if it has none) by
    frozen NF4Linear layers, in place; returns their qualified names. `names` picks them by attribute name (wq wk
    wv wo w1 w2 w3); None takes every nn.Linear there. The embedding and the LM head (`output`) always stay as
    they are: QLoRA quantizes the blocks, and a head tied to the embedding cannot be quantized alone.

    Run it before adapters are applied (the adapters then sit on the NF4 layers). Every chosen layer is checked
    before any is replaced, so a shape NF4 cannot hold leaves the model untouched."""
    _check_block_sizes(block_size, scaler_block_size)
    from .lora import LoraLinear

    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ConfigError("quantize_linear_layers runs before apply_lora: quantize the base layers first, then put "
                          "the adapters on the NF4 layers")
    scope = model.layers if isinstance(getattr(model, "layers", None), nn.Module) else model
    prefix = "layers" if scope is not model else ""
    linears = [(".".join(part for part in (prefix, parent_name, child_name) if part), parent, child_name, child)
               for parent_name, parent in scope.named_modules()
               for child_name, child in parent.named_children() if isinstance(child, nn.Linear)]
    if names is not None:
        names = tuple(names)
        available = sorted({child_name for _, _, child_name, _ in linears})
        missing = [n for n in names if n not in available]
        if missing:
            where = "the transformer blocks" if prefix else "this model"
            raise ConfigError(f"NF4 quantization: {missing} name no linear layer of {where}; they are named "
                              f"{', '.join(available)} (the embedding and the LM head are never quantized)")
        linears = [entry for entry in linears if entry[2] in names]
    refused = [f"{qualified} {tuple(child.weight.shape)}: {problem}" for qualified, _, _, child in linears
               if (problem := nf4_shape_problem(child.weight.shape, block_size))]
    if refused:
        raise ConfigError("cannot quantize these layers to NF4: " + "; ".join(refused))
    for _, parent, child_name, child in linears:
        setattr(parent, child_name, NF4Linear(child, block_size, scaler_block_size))
    return [qualified for qualified, _, _, _ in linears]
