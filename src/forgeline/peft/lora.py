"""LoRA (Hu et al., 2021): a frozen linear layer plus a trainable low-rank update, y = W x + s * B (A x).

A is (r x in), B is (out x r) and starts at zero, so the adapted model starts as exactly the base model; s is
alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023), which keeps the update's scale steady as r grows.
Only A and B have gradients and optimizer state. Adapters wrap the model's modules in place (`apply_lora`); the
model file holds no adapter code, and `merge_lora` folds the update back into plain linear layers.

On disk the adapter is Hugging Face PEFT's format (`adapter_model.safetensors` with `base_model.model.<hf name>.
lora_A.weight` keys, and `adapter_config.json`), so `peft.PeftModel.from_pretrained` puts it on the exported base.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

# forgeline's projection names and the Hugging Face (PEFT target_modules) names of the same layers
HF_MODULE_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj",
                   "w3": "up_proj", "w2": "down_proj", "output": "lm_head"}
ATTENTION = ("wq", "wk", "wv", "wo")
MLP = ("w1", "w2", "w3")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION + MLP
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"peft.r must be a positive integer, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"peft.dropout must lie in [0, 1), got {self.dropout}")
        unknown = [t for t in self.target_modules if t not in HF_MODULE_NAMES and t not in HF_MODULE_NAMES.values()]
        if unknown:
            raise ConfigError(f"peft.target_modules: {unknown} are not module names of this model; choose from "
                              f"{', '.join(HF_MODULE_NAMES)} (or their Hugging Face names "
                              f"{', '.join(HF_MODULE_NAMES.values())})")
        to_forgeline = {hf: fl for fl, hf in HF_MODULE_NAMES.items()}
        self.target_modules = tuple(dict.fromkeys(to_forgeline.get(t, t) for t in self.target_modules))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` with a trainable low-rank update. `weight` is the effective weight W + s * B A (what an
    objective's fused head needs when the adapter sits on the LM head)."""

    def __init__(self, base: nn.Linear, settings: LoraSettings):
        super().__init__()
        out_features, in_features = base.weight.shape
        if settings.r > min(in_features, out_features):
            raise ConfigError(f"peft.r={settings.r} is larger than the layer ({out_features} x {in_features}); "
                              "a rank above the smaller side adds parameters and no capacity")
        self.base = base.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(settings.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, settings.r, **factory))
        # A as nn.Linear would initialise it (and PEFT does); B = 0 makes the adapted model the base at step 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = settings.scale
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the update goes through the rank-r bottleneck, never through a full-size delta matrix
        return self.base(x) + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def merged(self) -> nn.Linear:
        """A plain linear layer holding W + s * B A."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _targets(model: nn.Module, names: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if child_name in names and isinstance(child, nn.Linear):
                found.append((parent, child_name, child))
    return found


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Freeze every parameter of `model` and wrap its target linear layers in LoraLinear, in place; returns the
    wrapped modules' names. Run it before the parallel layout (DDP/FSDP2 then see the adapters as parameters)."""
    targets = _targets(model, settings.target_modules)
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"peft.target_modules {list(settings.target_modules)} match no linear layer of this "
                          f"model; its linear layers are named {', '.join(linear)}")
    missing = [t for t in settings.target_modules if not any(name == t for _, name, _ in targets)]
    if missing:
        raise ConfigError(f"peft.target_modules: {missing} match no linear layer of this model")
    if "output" in settings.target_modules and getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        raise ConfigError("peft.target_modules includes output, but this model ties its output to the embedding; "
                          "an adapter on a tied head would also change the embedding")
    model.requires_grad_(False)
    wrapped = []
    names = {id(m): n for n, m in model.named_modules()}
    for parent, child_name, child in targets:
        setattr(parent, child_name, LoraLinear(child, settings))
        prefix = names[id(parent)]
        wrapped.append(f"{prefix}.{child_name}" if prefix else child_name)
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Replace every LoraLinear by a plain linear layer holding the merged weight, in place; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                setattr(parent, child_name, child.merged())
                count += 1
    return count


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, under PEFT's names for the Hugging Face export of the base."""
    from ..model.formats.hf import forgeline_to_hf_name

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            hf = forgeline_to_hf_name(f"{name}.weight")[: -len(".weight")]
            out[f"base_model.model.{hf}.lora_A.weight"] = module.lora_A.detach().contiguous().cpu()
            out[f"base_model.model.{hf}.lora_B.weight"] = module.lora_B.detach().contiguous().cpu()
    return out


def save_lora_adapter(model: nn.Module, settings: LoraSettings, out: str | Path, *, base: str = "",
                      overwrite: bool = False) -> Path:
    """`adapter_model.safetensors` + `adapter_config.json` in PEFT's format, written atomically."""
    from safetensors.torch import save_file

    from ..files import atomic_directory

    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": settings.r,
        "lora_alpha": settings.alpha, "lora_dropout": settings.dropout, "use_rslora": settings.use_rslora,
        "target_modules": sorted(HF_MODULE_NAMES[t] for t in settings.target_modules), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_dora": False,
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(lora_state_dict(model), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return Path(out)
