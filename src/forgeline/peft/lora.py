"""LoRA (Hu et al., 2021) and DoRA (Liu et al., 2024): a frozen linear layer plus a trainable low-rank update.

LoRA: y = W x + s * B (A x). A is (r x in), B is (out x r) and starts at zero, so the adapted model starts as exactly
the base model; s is alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023), which keeps the update's scale
steady as r grows.

DoRA (weight-decomposed LoRA) splits the adapted weight into a direction and a trainable per-output-row magnitude m:
W' = m / ||W + s B A||_row * (W + s B A). m starts at ||W||_row, so DoRA too starts as exactly the base. As in the
paper (section 4.3) and PEFT, the row norm is treated as a constant (detached from the graph).

Only A, B (and m) have gradients and optimizer state; they are float32 master weights whatever the base's dtype
(float64 with a float64 base). The base may be any module with `in_features`, `out_features`, a dense `weight`,
`bias` and `forward` (an `nn.Linear`, or a 4-bit `NF4Linear` for QLoRA). Adapters wrap the model's modules in place
(`apply_lora`); the model file holds no adapter code, and `merge_lora` folds the update back into plain linear layers.

On disk the adapter is Hugging Face PEFT's format, so `peft.PeftModel.from_pretrained` puts it on the exported base,
and `load_lora_adapter` reads what PEFT saved:
    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "use_rslora",
                                "use_dora", ...}
    adapter_model.safetensors  base_model.model.<hf module>.lora_A.weight     (r, in)
                               base_model.model.<hf module>.lora_B.weight     (out, r)
                               base_model.model.<hf module>.lora_magnitude_vector  (out,)   DoRA only
where <hf module> is the Hugging Face name of the layer, e.g. model.layers.0.self_attn.q_proj.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

# forgeline's projection names and the Hugging Face (PEFT target_modules) names of the same layers
HF_MODULE_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj",
                   "w3": "up_proj", "w2": "down_proj", "output": "lm_head"}
ATTENTION = ("wq", "wk", "wv", "wo")
MLP = ("w1", "w2", "w3")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Module names that wrappers applied after the adapters insert (activation checkpointing, torch.compile); the
# adapter's tensors are named as in the unwrapped model.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION + MLP
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"peft.r must be a positive integer, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"peft.dropout must lie in [0, 1), got {self.dropout}")
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"peft.use_dora must be true or false, got {self.use_dora!r}")
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


def adapter_placement(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the adapter's master weights live: the base's device, float32 (float64 if the base is float64).
    Read from the base's parameters and buffers, not `base.weight`, which a quantized base dequantizes on access."""
    tensors = [*base.parameters(), *base.buffers()]
    if not tensors:
        raise ConfigError(f"cannot put an adapter on {type(base).__name__}: it holds no weights")
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return tensors[0].device, dtype


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(weight, dim=1)


class LoraLinear(nn.Module):
    """A frozen linear layer with a trainable low-rank update (and with DoRA, a trainable magnitude per output row).
    `weight` is the effective dense weight (what an objective's fused head needs when the adapter sits on the LM
    head); `bias` is the base's, which LoRA and DoRA leave unchanged."""

    def __init__(self, base: nn.Module, settings: LoraSettings):
        super().__init__()
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        if settings.r > min(self.in_features, self.out_features):
            raise ConfigError(f"peft.r={settings.r} is larger than the layer ({self.out_features} x "
                              f"{self.in_features}); a rank above the smaller side adds parameters and no capacity")
        self.base = base.requires_grad_(False)
        device, dtype = adapter_placement(base)
        self.lora_A = nn.Parameter(torch.empty(settings.r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, settings.r, device=device, dtype=dtype))
        # A as nn.Linear would initialise it (and PEFT does); B = 0 makes the adapted model the base at step 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = settings.scale
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.lora_magnitude: nn.Parameter | None = None
        self.adapter_enabled = True  # off: the base alone (a DPO reference without a second copy of the model)
        if settings.use_dora:
            with torch.no_grad():
                # ||W + s B A|| with B = 0, as PEFT initialises it: m / ||W|| = 1 at step 0
                magnitude = _row_norm(base.weight.to(dtype))
            self.lora_magnitude = nn.Parameter(magnitude.to(device))

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude is not None

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W + s B A, times m / ||W + s B A||_row with DoRA, computed in `dtype`."""
        combined = self.base.weight.to(dtype) + self.scale * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))
        if self.lora_magnitude is None:
            return combined
        norm = _row_norm(combined.detach())  # a constant, as in forward
        return (self.lora_magnitude.to(dtype) / norm)[:, None] * combined

    @property
    def weight(self) -> torch.Tensor:
        base_weight = self.base.weight
        # in the adapters' precision, then in the base's dtype, which is what the layer's output has
        return self._dense_weight(torch.promote_types(base_weight.dtype, self.lora_A.dtype)).to(base_weight.dtype)

    def _dora_row_scale(self) -> torch.Tensor:
        """m / ||W + s B A||_row, the norm detached (DoRA section 4.3, as PEFT): the row norms need the dense
        product B A and the dense base weight once per forward (dequantized, for a quantized base), which PEFT
        computes too; the layer's output itself never goes through a full-size matrix other than W. The norm is
        taken in the adapters' precision with autocast off: under bf16 autocast PEFT takes it in bf16, which
        differs from this only by rounding."""
        with torch.no_grad(), torch.autocast(self.lora_A.device.type, enabled=False):
            delta = self.scale * (self.lora_B @ self.lora_A)
            norm = _row_norm(self.base.weight.to(delta.dtype) + delta)
        return self.lora_magnitude / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base(x)
        if self.lora_magnitude is None:
            return self._lora_forward(x)
        result = self.base(x)
        dropped = self.dropout(x)
        # autocast casts the float32 adapters to its dtype; without it a lower-precision input is brought to theirs
        lora_in = dropped if torch.is_autocast_enabled(x.device.type) else dropped.to(self.lora_A.dtype)
        # the update goes through the rank-r bottleneck, never through a full-size delta matrix
        update = F.linear(F.linear(lora_in, self.lora_A), self.lora_B)
        if self.lora_magnitude is None:
            return result + (self.scale * update).to(result.dtype)
        # PEFT's DoRA: out = base(x) + (g - 1) * W x' + g * s * B A x' with g = m / ||W + s B A||_row, x' the
        # dropped-out input. Without dropout (or in eval) x' = x and this is g * (W x + s B A x) + bias: the bias
        # is not rescaled. With dropout in training PEFT recomputes W x' and the base term keeps the undropped x.
        bias = self.base.bias
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_wx = result if bias is None else result - bias
        else:
            base_wx = self.base(dropped)
            if bias is not None:
                base_wx = base_wx - bias
        row_scale = self._dora_row_scale()
        return result + ((row_scale - 1) * base_wx + row_scale * (self.scale * update)).to(result.dtype)

    def _lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + s * B (A x), arranged for speed: under autocast the input is cast once for both paths (autocast
        would cast it again for A), the scale multiplies the rank-r intermediate rather than the full-size output,
        and the update is added inside B's matrix product (addmm) rather than by a separate full-size addition."""
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x = x.to(dtype)
        else:  # without autocast, a lower-precision input meets the float32 adapters in theirs
            dtype = torch.promote_types(x.dtype, self.lora_A.dtype)
        result = self.base(x)
        # the update goes through the rank-r bottleneck, never through a full-size delta matrix
        hidden = F.linear(self.dropout(x).to(dtype), self.lora_A.to(dtype)) * self.scale
        out = torch.addmm(result.reshape(-1, result.shape[-1]).to(dtype), hidden.reshape(-1, hidden.shape[-1]),
                          self.lora_B.to(dtype).t())
        return out.view(*result.shape[:-1], out.shape[-1]).to(result.dtype)

    def merged(self) -> nn.Linear:
        """A plain linear layer holding the effective weight: in the base weight's dtype for an `nn.Linear` base,
        in the adapters' (float32) for any other (a quantized base has no dtype of its own to go back to)."""
        dtype = self.base.weight.dtype if isinstance(self.base, nn.Linear) else self.lora_A.dtype
        bias = self.base.bias
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=self.lora_A.device,
                        dtype=dtype)
        with torch.no_grad():
            compute = torch.promote_types(dtype, self.lora_A.dtype)
            out.weight.copy_(self._dense_weight(compute))
            if bias is not None:
                out.bias.copy_(bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.lora_A.shape[0]}, "
                f"scale={self.scale:g}, dora={self.use_dora}")


def is_linear_layer(module: nn.Module) -> bool:
    """An `nn.Linear`, or a module with its interface (`in_features`, `out_features`, `weight`, `bias`, forward),
    such as a quantized linear layer; not a LoraLinear, which is never wrapped twice."""
    if isinstance(module, LoraLinear):
        return False
    if isinstance(module, nn.Linear):
        return True
    # `weight` is looked up without being read: reading it would dequantize a quantized layer
    has_weight = hasattr(type(module), "weight") or "weight" in module._parameters or "weight" in module._buffers
    return (isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int) and has_weight)


def clean_module_name(name: str) -> str:
    """`name` without the segments activation checkpointing and torch.compile insert."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def _targets(model: nn.Module, names: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Module]]:
    found = []
    for _, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if child_name in names and is_linear_layer(child):
                found.append((parent, child_name, child))
    return found


def _plan_lora(model: nn.Module, settings: LoraSettings) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """The layers `apply_lora` would wrap, as (parent, attribute, layer, forgeline name); raises ConfigError (and
    changes nothing) when the settings do not fit the model."""
    targets = _targets(model, settings.target_modules)
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear_layer(m) and n})
        raise ConfigError(f"peft.target_modules {list(settings.target_modules)} match no linear layer of this "
                          f"model; its linear layers are named {', '.join(linear)}")
    missing = [t for t in settings.target_modules if not any(name == t for _, name, _ in targets)]
    if missing:
        raise ConfigError(f"peft.target_modules: {missing} match no linear layer of this model")
    if "output" in settings.target_modules and getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        raise ConfigError("peft.target_modules includes output, but this model ties its output to the embedding; "
                          "an adapter on a tied head would also change the embedding")
    for _, _, layer in targets:
        if settings.r > min(layer.in_features, layer.out_features):
            raise ConfigError(f"peft.r={settings.r} is larger than the layer ({layer.out_features} x "
                              f"{layer.in_features}); a rank above the smaller side adds parameters and no capacity")
    names = {id(m): n for n, m in model.named_modules()}
    planned = []
    for parent, child_name, child in targets:
        prefix = clean_module_name(names[id(parent)])
        planned.append((parent, child_name, child, f"{prefix}.{child_name}" if prefix else child_name))
    return planned


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Freeze every parameter of `model` and wrap its target linear layers in LoraLinear, in place; returns the
    wrapped modules' names. Run it before the parallel layout (DDP/FSDP2 then see the adapters as parameters)."""
    planned = _plan_lora(model, settings)
    model.requires_grad_(False)
    for parent, child_name, child, _ in planned:
        # in the wrapped layer's mode: adapters loaded onto a model in eval() must not start dropping out
        setattr(parent, child_name, LoraLinear(child, settings).train(child.training))
    return [name for *_, name in planned]


def merge_lora(model: nn.Module) -> int:
    """Replace every LoraLinear by a plain linear layer holding the merged weight, in place; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                setattr(parent, child_name, child.merged())
                count += 1
    return count


def _hf_module_name(forgeline_module: str) -> str:
    from ..model.formats.hf import forgeline_to_hf_name

    return forgeline_to_hf_name(f"{forgeline_module}.weight")[: -len(".weight")]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, under PEFT's names for the Hugging Face export of the base."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            key = f"{PEFT_PREFIX}{_hf_module_name(clean_module_name(name))}"
            out[f"{key}.lora_A.weight"] = module.lora_A.detach().contiguous().cpu()
            out[f"{key}.lora_B.weight"] = module.lora_B.detach().contiguous().cpu()
            if module.lora_magnitude is not None:
                out[f"{key}.lora_magnitude_vector"] = module.lora_magnitude.detach().contiguous().cpu()
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
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_dora": settings.use_dora,
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(lora_state_dict(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return Path(out)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def read_adapter_config(directory: str | Path) -> tuple[dict[str, Any], Path]:
    """`directory/adapter_config.json` as a dict, and its path; ConfigError naming the file when it is missing or
    not a JSON object."""
    path = Path(directory) / ADAPTER_CONFIG
    if not Path(directory).is_dir():
        raise ConfigError(f"{directory}: no such adapter directory")
    if not path.is_file():
        raise ConfigError(f"{path}: missing; an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    from ..model.formats.common import read_json

    return read_json(path, error=ConfigError), path


def read_adapter_tensors(directory: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """`directory/adapter_model.safetensors`, and its path; a pickled `adapter_model.bin` is refused (loading a
    pickle runs code from the file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = Path(directory) / "adapter_model.bin"
        if pickled.is_file():
            raise ConfigError(f"{pickled}: adapters saved as pickled PyTorch files are not loaded (unpickling can "
                              f"run code); convert it to {ADAPTER_WEIGHTS}, e.g. safetensors.torch.save_file("
                              f"torch.load(path, weights_only=True), '{ADAPTER_WEIGHTS}')")
        raise ConfigError(f"{path}: missing; an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        return load_file(str(path)), path
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable safetensors file: {exc}") from None


def check_adapter_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], path: Path, *,
                          why_unexpected: Callable[[str], str]) -> None:
    """Every tensor in the file is expected and has the expected shape, and every expected tensor is there;
    otherwise ConfigError naming the file and the key."""
    for key, tensor in tensors.items():
        if key not in shapes:
            raise ConfigError(f"{path}: unexpected tensor {key}: {why_unexpected(key)}")
        if tuple(tensor.shape) != shapes[key]:
            raise ConfigError(f"{path}: {key} has shape {tuple(tensor.shape)}; this model needs {shapes[key]}")
    missing = [key for key in shapes if key not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"{path}: no tensor {missing[0]}{more}; the adapter's config says it is there")


# adapter_config.json fields whose non-default values change the model in ways forgeline's LoRA does not model
_UNSUPPORTED_PEFT_FIELDS = {
    "rank_pattern": "per-layer ranks", "alpha_pattern": "per-layer alphas",
    "modules_to_save": "fully trained copies of modules", "fan_in_fan_out": "transposed (Conv1D) weights",
    "layers_to_transform": "adapters on some layers only", "layer_replication": "replicated layers",
    "exclude_modules": "excluded modules", "target_parameters": "adapters on parameters",
    "trainable_token_indices": "trainable token embeddings", "lora_bias": "a bias on lora_B",
    "use_qalora": "QALoRA", "alora_invocation_tokens": "activated LoRA", "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
}


def lora_settings_from_peft(config: dict[str, Any], where: str | Path = ADAPTER_CONFIG) -> LoraSettings:
    """LoraSettings from a PEFT adapter_config.json dict; ConfigError naming `where` for what forgeline cannot load
    exactly (another PEFT method, per-layer patterns, trained biases or extra modules, unknown target names)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ConfigError(f"{where}: peft_type is {peft_type!r}; forgeline loads LoRA (and DoRA) adapters only "
                          "(peft_type \"LORA\")")
    unsupported = [f"{field} ({what})" for field, what in _UNSUPPORTED_PEFT_FIELDS.items() if config.get(field)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r} (trained biases)")
    if unsupported:
        raise ConfigError(f"{where}: this adapter uses {', '.join(unsupported)}, which forgeline's LoRA does not "
                          "support; only plain LoRA/DoRA adapters on whole layers load")
    targets, _ = _peft_targets(config, where)
    flags = {field: config.get(field) or False for field in ("use_rslora", "use_dora")}
    for field, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {field} must be true or false, got {value!r}")
    try:
        return LoraSettings(r=config.get("r", 8), alpha=float(config.get("lora_alpha", 8)),
                            dropout=float(config.get("lora_dropout", 0.0)), target_modules=tuple(targets),
                            **flags)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _peft_targets(config: dict[str, Any], where: str | Path) -> tuple[tuple[str, ...], dict[str, set[str]]]:
    """adapter_config.json's target_modules as layer kinds (forgeline or Hugging Face short names, as
    LoraSettings takes them), and for the kinds named only by full paths (PEFT's save_pretrained writes
    "all-linear" out as every layer's path, model.layers.0.mlp.gate_proj ...), the forgeline layers named."""
    from ..model.formats.hf import hf_to_forgeline_name

    targets = config.get("target_modules")
    if targets == "all-linear":
        return ATTENTION + MLP, {}  # PEFT's all-linear leaves out the output layer
    if isinstance(targets, str):
        raise ConfigError(f"{where}: target_modules is the pattern {targets!r}; forgeline loads a list of module "
                          f"names ({', '.join(HF_MODULE_NAMES.values())}) or \"all-linear\"")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"{where}: target_modules must be a list of module names or \"all-linear\", got "
                          f"{targets!r}")
    kinds: list[str] = []
    bare: set[str] = set()  # kinds named as such: every layer of the kind
    by_path: dict[str, set[str]] = {}
    for target in targets:
        forgeline = hf_to_forgeline_name(f"{target}.weight") if "." in target else None
        if forgeline is None or forgeline.rsplit(".", 2)[-2] not in HF_MODULE_NAMES:
            kinds.append(target)  # LoraSettings rejects what is not a layer kind, naming the choices
            bare.add(target)
            continue
        layer = forgeline[: -len(".weight")]
        kind = layer.rsplit(".", 1)[-1]
        kinds.append(kind)
        by_path.setdefault(kind, set()).add(layer)
    return tuple(kinds), {k: v for k, v in by_path.items() if k not in bare and HF_MODULE_NAMES[k] not in bare}


def load_lora_adapter(model: nn.Module, adapter_dir: str | Path) -> LoraSettings:
    """Apply the PEFT LoRA/DoRA adapter in `adapter_dir` to `model` in place (freezing the base, as apply_lora)
    and load its weights; returns its settings. Every tensor in the file must be one of the adapter's, with the
    shape this model needs, and every adapter tensor must be there; otherwise ConfigError naming the file and key,
    and the model is left unchanged."""
    from ..model.formats.hf import hf_to_forgeline_name

    config, config_path = read_adapter_config(adapter_dir)
    settings = lora_settings_from_peft(config, config_path)
    tensors, weights_path = read_adapter_tensors(adapter_dir)
    try:
        planned = _plan_lora(model, settings)
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    layers = {name: layer for *_, layer, name in planned}
    for kind, named in _peft_targets(config, config_path)[1].items():
        of_kind = {name for name in layers if name.rsplit(".", 1)[-1] == kind}
        if named - of_kind:
            raise ConfigError(f"{config_path}: target_modules names {sorted(named - of_kind)[0]}, which this "
                              "model does not have")
        if of_kind - named:
            raise ConfigError(f"{config_path}: target_modules puts adapters on {len(named)} of the "
                              f"{len(of_kind)} {HF_MODULE_NAMES[kind]} layers; forgeline's LoRA adapts every layer "
                              "of a kind")

    expected: dict[str, tuple[str, str, tuple[int, ...]]] = {}  # PEFT key -> forgeline module, tensor, shape
    for name, layer in layers.items():
        key = f"{PEFT_PREFIX}{_hf_module_name(name)}"
        expected[f"{key}.lora_A.weight"] = (name, "lora_A", (settings.r, layer.in_features))
        expected[f"{key}.lora_B.weight"] = (name, "lora_B", (layer.out_features, settings.r))
        if settings.use_dora:
            expected[f"{key}.lora_magnitude_vector"] = (name, "lora_magnitude", (layer.out_features,))
    for key in [k for k in tensors if k.startswith(PEFT_PREFIX) and k.endswith(".base_layer.weight")]:
        # PEFT saves its own copy of the head's weight when lm_head is a target (in case the vocabulary was
        # resized); the adapter fits this model only if that copy is this model's head
        name = hf_to_forgeline_name(key[len(PEFT_PREFIX):].replace(".base_layer.weight", ".weight"))
        layer = layers.get(name[: -len(".weight")]) if name else None
        if layer is None or not _same_weight(tensors.pop(key), layer.weight):
            raise ConfigError(f"{weights_path}: {key} is a copy of a base weight that is not this model's "
                              "(the adapter was trained on another base, or one with a resized vocabulary)")

    def why_unexpected(key: str) -> str:
        if key.endswith(".lora_magnitude_vector") and not settings.use_dora:
            return "a DoRA magnitude, but adapter_config.json does not set use_dora"
        if key.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")):
            return "for a layer of this model that adapter_config.json's target_modules does not name"
        return "not a tensor of a LoRA adapter"

    check_adapter_tensors(tensors, {key: shape for key, (*_, shape) in expected.items()}, weights_path,
                          why_unexpected=why_unexpected)

    apply_lora(model, settings)
    modules = {clean_module_name(n): m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    with torch.no_grad():
        for key, (name, attribute, _) in expected.items():
            getattr(modules[name], attribute).copy_(tensors[key])
    return settings


def _same_weight(stored: torch.Tensor, weight: torch.Tensor) -> bool:
    """Equal once both are in the coarser of the two dtypes (the adapter may come from a bf16 or fp32 export)."""
    if stored.shape != weight.shape:
        return False
    weight = weight.detach().cpu()
    coarser = stored.dtype if torch.finfo(stored.dtype).eps >= torch.finfo(weight.dtype).eps else weight.dtype
    return torch.equal(stored.to(coarser), weight.to(coarser))
