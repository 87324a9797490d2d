"""The adapter step of model preparation: `peft:` in a stage config turns a loaded model into a frozen base with
trainable adapters, before the parallel layout wraps it (so DDP and FSDP2 see the adapters as the parameters that
train, and the model file holds no adapter code).

    lora     LoRA on the target projections (lora.py)
    dora     the same, with DoRA's learned magnitude per output row
    qlora    the block projections stored in 4-bit NF4 (nf4.py), LoRA on top
    adapter  bottleneck adapters after attention and after the MLP (bottleneck.py); they cannot be merged

The base is identified by a hash of its weights as loaded (format-independent: a model directory and its
Hugging Face export hash the same), which adapter checkpoints and adapter directories record, so that an adapter
is never resumed or loaded onto another base by mistake.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

BASE_FILE = "forgeline_base.json"  # beside adapter_config.json: which base an adapter directory belongs to


@dataclass
class PeftReport:
    """What the adapter step did: the figures the run prints and the benchmark reports."""

    method: str
    wrapped: list[str]
    trainable_params: int
    total_params: int
    base_sha256: str
    base_linear_bytes: int = 0  # the block projections' frozen weights as stored (NF4 data and scales for qlora)
    base_linear_bf16_bytes: int = 0  # the same weights in bf16
    embedding_bytes: int = 0  # token embedding and LM head as stored (never quantized), reported separately

    def describe(self) -> str:
        share = 100 * self.trainable_params / max(self.total_params, 1)
        text = (f"peft: {self.method} on {len(self.wrapped)} modules; {self.trainable_params:,} trainable of "
                f"{self.total_params:,} parameters ({share:.2f}%)")
        if self.base_linear_bf16_bytes:
            text += (f"; frozen block weights {self.base_linear_bytes / 2**20:.1f} MiB "
                     f"({100 * self.base_linear_bytes / self.base_linear_bf16_bytes:.0f}% of bf16)")
        return text


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the base's weights (names, dtypes, shapes and bytes in state-dict order), before any adapter."""
    from ..model.formats.model_dir import model_state_dict

    digest = hashlib.sha256()
    for name, tensor in model_state_dict(model).items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.numel():  # hashed through the buffer protocol: no copy of the weights
            digest.update(tensor.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def lora_settings(cfg) -> Any:
    from .lora import LoraSettings

    return LoraSettings(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.expanded_targets(),
                        use_rslora=cfg.use_rslora, use_dora=cfg.method == "dora")


def bottleneck_settings(cfg) -> Any:
    from .bottleneck import BottleneckSettings

    return BottleneckSettings(size=cfg.adapter_size, dropout=cfg.dropout)


def apply_peft(model: nn.Module, cfg, *, precision: str = "fp32", fingerprint: str | None = None) -> PeftReport:
    """Freeze `model` and add the adapters `cfg` (a PeftConfig) asks for, in place. `precision`: the run's; with
    bf16 the frozen block projections are stored in bf16 (`base_dtype: auto`), the bytes autocast would cast
    them to on every forward anyway, so the results are the same at half the memory. `fingerprint`: the base's
    hash when the caller already has it."""
    fingerprint = fingerprint or base_fingerprint(model)
    base_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        cfg.base_dtype, torch.bfloat16 if precision == "bf16" else torch.float32)
    if base_dtype == torch.bfloat16 and precision != "bf16" and cfg.method != "qlora":
        raise ConfigError("peft.base_dtype=bf16 needs train.precision=bf16 (an fp32 forward cannot take bf16 "
                          "weights); use base_dtype: auto")
    if cfg.method == "adapter":
        from .bottleneck import apply_bottleneck

        wrapped = apply_bottleneck(model, bottleneck_settings(cfg))
    else:
        from .lora import apply_lora

        if cfg.method == "qlora":
            from .nf4 import quantize_linear_layers

            model.requires_grad_(False)
            quantize_linear_layers(model, None, block_size=cfg.quant_block_size)
        wrapped = apply_lora(model, lora_settings(cfg))
    _store_frozen_linears(model, base_dtype)
    return _report(model, cfg.method, wrapped, fingerprint)


def _store_frozen_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """The frozen nn.Linear weights inside the blocks in `dtype` (quantized ones are not nn.Linear)."""
    layers = getattr(model, "layers", None)
    if layers is None or dtype == torch.float32:
        return
    for module in layers.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            module.to(dtype)


def _report(model: nn.Module, method: str, wrapped: list[str], fingerprint: str) -> PeftReport:
    from .nf4 import NF4Linear

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    stored = bf16 = 0
    for module in getattr(model, "layers", nn.Module()).modules():
        if isinstance(module, NF4Linear):
            total += module.in_features * module.out_features
            stored += module.quantized_bytes()
            bf16 += 2 * module.in_features * module.out_features
        elif isinstance(module, nn.Linear) and not module.weight.requires_grad:
            stored += module.weight.numel() * module.weight.element_size()
            bf16 += 2 * module.weight.numel()
    embedding = 0
    counted: set[int] = set()  # a tied head shares the embedding's tensor
    for name in ("tok_embeddings", "output"):
        sub = getattr(model, name, None)
        weight = getattr(getattr(sub, "base", sub), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.data_ptr() not in counted:
            counted.add(weight.data_ptr())
            embedding += weight.numel() * weight.element_size()
    return PeftReport(method=method, wrapped=wrapped, trainable_params=trainable, total_params=total,
                      base_sha256=fingerprint, base_linear_bytes=stored, base_linear_bf16_bytes=bf16,
                      embedding_bytes=embedding)


def has_adapters(model: nn.Module) -> bool:
    from .bottleneck import BottleneckAdapter
    from .lora import LoraLinear

    return any(isinstance(m, (LoraLinear, BottleneckAdapter)) for m in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the frozen base alone inside the block: with adapters on a frozen base, the base is the reference model
    that DPO and KTO compare against, so no second copy of the model is loaded."""
    from .bottleneck import BottleneckAdapter
    from .lora import LoraLinear

    layers = [m for m in model.modules() if isinstance(m, (LoraLinear, BottleneckAdapter))]
    if not layers:
        raise ConfigError("adapters_disabled: the model has no adapters")
    previous = [m.adapter_enabled for m in layers]
    for m in layers:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m, state in zip(layers, previous):
            m.adapter_enabled = state


def merge_adapters(model: nn.Module) -> int:
    """Fold LoRA / DoRA / QLoRA updates into plain linear layers (a QLoRA base is dequantized first), in place;
    returns how many layers were merged. Bottleneck adapters have a nonlinearity and cannot be folded in."""
    from .bottleneck import has_bottleneck
    from .lora import merge_lora

    if has_bottleneck(model):
        raise ConfigError("bottleneck adapters (peft.method: adapter) cannot be merged into the base weights (their "
                          "GELU sits between the two projections); use the adapter directory with its base "
                          "(forgeline generate and chat read it) instead of a merged model")
    count = merge_lora(model)
    from .nf4 import NF4Linear

    for parent in list(model.modules()):  # a qlora base projection no adapter targeted: dequantize it
        for child_name, child in list(parent.named_children()):
            if isinstance(child, NF4Linear):
                setattr(parent, child_name, _dense(child))
    model.requires_grad_(False)
    return count


def _dense(layer) -> nn.Linear:
    weight = layer.weight.float()
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias.float())
    return out


# -- adapter directories -----------------------------------------------------------------------------------------

@dataclass
class BaseReference:
    """The base an adapter belongs to: where it was loaded from (a hint) and its weights' hash (the check)."""

    path: str
    sha256: str
    method: str
    peft: dict[str, Any] = field(default_factory=dict)  # the run's peft: section (rebuilds a qlora base alike)


def write_base_reference(directory: Path, ref: BaseReference) -> None:
    (Path(directory) / BASE_FILE).write_text(json.dumps(asdict(ref), indent=1))


def read_base_reference(directory: Path) -> BaseReference | None:
    file = Path(directory) / BASE_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
        return BaseReference(path=str(data["path"]), sha256=str(data["sha256"]), method=str(data["method"]),
                             peft=dict(data.get("peft") or {}))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{file} is not a valid base reference ({exc})") from None


def check_base(expected_sha256: str, actual_sha256: str, *, what: str, base: str | Path) -> None:
    if expected_sha256 != actual_sha256:
        raise CheckpointError(f"{what} was trained on another base than {base} (its weights hash "
                              f"{actual_sha256[:12]}..., the adapter's base {expected_sha256[:12]}...); give the "
                              "base it was trained on")


def save_adapter(model: nn.Module, cfg, out: str | Path, *, base: BaseReference, tokenizer=None,
                 overwrite: bool = False) -> Path:
    """The adapter in the format others read: PEFT's for lora / dora / qlora (a qlora adapter loads onto the
    unquantized base, as PEFT's QLoRA adapters do), forgeline's for bottleneck adapters; beside it
    forgeline_base.json, the tokenizer (tokenizer/) and a manifest, all published in one rename."""
    from ..files import atomic_directory, write_manifest

    with atomic_directory(out, overwrite=overwrite, what="adapter directory") as tmp:
        inner = tmp / "adapter"  # the format writers publish a directory of their own: written inside, moved up
        if cfg.method == "adapter":
            from .bottleneck import save_bottleneck_adapter

            save_bottleneck_adapter(model, bottleneck_settings(cfg), inner, base=base.path)
        else:
            from .lora import save_lora_adapter

            save_lora_adapter(model, lora_settings(cfg), inner, base=base.path)
        for file in inner.iterdir():
            file.rename(tmp / file.name)
        inner.rmdir()
        write_base_reference(tmp, base)
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        write_manifest(tmp)
    return Path(out)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()
