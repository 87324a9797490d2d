"""NF4 (QLoRA) base weights: the code book, quantize/dequantize against torchao's NF4Tensor, the error bounds,
NF4Linear's forward/backward (fp32 and bf16 autocast), its buffers through state_dict and dtype casts, and
quantize_linear_layers on a small model."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forgeline.errors import ConfigError
from forgeline.model import ModelConfig, build_model
from forgeline.peft.lora import LoraLinear, LoraSettings
from forgeline.peft.nf4 import (NF4_CODES, NF4Linear, _block_absmax, dequantize_nf4, quantize_linear_layers,
                                quantize_nf4)

SMALL = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)
BLOCK_LINEARS = {"attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}
MIDPOINTS = (NF4_CODES[1:] + NF4_CODES[:-1]) / 2


def gaussian(*shape, seed=0, std=0.02):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def to_nf4():
    pytest.importorskip("torchao")
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    return to_nf4


def unpack(data: torch.Tensor) -> torch.Tensor:
    """Level indices, in weight order, of a packed uint8 tensor (first of a pair in the high nibble)."""
    return torch.stack([data >> 4, data & 15], dim=1).reshape(-1).long()


def steps_per_block(q, scaler_block_size=256):
    return q["absmax_steps"].repeat_interleave(scaler_block_size)[: q["absmax_codes"].numel()]


def test_code_book_is_normal_float_4():
    assert NF4_CODES.dtype == torch.float32 and NF4_CODES.shape == (16,)
    assert torch.equal(NF4_CODES, NF4_CODES.sort().values)
    assert NF4_CODES[0] == -1 and NF4_CODES[-1] == 1 and (NF4_CODES == 0).sum() == 1
    # the QLoRA construction: normal quantiles, 8 on the positive side and 7 on the negative, plus 0, over the max
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    built = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(NF4_CODES.double(), built / built.max(), rtol=0, atol=1e-6)
    # torchao's table is the same one rounded to 4 decimals
    w = gaussian(128, 128)  # torchao needs a multiple of 256 blocks
    torch.testing.assert_close(to_nf4()(w).nf4, NF4_CODES, rtol=0, atol=5e-5)


@pytest.mark.parametrize("shape", [(256, 256), (512, 256)])
def test_dequantize_matches_torchao(shape):
    """Same packing, same levels up to torchao's 4-decimal rounding, same double quantization up to its int8 step."""
    w = gaussian(*shape, seed=shape[0])
    ours, theirs = quantize_nf4(w), to_nf4()(w)
    true_absmax = w.reshape(-1, 64).abs().amax(dim=1)

    # level indices agree except where a value sits within the tables' rounding (5e-5) of a decision midpoint
    mine, ao = unpack(ours["nf4_data"]), unpack(theirs.quantized_data)
    normalized = (w.reshape(-1, 64) / true_absmax[:, None]).reshape(-1)
    near_midpoint = (normalized[:, None] - MIDPOINTS).abs().amin(dim=1) < 1e-4
    assert torch.equal(mine[~near_midpoint], ao[~near_midpoint])
    assert (mine - ao).abs().max() <= 1 and near_midpoint.float().mean() < 5e-3

    # the dequantized block scales: ours within half an int8 step of the true absmax (torchao's within a whole
    # one: it clips the largest deviation of each group from 128 to 127 steps)
    step = steps_per_block(ours)
    assert ((_block_absmax(ours, 256) - true_absmax).abs() <= step / 2 + 1e-7).all()
    theirs_absmax = theirs.dequantize_scalers(theirs.quantized_scalers, theirs.quantization_factor, 256)
    assert ((theirs_absmax - true_absmax).abs() <= step + 1e-7).all()

    # dense weights: where the indices agree, they differ by at most the two scale errors and the table rounding
    dense, reference = dequantize_nf4(ours, shape).reshape(-1, 64), theirs.get_original_weight().reshape(-1, 64)
    same = (mine == ao).view(-1, 64)
    tolerance = (1.5 * step + 5e-5 * true_absmax + 1e-7)[:, None].expand_as(dense)
    assert ((dense - reference).abs()[same] <= tolerance[same]).all()
    # ...and ours is exactly level x dequantized absmax
    assert torch.equal(dense, NF4_CODES[mine].view(-1, 64) * _block_absmax(ours, 256)[:, None])


@pytest.mark.parametrize("shape", [(256, 256), (192, 576)])  # the second: 1728 blocks, a ragged last group
def test_round_trip_error(shape):
    w = gaussian(*shape, seed=2)
    q = quantize_nf4(w)
    assert q["nf4_data"].dtype == torch.uint8 and q["nf4_data"].numel() == w.numel() // 2
    assert q["absmax_codes"].dtype == torch.int8 and q["absmax_codes"].numel() == w.numel() // 64
    assert q["absmax_steps"].numel() == math.ceil(w.numel() / 64 / 256)
    dense = dequantize_nf4(q, shape)
    relative = ((dense - w).abs().mean() / w.abs().mean()).item()
    print(f"NF4 round trip {shape}: mean |error| / mean |w| = {relative:.4f}")
    assert relative < 0.12  # measured 0.091 on both shapes

    # the largest value of each block comes back as its sign times the block's dequantized absmax, which is
    # within half an int8 step of the true one
    blocks, dense_blocks = w.reshape(-1, 64), dense.reshape(-1, 64)
    at = blocks.abs().argmax(dim=1, keepdim=True)
    absmax = _block_absmax(q, 256)
    assert torch.equal(dense_blocks.gather(1, at).squeeze(1), blocks.gather(1, at).squeeze(1).sign() * absmax)
    assert ((absmax - blocks.abs().amax(dim=1)).abs() <= steps_per_block(q) / 2 + 1e-7).all()


def test_zero_blocks_and_bad_shapes():
    w = gaussian(4, 64, seed=3)
    w[1] = 0
    dense = dequantize_nf4(quantize_nf4(w), w.shape)
    assert torch.isfinite(dense).all() and (dense[1] == 0).all()
    assert dequantize_nf4(quantize_nf4(torch.zeros(2, 64)), (2, 64)).abs().max() == 0
    with pytest.raises(ConfigError, match=r"\(6, 10\) weight.*blocks of 64"):
        quantize_nf4(torch.randn(6, 10))
    with pytest.raises(ConfigError, match="even"):
        quantize_nf4(torch.randn(6, 63), block_size=63)


def layer(out_features=96, in_features=128, bias=True, seed=4):
    base = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        base.weight.copy_(gaussian(out_features, in_features, seed=seed))
        if bias:
            base.bias.copy_(gaussian(out_features, seed=seed + 1))
    return NF4Linear(base)


def test_forward_and_backward_fp32():
    nf4 = layer()
    assert (nf4.in_features, nf4.out_features, nf4.compute_dtype) == (128, 96, torch.float32)
    assert list(nf4.parameters()) == [nf4.bias] and not nf4.bias.requires_grad
    assert {n for n, _ in nf4.named_buffers()} == {"nf4_data", "absmax_codes", "absmax_steps", "absmax_mean"}
    weight = nf4.weight
    assert weight.shape == (96, 128) and weight.dtype == torch.float32 and not weight.requires_grad

    x = gaussian(3, 5, 128, seed=5, std=1.0).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    y, ref = nf4(x), F.linear(ref_x, weight, nf4.bias)
    assert torch.equal(y, ref)
    g = gaussian(3, 5, 96, seed=6, std=1.0)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-6, atol=1e-6)
    assert nf4.bias.grad is None and all(b.grad is None for b in nf4.buffers())


def test_forward_and_backward_under_bf16_autocast():
    nf4 = layer()
    x = gaussian(2, 7, 128, seed=7, std=1.0).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    dense = dequantize_nf4({n: getattr(nf4, n) for n in ("nf4_data", "absmax_codes", "absmax_steps",
                                                         "absmax_mean")}, (96, 128), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nf4.weight.dtype == torch.bfloat16 and torch.equal(nf4.weight, dense.to(torch.bfloat16))
        y = nf4(x)
        ref = F.linear(ref_x, dense, nf4.bias)  # autocast casts the fp32 dense weight, input and bias to bf16
    assert y.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(y, ref)
    g = gaussian(2, 7, 96, seed=8, std=1.0).to(torch.bfloat16)
    y.backward(g)
    ref.backward(g)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)
    assert nf4.weight.dtype == torch.float32  # outside autocast again


def test_bytes_state_dict_and_dtype_casts():
    for out_features, in_features in [(576, 576), (1536, 576)]:
        nf4 = layer(out_features, in_features, bias=False, seed=9)
        ratio = nf4.quantized_bytes() / (2 * out_features * in_features)
        print(f"NF4 {out_features}x{in_features}: {nf4.quantized_bytes()} bytes, {ratio:.4f} of bf16")
        assert ratio <= 0.30

    nf4 = layer(seed=10)
    state = nf4.state_dict()
    assert {k: v.dtype for k, v in state.items()} == {"bias": torch.float32, "nf4_data": torch.uint8,
                                                     "absmax_codes": torch.int8, "absmax_steps": torch.float32,
                                                     "absmax_mean": torch.float32}
    fresh = layer(seed=11)
    x = gaussian(4, 128, seed=12, std=1.0)
    assert not torch.equal(fresh(x), nf4(x))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), nf4(x))
    # built on the meta device (no weights read), then given memory and the saved buffers
    empty = NF4Linear(nn.Linear(128, 96, device="meta")).to_empty(device="cpu")
    empty.load_state_dict(state)
    assert torch.equal(empty(x), nf4(x))

    # a bf16 cast: the codes and the fp32 scales are kept, the weight now dequantizes to bf16 (as the bias is)
    codes = {n: t.clone() for n, t in nf4.named_buffers()}
    y = nf4(x)
    nf4.to(torch.bfloat16)
    assert nf4.compute_dtype == torch.bfloat16 and nf4.bias.dtype == torch.bfloat16
    assert all(torch.equal(t, codes[n]) and t.dtype == codes[n].dtype for n, t in nf4.named_buffers())
    y16 = nf4(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y, rtol=0, atol=0.005)  # bf16 rounding; y's std is 0.23
    nf4.float()
    assert nf4.compute_dtype == torch.float32 and nf4.weight.dtype == torch.float32
    torch.testing.assert_close(nf4(x), y, rtol=0, atol=1e-3)  # only the bias went through bf16


def test_quantize_linear_layers_on_small_model():
    torch.manual_seed(0)
    model = build_model(SMALL)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(13))
    before = model(tokens)
    replaced = quantize_linear_layers(model)
    assert len(replaced) == 14 and set(replaced) == {f"layers.{i}.{n}" for i in range(2) for n in BLOCK_LINEARS}
    assert {n for n, m in model.named_modules() if isinstance(m, NF4Linear)} == set(replaced)
    assert type(model.output) is nn.Linear and type(model.tok_embeddings) is nn.Embedding
    after = model(tokens)
    # 4-bit weights change the logits a little, not wholesale
    assert (after - before).abs().mean() < 0.1 * before.abs().mean()

    # a trainable parameter elsewhere still trains; nothing quantized gets a gradient
    model.requires_grad_(False)
    model.norm.weight.requires_grad_(True)
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    assert model.norm.weight.grad is not None and model.norm.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad for n, p in model.named_parameters() if n != "norm.weight")

    # only the named ones; names outside the blocks are refused
    model = build_model(SMALL)
    assert quantize_linear_layers(model, ("wq", "w2")) == ["layers.0.attention.wq", "layers.0.feed_forward.w2",
                                                          "layers.1.attention.wq", "layers.1.feed_forward.w2"]
    with pytest.raises(ConfigError, match=r"\['output'\].*never quantized"):
        quantize_linear_layers(build_model(SMALL), ("wq", "output"))


def test_lora_on_nf4_base_and_refused_shapes():
    # QLoRA: a LoRA adapter on an NF4 layer trains A and B only; at B = 0 it is the NF4 layer
    torch.manual_seed(0)
    nf4 = layer(bias=False, seed=14)
    lora = LoraLinear(nf4, LoraSettings(r=4, alpha=8))
    x = gaussian(3, 128, seed=15, std=1.0)
    assert torch.equal(lora(x), nf4(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lora(x).float().square().sum().backward()
    assert lora.lora_B.grad is not None and lora.lora_B.grad.abs().sum() > 0
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]

    # a block layer of a shape NF4 cannot hold: a clear error, and the model is left as it was
    model = nn.Module()
    model.layers = nn.ModuleDict({"0": nn.ModuleDict({"wq": nn.Linear(64, 64), "wk": nn.Linear(10, 6)})})
    with pytest.raises(ConfigError, match=r"layers\.0\.wk \(6, 10\)"):
        quantize_linear_layers(model)
    assert type(model.layers["0"]["wq"]) is nn.Linear
    with pytest.raises(ConfigError, match="before apply_lora"):
        quantize_linear_layers(nn.Sequential(lora))
