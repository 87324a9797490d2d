"""What the readers and writers of every model format share.

`LoadedModel` is what loading any of them returns; `allocate_model` + `load_state_into` fill a model allocated
once in the requested dtype, tensor by tensor, so a large import never holds two copies; `save_file` writes
safetensors streamed tensor by tensor; `architecture_of` names the Hugging Face architecture that a model
directory made by `import hf` keeps beside its weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError, ConfigError
from ..config import ModelConfig
from ..transformer import Transformer, rope_inverse_frequencies

# architectures[0] in config.json -> the model_type transformers writes next to it. Each family comes as a language
# model (<Family>ForCausalLM, head=lm) and as a reward model (<Family>ForSequenceClassification with one label,
# head=score).
_LM_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_SCORE_SUFFIX, _LM_SUFFIX = "ForSequenceClassification", "ForCausalLM"
SUPPORTED_ARCHITECTURES = {
    **_LM_ARCHITECTURES,
    **{arch.removesuffix(_LM_SUFFIX) + _SCORE_SUFFIX: family for arch, family in _LM_ARCHITECTURES.items()},
}
_ARCH_BY_MODEL_TYPE = {v: k for k, v in _LM_ARCHITECTURES.items()}

HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ConfigError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[value]


def architecture_of(hf: dict[str, Any], where: Path | str = HF_CONFIG) -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else _ARCH_BY_MODEL_TYPE.get(hf.get("model_type", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        found = arch or hf.get("model_type") or "none given"
        raise CheckpointError(
            f"{where}: unsupported architecture {found!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def head_of(architecture: str) -> str:
    """The forgeline head a supported architecture has: "score" for a sequence classifier, else "lm"."""
    return "score" if architecture.endswith(_SCORE_SUFFIX) else "lm"


def architecture_with_head(architecture: str, head: str) -> str:
    """The same family's architecture with `head`: LlamaForCausalLM <-> LlamaForSequenceClassification."""
    stem = architecture.removesuffix(_SCORE_SUFFIX).removesuffix(_LM_SUFFIX)
    return stem + (_SCORE_SUFFIX if head == "score" else _LM_SUFFIX)


def read_json(path: Path, *, error: type[Exception] = CheckpointError) -> dict[str, Any]:
    """A JSON object file; `error` (naming the file) when it cannot be read, is not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


@dataclass
class LoadedModel:
    """A model ready for inference: weights, tokenizer (None if the checkpoint has none), generation defaults."""

    model: Transformer
    tokenizer: Any = None
    generation_config: dict[str, Any] = field(default_factory=dict)
    architecture: str | None = None
    hf_config: dict[str, Any] | None = None
    source: str = ""
    # How plain-text prompts get BOS: None = the tokenizer's own post-processor decides (Hugging Face and GGUF
    # models); True = prepend BOS (forgeline-trained models: documents are separated by EOS/BOS in pre-training).
    add_bos: bool | None = None


def allocate_model(cfg: ModelConfig, *, dtype: torch.dtype | None, device: str | torch.device = "cpu") -> Transformer:
    """A model whose weights are allocated (once, in `dtype`) but not initialised; the rotary table is fp32."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model = model.to_empty(device=device)
    if {name for name, _ in model.named_buffers()} - {"inv_freq"}:
        model.init_weights()  # buffers this loader does not know how to fill: let the model compute them (slower)
    fix_rope(model)
    if model.output is not None and cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def fix_rope(model: Transformer) -> Transformer:
    """Recompute the rotary inverse frequencies in fp32 (`model.to(bf16)` rounds the buffer)."""
    cfg = model.cfg
    model.inv_freq = rope_inverse_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling).to(
        model.inv_freq.device)
    return model


def load_state_into(model: Transformer, tensors: Iterator[tuple[str, torch.Tensor]], where: str) -> None:
    """Copy (name, tensor) pairs into the model's parameters; every parameter must be filled exactly once."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in tensors:
            if name not in params:
                raise CheckpointError(f"{where}: unexpected tensor {name!r} for this model")
            target = params[name]
            local = target.to_local() if hasattr(target, "to_local") else target  # DTensor: this rank's shard
            if tuple(local.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{where}: {name} has shape {list(tensor.shape)}, the model expects "
                                      f"{list(local.shape)}")
            local.copy_(tensor)
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def model_config_from(data: dict[str, Any], where: Path) -> ModelConfig:
    try:
        return ModelConfig.model_validate(data)
    except ValueError as exc:
        raise CheckpointError(f"{where}: invalid model config: {exc}") from None


def read_safetensors(path: Path, dtype, tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    with handle as f:
        for name in f.keys():
            if tied and name == "output.weight":
                continue
            try:
                tensor = f.get_tensor(name)
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot read {name} ({exc})") from None
            yield name, tensor.to(dtype) if dtype is not None else tensor


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file's format, streamed tensor by tensor.

    safetensors' own save_file first copies every tensor into Python bytes, so saving a model needs twice its
    size in memory; here each tensor's bytes go from its storage to the file (one tensor's copy at most, for a
    non-contiguous one).
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"cannot store dtype {t.dtype} in safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            t = t.detach().cpu().contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def describe(loaded: LoadedModel) -> str:
    cfg = loaded.model.cfg
    params = loaded.model.num_params()
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    arch = f"{loaded.architecture} " if loaded.architecture else ""
    if cfg.head == "score":
        arch += f"reward model (score head, pad_token_id {cfg.pad_token_id}), "
    tok = "no tokenizer" if loaded.tokenizer is None else f"tokenizer {loaded.tokenizer.vocab_size} tokens" + (
        ", chat template" if loaded.tokenizer.chat_template else "")
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    return (f"{arch}{size} parameters ({cfg.n_layers} layers, d {cfg.dim}, {cfg.n_heads}/{cfg.kv_heads} heads, "
            f"vocab {cfg.vocab_size}, context {cfg.max_seq_len}), {dtype}; {tok}")
