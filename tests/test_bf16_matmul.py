"""bf16 products on the fp32 units (forgeline/kernels/bf16_matmul.py): the same function as bf16 autocast's GEMMs."""

import pytest
import torch
import torch.nn.functional as F

from forgeline.model import ModelConfig, build_model
from forgeline.objectives import causal_lm_loss
from forgeline.kernels.cross_entropy import fused_linear_cross_entropy
from forgeline.kernels import bf16_matmul
from forgeline.kernels.bf16_matmul import Bf16LinearOnFp32Units, bf16_autocast

CPU = torch.device("cpu")


@pytest.fixture
def mode():
    def set_mode(value):
        bf16_matmul.configure(value)
    yield set_mode
    bf16_matmul.configure("auto")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bias", [False, True])
def test_linear_on_fp32_units_is_bf16_autocast_linear(bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80, bias=bias)
    x = torch.randn(3, 7, 96, requires_grad=True)
    g = torch.randn(3, 7, 80)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = lin(x)
    ref.backward(g.bfloat16())
    ref_grads = [x.grad.clone()] + [p.grad.clone() for p in lin.parameters()]
    x.grad = None
    lin.zero_grad()

    out = Bf16LinearOnFp32Units.apply(x, lin.weight, lin.bias)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    # bf16 inputs, exact products, fp32 sums in another order, one bf16 rounding: within a couple of bf16 ulps
    assert (out.float() - ref.float()).abs().max() <= 2 * 2 ** -8 * ref.float().abs().max()
    out.backward(g.bfloat16())
    grads = [x.grad] + [p.grad for p in lin.parameters()]
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel(got, want) < 5e-3


def test_autocast_routes_linears_by_mode(mode, monkeypatch):
    model = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=48, max_seq_len=16))
    calls = []
    original = Bf16LinearOnFp32Units.apply
    monkeypatch.setattr(Bf16LinearOnFp32Units, "apply", lambda *a: calls.append(1) or original(*a))
    tokens = torch.randint(0, 64, (2, 8))
    mode("fp32")
    with bf16_autocast(CPU):
        model(tokens, return_hidden=True)
    assert len(calls) == 7  # q, k, v, o, w1, w2, w3
    mode("native")
    with bf16_autocast(CPU):
        model(tokens, return_hidden=True)
    assert len(calls) == 7
    with pytest.raises(ValueError):
        bf16_matmul.configure("fast")


def test_fused_cross_entropy_on_fp32_units_matches_bf16(mode):
    torch.manual_seed(1)
    hidden = torch.randn(300, 64, requires_grad=True)
    weight = (torch.randn(2048, 64) * 0.05).requires_grad_()
    targets = torch.randint(0, 2048, (300,))
    results = {}
    for value in ("native", "fp32"):
        mode(value)
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_bytes=64 * 2048 * 4)
        loss.backward()
        results[value] = (loss.item(), hidden.grad.clone(), weight.grad.clone())
    (l_bf16, gh_bf16, gw_bf16), (l_fp32, gh_fp32, gw_fp32) = results["native"], results["fp32"]
    assert abs(l_bf16 - l_fp32) < 1e-3 * abs(l_bf16)
    assert rel(gh_fp32, gh_bf16) < 5e-3 and rel(gw_fp32, gw_bf16) < 5e-3
    plain = F.cross_entropy(F.linear(hidden.detach().bfloat16(), weight.detach().bfloat16()).float(), targets,
                            reduction="sum")
    assert abs(l_fp32 - plain.item()) < 1e-3 * abs(plain.item())


def test_training_steps_track_the_bf16_path(mode):
    """A few AdamW steps of a small model: the fp32-unit path follows the bf16 GEMM path's losses."""
    losses = {}
    for value in ("native", "fp32"):
        mode(value)
        torch.manual_seed(0)
        model = build_model(ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                                        max_seq_len=64))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        data = torch.randint(0, 512, (6, 4, 65), generator=torch.Generator().manual_seed(5))
        losses[value] = []
        for ids in data:
            with bf16_autocast(CPU):
                loss = causal_lm_loss(model, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[value].append(loss.item() / ids[:, 1:].numel())
    assert losses["fp32"][-1] < losses["fp32"][0]
    for a, b in zip(losses["native"], losses["fp32"]):
        assert abs(a - b) < 0.02, (losses["native"], losses["fp32"])


def test_auto_measures_once_and_keeps_gpus_native(mode):
    mode("auto")
    first = bf16_matmul.bf16_matmul_mode(CPU)
    assert first in ("native", "fp32")
    assert bf16_matmul.bf16_matmul_mode(CPU) == first  # measured once per process (and thread count)
    assert bf16_matmul.bf16_matmul_mode(torch.device("cuda", 0)) == "native"


def test_a_frozen_weight_gets_the_same_input_gradient():
    """An adapter's frozen base: no weight gradient, and the input's equals the trained weight's case."""
    from forgeline.kernels.bf16_matmul import Bf16LinearOnFp32Units

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=g)
    w = torch.randn(8, 16, generator=g)
    grads = []
    for trained in (True, False):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_(trained)
        out = Bf16LinearOnFp32Units.apply(xi, wi, None)
        out.float().sum().backward()
        grads.append(xi.grad)
        assert (wi.grad is not None) == trained
    assert torch.equal(grads[0], grads[1])
