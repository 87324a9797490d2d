"""The model's hand-written hot paths (RMSNorm, RoPE, grouped-query attention) against the plain reference ops
they replace: equal fp32 outputs (1e-5) and gradients, and the same dtypes under bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F

import forgeline.model.lean_ops as lean
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
    out, (gx, gw) = grads(lambda x, w: T._RMSNorm.apply(x, w, 1e-5, None), x, weight)
    ref, (rx, rw) = grads(lambda x, w: ref_rms_norm(x, w, 1e-5), x, weight)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same arithmetic as F.rms_norm
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


def test_rms_norm_bf16_input_matches_reference():
    x = (torch.randn(4, 7, 32) * 2).bfloat16()
    weight = torch.randn(32)
    out, (gx, gw) = grads(lambda x, w: T._RMSNorm.apply(x, w, 1e-5, None), x, weight)
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


# -- the training paths that keep fewer bytes for the backward pass -------------------------------------------------


def _tiny(**overrides):
    torch.manual_seed(0)
    cfg = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=100, max_seq_len=128)
    cfg.update(overrides)
    return build_model(ModelConfig(**cfg))


def _grads_of(model, fn, *, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = fn(model)
    out.float().square().mean().backward()
    return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worst_relative(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)).item() for n in a)


_BRANCHES = T.BranchedRows(prefix=6, first=5, prefix_real=torch.tensor([[False] * 2 + [True] * 4, [True] * 6]))
_POSITIONS = torch.cat([torch.arange(11), torch.arange(6, 13)])[None].expand(2, -1)


@pytest.mark.parametrize("layout", ["causal", "documents", "branched"])
def test_bf16_attention_function_keeps_the_reference_numbers(monkeypatch, layout):
    """Fp32AttentionOfBf16 (bf16 saved tensors, the fp32 kernel) gives the autograd path's output bit for bit and
    gradients as close to fp32 training's as the autograd path's own."""
    model = _tiny()
    x = torch.randint(0, 100, (2, 18))
    kwargs = {"causal": {}, "documents": {"doc_ids": torch.tensor([[0] * 9 + [1] * 9, [0] * 18])},
              "branched": {"branches": _BRANCHES, "position_ids": _POSITIONS}}[layout]
    fn = lambda m: m(x, **kwargs)  # noqa: E731
    monkeypatch.setattr(lean, "cpu_has_amx", lambda: False)
    calls = []
    real = lean.Fp32AttentionOfBf16.apply
    monkeypatch.setattr(lean.Fp32AttentionOfBf16, "apply", lambda *a: calls.append(1) or real(*a))
    out_new, new = _grads_of(model, fn, autocast=True)
    assert calls, "the bf16 attention function was not used"
    monkeypatch.setattr(lean, "fp32_attention_of_bf16_ok", lambda *a: False)
    out_old, old = _grads_of(model, fn, autocast=True)
    _, fp32 = _grads_of(model, fn, autocast=False)
    torch.testing.assert_close(out_new, out_old, rtol=0, atol=0)
    assert _worst_relative(new, old) < 0.03
    assert _worst_relative(new, fp32) < 1.25 * _worst_relative(old, fp32) + 1e-3


def test_branched_rows_equal_each_continuation_after_its_prefix_alone():
    """Row r = [left pad | prefix | first | second]: the first continuation's outputs equal prefix+first run alone,
    the second's equal prefix+second run alone (fp32)."""
    model = _tiny()
    prefix = [torch.randint(1, 100, (4,)), torch.randint(1, 100, (6,))]
    first = [torch.randint(1, 100, (5,)), torch.randint(1, 100, (5,))]
    second = [torch.randint(1, 100, (7,)), torch.randint(1, 100, (7,))]
    rows = torch.stack([torch.cat([torch.zeros(6 - len(p), dtype=torch.long), p, f, s])
                        for p, f, s in zip(prefix, first, second)])
    positions = torch.stack([torch.cat([torch.zeros(6 - len(p), dtype=torch.long), torch.arange(len(p) + 5),
                                        torch.arange(len(p), len(p) + 7)]) for p in prefix])
    with torch.no_grad():
        out = model(rows, position_ids=positions, branches=_BRANCHES)
        for r, (p, f, s) in enumerate(zip(prefix, first, second)):
            alone_first = model(torch.cat([p, f])[None])[0]
            alone_second = model(torch.cat([p, s])[None])[0]
            torch.testing.assert_close(out[r, 6 - len(p):11], alone_first, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[r, 11:], alone_second[len(p):], rtol=1e-5, atol=1e-5)


def test_output_positions_equal_the_full_forward_at_those_positions():
    model = _tiny()
    x = torch.randint(0, 100, (2, 18))
    keep = torch.tensor([[10, 17], [3, 12]])
    for kwargs in ({}, {"branches": _BRANCHES, "position_ids": _POSITIONS}):
        with torch.no_grad():
            full = model(x, **kwargs)
            kept = model(x, output_positions=keep, **kwargs)
        torch.testing.assert_close(kept, full.gather(1, keep[..., None].expand(-1, -1, full.shape[-1])),
                                   rtol=1e-5, atol=1e-5)


def test_down_projection_and_linear_functions_match_the_modules(monkeypatch):
    """SwiGLUDown and Bf16Linear against nn.Linear and autocast: the same forward values and gradients (fp32:
    1e-5; bf16 autocast: the module path's output bit for bit)."""
    model = _tiny()
    x = torch.randint(0, 100, (2, 18))
    monkeypatch.setattr(lean, "bf16_matmul_mode", lambda device: "native")
    calls = {"down": 0, "linear": 0}
    down, lin = lean.SwiGLUDown.apply, lean.Bf16Linear.apply
    monkeypatch.setattr(lean.SwiGLUDown, "apply", lambda *a: calls.__setitem__("down", calls["down"] + 1) or down(*a))
    monkeypatch.setattr(lean.Bf16Linear, "apply", lambda *a: calls.__setitem__("linear", calls["linear"] + 1) or lin(*a))
    fn = lambda m: m(x)  # noqa: E731
    out32, g32 = _grads_of(model, fn, autocast=False)
    out16, g16 = _grads_of(model, fn, autocast=True)
    assert calls["down"] == 4 and calls["linear"] == 2 * 6  # two passes over two layers; six projections each
    monkeypatch.setattr(lean, "swiglu_down_ok", lambda *a: False)
    monkeypatch.setattr(lean, "_plain_weight", lambda proj: False)
    ref32, r32 = _grads_of(model, fn, autocast=False)
    ref16, r16 = _grads_of(model, fn, autocast=True)
    torch.testing.assert_close(out32, ref32, rtol=1e-5, atol=1e-5)
    assert _worst_relative(g32, r32) < 1e-5
    torch.testing.assert_close(out16, ref16, rtol=0, atol=0)
    assert _worst_relative(g16, r16) < 0.03


def test_block_norms_hand_bf16_to_the_projections_under_autocast():
    norm = RMSNorm(32, 1e-5, feeds_autocast=True)
    x = torch.randn(3, 32)
    with torch.autocast("cpu", torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref_rms_norm(x, norm.weight, 1e-5).detach().bfloat16(), rtol=0, atol=0)
    assert RMSNorm(32, 1e-5)(x).dtype == torch.float32


def test_cpu_allocator_setting(monkeypatch):
    from forgeline.train import cpu_allocator

    cpu_allocator.keep_large_blocks.cache_clear()
    monkeypatch.setenv("FORGELINE_MALLOC_TUNING", "0")
    assert cpu_allocator.keep_large_blocks() is False
    cpu_allocator.keep_large_blocks.cache_clear()
    monkeypatch.delenv("FORGELINE_MALLOC_TUNING")
    import platform
    assert cpu_allocator.keep_large_blocks() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
