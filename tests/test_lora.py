"""LoRA and DoRA as an explicit step on a forgeline model: the base at step 0, only adapters train, merging is exact,
the saved adapter loads with Hugging Face PEFT on the exported base and gives forgeline's logits, an adapter PEFT
saved loads onto the forgeline model and gives PEFT's, bad settings and bad adapter files are one clear error."""

import os

import pytest
import torch

from forgeline.errors import ConfigError
from forgeline.model import ModelConfig, build_model
from forgeline.objectives import causal_lm_loss
from forgeline.peft import LoraLinear, LoraSettings, apply_lora, merge_lora, save_lora_adapter
from forgeline.peft.lora import ATTENTION, MLP

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


def model(seed=0):
    torch.manual_seed(seed)
    return build_model(CFG)


def randomise_adapters(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in m.modules():
            if isinstance(module, LoraLinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.1)
                if module.lora_magnitude is not None:
                    module.lora_magnitude.mul_(1 + 0.2 * torch.randn(module.lora_magnitude.shape, generator=g))


IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))


def test_the_adapted_model_starts_as_the_base_and_only_adapters_train():
    base, adapted = model(), model()
    wrapped = apply_lora(adapted, LoraSettings(r=4, alpha=8, target_modules=("wq", "wv", "w2")))
    assert len(wrapped) == 6 and "layers.0.attention.wq" in wrapped
    torch.testing.assert_close(adapted(IDS), base(IDS), atol=0, rtol=0)  # B = 0
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    frozen_before = {n: p.clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    batch = {"input_ids": IDS[:, :-1], "targets": IDS[:, 1:], "n_targets": IDS[:, 1:].numel()}
    causal_lm_loss(adapted, batch).loss.backward()
    opt.step()
    assert all(torch.equal(p, frozen_before[n]) for n, p in adapted.named_parameters() if not p.requires_grad)
    assert not torch.allclose(adapted(IDS), base(IDS))


@pytest.mark.parametrize("rslora", [False, True])
def test_merging_gives_the_same_logits(rslora):
    m = model()
    apply_lora(m, LoraSettings(r=4, alpha=16, use_rslora=rslora, target_modules=("wq", "wk", "wv", "wo", "w1",
                                                                                  "w2", "w3", "output")))
    randomise_adapters(m)
    before = m(IDS)
    assert merge_lora(m) == 15
    assert not any(isinstance(x, LoraLinear) for x in m.modules())
    torch.testing.assert_close(m(IDS), before, atol=1e-5, rtol=1e-5)


def test_an_adapter_on_the_head_trains_through_the_fused_loss():
    m = model()
    apply_lora(m, LoraSettings(r=2, target_modules=("output",)))
    batch = {"input_ids": IDS[:, :-1], "targets": IDS[:, 1:], "n_targets": IDS[:, 1:].numel()}
    causal_lm_loss(m, batch).loss.backward()
    assert m.output.lora_A.grad is None or torch.count_nonzero(m.output.lora_A.grad) == 0  # B = 0: no signal to A
    assert torch.count_nonzero(m.output.lora_B.grad) > 0


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="not module names.*wq"):
        LoraSettings(target_modules=("query",))
    with pytest.raises(ConfigError, match="larger than the layer"):
        apply_lora(model(), LoraSettings(r=64, target_modules=("wk",)))
    with pytest.raises(ConfigError, match="positive integer"):
        LoraSettings(r=0)


@pytest.mark.parametrize("dora", [False, True])
def test_the_saved_adapter_loads_with_peft_on_the_exported_base(tmp_path, story_dataset, dora):
    pytest.importorskip("peft", reason="the PEFT comparison needs the peft package (a test extra)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from forgeline.cli import main
    from forgeline.model.formats.model_dir import save_model_dir
    from forgeline.tokenizer import Tokenizer

    base = build_model(ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                   max_seq_len=32))
    save_model_dir(base, Tokenizer.load(story_dataset / "tokenizer"), tmp_path / "base")
    assert main(["export", "hf", str(tmp_path / "base"), str(tmp_path / "base-hf")]) == 0
    settings = LoraSettings(r=4, alpha=8, use_rslora=True, target_modules=("q_proj", "v_proj", "w2"), use_dora=dora)
    apply_lora(base, settings)
    randomise_adapters(base)
    save_lora_adapter(base, settings, tmp_path / "adapter", base=str(tmp_path / "base-hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, base(ids), atol=1e-4, rtol=0)
    if dora:
        assert '"use_dora": true' in (tmp_path / "adapter" / "adapter_config.json").read_text()


# ---------------------------------------------------------------------------------------------------------------
# DoRA
# ---------------------------------------------------------------------------------------------------------------


def test_dora_starts_as_the_base_and_only_adapters_and_magnitudes_train():
    base, adapted = model(), model()
    apply_lora(adapted, LoraSettings(r=4, alpha=8, target_modules=("wq", "wv", "w2", "output"), use_dora=True))
    wq = adapted.layers["0"].attention.wq
    torch.testing.assert_close(wq.lora_magnitude, base.layers["0"].attention.wq.weight.norm(dim=1), atol=0, rtol=0)
    torch.testing.assert_close(adapted(IDS), base(IDS), atol=0, rtol=0)  # B = 0 and m = ||W||: exactly the base
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert {n.rsplit(".", 1)[-1] for n in trainable} == {"lora_A", "lora_B", "lora_magnitude"}
    frozen_before = {n: p.clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    magnitude_before = wq.lora_magnitude.detach().clone()
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    batch = {"input_ids": IDS[:, :-1], "targets": IDS[:, 1:], "n_targets": IDS[:, 1:].numel()}
    causal_lm_loss(adapted, batch).loss.backward()  # the head's adapter trains through the fused loss
    assert torch.count_nonzero(adapted.output.lora_magnitude.grad) > 0
    opt.step()
    assert all(torch.equal(p, frozen_before[n]) for n, p in adapted.named_parameters() if not p.requires_grad)
    assert not torch.equal(wq.lora_magnitude, magnitude_before)
    assert not torch.allclose(adapted(IDS), base(IDS))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_dora_merging_gives_the_same_logits(qkv_bias):
    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                max_seq_len=32, qkv_bias=qkv_bias))
    if qkv_bias:  # nonzero biases, so that one scaled by the magnitude would show
        with torch.no_grad():
            for block in m.layers.values():
                block.attention.wq.bias.normal_()
    apply_lora(m, LoraSettings(r=4, alpha=16, use_dora=True, target_modules=ATTENTION + MLP + ("output",)))
    randomise_adapters(m)
    before = m(IDS)
    torch.testing.assert_close(m.output.weight, m.output.merged().weight, atol=0, rtol=0)
    assert merge_lora(m) == 15
    assert not any(isinstance(x, LoraLinear) for x in m.modules())
    torch.testing.assert_close(m(IDS), before, atol=1e-5, rtol=1e-5)


def test_dora_dropout_is_peft_s_in_training_and_off_in_eval():
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(16, 8), LoraSettings(r=2, dropout=0.5, use_dora=True))
    plain = LoraLinear(torch.nn.Linear(16, 8), LoraSettings(r=2, use_dora=True))
    plain.load_state_dict(layer.state_dict())
    randomise_adapters(layer)
    randomise_adapters(plain)
    x = torch.randn(3, 16)
    layer.eval(), plain.eval()
    torch.testing.assert_close(layer(x), plain(x), atol=0, rtol=0)
    layer.train()
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    dropped = torch.nn.functional.dropout(x, 0.5)
    w, b = layer.base.weight, layer.base.bias
    delta = layer.scale * layer.lora_B @ layer.lora_A
    g = layer.lora_magnitude / (w + delta).norm(dim=1)
    # the base term keeps the whole input; the magnitude's correction and the update see the dropped-out one
    expected = x @ w.T + b + (g - 1) * (dropped @ w.T) + g * (dropped @ delta.T)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


class QuantizedLikeLinear(torch.nn.Module):
    """The interface a quantized base offers (as NF4Linear does): sizes, a dense `weight` computed on each read
    (counted here), `bias`, forward. Stored in bf16, so the adapters' float32 master weights are visible."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("stored", linear.weight.detach().to(torch.bfloat16))
        self.bias = None
        self.reads = 0

    @property
    def weight(self):
        self.reads += 1
        return self.stored.float()

    def forward(self, x):
        return torch.nn.functional.linear(x, self.stored.float())


@pytest.mark.parametrize("dora", [False, True])
def test_any_linear_like_base_takes_an_adapter(dora):
    torch.manual_seed(0)
    base = QuantizedLikeLinear(torch.nn.Linear(16, 8, bias=False))
    layer = LoraLinear(base, LoraSettings(r=2, use_dora=dora))
    assert base.reads == (1 if dora else 0)  # the magnitude needs ||W|| once; plain LoRA never reads it
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32 and (layer.in_features, layer.out_features) == (
        16, 8)
    randomise_adapters(layer)
    x = torch.randn(3, 16)
    merged = layer.merged()
    assert type(merged) is torch.nn.Linear and merged.weight.dtype == torch.float32
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=1e-5)

    m = model()  # apply_lora finds such layers as it finds nn.Linear
    m.layers["0"].attention.wq = QuantizedLikeLinear(m.layers["0"].attention.wq)
    assert "layers.0.attention.wq" in apply_lora(m, LoraSettings(r=2, target_modules=("wq",), use_dora=dora))


def test_a_bf16_base_keeps_float32_adapters():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoraLinear(base, LoraSettings(r=2, use_dora=True))
    assert layer.lora_A.dtype == layer.lora_magnitude.dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert layer.merged().weight.dtype == torch.bfloat16
    double = LoraLinear(torch.nn.Linear(16, 8).double(), LoraSettings(r=2))
    assert double.lora_A.dtype == torch.float64


def test_adapter_names_ignore_activation_checkpointing():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from forgeline.peft.lora import lora_state_dict

    m = model()
    apply_lora(m, LoraSettings(r=2, target_modules=("wq",), use_dora=True))
    names = set(lora_state_dict(m))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in names
    for name in list(m.layers.keys()):
        m.layers[name] = checkpoint_wrapper(m.layers[name])
    assert set(lora_state_dict(m)) == names


# ---------------------------------------------------------------------------------------------------------------
# Adapters that PEFT saved, loaded onto the forgeline model
# ---------------------------------------------------------------------------------------------------------------

HF_CFG = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


@pytest.fixture(scope="module")
def exported_base(tmp_path_factory, story_dataset):
    """A forgeline model's weights, and the Hugging Face directory `forgeline export hf` made of it."""
    from forgeline.cli import main
    from forgeline.model.formats.model_dir import save_model_dir
    from forgeline.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("lora-base")
    torch.manual_seed(11)
    base = build_model(HF_CFG)
    save_model_dir(base, Tokenizer.load(story_dataset / "tokenizer"), root / "base")
    assert main(["export", "hf", str(root / "base"), str(root / "base-hf")]) == 0
    return base.state_dict(), root / "base-hf"


def forgeline_base(exported_base):
    m = build_model(HF_CFG)
    m.load_state_dict(exported_base[0])
    return m.eval()


def save_peft_adapter(hf_dir, out, **lora_config):
    """An adapter made and saved by PEFT itself, its B (and DoRA magnitudes) randomised; returns the PEFT model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(**lora_config))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)
    return peft_model.eval()


@pytest.mark.parametrize("dora", [False, True])
def test_an_adapter_peft_saved_loads_onto_the_forgeline_model(tmp_path, exported_base, dora):
    pytest.importorskip("peft", reason="the PEFT comparison needs the peft package (a test extra)")
    from forgeline.peft.lora import load_lora_adapter

    peft_model = save_peft_adapter(exported_base[1], tmp_path / "adapter", r=4, lora_alpha=8, lora_dropout=0.1,
                                   target_modules=["q_proj", "v_proj", "down_proj", "lm_head"], use_dora=dora,
                                   use_rslora=not dora)
    m = forgeline_base(exported_base)
    settings = load_lora_adapter(m, tmp_path / "adapter")
    assert (settings.r, settings.alpha, settings.use_dora, settings.use_rslora) == (4, 8.0, dora, not dora)
    assert set(settings.target_modules) == {"wq", "wv", "w2", "output"}
    assert sum(isinstance(x, LoraLinear) for x in m.modules()) == 7
    assert all(n.rsplit(".", 1)[-1].startswith("lora_") for n, p in m.named_parameters() if p.requires_grad)
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = peft_model(ids).logits
        assert not torch.allclose(expected, forgeline_base(exported_base)(ids), atol=1e-3)  # not the bare base
        torch.testing.assert_close(m(ids), expected, atol=1e-4, rtol=0)
    # PEFT saved its own copy of lm_head (a target): onto a model with another head the adapter does not fit
    torch.manual_seed(12)
    with pytest.raises(ConfigError, match="lm_head.base_layer.weight is a copy of a base weight that is not this"):
        load_lora_adapter(build_model(HF_CFG), tmp_path / "adapter")


def test_all_linear_targets_every_projection(tmp_path, exported_base):
    pytest.importorskip("peft", reason="the PEFT comparison needs the peft package (a test extra)")
    from forgeline.peft.lora import load_lora_adapter

    save_peft_adapter(exported_base[1], tmp_path / "adapter", r=2, target_modules="all-linear")
    m = forgeline_base(exported_base)
    # PEFT writes all-linear out as every layer's path (model.layers.0.mlp.gate_proj, ...)
    assert set(load_lora_adapter(m, tmp_path / "adapter").target_modules) == set(ATTENTION + MLP)
    assert sum(isinstance(x, LoraLinear) for x in m.modules()) == 14


def edit_config(directory, **changes):
    import json

    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture
def forgeline_adapter(tmp_path):
    m = model()
    settings = LoraSettings(r=2, target_modules=("wq", "w2"), use_dora=True)
    apply_lora(m, settings)
    randomise_adapters(m)
    save_lora_adapter(m, settings, tmp_path / "adapter")
    return m, tmp_path / "adapter"


def test_forgeline_s_own_adapter_round_trips(forgeline_adapter):
    from forgeline.peft.lora import load_lora_adapter

    adapted, directory = forgeline_adapter
    fresh = model()
    assert load_lora_adapter(fresh, directory).use_dora
    torch.testing.assert_close(fresh(IDS), adapted(IDS), atol=0, rtol=0)


@pytest.mark.parametrize("changes, message", [
    ({"peft_type": "IA3"}, "peft_type is 'IA3'.*LoRA"),
    ({"rank_pattern": {"q_proj": 8}, "bias": "all"}, "rank_pattern \\(per-layer ranks\\), bias='all'"),
    ({"modules_to_save": ["embed_tokens"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "query_key_value"]}, "query_key_value.*not module names"),
    ({"target_modules": ".*attn.*"}, "pattern '.\\*attn.\\*'"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"target_modules": ["model.layers.0.self_attn.q_proj", "down_proj"]}, "on 1 of the 2 q_proj layers"),
])
def test_a_peft_config_forgeline_cannot_load_exactly_is_refused(forgeline_adapter, changes, message):
    from forgeline.peft.lora import load_lora_adapter

    _, directory = forgeline_adapter
    edit_config(directory, **changes)
    fresh = model()
    with pytest.raises(ConfigError, match=f"adapter_config.json: .*{message}"):
        load_lora_adapter(fresh, directory)
    assert not any(isinstance(x, LoraLinear) for x in fresh.modules())  # the model is left as it was


def test_bad_adapter_files_are_one_clear_error(forgeline_adapter):
    from safetensors.torch import load_file, save_file

    from forgeline.peft.lora import load_lora_adapter

    _, directory = forgeline_adapter
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"

    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(ConfigError, match=f"adapter_model.safetensors: no tensor {key}"):
        load_lora_adapter(model(), directory)
    save_file({**tensors, key: torch.zeros(32, 3)}, weights)
    with pytest.raises(ConfigError, match=f"{key} has shape \\(32, 3\\); this model needs \\(32, 2\\)"):
        load_lora_adapter(model(), directory)
    save_file({**tensors, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(2, 32)},
              weights)
    with pytest.raises(ConfigError, match="unexpected tensor .*k_proj.lora_A.weight: for a layer .* does not name"):
        load_lora_adapter(model(), directory)
    save_file(tensors, weights)
    edit_config(directory, use_dora=False)
    with pytest.raises(ConfigError, match="lora_magnitude_vector: a DoRA magnitude, but .* does not set use_dora"):
        load_lora_adapter(model(), directory)

    weights.rename(directory / "adapter_model.bin")
    with pytest.raises(ConfigError, match="adapter_model.bin: .*convert it to adapter_model.safetensors"):
        load_lora_adapter(model(), directory)
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="adapter_config.json: not valid JSON"):
        load_lora_adapter(model(), directory)
    (directory / "adapter_config.json").unlink()
    with pytest.raises(ConfigError, match="adapter_config.json: missing"):
        load_lora_adapter(model(), directory)
