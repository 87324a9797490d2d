"""Trained models as inference and export read them: a whole model, or a base with the adapters a `peft:` run
trained on it (or another tool saved for it).

    model, tokenizer, info = load_trained_model(source, base=None)   the adapters unmerged, on an fp32 base
    decoding_model(model)        what generation runs: the one place that merges adapters for decoding or keeps them
    merge_to_model_dir(...)      `forgeline merge`: the merged whole model as a model directory
    export_merged_hf(...)        `forgeline export hf` of an adapter source: the merged model in Hugging Face format
    export_adapter(...)          `forgeline export hf --adapter-only`: the adapter in PEFT's format
    import_peft_adapter(...)     `forgeline import peft`: a PEFT adapter onto a local base, as an adapter directory

What `source` may be (find_adapters decides, reading a few small files, loading nothing):

    an adapter directory          adapter_config.json: a run's `adapter/`, `forgeline import peft`'s output, or a
                                  PEFT `save_pretrained` directory (its base must then be given: `base`)
    a checkpoint of a peft run    trainer_state.json says its weights are the trainable ones only and names the base
                                  (path, sha256); config.yaml has the run's `peft:` and `init:`
    a run dir                     its final output first, as load_model reads `model/` before any checkpoint:
                                  `model/` (a whole model), else `adapter/`, else its newest intact checkpoint
    anything else                 whatever forgeline.model.formats.load_model reads: a whole model, no adapters

The base is `base` when given, else the one the source records (forgeline_base.json, or the checkpoint's `init:`);
either way its weights' hash must be the one the adapters were trained on (a CheckpointError naming both hashes
otherwise). Adapted models load in float32: a merge into a lower precision would round the update twice.

Decoding: the native CPU decode step (forgeline.model.decode.NativeDecoder) reads the projections' weight tensors
and runs a block's arithmetic itself, so it cannot run a LoRA wrapper (it then leaves the step to torch) nor a
bottleneck adapter wrapped around a sublayer (it would skip the adapter; it refuses such a model too).
`decoding_model` therefore merges LoRA / DoRA / QLoRA adapters into the weights (exact up to rounding, and the
kernels then run) and keeps bottleneck adapters, which cannot be merged, on the PyTorch forward; either way it says
so in one line.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, ForgelineError
from ..model.formats import LoadedModel, load_model
from ..model.formats.checkpoint import (
    DCP_DIR,
    DEEPSPEED_DIR,
    check_dcp_keys,
    find_run_tokenizer,
    is_adapter_checkpoint,
    is_sharded_checkpoint,
    list_checkpoints,
    looks_like_checkpoint,
    one_line,
    print_stderr,
    resolve_checkpoint_source,
    verify_checkpoint,
)
from ..model.formats.common import GENERATION_CONFIG, HF_CONFIG, architecture_of, fix_rope, parse_dtype, read_json
from ..model.formats.model_dir import (
    IMPORT_INFO,
    SOURCE_HF_CONFIG,
    WEIGHTS_NAME,
    is_model_dir,
    load_model_state,
)
from ..peft.apply import is_adapter_dir

__all__ = ["AdapterSource", "TrainedModelInfo", "decoding_model", "export_adapter", "export_merged_hf",
           "find_adapters", "import_peft_adapter", "load_for_generation", "load_trained_model", "merge_to_model_dir"]

ADAPTER_RUN_DIR = "adapter"  # where a peft run writes its final adapter directory (Run.finish)


@dataclass(frozen=True)
class AdapterSource:
    kind: str  # "adapter_dir" or "checkpoint"
    path: Path


@dataclass
class TrainedModelInfo:
    """What came with a trained model besides its weights and tokenizer."""

    source: str
    method: str | None = None  # lora, dora, qlora or adapter; None: a whole model
    base: Any = None  # forgeline.peft.apply.BaseReference of the adapters' base (its path and hash)
    peft: Any = None  # the adapters' settings as a PeftConfig (None for a whole model)
    generation_config: dict[str, Any] = field(default_factory=dict)  # the base's (a whole model's own)
    generation_eos: list[str] = field(default_factory=list)  # the chat template's end of turn, for the merged model
    hf_config: dict[str, Any] | None = None  # an imported base's Hugging Face config (architecture and extras)
    architecture: str | None = None
    add_bos: bool | None = None  # as load_model says for the base (see LoadedModel)

    @property
    def has_adapters(self) -> bool:
        return self.method is not None

    def loaded(self, model: nn.Module, tokenizer) -> LoadedModel:
        """The model as a LoadedModel (what generate, chat and the Hugging Face exporter take), its generation
        config with the end-of-turn token among the EOS ids, as the merged model directory will have it."""
        gen = self.generation_config
        if self.generation_eos and tokenizer is not None:
            from ..model.formats.model_dir import _generation_config

            gen = _generation_config(tokenizer, gen, self.generation_eos)
        return LoadedModel(model=model, tokenizer=tokenizer, generation_config=dict(gen),
                           architecture=self.architecture, hf_config=self.hf_config, source=self.source,
                           add_bos=self.add_bos)


# ---------------------------------------------------------------------------------------------------------------
# finding and loading
# ---------------------------------------------------------------------------------------------------------------


def find_adapters(source: str | Path) -> AdapterSource | None:
    """Where the adapters of `source` are, or None when it is a whole model (see the module docstring). A run dir's
    checkpoints are those of one run, all adapters or none: any one of them tells; the newest intact one is read."""
    path = Path(source)
    if not path.is_dir():
        return None
    if is_adapter_dir(path):
        return AdapterSource("adapter_dir", path)
    if looks_like_checkpoint(path):
        return AdapterSource("checkpoint", path) if is_adapter_checkpoint(path) else None
    if is_model_dir(path) or (path / HF_CONFIG).is_file() or is_model_dir(path / "model"):
        return None
    if is_adapter_dir(path / ADAPTER_RUN_DIR):
        return AdapterSource("adapter_dir", path / ADAPTER_RUN_DIR)
    if any(is_adapter_checkpoint(c) for c in list_checkpoints(path / "checkpoints")):
        return AdapterSource("checkpoint", resolve_checkpoint_source(path))
    return None


def load_trained_model(source: str | Path | AdapterSource, *, base: str | Path | None = None,
                       device: torch.device | str = "cpu", dtype: torch.dtype | str | None = torch.float32
                       ) -> tuple[nn.Module, Any, TrainedModelInfo]:
    """(model, tokenizer, info) of `source`. Adapters stay unmerged on a float32 base (`dtype` applies to whole
    models; decoding_model casts an adapted one after merging). `base`: the adapters' base model (needed for a
    PEFT directory from another tool; else it overrides the recorded path, its hash checked alike)."""
    found = source if isinstance(source, AdapterSource) else find_adapters(source)
    if found is None:
        if base is not None:
            raise ConfigError(f"--base is the base model of adapters, and {source} holds none: it is a whole model "
                              "(not an adapter directory, nor a run or checkpoint trained with peft:)")
        loaded = load_model(source, dtype=dtype, device=device)
        info = TrainedModelInfo(source=loaded.source or str(source), generation_config=loaded.generation_config,
                                hf_config=loaded.hf_config, architecture=loaded.architecture, add_bos=loaded.add_bos)
        return loaded.model, loaded.tokenizer, info
    if found.kind == "adapter_dir":
        return _load_adapter_dir(found.path, base, device)
    return _load_adapter_checkpoint(found.path, base, device)


def _load_adapter_dir(path: Path, base, device) -> tuple[nn.Module, Any, TrainedModelInfo]:
    from ..peft.load import load_adapter_dir

    adapted = load_adapter_dir(path, base=base, device=device)
    gen, hf, add_bos = _base_metadata(Path(adapted.base.path))
    info = TrainedModelInfo(source=str(path), method=adapted.method, base=adapted.base,
                            peft=_adapter_dir_peft_config(path, adapted.method, adapted.base.peft),
                            generation_config=gen, generation_eos=end_of_turn_tokens(adapted.tokenizer),
                            hf_config=hf, architecture=architecture_of(hf) if hf else None, add_bos=add_bos)
    return adapted.model.eval(), adapted.tokenizer, info


def _load_adapter_checkpoint(ckpt: Path, base, device) -> tuple[nn.Module, Any, TrainedModelInfo]:
    from ..config import PeftConfig, read_yaml
    from ..peft.apply import BaseReference, apply_peft, base_fingerprint, check_base

    run_cfg = read_yaml(ckpt / "config.yaml")
    peft = run_cfg.get("peft")
    if not isinstance(peft, dict):
        raise CheckpointError(f"{ckpt / 'config.yaml'} has no peft: section, but its trainer_state.json says the "
                              "checkpoint holds adapter weights only")
    saved = _read_state(ckpt).get("base")
    saved = saved if isinstance(saved, dict) else {}
    base_path = base if base is not None else (run_cfg.get("init") or saved.get("path"))
    if not base_path:
        raise ConfigError(f"{ckpt} does not say which model its adapters belong to (no init:); give the base "
                          "model (--base)")
    if not Path(base_path).exists():
        raise ConfigError(f"the base model {base_path} of {ckpt} does not exist; give its path (--base)")
    try:
        peft_cfg = PeftConfig(**peft)
    except ValueError as exc:
        raise CheckpointError(f"{ckpt / 'config.yaml'}: invalid peft: section ({one_line(exc)})") from None
    verify_checkpoint(ckpt)  # before the base is loaded: a damaged checkpoint costs no loading time
    loaded = load_model(base_path, dtype=torch.float32, device=device)
    model = loaded.model.eval()
    fingerprint = base_fingerprint(model)
    if saved.get("sha256"):
        check_base(str(saved["sha256"]), fingerprint, what=str(ckpt), base=base_path)
    # as the run applied them, with the frozen base kept in float32 (a bf16 run stored it in bf16 only to save
    # memory: autocast computed in bf16 from either)
    apply_peft(model, peft_cfg.model_copy(update={"base_dtype": "fp32"}), precision="fp32", fingerprint=fingerprint)
    if (ckpt / WEIGHTS_NAME).is_file():
        load_model_state(model, ckpt / WEIGHTS_NAME, trainable_only=True)
    elif is_sharded_checkpoint(ckpt):
        _load_dcp_trainable(ckpt, model)
    elif (ckpt / DEEPSPEED_DIR).is_dir():
        raise CheckpointError(f"{ckpt} is a DeepSpeed checkpoint; adapter runs do not use that backend")
    else:
        raise CheckpointError(f"{ckpt} is an incomplete checkpoint: no model.safetensors or sharded dcp/ weights")
    model.requires_grad_(False).eval()
    tokenizer = find_run_tokenizer(ckpt) or loaded.tokenizer
    ref = BaseReference(path=str(base_path), sha256=fingerprint, method=peft_cfg.method,
                        peft=peft_cfg.model_dump(mode="json"))
    info = TrainedModelInfo(source=str(ckpt), method=peft_cfg.method, base=ref, peft=peft_cfg,
                            generation_config=dict(loaded.generation_config),
                            generation_eos=end_of_turn_tokens(tokenizer), hf_config=loaded.hf_config,
                            architecture=loaded.architecture, add_bos=loaded.add_bos)
    return model, tokenizer, info


def _read_state(ckpt: Path) -> dict[str, Any]:
    file = ckpt / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot read it ({one_line(exc)})") from None
    return state if isinstance(state, dict) else {}


def _load_dcp_trainable(ckpt: Path, model: nn.Module) -> None:
    """The trained weights of a sharded (DCP) checkpoint of an adapter run, read into this one-process model (its
    DCP holds the trainable weights only, under the model's own names)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    check_dcp_keys(ckpt, state, "model")
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load({"model": state}, checkpoint_id=str(ckpt / DCP_DIR), no_dist=True)
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(f"{ckpt}: cannot read the sharded checkpoint in dcp/ ({one_line(exc)})") from None


def _base_metadata(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None, bool | None]:
    """(generation config, Hugging Face config, add_bos) of the base at `path`, as load_model gives them, read from
    its small files (the adapter directory loader keeps only the weights and the tokenizer)."""
    if path.is_dir() and not is_model_dir(path) and not (path / HF_CONFIG).is_file() and is_model_dir(path / "model"):
        path = path / "model"  # a run dir: its final model
    gen = read_json(path / GENERATION_CONFIG) if (path / GENERATION_CONFIG).is_file() else {}
    if is_model_dir(path):  # read_model_dir's rule: an imported model keeps its tokenizer's own BOS rule
        from ..files import MANIFEST_NAME

        hf = read_json(path / SOURCE_HF_CONFIG) if (path / SOURCE_HF_CONFIG).is_file() else None
        imported = ((path / IMPORT_INFO).is_file() or hf is not None
                    or bool(gen and not (path / MANIFEST_NAME).is_file()))
        return gen, hf, None if imported else True
    if (path / HF_CONFIG).is_file():
        return gen, read_json(path / HF_CONFIG), None
    if path.is_file():  # a GGUF file
        return {}, None, None
    return {}, None, True  # a checkpoint or run dir: trained here


def _adapter_dir_peft_config(path: Path, method: str, recorded: dict[str, Any]):
    """The adapter's settings as a PeftConfig: the run's peft: section when forgeline_base.json records it, else
    read from a LoRA adapter_config.json (None for bottleneck adapters without a record)."""
    from ..config import PeftConfig

    if recorded:
        try:
            return PeftConfig(**recorded)
        except ValueError as exc:
            raise ConfigError(f"{path / 'forgeline_base.json'}: invalid peft settings ({one_line(exc)})") from None
    if method == "adapter":
        return None
    from ..peft.lora import lora_settings_from_peft, read_adapter_config

    config, where = read_adapter_config(path)
    s = lora_settings_from_peft(config, where)
    return PeftConfig(method="dora" if s.use_dora else "lora", r=s.r, alpha=s.alpha, dropout=s.dropout,
                      target_modules=list(s.target_modules), use_rslora=s.use_rslora)


def end_of_turn_tokens(tokenizer) -> list[str]:
    """The chat template's end-of-turn token, which an SFT run makes an EOS of its model's generation config (so
    generation stops where a turn ends); [] without a template, or for one whose end of turn cannot be found."""
    if tokenizer is None or not tokenizer.chat_template:
        return []
    from ..data.chat_templates import load_chat_template

    try:
        return [load_chat_template(tokenizer, "model").end_of_turn]
    except ForgelineError:
        return []


# ---------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------


def decoding_model(model: nn.Module, *, dtype: torch.dtype | str | None = None, inplace: bool = False,
                   report: Callable[[str], None] | None = print_stderr) -> nn.Module:
    """The model generation should decode with, and the one place that decides it for adapted models:

    LoRA / DoRA / QLoRA  merged into the weights (of a copy unless `inplace`): the same function, so the same
                         tokens up to rounding, and the native decode kernels run it (they cannot run the wrappers)
    bottleneck adapters  kept (they cannot be merged); the decode kernels leave such a model to its PyTorch forward,
                         which computes them

    `report` gets one line saying which, for adapted models only. `dtype`: cast after merging (a bf16 update
    merged into bf16 weights would be rounded twice)."""
    from ..peft.apply import has_adapters, merge_adapters
    from ..peft.bottleneck import has_bottleneck

    if has_adapters(model):
        if has_bottleneck(model):
            if report is not None:
                report("forgeline: note: bottleneck adapters cannot be merged into the weights; decoding runs the "
                       "model's PyTorch forward with them (slower than the native decode kernels)")
        else:
            if not inplace:
                model = copy.deepcopy(model)
            merged = merge_adapters(model)
            if report is not None:
                report(f"forgeline: note: adapter merged into the weights for decoding ({merged} layers)")
    dtype = parse_dtype(dtype)
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        model = fix_rope(model.to(dtype))  # the cast rounds the rotary table, which fix_rope recomputes
    return model.eval()


def load_for_generation(source: str | Path, *, base: str | Path | None = None,
                        dtype: torch.dtype | str | None = torch.float32, device: torch.device | str = "cpu",
                        report: Callable[[str], None] | None = print_stderr) -> LoadedModel:
    """`forgeline generate` / `chat`: any trained model, adapted ones included, ready to decode."""
    model, tokenizer, info = load_trained_model(source, base=base, device=device, dtype=dtype)
    return info.loaded(decoding_model(model, dtype=dtype, inplace=True, report=report), tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# merge, export, import
# ---------------------------------------------------------------------------------------------------------------


def _adapters_of(source: str | Path | AdapterSource, command: str) -> AdapterSource:
    if isinstance(source, AdapterSource):
        return source
    found = find_adapters(source)
    if found is None:
        raise ConfigError(f"{source} holds no adapters (it is not an adapter directory, nor a run or checkpoint "
                          f"trained with peft:); {command} takes one")
    return found


def merge_to_model_dir(source: str | Path | AdapterSource, out: str | Path, *, base: str | Path | None = None,
                       overwrite: bool = False) -> tuple[Path, TrainedModelInfo, int]:
    """`forgeline merge`: the adapters folded into their base, written as a model directory with the tokenizer and
    the generation config a fully fine-tuned model of the same run would have (the base's, the chat template's end
    of turn among its EOS ids), and an imported base's Hugging Face config (so `export hf` restores its
    architecture). Bottleneck adapters cannot be merged: merge_adapters' ConfigError."""
    from ..files import check_target
    from ..model.formats.model_dir import save_model_dir
    from ..peft.apply import merge_adapters

    check_target(Path(out), overwrite=overwrite, what="model directory")  # before minutes of loading
    model, tokenizer, info = load_trained_model(_adapters_of(source, "forgeline merge"), base=base)
    merged = merge_adapters(model)
    save_model_dir(model, tokenizer, out, overwrite=overwrite, generation_eos=info.generation_eos or None,
                   generation_config=info.generation_config, hf_config=info.hf_config)
    return Path(out), info, merged


def export_merged_hf(found: AdapterSource, out: str | Path, *, base: str | Path | None = None, tokenizer=None,
                     architecture: str | None = None, dtype=None, max_shard_size: int | str = "5GB",
                     overwrite: bool = False) -> tuple[Path, TrainedModelInfo]:
    """`forgeline export hf` of an adapter source: the merged model through the Hugging Face exporter."""
    from ..files import check_target
    from ..model.formats.hf import export_hf
    from ..peft.apply import merge_adapters

    check_target(Path(out), overwrite=overwrite)
    model, tok, info = load_trained_model(found, base=base)
    merge_adapters(model)
    loaded = info.loaded(model, tok)
    return export_hf(loaded, out, tokenizer=tokenizer, architecture=architecture, dtype=dtype,
                     max_shard_size=max_shard_size, overwrite=overwrite), info


def export_adapter(source: str | Path | AdapterSource, out: str | Path, *, base: str | Path | None = None,
                   overwrite: bool = False) -> tuple[Path, TrainedModelInfo]:
    """`forgeline export hf --adapter-only`: the adapter in PEFT's format (adapter_config.json with the base's path
    in base_model_name_or_path, adapter_model.safetensors under the Hugging Face export's module names), which
    `peft.PeftModel.from_pretrained` puts on the `export hf` of the base; beside it, as in every adapter directory,
    forgeline_base.json and the tokenizer, so forgeline reads it back without --base."""
    from ..files import check_target
    from ..peft.apply import save_adapter

    found = _adapters_of(source, "--adapter-only")
    check_target(Path(out), overwrite=overwrite, what="adapter directory")
    if found.kind == "adapter_dir":
        from ..peft.load import adapter_method

        if adapter_method(found.path) == "adapter":
            raise ConfigError(_NO_PEFT_BOTTLENECK.format(source=found.path))
    model, tokenizer, info = load_trained_model(found, base=base)
    if info.method == "adapter" or info.peft is None:
        raise ConfigError(_NO_PEFT_BOTTLENECK.format(source=found.path))
    save_adapter(model, info.peft, out, base=info.base, tokenizer=tokenizer, overwrite=overwrite)
    return Path(out), info


_NO_PEFT_BOTTLENECK = ("{source} holds bottleneck adapters (peft.method: adapter), which PEFT's format has no place "
                       "for; use it with forgeline as it is, or export the whole model (export hf without "
                       "--adapter-only is refused too: they cannot be merged)")


def import_peft_adapter(adapter_dir: str | Path, base: str | Path, out: str | Path, *, overwrite: bool = False
                        ) -> tuple[Path, TrainedModelInfo]:
    """`forgeline import peft`: a PEFT LoRA / DoRA adapter directory (PEFT's save_pretrained) put on the local
    `base`, written as a forgeline adapter directory that records the base's path and hash and holds the base's
    tokenizer, so generate / merge / export hf read it without --base."""
    from ..files import check_target
    from ..peft.apply import BaseReference, save_adapter
    from ..peft.load import adapter_method
    from ..peft.lora import lora_settings_from_peft, read_adapter_config

    adapter_dir = Path(adapter_dir)
    config, where = read_adapter_config(adapter_dir)  # missing or unreadable: its own clear error
    if adapter_method(adapter_dir) == "adapter":
        raise ConfigError(f"{adapter_dir} holds forgeline's bottleneck adapters, not a PEFT adapter; forgeline "
                          "reads it as it is (with --base when its recorded base moved)")
    lora_settings_from_peft(config, where)  # options forgeline cannot load exactly: refused before the base loads
    check_target(Path(out), overwrite=overwrite, what="adapter directory")
    model, tokenizer, info = _load_adapter_dir(adapter_dir, base, "cpu")
    ref = BaseReference(path=str(Path(info.base.path).resolve()), sha256=info.base.sha256, method=info.method,
                        peft=info.peft.model_dump(mode="json"))
    save_adapter(model, info.peft, out, base=ref, tokenizer=tokenizer, overwrite=overwrite)
    info.base = ref
    return Path(out), info
