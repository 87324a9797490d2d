"""Reading an adapter directory back: the base it names (or the one given) loaded and checked against the
recorded hash, the adapter put on it unmerged. A directory from another tool (PEFT's `save_pretrained`) has no
forgeline_base.json: its base must be given, since PEFT configs name hub ids, not local files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .apply import BaseReference, base_fingerprint, check_base, read_base_reference


@dataclass
class AdaptedModel:
    model: nn.Module  # the base with the adapter on it, unmerged
    tokenizer: object | None
    method: str  # lora, dora, qlora or adapter
    base: BaseReference


def adapter_method(adapter_dir: Path) -> str:
    """lora / dora / adapter from adapter_config.json (qlora is only known from forgeline_base.json)."""
    from .lora import read_adapter_config

    config, file = read_adapter_config(adapter_dir)
    kind = config.get("peft_type")
    if kind == "FORGELINE_BOTTLENECK":
        return "adapter"
    if kind == "LORA":
        return "dora" if config.get("use_dora") else "lora"
    raise ConfigError(f"{file}: peft_type {kind!r} is not supported (LoRA and DoRA adapters, and forgeline's "
                      "bottleneck adapters, are)")


def load_adapter_dir(adapter_dir: str | Path, *, base: str | Path | None = None, device: torch.device | str = "cpu"
                     ) -> AdaptedModel:
    """The base (`base`, else the path forgeline_base.json records) in fp32 with the adapter on it."""
    from ..model.formats import load_model
    from ..tokenizer import Tokenizer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_dir} is not an adapter directory (no adapter_config.json)")
    ref = read_base_reference(adapter_dir)
    base_path = base if base is not None else (ref.path if ref else None)
    if base_path is None:
        raise ConfigError(f"{adapter_dir} does not say which local model it adapts (its adapter_config.json names "
                          "a hub id at most); give the base model (--base)")
    if not Path(base_path).exists():
        raise ConfigError(f"the base model {base_path} of {adapter_dir} does not exist; give its path (--base)")
    loaded = load_model(base_path, dtype=torch.float32, device=device)
    model = loaded.model.eval()
    fingerprint = base_fingerprint(model)
    if ref is not None:
        check_base(ref.sha256, fingerprint, what=str(adapter_dir), base=base_path)
    method = ref.method if ref is not None else adapter_method(adapter_dir)
    model.requires_grad_(False)
    if method == "adapter":
        from .bottleneck import load_bottleneck_adapter

        load_bottleneck_adapter(model, adapter_dir)
    else:
        from .lora import load_lora_adapter

        if method == "qlora":  # trained on the NF4 base: quantize it the same (deterministic) way again
            from .nf4 import quantize_linear_layers

            quantize_linear_layers(model, None, block_size=int(ref.peft.get("quant_block_size", 64)))
        load_lora_adapter(model, adapter_dir)
    model.requires_grad_(False)
    tokenizer = loaded.tokenizer
    if (adapter_dir / "tokenizer").is_dir():
        tokenizer = Tokenizer.load(adapter_dir / "tokenizer")
    reference = ref or BaseReference(path=str(base_path), sha256=fingerprint, method=method)
    if ref is None or base is not None:
        reference = BaseReference(path=str(base_path), sha256=fingerprint, method=method,
                                  peft=ref.peft if ref else {})
    return AdaptedModel(model=model, tokenizer=tokenizer, method=method, base=reference)
