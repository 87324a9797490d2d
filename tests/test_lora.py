"""LoRA as an explicit step on a forgeline model: the base at step 0, only adapters train, merging is exact, the
saved adapter loads with Hugging Face PEFT on the exported base and gives forgeline's logits, bad settings are
one clear error."""

import os

import pytest
import torch

from forgeline.errors import ConfigError
from forgeline.model import ModelConfig, build_model
from forgeline.objectives import causal_lm_loss
from forgeline.peft import LoraLinear, LoraSettings, apply_lora, merge_lora, save_lora_adapter

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


def test_the_saved_adapter_loads_with_peft_on_the_exported_base(tmp_path, story_dataset):
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
    settings = LoraSettings(r=4, alpha=8, use_rslora=True, target_modules=("q_proj", "v_proj", "w2"))
    apply_lora(base, settings)
    randomise_adapters(base)
    save_lora_adapter(base, settings, tmp_path / "adapter", base=str(tmp_path / "base-hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, base(ids), atol=1e-4, rtol=0)
