"""The native decoding kernels (forgeline/kernels/decode.c) and the decoding step built on them
(forgeline/model/decode.py) against torch's own operators and the model's forward."""

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from forgeline import kernels
from forgeline.model import ModelConfig, build_model
import forgeline.model.inference.generate as generate_module
from forgeline.model.decode import NativeDecoder
from forgeline.model.inference.generate import generate
from forgeline.model.transformer import rope_cos_sin

# Only a machine that cannot build them skips; where a C compiler exists on Linux a failed build fails the tests.
_CANNOT_BUILD = (platform.system() != "Linux" or os.environ.get("FORGELINE_NATIVE_KERNELS") == "0"
                 or not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")))
pytestmark = pytest.mark.skipif(_CANNOT_BUILD, reason="no C compiler, not Linux, or FORGELINE_NATIVE_KERNELS=0")


def test_kernels_build_here():
    assert kernels.available(), "a C compiler is present but the native decode kernels did not build or load"

DTYPES = [torch.float32, torch.bfloat16]


def close(actual, expected, dtype, scale=1.0):
    """fp32: summation order only. bf16: one rounding of the result plus the inputs' own rounding."""
    tol = 2e-5 * scale if dtype == torch.float32 else 2e-2 * scale
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 11, 16])
@pytest.mark.parametrize("K", [16, 37, 512])
def test_linear_matches_torch(dtype, rows, K):
    torch.manual_seed(rows * 100 + K)
    x = torch.randn(rows, K)
    weights = [torch.randn(n, K) / K ** 0.5 for n in (5, 64, 3)]
    biases = [torch.randn(5), None, torch.randn(3)]
    norm_w = torch.rand(K) + 0.5
    expected = F.linear(F.rms_norm(x, (K,), norm_w, eps=1e-6), torch.cat(weights), torch.cat(
        [biases[0], torch.zeros(64), biases[2]]))
    cast = [w.to(dtype) for w in weights]
    got = kernels.linear(x.to(dtype), cast, [b if b is None else b.to(dtype) for b in biases],
                         norm_weight=norm_w.to(dtype), eps=1e-6)
    assert got.shape == (rows, 72) and got.dtype == dtype
    close(got, expected, dtype)
    # accumulate: a residual add into an existing buffer, no normalisation
    base = torch.randn(rows, 5)
    out = base.to(dtype).clone()
    kernels.linear(x.to(dtype), [cast[0]], out=out, accumulate=True)
    close(out, base + F.linear(x, weights[0]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 4, 9])
def test_swiglu_matches_torch(dtype, rows):
    torch.manual_seed(rows)
    K, N = 48, 67
    x, w1, w3 = torch.randn(rows, K), torch.randn(N, K) / K ** 0.5, torch.randn(N, K) / K ** 0.5
    norm_w = torch.rand(K) + 0.5
    h = F.rms_norm(x, (K,), norm_w, eps=1e-5)
    expected = F.silu(F.linear(h, w1)) * F.linear(h, w3)
    got = kernels.swiglu(x.to(dtype), w1.to(dtype), w3.to(dtype), norm_weight=norm_w.to(dtype), eps=1e-5)
    close(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_attention_matches_sdpa_with_rope_cache_write_and_padding(dtype, heads, kv_heads):
    torch.manual_seed(heads * 10 + kv_heads)
    B, D, cache_len, pos = 3, 32, 20, 12
    k_cache = torch.randn(B, kv_heads, cache_len, D)
    v_cache = torch.randn(B, kv_heads, cache_len, D)
    qkv = torch.randn(B, (heads + 2 * kv_heads) * D)
    positions = torch.tensor([12, 9, 3])  # left-padded rows count positions from their first real token
    key_mask = torch.ones(B, pos + 1, dtype=torch.uint8)
    key_mask[1, :3] = 0
    key_mask[2, :9] = 0
    cos, sin = rope_cos_sin(positions, 1.0 / (10000 ** (torch.arange(0, D, 2) / D)))

    def rope(t):  # (B, H, D)
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos[:, None] + torch.cat([-t2, t1], dim=-1) * sin[:, None]

    q, k, v = qkv.split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
    q, k, v = rope(q.view(B, heads, D)), rope(k.view(B, kv_heads, D)), v.view(B, kv_heads, D)
    keys, values = k_cache.clone(), v_cache.clone()
    keys[:, :, pos], values[:, :, pos] = k, v
    expected = F.scaled_dot_product_attention(
        q[:, :, None], keys[:, :, : pos + 1], values[:, :, : pos + 1], attn_mask=key_mask.bool()[:, None, None],
        enable_gqa=heads != kv_heads)[:, :, 0].reshape(B, heads * D)

    kc, vc = k_cache.to(dtype), v_cache.to(dtype)
    got = kernels.attention(qkv.to(dtype), cos, sin, kc, vc, pos, n_heads=heads, key_mask=key_mask)
    close(got, expected, dtype, scale=2)
    close(kc[:, :, pos], k, dtype, scale=4)  # the rotated key was written to the cache
    close(vc[:, :, pos], v, dtype)
    assert torch.equal(kc[:, :, :pos], k_cache[:, :, :pos].to(dtype))  # nothing else was touched


def tiny(dtype, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=311, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    cfg.update(kw)
    model = build_model(ModelConfig(**cfg)).eval().to(dtype)
    if cfg.get("qkv_bias"):
        with torch.no_grad():
            for block in model.layers.values():
                block.attention.wq.bias.normal_()
                block.attention.wk.bias.normal_()
                block.attention.wv.bias.normal_()
    return model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", [dict(), dict(n_kv_heads=1, qkv_bias=True), dict(n_kv_heads=4, tie_embeddings=True)])
def test_decoder_step_equals_model_forward(dtype, arch):
    model = tiny(dtype, **arch)
    decoder = NativeDecoder.for_model(model)
    assert decoder is not None
    B, P = 4, 9
    tokens = torch.randint(0, 311, (B, P + 3))
    with torch.inference_mode():
        full = model(tokens)
        cache = model.new_kv_cache(B, 32)
        model(tokens[:, :P], kv_cache=cache)
        for t in range(P, P + 3):
            close(decoder.step(tokens[:, t], cache), full[:, t], dtype, scale=4)
        # left padding: row 0 has 4 pads, row 2 one; positions count from the first real token
        mask = torch.ones(B, 32, dtype=torch.long)
        mask[0, :4], mask[2, :1] = 0, 0
        positions = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)
        ours, ref = model.new_kv_cache(B, 32), model.new_kv_cache(B, 32)
        for cache in (ours, ref):
            model(tokens[:, :P], position_ids=positions, attention_mask=mask[:, :P], kv_cache=cache)
        next_pos = positions[:, -1] + 1
        for t in range(P, P + 3):
            got = decoder.step(tokens[:, t], ours, positions=next_pos, key_mask=mask[:, : ours.length + 1])
            want = model(tokens[:, t:t + 1], position_ids=next_pos[:, None], attention_mask=mask[:, : ref.length + 1],
                         kv_cache=ref)[:, -1]
            close(got, want, dtype, scale=4)
            next_pos = next_pos + 1
        assert ours.length == ref.length


def test_decoder_declines_what_it_cannot_run():
    model = tiny(torch.float32)
    assert NativeDecoder.for_model(model) is not None
    model.layers["0"].attention.wq = torch.nn.Sequential(model.layers["0"].attention.wq)  # an adapter-like wrapper
    assert NativeDecoder.for_model(model) is None
    mixed = tiny(torch.float32)
    mixed.output.to(torch.bfloat16)
    assert NativeDecoder.for_model(mixed) is None
    half = tiny(torch.float16)
    assert NativeDecoder.for_model(half) is None
    strided = tiny(torch.float32)
    w = strided.layers["1"].feed_forward.w2
    w.weight = torch.nn.Parameter(w.weight.detach().t().contiguous().t())  # same values, column-major
    assert NativeDecoder.for_model(strided) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert NativeDecoder.for_model(tiny(torch.float32)) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_generate_with_and_without_kernels_agree(dtype, monkeypatch):
    """Greedy, batched, left-padded prompts and rows finishing early: the kernel path must produce the torch
    path's tokens (fp32: identical tokens and log-probs to 1e-4; bf16 rounds differently, so the first tokens)."""
    model = tiny(dtype)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    settings = dict(max_new_tokens=12, stop_token_ids=[])
    fast = generate(model, prompts, **settings)
    monkeypatch.setattr(generate_module.NativeDecoder, "for_model", classmethod(lambda cls, m: None))
    slow = generate(model, prompts, **settings)
    for a, b in zip(fast, slow):
        if dtype == torch.float32:
            assert a.tokens == b.tokens
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
        else:
            assert a.tokens[:3] == b.tokens[:3]
    # a stop token ends some rows early; the cache is reordered and the kernel path goes on with the rest
    stop = fast[1].tokens[2]
    monkeypatch.undo()
    early = generate(model, prompts, max_new_tokens=12, stop_token_ids=[stop])
    assert early[1].tokens[-1] == stop and early[1].finish_reason == "stop"


def test_an_unwritable_cache_dir_falls_back_to_the_temp_dir(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    code = "from forgeline import kernels; print(kernels.available())"
    env = dict(os.environ, FORGELINE_CACHE_DIR=str(not_a_dir))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"]


def test_kernels_can_be_switched_off():
    code = ("import torch; from forgeline import kernels; from forgeline.model import ModelConfig, build_model;"
            "from forgeline.model.inference.generate import generate; print(kernels.available());"
            "m = build_model(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, ffn_dim=48, max_seq_len=32));"
            "print(len(generate(m, [[1, 2, 3]], max_new_tokens=4, stop_token_ids=[])[0].tokens))")
    env = dict(os.environ, FORGELINE_NATIVE_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "4"]


def test_generate_uses_the_kernels_and_falls_back_beyond_their_batch_limit(monkeypatch):
    model = tiny(torch.float32)
    calls = []
    original = NativeDecoder.step

    def counting_step(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NativeDecoder, "step", counting_step)
    generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=6, stop_token_ids=[])
    assert calls == [2] * 5  # every step after the prefill's token went through the kernels

    calls.clear()
    prompts = [[i + 1, i + 2] for i in range(kernels.MAX_ROWS + 1)]
    big = generate(model, prompts, max_new_tokens=4, stop_token_ids=[])
    assert calls == []  # 17 rows: torch's operators
    monkeypatch.setattr(generate_module.NativeDecoder, "for_model", classmethod(lambda cls, m: None))
    assert [c.tokens for c in big] == [c.tokens for c in generate(model, prompts, max_new_tokens=4,
                                                                  stop_token_ids=[])]
