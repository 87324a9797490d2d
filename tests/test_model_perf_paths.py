"""The model's hand-written hot paths (RMSNorm, RoPE, grouped-query attention) against the plain reference ops
they replace: equal fp32 outputs (1e-5) and gradients, and the same dtypes under bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F

import forgeline.model.transformer as T
from forgeline.model.config import ModelConfig
from forgeline.model.transformer import NO_MASK, RMSNorm, apply_rope, attention, build_model, rope_cos_sin, rotate


def ref_rms_norm(x, weight, eps):
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def ref_rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def ref_apply_rope(x, cos, sin):  # the implementation the fused one replaced
    return ref_rotate(x, cos, sin).to(x.dtype)


def ref_attention(q, k, v, mask):
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if mask is NO_MASK:
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def grads(fn, *inputs, grad_out=None):
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in inputs if x.requires_grad]


@pytest.mark.parametrize("shape", [(2, 5, 16), (3, 64)])
def test_rms_norm_fp32_matches_reference(shape):
    x = torch.randn(shape) * 3
    weight = torch.randn(shape[-1])
    out, (gx, gw) = grads(lambda x, w: T._RMSNorm.apply(x, w, 1e-5), x, weight)
    ref, (rx, rw) = grads(lambda x, w: ref_rms_norm(x, w, 1e-5), x, weight)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same arithmetic as F.rms_norm
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


def test_rms_norm_bf16_input_matches_reference():
    x = (torch.randn(4, 7, 32) * 2).bfloat16()
    weight = torch.randn(32)
    out, (gx, gw) = grads(lambda x, w: T._RMSNorm.apply(x, w, 1e-5), x, weight)
    ref, (rx, rw) = grads(lambda x, w: ref_rms_norm(x, w, 1e-5), x, weight)
    assert out.dtype == ref.dtype and gx.dtype == rx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(gx.float(), rx.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)


def test_rms_norm_module_uses_fused_path():
    norm = RMSNorm(16, 1e-6)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(norm(x), ref_rms_norm(x, norm.weight, 1e-6), rtol=0, atol=0)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_reference(x_dtype):
    B, H, L, D = 2, 3, 7, 16
    # a transposed view, as the attention's projections give it
    x = torch.randn(B, L, H, D).to(x_dtype).transpose(1, 2)
    inv_freq = T.rope_inverse_frequencies(D, 10000.0)
    cos, sin = rope_cos_sin(torch.arange(L)[None], inv_freq)
    cos, sin = cos[:, None], sin[:, None]
    tol = 1e-6 if x_dtype == torch.float32 else 1e-2

    out, (gx,) = grads(lambda x: rotate(x, cos, sin), x)
    ref, (rx,) = grads(lambda x: ref_rotate(x, cos, sin), x)
    assert out.dtype == ref.dtype == torch.float32  # promoted, as x * cos gives
    assert gx.dtype == rx.dtype == x_dtype
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx.float(), rx.float(), rtol=tol, atol=tol)

    out, (gx,) = grads(lambda x: apply_rope(x, cos, sin), x)
    ref, (rx,) = grads(lambda x: ref_apply_rope(x, cos, sin), x)
    assert out.dtype == ref.dtype == x_dtype  # the public function keeps x's dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(gx.float(), rx.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("mask_kind", ["causal", "none", "bool"])
@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_attention_gqa_matches_repeat_interleave(mask_kind, n_kv):
    B, H, L, D = 2, 4, 9, 8
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, n_kv, L, D), torch.randn(B, n_kv, L, D)
    mask = {"causal": None, "none": NO_MASK, "bool": torch.rand(B, 1, L, L) > 0.3}[mask_kind]
    if mask_kind == "bool":
        mask[..., 0] = True  # every query sees at least one key
    out, g = grads(lambda q, k, v: attention(q, k, v, mask), q, k, v)
    ref, r = grads(lambda q, k, v: ref_attention(q, k, v, mask), q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_attention_under_cpu_autocast_runs_in_fp32():
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_attention(q, k, v.float(), None), rtol=1e-5, atol=1e-5)


def _reference_model(monkeypatch):
    monkeypatch.setattr(T, "rotate", ref_apply_rope)
    monkeypatch.setattr(T, "attention", ref_attention)
    monkeypatch.setattr(T.RMSNorm, "forward", lambda self, x: ref_rms_norm(x, self.weight, self.eps))


@pytest.mark.parametrize("packed", [False, True])
def test_model_fp32_outputs_and_gradients_match_plain_ops(monkeypatch, packed):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)
    model = build_model(cfg)
    tokens = torch.randint(0, 101, (2, 24))
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24]) if packed else None

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(tokens, doc_ids=doc_ids)
        (logits.float().square().mean()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out, g = run()
    with monkeypatch.context() as m:
        _reference_model(m)
        ref, rg = run()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name in g:
        torch.testing.assert_close(g[name], rg[name], rtol=1e-4, atol=1e-6, msg=name)


def test_model_bf16_autocast_close_to_plain_ops(monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)
    model = build_model(cfg)
    tokens = torch.randint(0, 101, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens)
    with monkeypatch.context() as m:
        _reference_model(m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = model(tokens)
    assert out.dtype == ref.dtype == torch.bfloat16
    # the reference runs its attention in bf16, ours in fp32: bf16-level agreement
    torch.testing.assert_close(out.float(), ref.float(), rtol=5e-2, atol=5e-2)
