"""Bottleneck adapters (Houlsby et al., 2019): a small trainable MLP after a frozen sublayer, inside its residual.

Each adapted sublayer (a block's attention, its feed-forward, or both) becomes

    h = sublayer(x);  out = h + up(act(down(dropout(h))))

down projects the model dimension to `size` and up projects back; up starts at zero (weight and bias), so the
adapted model starts as exactly the base model. Only down and up train: 2 * dim * size + size + dim parameters per
adapted sublayer. They are float32 master weights whatever the base's dtype (float64 with a float64 base).

Unlike LoRA, the nonlinearity between down and up means the adapter cannot be folded into the base's weights: a
model with bottleneck adapters keeps them at inference (`has_bottleneck` tells a merge step to refuse).

On disk (forgeline's own format; PEFT has no bottleneck adapters):
    adapter_config.json        {"peft_type": "FORGELINE_BOTTLENECK", "format_version": 1, "size": 64,
                                "dropout": 0.0, "positions": ["attention", "feed_forward"],
                                "base_model_name_or_path": "..."}
    adapter_model.safetensors  layers.<i>.<position>.down.weight (size, dim)   layers.<i>.<position>.down.bias (size)
                               layers.<i>.<position>.up.weight   (dim, size)   layers.<i>.<position>.up.bias   (dim)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_placement, check_adapter_tensors, clean_module_name,
                   read_adapter_config, read_adapter_tensors)

PEFT_TYPE = "FORGELINE_BOTTLENECK"
FORMAT_VERSION = 1
POSITIONS = ("attention", "feed_forward")


@dataclass
class BottleneckSettings:
    size: int = 64
    dropout: float = 0.0
    positions: tuple[str, ...] = POSITIONS

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ConfigError(f"peft.adapter_size must be a positive integer, got {self.size!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"peft.dropout must lie in [0, 1), got {self.dropout!r}")
        if isinstance(self.positions, str) or not all(isinstance(p, str) for p in self.positions):
            raise ConfigError(f"peft.adapter_positions must be a list of sublayer names, got {self.positions!r}")
        unknown = [p for p in self.positions if p not in POSITIONS]
        if unknown or not self.positions:
            raise ConfigError(f"peft.adapter_positions: {unknown or 'an empty list'} are not sublayers of a block; "
                              f"choose one or both of {', '.join(POSITIONS)}")
        self.positions = tuple(p for p in POSITIONS if p in self.positions)  # block order, no repeats


class BottleneckAdapter(nn.Module):
    """`base` (a frozen sublayer), then h + up(act(down(dropout(h)))) on its output h.

    Calls pass straight through (`forward(*args, **kwargs)`), so the block calls attention as before, KV cache
    included. Attribute lookups deliberately do not: `adapter.wq` is an AttributeError, the layer is `adapter.base.wq`.
    Code that reaches into a block's sublayers for their weights (the native CPU decode step reads
    `block.attention.wq.weight` and runs its own kernels) would otherwise find plain linear layers, take the model
    for an unadapted one and silently compute the base model's output; failing on the lookup is the loud outcome.
    """

    def __init__(self, base: nn.Module, dim: int, settings: BottleneckSettings):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.adapter_enabled = True  # off: the base sublayer alone (a DPO reference without a second model copy)
        device, dtype = adapter_placement(base)
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.down = nn.Linear(dim, settings.size, device=device, dtype=dtype)
        # Houlsby et al. only ask for a nonlinearity here (without one, down and up would collapse into one low-rank
        # linear map, LoRA on the sublayer's output). GELU: smooth, and nonzero-gradient around 0, where the
        # adapter's pre-activations start; the choice is recorded by this code, not in the saved config.
        self.act = nn.GELU()
        self.up = nn.Linear(settings.size, dim, device=device, dtype=dtype)
        with torch.no_grad():
            self.up.weight.zero_()  # up(...) = 0: the adapted sublayer starts as exactly the base
            self.up.bias.zero_()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        h = self.base(*args, **kwargs)
        if not self.adapter_enabled:
            return h
        # autocast casts the float32 adapter to its dtype; without it a lower-precision h is brought to the adapter's
        x = h if torch.is_autocast_enabled(h.device.type) else h.to(self.down.weight.dtype)
        return h + self.up(self.act(self.down(self.dropout(x)))).to(h.dtype)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors, by their names inside this module (down.weight, ...)."""
        return {f"{part}.{name}": p for part in ("down", "up") for name, p in getattr(self, part).named_parameters()}


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from ..model.transformer import TransformerBlock

    return [(clean_module_name(name), m) for name, m in model.named_modules() if isinstance(m, TransformerBlock)]


def _plan_bottleneck(model: nn.Module, settings: BottleneckSettings) -> tuple[int, list[tuple[nn.Module, str, str]]]:
    """The model dimension and the sublayers `apply_bottleneck` would wrap, as (block, position, name); raises
    ConfigError (and changes nothing) when the settings do not fit the model."""
    blocks = _blocks(model)
    if not blocks:
        raise ConfigError(f"bottleneck adapters go into transformer blocks, and {type(model).__name__} has none")
    dim = model.cfg.dim
    if settings.size > dim:
        raise ConfigError(f"peft.adapter_size={settings.size} is larger than the model's dim={dim}; a bottleneck "
                          "wider than the residual stream adds parameters and no capacity")
    if any(isinstance(getattr(block, p), BottleneckAdapter) for _, block in blocks for p in POSITIONS):
        raise ConfigError("this model already has bottleneck adapters; apply them once")
    return dim, [(block, p, f"{name}.{p}") for name, block in blocks for p in settings.positions]


def apply_bottleneck(model: nn.Module, settings: BottleneckSettings) -> list[str]:
    """Freeze every parameter of `model` and wrap the chosen sublayers of every block in a BottleneckAdapter, in
    place; returns the wrapped sublayers' names (layers.0.attention, ...). Run it before activation checkpointing
    and the parallel layout (DDP/FSDP2 then see the adapters as parameters)."""
    dim, planned = _plan_bottleneck(model, settings)
    model.requires_grad_(False)
    for block, position, _ in planned:
        sublayer = getattr(block, position)
        # in the sublayer's mode: adapters loaded onto a model in eval() must not start dropping out
        setattr(block, position, BottleneckAdapter(sublayer, dim, settings).train(sublayer.training))
    return [name for *_, name in planned]


def has_bottleneck(model: nn.Module) -> bool:
    """Whether `model` holds bottleneck adapters (which cannot be merged into its weights)."""
    return any(isinstance(m, BottleneckAdapter) for m in model.modules())


def bottleneck_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under their names in the model (layers.0.attention.down.weight, ...), without the
    segments activation checkpointing or torch.compile add."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BottleneckAdapter):
            prefix = clean_module_name(name)
            for key, p in module.adapter_parameters().items():
                out[f"{prefix}.{key}"] = p.detach().contiguous().cpu()
    return out


def save_bottleneck_adapter(model: nn.Module, settings: BottleneckSettings, out: str | Path, *, base: str = "",
                            overwrite: bool = False) -> Path:
    """`adapter_config.json` + `adapter_model.safetensors` (the format in this module's docstring), atomically."""
    from safetensors.torch import save_file

    from ..files import atomic_directory

    tensors = bottleneck_state_dict(model)
    if not tensors:
        raise ConfigError("this model has no bottleneck adapters to save")
    config = {"peft_type": PEFT_TYPE, "format_version": FORMAT_VERSION, "size": settings.size,
              "dropout": settings.dropout, "positions": list(settings.positions), "base_model_name_or_path": base}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return Path(out)


def load_bottleneck_adapter(model: nn.Module, adapter_dir: str | Path) -> BottleneckSettings:
    """Apply the bottleneck adapter saved in `adapter_dir` to `model` in place (freezing the base, as
    apply_bottleneck) and load its weights; returns its settings. Every tensor in the file must be one of the
    adapter's, with the shape this model needs, and every adapter tensor must be there; otherwise ConfigError naming
    the file and key, and the model is left unchanged."""
    config, config_path = read_adapter_config(adapter_dir)
    if config.get("peft_type") != PEFT_TYPE:
        hint = " (a PEFT LoRA adapter: load it with load_lora_adapter)" if config.get("peft_type") == "LORA" else ""
        raise ConfigError(f"{config_path}: peft_type is {config.get('peft_type')!r}, not {PEFT_TYPE!r}{hint}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{config_path}: format_version {config.get('format_version')!r}; this forgeline reads "
                          f"bottleneck adapters of format_version {FORMAT_VERSION}")
    positions = config.get("positions", list(POSITIONS))
    try:
        settings = BottleneckSettings(size=config.get("size"), dropout=config.get("dropout", 0.0),
                                      positions=tuple(positions) if isinstance(positions, list) else positions)
        dim, planned = _plan_bottleneck(model, settings)
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    tensors, weights_path = read_adapter_tensors(adapter_dir)

    size = settings.size
    part_shapes = {"down.weight": (size, dim), "down.bias": (size,), "up.weight": (dim, size), "up.bias": (dim,)}
    shapes = {f"{name}.{part}": shape for *_, name in planned for part, shape in part_shapes.items()}

    def why_unexpected(key: str) -> str:
        if any(key.startswith(f"{block}.{p}.") for block, _ in _blocks(model) for p in POSITIONS):
            return f"an adapter on a sublayer that adapter_config.json's positions {list(settings.positions)} leave out"
        return "not a tensor of a bottleneck adapter on this model"

    check_adapter_tensors(tensors, shapes, weights_path, why_unexpected=why_unexpected)
    apply_bottleneck(model, settings)
    adapters = {clean_module_name(n): m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}
    with torch.no_grad():
        for *_, name in planned:
            for part, p in adapters[name].adapter_parameters().items():
                p.copy_(tensors[f"{name}.{part}"])
    return settings
