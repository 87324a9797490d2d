import math

import pytest
import torch

from forgeline.model import ModelConfig, RopeScaling, build_model, num_params, training_flops_per_token
from forgeline.model.transformer import rope_inverse_frequencies


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("kv", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("qkv_bias,tie", [(False, False), (True, True)])
def test_shapes_and_parameter_count(kv, qkv_bias, tie):
    cfg = tiny(n_kv_heads=kv, qkv_bias=qkv_bias, tie_embeddings=tie)
    model = build_model(cfg)
    assert model.num_params() == num_params(cfg)
    logits = model(torch.randint(0, 97, (3, 10)))
    assert logits.shape == (3, 10, 97)
    if tie:
        assert model.output.weight is model.tok_embeddings.weight
    assert (model.layers["0"].attention.wq.bias is not None) == qkv_bias


def test_presets_match_published_sizes_on_meta_device():
    # Llama-2-7B has 6.74B parameters, Llama-2-70B 68.98B; neither may allocate memory here.
    for name, expected in [("7b", 6.738e9), ("70b", 68.977e9)]:
        model = build_model(ModelConfig.from_preset(name), device="meta")
        assert all(p.is_meta for p in model.parameters())
        assert model.num_params() == pytest.approx(expected, rel=1e-3)
    assert ModelConfig.from_preset("1b").n_kv_heads == 4
    flops = training_flops_per_token(ModelConfig.from_preset("7b"), 4096)
    assert flops == pytest.approx(6 * (6.738e9 - 32000 * 4096) + 12 * 32 * 32 * 128 * 4096, rel=1e-3)


def test_invalid_shapes_are_rejected():
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        tiny(n_heads=6, n_kv_heads=4, head_dim=16)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig(preset="13q")


def test_init_scales_residual_projections_by_depth():
    cfg = tiny(dim=256, n_layers=8, ffn_dim=512, n_heads=4, n_kv_heads=4)
    model = build_model(cfg)
    assert model.layers["0"].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    expected = 0.02 / math.sqrt(2 * 8)
    assert model.layers["3"].attention.wo.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.layers["3"].feed_forward.w2.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.all(model.norm.weight == 1)


def test_packed_documents_never_attend_across_boundaries():
    torch.manual_seed(0)
    model = build_model(tiny())
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 9))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    out = model(packed, doc_ids=doc_ids)
    # Rotary attention depends only on relative positions, so document b at offset 7 equals b on its own.
    torch.testing.assert_close(out[:, :7], model(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 7:], model(b), atol=1e-5, rtol=0)
    # And without doc_ids the second document does see the first.
    assert (model(packed)[:, 7:] - model(b)).abs().max() > 1e-3


def test_kv_cache_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    tokens = torch.randint(0, 97, (2, 12))
    full = model(tokens)
    cache = model.new_kv_cache(2, 16)
    pieces = [model(tokens[:, :5], kv_cache=cache)]
    for t in range(5, 12):
        pieces.append(model(tokens[:, t : t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 12


def test_left_padding_mask_and_positions():
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    seq = torch.randint(0, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(out[:, 3:], model(seq), atol=1e-5, rtol=0)


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
    hf_cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    expected, _ = _compute_llama3_parameters(hf_cfg, device="cpu")
    ours = rope_inverse_frequencies(64, 500000.0, scaling)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, rope_inverse_frequencies(64, 500000.0, None))


def test_bf16_autocast_forward_backward_on_cpu():
    model = build_model(tiny())
    tokens = torch.randint(0, 97, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
