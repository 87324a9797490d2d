"""Bottleneck adapters as an explicit step on a forgeline model: the base at step 0 (also through the KV cache),
only the adapters train, the parameter count is the formula's, save/load gives the same logits, activation
checkpointing gives the same gradients, bad settings and bad adapter files are one clear error."""

import json

import pytest
import torch

from forgeline.errors import ConfigError
from forgeline.model import ModelConfig, build_model
from forgeline.objectives import causal_lm_loss
from forgeline.peft.bottleneck import (BottleneckAdapter, BottleneckSettings, apply_bottleneck, bottleneck_state_dict,
                                       has_bottleneck, load_bottleneck_adapter, save_bottleneck_adapter)

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))
BATCH = {"input_ids": IDS[:, :-1], "targets": IDS[:, 1:], "n_targets": IDS[:, 1:].numel()}


def model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model(CFG, **kwargs)


def randomise_adapters(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in m.modules():
            if isinstance(module, BottleneckAdapter):
                for p in module.adapter_parameters().values():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_the_adapted_model_starts_as_the_base():
    base, adapted = model(), model()
    wrapped = apply_bottleneck(adapted, BottleneckSettings(size=8))
    assert wrapped == ["layers.0.attention", "layers.0.feed_forward", "layers.1.attention", "layers.1.feed_forward"]
    assert has_bottleneck(adapted) and not has_bottleneck(base)
    torch.testing.assert_close(adapted(IDS), base(IDS), atol=0, rtol=0)  # up = 0


def test_the_adapter_is_transparent_to_the_kv_cache():
    m = model().eval()
    apply_bottleneck(m, BottleneckSettings(size=8))
    randomise_adapters(m)
    with torch.no_grad():
        whole = m(IDS)
        cache = m.new_kv_cache(2)
        prefill = m(IDS[:, :-1], kv_cache=cache)
        step = m(IDS[:, -1:], kv_cache=cache)
    torch.testing.assert_close(torch.cat([prefill, step], dim=1), whole, atol=1e-5, rtol=1e-5)


def test_only_the_adapters_train():
    m = model()
    apply_bottleneck(m, BottleneckSettings(size=8))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{pos}.{part}.{t}" for i in range(2) for pos in ("attention", "feed_forward")
                         for part in ("down", "up") for t in ("weight", "bias")}
    frozen_before = {n: p.clone() for n, p in m.named_parameters() if not p.requires_grad}
    up_before = m.layers["0"].feed_forward.up.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    causal_lm_loss(m, BATCH).loss.backward()
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
    adapter = m.layers["0"].feed_forward
    assert torch.count_nonzero(adapter.up.weight.grad) > 0
    assert torch.count_nonzero(adapter.down.weight.grad) == 0  # up = 0: no signal reaches down at step 0
    opt.step()
    opt.zero_grad()
    assert all(torch.equal(p, frozen_before[n]) for n, p in m.named_parameters() if not p.requires_grad)
    assert not torch.equal(adapter.up.weight, up_before)
    causal_lm_loss(m, BATCH).loss.backward()
    assert torch.count_nonzero(adapter.down.weight.grad) > 0


@pytest.mark.parametrize("positions", [("attention", "feed_forward"), ("feed_forward",)])
def test_the_parameter_count_is_the_formula_s(positions):
    m = model()
    apply_bottleneck(m, BottleneckSettings(size=8, positions=positions))
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == len(positions) * CFG.n_layers * (2 * CFG.dim * 8 + 8 + CFG.dim)


def test_saving_and_loading_gives_the_same_logits(tmp_path):
    adapted = model().eval()
    settings = BottleneckSettings(size=8, dropout=0.1, positions=("feed_forward", "attention"))
    apply_bottleneck(adapted, settings)
    randomise_adapters(adapted)
    save_bottleneck_adapter(adapted, settings, tmp_path / "adapter", base="some/base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config == {"peft_type": "FORGELINE_BOTTLENECK", "format_version": 1, "size": 8, "dropout": 0.1,
                      "positions": ["attention", "feed_forward"], "base_model_name_or_path": "some/base"}
    fresh = model().eval()
    assert load_bottleneck_adapter(fresh, tmp_path / "adapter") == settings
    assert not fresh.layers["0"].attention.training  # loaded in the model's mode: no dropout at inference
    torch.testing.assert_close(fresh(IDS), adapted(IDS), atol=0, rtol=0)
    assert bottleneck_state_dict(fresh).keys() == bottleneck_state_dict(adapted).keys()


def test_activation_checkpointing_gives_the_same_gradients():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    plain, checkpointed = model(), model()
    for m in (plain, checkpointed):
        apply_bottleneck(m, BottleneckSettings(size=8))
        randomise_adapters(m)
    names = bottleneck_state_dict(checkpointed).keys()
    for name in list(checkpointed.layers.keys()):  # as forgeline.recipes.setup.prepare_whole_model does
        checkpointed.layers[name] = checkpoint_wrapper(checkpointed.layers[name])
    assert bottleneck_state_dict(checkpointed).keys() == names  # adapter names without the wrapper's segment
    for m in (plain, checkpointed):
        causal_lm_loss(m, BATCH).loss.backward()
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in checkpointed.named_parameters()
             if p.requires_grad}
    for n, p in plain.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-7, rtol=1e-6)


def test_sublayer_attributes_are_not_forwarded():
    m = model()
    apply_bottleneck(m, BottleneckSettings(size=8, positions=("attention",)))
    attention = m.layers["0"].attention
    with pytest.raises(AttributeError):
        attention.wq  # noqa: B018 - code reading a block's projections must notice the adapter
    assert isinstance(attention.base.wq, torch.nn.Linear)
    assert "layers.0.attention.base.wq.weight" in dict(m.named_parameters())
    assert isinstance(m.layers["0"].feed_forward.w1, torch.nn.Linear)  # positions left out stay as they were


def test_a_bf16_model_keeps_float32_adapters():
    m = model(dtype=torch.bfloat16)
    apply_bottleneck(m, BottleneckSettings(size=8))
    adapter = m.layers["0"].attention
    assert adapter.down.weight.dtype == adapter.up.bias.dtype == torch.float32
    assert m(IDS).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(IDS).dtype == torch.bfloat16


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="peft.adapter_size must be a positive integer"):
        BottleneckSettings(size=0)
    with pytest.raises(ConfigError, match="peft.adapter_size must be a positive integer"):
        BottleneckSettings(size="8")
    with pytest.raises(ConfigError, match=r"peft.dropout must lie in \[0, 1\)"):
        BottleneckSettings(dropout=1.0)
    with pytest.raises(ConfigError, match="peft.adapter_positions: \\['mlp'\\] are not sublayers"):
        BottleneckSettings(positions=("attention", "mlp"))
    with pytest.raises(ConfigError, match="peft.adapter_positions: an empty list"):
        BottleneckSettings(positions=())
    m = model()
    with pytest.raises(ConfigError, match="peft.adapter_size=64 is larger than the model's dim=32"):
        apply_bottleneck(m, BottleneckSettings(size=64))
    assert not has_bottleneck(m) and all(p.requires_grad for p in m.parameters())  # left as it was
    apply_bottleneck(m, BottleneckSettings(size=8))
    with pytest.raises(ConfigError, match="already has bottleneck adapters"):
        apply_bottleneck(m, BottleneckSettings(size=8))


def test_bad_adapter_files_are_one_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    m = model()
    settings = BottleneckSettings(size=8)
    apply_bottleneck(m, settings)
    directory = save_bottleneck_adapter(m, settings, tmp_path / "adapter")
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "layers.1.feed_forward.up.weight"

    def refused(match):
        fresh = model()
        with pytest.raises(ConfigError, match=match):
            load_bottleneck_adapter(fresh, directory)
        assert not has_bottleneck(fresh)

    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    refused(f"adapter_model.safetensors: no tensor {key}")
    save_file({**tensors, key: torch.zeros(32, 4)}, weights)
    refused(rf"{key} has shape \(32, 4\); this model needs \(32, 8\)")
    save_file(tensors, weights)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "positions": ["attention"]}))
    refused("unexpected tensor layers.0.feed_forward.down.bias: an adapter on a sublayer that .* leave out")
    (directory / "adapter_config.json").write_text(json.dumps({**config, "size": 64}))
    refused("adapter_config.json: peft.adapter_size=64 is larger than the model's dim=32")
    (directory / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    refused("peft_type is 'LORA', not 'FORGELINE_BOTTLENECK' .*load_lora_adapter")
    (directory / "adapter_config.json").write_text("[1, 2")
    refused("adapter_config.json: not valid JSON")
