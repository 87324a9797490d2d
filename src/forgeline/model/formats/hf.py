"""Hugging Face interop: import Llama / Mistral / Qwen2 checkpoints, export forgeline models.

Language models are `<Family>ForCausalLM`; reward models (head=score) are `<Family>ForSequenceClassification` with
one label, whose config's pad_token_id is the model's (the token transformers pools at is the rightmost that is not
the pad id, as forgeline's model/heads.py reads it).

Import reads ``config.json``, single-file or sharded safetensors (``model.safetensors.index.json``), the tokenizer
(``tokenizer.json`` + ``tokenizer_config.json`` with its chat template) and ``generation_config.json``. Weights are
read tensor by tensor from memory-mapped shards straight into a model allocated once in the requested dtype, so
a 7B import never holds two copies. ``select`` lets a distributed caller read only its own slice of each tensor
(``safe_open(...).get_slice``); nothing else is read from disk.

Export writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` (a reward model:
``AutoModelForSequenceClassification``) and ``AutoTokenizer.from_pretrained`` load without warnings, sharded past
``max_shard_size``, with the chat template.

Name mapping (forgeline <-> Hugging Face), identical for the three families:

    tok_embeddings                    model.embed_tokens
    layers.{i}.attention.w{q,k,v,o}   model.layers.{i}.self_attn.{q,k,v,o}_proj   (+ q/k/v bias for Qwen2)
    layers.{i}.attention_norm         model.layers.{i}.input_layernorm
    layers.{i}.feed_forward.w1/w3/w2  model.layers.{i}.mlp.gate_proj/up_proj/down_proj
    layers.{i}.ffn_norm               model.layers.{i}.post_attention_layernorm
    norm                              model.norm
    output                            lm_head (absent when tie_word_embeddings)
    score                             score (a reward model's head, in place of lm_head)

forgeline's rotary embedding uses the same half-split layout as transformers, so no weight is permuted.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError, ConfigError
from ...files import atomic_directory
from ..config import ModelConfig, RopeScaling
from ..transformer import Transformer
from .common import (
    GENERATION_CONFIG,
    HF_CONFIG,
    SUPPORTED_ARCHITECTURES,
    LoadedModel,
    allocate_model,
    architecture_of,
    architecture_with_head,
    head_of,
    load_state_into,
    parse_dtype,
    read_json,
    save_file,
)
from .model_dir import model_state_dict, save_imported

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Selector",
    "config_from_hf",
    "config_to_hf",
    "export_hf",
    "import_hf",
    "load_hf",
    "read_hf_state",
]

HF_INDEX = "model.safetensors.index.json"
HF_WEIGHTS = "model.safetensors"
# A per-parameter slice selector: (forgeline parameter name, full shape on disk) -> index into that tensor (a tuple
# of slices/ints, as for tensor[...]), or None to read it whole.
Selector = Callable[[str, tuple[int, ...]], "tuple | None"]

# ---------------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------------

_TO_FORGELINE = [
    (re.compile(r"^model\.embed_tokens\.weight$"), "tok_embeddings.weight"),
    (re.compile(r"^model\.norm\.weight$"), "norm.weight"),
    (re.compile(r"^lm_head\.weight$"), "output.weight"),
    (re.compile(r"^score\.weight$"), "score.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)$"), r"layers.\1.attention.w\2.\3"),
    (re.compile(r"^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$"), r"layers.\1.feed_forward.w1.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.mlp\.up_proj\.weight$"), r"layers.\1.feed_forward.w3.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.mlp\.down_proj\.weight$"), r"layers.\1.feed_forward.w2.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.input_layernorm\.weight$"), r"layers.\1.attention_norm.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$"), r"layers.\1.ffn_norm.weight"),
]
_TO_HF = [
    (re.compile(r"^tok_embeddings\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^norm\.weight$"), "model.norm.weight"),
    (re.compile(r"^output\.weight$"), "lm_head.weight"),
    (re.compile(r"^score\.weight$"), "score.weight"),
    (re.compile(r"^layers\.(\d+)\.attention\.w([qkvo])\.(weight|bias)$"), r"model.layers.\1.self_attn.\2_proj.\3"),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.w1\.weight$"), r"model.layers.\1.mlp.gate_proj.weight"),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.w3\.weight$"), r"model.layers.\1.mlp.up_proj.weight"),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.w2\.weight$"), r"model.layers.\1.mlp.down_proj.weight"),
    (re.compile(r"^layers\.(\d+)\.attention_norm\.weight$"), r"model.layers.\1.input_layernorm.weight"),
    (re.compile(r"^layers\.(\d+)\.ffn_norm\.weight$"), r"model.layers.\1.post_attention_layernorm.weight"),
]
# Buffers some older checkpoints carry; recomputed from the config, never loaded.
_IGNORED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def hf_to_forgeline_name(name: str) -> str | None:
    for pattern, repl in _TO_FORGELINE:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return None


def forgeline_to_hf_name(name: str) -> str:
    for pattern, repl in _TO_HF:
        if pattern.match(name):
            return pattern.sub(repl, name)
    raise CheckpointError(f"forgeline parameter {name!r} has no Hugging Face name")


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------


def _rope_settings(hf: dict[str, Any], where: Path | str) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from either transformers 4 keys (rope_theta + rope_scaling) or 5 (rope_parameters)."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", params.get("type", "default")) != "default":
            scaling = params
    if theta is None:
        theta = 10000.0
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise CheckpointError(f"{where}: rope scaling type {kind!r} is not supported (supported: none, 'llama3')")
    try:
        rs = RopeScaling(
            factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_seq_len=scaling["original_max_position_embeddings"],
        )
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid llama3 rope scaling {scaling}: {exc}") from None
    return float(theta), rs


def config_from_hf(hf: dict[str, Any], where: Path | str = HF_CONFIG) -> tuple[ModelConfig, str]:
    """ModelConfig and architecture name for a transformers config.json dict; unsupported features are errors."""
    arch = architecture_of(hf, where)
    family = SUPPORTED_ARCHITECTURES[arch]
    head = head_of(arch)
    if head == "score":
        labels = _num_labels(hf)
        if labels != 1:
            raise CheckpointError(f"{where}: {arch} with {labels} labels; a forgeline reward model has one (a score)")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (forgeline's MLP is SwiGLU)")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")
    if family == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v biases and none on o_proj
    else:
        if hf.get("attention_bias"):
            raise CheckpointError(f"{where}: attention_bias=true (a bias on o_proj too) is not supported")
        qkv_bias = False
    theta, scaling = _rope_settings(hf, where)
    max_len = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    if window and (family == "mistral" or hf.get("use_sliding_window")) and window < max_len:
        # forgeline has no sliding-window attention; up to the window length it is exactly full attention.
        logger.warning("%s: sliding_window=%d; the context is limited to %d tokens, where attention is exact",
                       where, window, window)
        max_len = int(window)
    try:
        n_heads = int(hf["num_attention_heads"])
        dim = int(hf["hidden_size"])
        cfg = ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            dim=dim,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=None if int(hf.get("head_dim") or dim // n_heads) * n_heads == dim else int(hf["head_dim"]),
            ffn_dim=int(hf["intermediate_size"]),
            max_seq_len=max_len,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=qkv_bias,
            # a sequence classifier has no lm_head, whatever tie_word_embeddings it kept from its base model
            tie_embeddings=head == "lm" and bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
            head=head,
            pad_token_id=_pad_token_id(hf) if head == "score" else None,
        )
    except KeyError as exc:
        raise CheckpointError(f"{where}: missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: invalid config: {exc}") from None
    return cfg, arch


def _num_labels(hf: dict[str, Any]) -> int:
    """How many outputs a sequence classifier's config declares: its id2label (what transformers writes), else
    num_labels, else transformers' default of 2."""
    if isinstance(hf.get("id2label"), dict):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))


def _pad_token_id(hf: dict[str, Any]) -> int | None:
    """A sequence classifier's pad_token_id: the id its score is pooled by (None: the last position)."""
    pad = hf.get("pad_token_id")
    if pad is not None and not isinstance(pad, int):
        raise CheckpointError(f"pad_token_id {pad!r}: a reward model pools by one pad id")
    return pad


def default_architecture(cfg: ModelConfig) -> str:
    return architecture_with_head("Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM", cfg.head)


def config_to_hf(
    cfg: ModelConfig,
    *,
    architecture: str | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer=None,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A transformers config.json dict. `base` (the original config of an imported model) supplies the fields
    forgeline does not model; every shape field is rewritten from `cfg`. The architecture follows the model's head:
    a reward model exports as its family's ForSequenceClassification whether `architecture` or `base` names the
    family's ForCausalLM (a reward model trained from an imported LM) or the classifier itself."""
    arch = architecture or (architecture_of(base) if base else default_architecture(cfg))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"cannot export as {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    arch = architecture_with_head(arch, cfg.head)
    family = SUPPORTED_ARCHITECTURES[arch]
    if family == "qwen2" and not cfg.qkv_bias:
        raise ConfigError(f"{arch} has q/k/v biases; this model has none (export as a Llama architecture)")
    if family != "qwen2" and cfg.qkv_bias:
        raise ConfigError(f"{arch} has no q/k/v-only biases; a model with qkv_bias exports as a Qwen2 architecture")
    out: dict[str, Any] = {}
    if base and architecture_with_head(architecture_of(base), cfg.head) == arch:
        out.update({k: v for k, v in base.items() if k not in ("rope_scaling", "rope_parameters", "rope_theta",
                                                                  "transformers_version", "torch_dtype", "dtype",
                                                                  "id2label", "label2id", "num_labels")})
    rope_scaling = None
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                        "high_freq_factor": rs.high_freq_factor,
                        "original_max_position_embeddings": rs.original_max_seq_len}
    out.update({
        "architectures": [arch],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    })
    if not (base and architecture_of(base) == arch and out.get("sliding_window")):
        out["max_position_embeddings"] = cfg.max_seq_len
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if family == "mistral":
        out.setdefault("sliding_window", None)
    if family == "qwen2":
        out.setdefault("use_sliding_window", False)
        out.setdefault("sliding_window", None)
        out.setdefault("max_window_layers", cfg.n_layers)
        out.pop("layer_types", None)
    if tokenizer is not None:
        out["bos_token_id"] = tokenizer.bos_id
        out["eos_token_id"] = tokenizer.eos_id
        out["pad_token_id"] = tokenizer.pad_id if tokenizer.pad_token is not None else None
    if cfg.head == "score":
        # One label, written as transformers writes it; the pad id is the one the score is pooled by, not the
        # tokenizer's (transformers reads the pooled token from config.pad_token_id alone).
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=cfg.pad_token_id)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reading weights
# ---------------------------------------------------------------------------------------------------------------


def _weight_files(directory: Path) -> dict[str, list[str] | None]:
    """{shard file: tensor names listed for it by the index, or None (all of a single file)}."""
    index = directory / HF_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        for file in files:
            if not (directory / file).is_file():
                raise CheckpointError(f"{index} names shard {file}, which is missing")
        return dict(sorted(files.items()))
    if (directory / HF_WEIGHTS).is_file():
        return {HF_WEIGHTS: None}
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pth"))
    hint = f" (found {others[0]}: pickle checkpoints are not read; convert them to safetensors)" if others else ""
    raise CheckpointError(f"{directory}: no {HF_WEIGHTS} or {HF_INDEX}{hint}")


def read_hf_state(
    directory: str | Path,
    *,
    select: Selector | None = None,
    dtype: torch.dtype | None = None,
    expected_shapes: dict[str, tuple[int, ...]] | None = None,
    tied: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (forgeline name, tensor) one tensor at a time, shard after shard.

    `select(name, full_shape)` returns the index of the part to read (e.g. this rank's rows), read with
    safetensors' get_slice so that nothing else leaves the disk. `expected_shapes` (full shapes by forgeline name)
    are checked before any data is read. A tied model skips lm_head.weight when a checkpoint carries it anyway.
    """
    from safetensors import safe_open

    directory = Path(directory)
    for file, listed in _weight_files(directory).items():
        path = directory / file
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # SafetensorError and OSError alike: truncated or not safetensors
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        with handle as f:
            names = list(f.keys())
            if listed is not None and set(listed) - set(names):
                missing = sorted(set(listed) - set(names))
                raise CheckpointError(f"{path}: tensors listed in {HF_INDEX} are missing: {missing[:5]}")
            for hf_name in names:
                if listed is not None and hf_name not in listed:
                    continue
                if _IGNORED_HF.search(hf_name):
                    continue
                name = hf_to_forgeline_name(hf_name)
                if name is None:
                    raise CheckpointError(f"{path}: unexpected tensor {hf_name!r} (not part of a supported "
                                          "Llama/Mistral/Qwen2 layout)")
                if tied and name == "output.weight":
                    continue
                try:
                    sl = f.get_slice(hf_name)
                    shape = tuple(sl.get_shape())
                    if expected_shapes is not None:
                        if name not in expected_shapes:
                            raise CheckpointError(f"{path}: unexpected tensor {hf_name!r} for this config")
                        if tuple(expected_shapes[name]) != shape:
                            raise CheckpointError(
                                f"{path}: {hf_name} has shape {list(shape)}, but config.json implies "
                                f"{list(expected_shapes[name])}")
                    index = select(name, shape) if select is not None else None
                    tensor = sl[index] if index is not None else f.get_tensor(hf_name)
                except CheckpointError:
                    raise
                except Exception as exc:
                    raise CheckpointError(f"{path}: cannot read {hf_name} ({exc})") from None
                if dtype is not None and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                yield name, tensor


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _load_tokenizer(directory: Path):
    from ...tokenizer import Tokenizer

    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer.model").is_file():
        return Tokenizer.load(directory)
    logger.warning("%s has no tokenizer.json: the model is loaded without a tokenizer", directory)
    return None


def load_hf(
    directory: str | Path,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    device: str | torch.device = "cpu",
    select: Selector | None = None,
    model: Transformer | None = None,
    load_tokenizer: bool = True,
) -> LoadedModel:
    """Load a Hugging Face Llama / Mistral / Qwen2 directory.

    dtype: the weights' dtype in memory (default fp32, the safe choice on CPU; None is fp32 too).
    select/model: a distributed caller builds its own (e.g. tensor-parallel) `model` whose parameters have the
    local shapes, and passes `select` giving each parameter's slice of the full tensor.
    """
    directory = Path(directory)
    dtype = parse_dtype(dtype)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    if not (directory / HF_CONFIG).is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face checkpoint: {HF_CONFIG} is missing")
    hf = read_json(directory / HF_CONFIG)
    cfg, arch = config_from_hf(hf, directory / HF_CONFIG)
    files = _weight_files(directory)  # fail on missing weights before allocating anything
    del files
    tokenizer = _load_tokenizer(directory) if load_tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens, more than the "
                              f"model's vocab_size={cfg.vocab_size}")
    if model is None:
        model = allocate_model(cfg, dtype=dtype, device=device)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    else:
        shapes = None  # the caller's model may hold local shards; full shapes are checked by the selector's caller
    load_state_into(
        model,
        read_hf_state(directory, select=select, dtype=dtype, expected_shapes=shapes, tied=cfg.tie_embeddings),
        str(directory),
    )
    model.eval()
    gen = read_json(directory / GENERATION_CONFIG) if (directory / GENERATION_CONFIG).is_file() else {}
    return LoadedModel(model=model, tokenizer=tokenizer, generation_config=gen, architecture=arch, hf_config=hf,
                       source=str(directory))


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", value.upper())
    if not m:
        raise ConfigError(f"cannot read size {value!r}; write e.g. 5GB, 500MB or a byte count")
    unit = m.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def write_hf_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_size: int) -> None:
    """model.safetensors, or model-0000i-of-0000N.safetensors + index when the total exceeds max_shard_size."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / HF_WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    (directory / HF_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _generation_config(tokenizer, base: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(base or {})
    out.pop("transformers_version", None)
    if tokenizer is not None:
        out.setdefault("bos_token_id", tokenizer.bos_id)
        out.setdefault("eos_token_id", tokenizer.eos_id)
        if tokenizer.pad_token is not None:
            out.setdefault("pad_token_id", tokenizer.pad_id)
    return out


def export_hf(
    source: str | Path | Transformer | LoadedModel,
    out: str | Path,
    *,
    tokenizer=None,
    architecture: str | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write a transformers-loadable directory for a run dir, checkpoint, forgeline model dir or in-memory model.

    dtype: the stored dtype (default: the model's). Written into a temp dir beside `out` and renamed into place.
    """
    out = Path(out)
    dtype = parse_dtype(dtype)
    if isinstance(source, Transformer):
        loaded = LoadedModel(model=source, tokenizer=tokenizer)
    elif isinstance(source, LoadedModel):
        loaded = source
    else:
        src = Path(source)
        if src.is_file():
            raise CheckpointError(f"{src}: export hf takes a run dir, a checkpoint dir or a forgeline model dir")
        from .load import load_model  # load.py reads every format, this one included

        loaded = load_model(src, dtype=None)
    if tokenizer is not None:
        loaded.tokenizer = tokenizer
    model = loaded.model
    cfg = model.cfg
    if loaded.tokenizer is None:
        raise CheckpointError(f"{loaded.source or 'the model'}: no tokenizer found to export with it (pass "
                              "tokenizer= / --tokenizer DIR)")
    if loaded.tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"the tokenizer has {loaded.tokenizer.vocab_size} tokens, more than the model's "
                              f"vocab_size={cfg.vocab_size}")
    if cfg.head == "score" and loaded.tokenizer.pad_token is not None and loaded.tokenizer.pad_id != cfg.pad_token_id:
        logger.warning("the tokenizer pads with id %d, the reward model's pad_token_id is %s: batches padded by "
                       "this tokenizer are read at a padding token", loaded.tokenizer.pad_id, cfg.pad_token_id)
    state = {}
    for name, tensor in model_state_dict(model).items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        state[forgeline_to_hf_name(name)] = tensor.to(dtype) if dtype is not None else tensor
    stored = dtype or next(iter(state.values())).dtype
    hf_config = config_to_hf(cfg, architecture=architecture, dtype=stored, tokenizer=loaded.tokenizer,
                             base=loaded.hf_config)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_hf_weights(state, tmp, parse_size(max_shard_size))
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        gen = _generation_config(loaded.tokenizer, loaded.generation_config) if cfg.head == "lm" else None
        if gen:  # a reward model does not generate: no generation defaults
            (tmp / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
        loaded.tokenizer.save(tmp)
    return out


def import_hf(source: str | Path, out: str | Path, *, dtype: torch.dtype | str | None = torch.float32,
              overwrite: bool = False) -> Path:
    """`forgeline import hf`: a Hugging Face directory -> a forgeline model directory."""
    return save_imported(load_hf(source, dtype=dtype), out, overwrite=overwrite)
