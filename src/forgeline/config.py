"""Configuration: pydantic schemas, YAML files, dotted `key.sub=value` overrides and errors that name the field.

Every command's config is a pydantic model with `extra="forbid"`, so a misspelt key is an error (with a
did-you-mean) rather than a silently ignored setting. Values given on the command line are parsed as YAML scalars
(`train.lr=3e-4`, `model.tie_embeddings=true`, `data.inputs=[a.txt,b.txt]`).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .model.config import ModelConfig

T = TypeVar("T", bound=BaseModel)
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------------------------
# Pre-training
# ---------------------------------------------------------------------------------------------------------------

# The seed's hyperparameter table (Llama-2 recipes): applied under whatever the user sets explicitly.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "7b": dict(lr=3e-4, global_batch_tokens=4 * 1024 * 1024, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1,
               grad_clip=1.0, betas=(0.9, 0.95), eps=1e-5),
    "70b": dict(lr=1.5e-4, global_batch_tokens=8 * 1024 * 1024, warmup_steps=2000, min_lr_ratio=0.1,
                weight_decay=0.1, grad_clip=1.0, betas=(0.9, 0.95), eps=1e-5),
}


class DataConfig(Strict):
    dataset: Path = Field(description="a directory made by `forgeline data prepare`")
    seq_len: int = Field(256, gt=0)
    shuffle: bool = True


class TrainConfig(Strict):
    preset: Literal["7b", "70b"] | None = Field(None, description="the seed's hyperparameters for that scale")
    max_steps: int | None = Field(
        1000, gt=0, description="optimizer steps; None: train.epochs passes over the data (a set max_steps wins)")
    epochs: float | None = Field(None, gt=0, description="passes over the training data (stages with a sample "
                                                         "data set: sft, ...)")
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward pass on one rank")
    global_batch_tokens: int | None = Field(
        None, gt=0, description="tokens per optimizer step over all ranks; None: one micro-batch per rank"
    )
    global_batch_samples: int | None = Field(
        None, gt=0, description="samples per optimizer step over all ranks (stages with a sample data set)")
    lr: float = Field(3e-4, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="after warmup: cosine or linear decay to lr * min_lr_ratio, or constant")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the schedule decays to lr * min_lr_ratio")
    warmup_steps: int = Field(100, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="warmup as a share of all steps (overrides "
                                                                      "warmup_steps)")
    decay_steps: int | None = Field(None, gt=0, description="None: the decay ends at max_steps")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0, description="None disables clipping; the norm is logged anyway")
    precision: Literal["fp32", "bf16"] = "bf16"
    bf16_matmul: Literal["auto", "native", "fp32"] = Field(
        "auto", description="CPU bf16: native bf16 GEMMs, or fp32 GEMMs on the bf16 values (the same products and "
        "fp32 sums; faster on CPUs whose bf16 dot products are slow); auto measures which is faster")
    activation_checkpointing: bool = False
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None and data["preset"] in TRAIN_PRESETS:
            return {**TRAIN_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        if self.global_batch_tokens is not None and self.global_batch_samples is not None:
            raise ValueError("set train.global_batch_tokens or train.global_batch_samples, not both")
        if (self.warmup_ratio is None and self.max_steps is not None and self.warmup_steps >= self.max_steps
                and self.max_steps > 1):
            raise ValueError(f"warmup_steps={self.warmup_steps} must be smaller than max_steps={self.max_steps}")
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        return self


class CheckpointConfig(Strict):
    every: int = Field(1000, gt=0, description="save every N optimizer steps (and at the end)")
    keep_last: int = Field(3, gt=0)


class StabilityConfig(Strict):
    spike_factor: float = Field(2.0, gt=1, description="a loss above spike_factor x its running mean is a spike")
    ema_beta: float = Field(0.95, gt=0, lt=1, description="smoothing of the running mean loss")
    warmup_steps: int = Field(20, ge=0, description="steps before spikes are looked for (the mean must settle)")
    max_rollbacks: int = Field(3, ge=0, description="stop the run after this many rollbacks")
    skip_batches: int | None = Field(
        None, ge=0, description="batches skipped after a rollback; None: those since the checkpoint through the spike"
    )
    grad_norm_alert: float = Field(10.0, gt=0)
    signal: str = Field("loss", description="what the spike test watches: loss, grad_norm, or a metric the stage "
                                            "logs (kl, ...); it must be positive where it is meaningful")


class MonitorConfig(Strict):
    log_every: int = Field(1, gt=0)
    val_every: int = Field(200, gt=0)
    val_batches: int = Field(20, gt=0)
    peak_flops: float | None = Field(
        None, gt=0, description="peak FLOP/s for MFU; None: measured with a matmul at start-up (CPU) or looked up"
    )
    tensorboard: bool = True
    progress: bool = True
    sample_every: int | None = Field(None, gt=0, description="print a short sample every N steps")
    sample_prompt: str = ""


class DeepSpeedConfig(Strict):
    """Only read when parallel.backend is 'deepspeed' (the optional `forgeline[deepspeed]` extra)."""

    zero_stage: Literal[3] = Field(3, description="ZeRO stage; only 3 (parameters, gradients, optimizer sharded)")
    offload_optimizer: bool = Field(False, description="keep the optimizer state in CPU memory (GPU runs)")
    overlap_comm: bool = False


class ParallelConfig(Strict):
    """How the model and the batch are laid out over the ranks (see docs/distributed.md).

    world size = pp x dp_replicate x dp_shard x tp. The default, every rank holding a replica, is plain DDP; any
    other layout builds a DeviceMesh (pp, dp_replicate, dp_shard, tp) and applies, in this order: tensor
    parallelism, activation checkpointing, torch.compile, FSDP2 per block then root, and pipeline stages.
    """

    backend: Literal["native", "deepspeed"] = Field(
        "native", description="native: DDP / FSDP2 / TP / PP from torch.distributed; deepspeed: ZeRO-3 engine"
    )
    dp_replicate: int = Field(
        -1, description="replicas (DDP; HSDP's replicate dimension with dp_shard > 1); -1: fill the world unless "
                        "dp_shard is -1, then 1"
    )
    dp_shard: int = Field(1, description="FSDP2 shard group size; -1: fill the world")
    tp: int = Field(1, ge=1, description="tensor-parallel degree (divides n_heads, n_kv_heads, ffn_dim)")
    pp: int = Field(1, ge=1, description="pipeline-parallel degree (ranks per pipeline)")
    sequence_parallel: bool = Field(
        True, description="with tp > 1: norms and residuals sharded over the sequence between blocks"
    )
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    pp_microbatches: int | None = Field(
        None, gt=0, description="micro-batches per pipeline step (divides micro_batch_size); None: pp x stages/rank"
    )
    pp_stages_per_rank: int | None = Field(
        None, gt=0, description="virtual stages per rank; None: 2 for interleaved_1f1b, else 1"
    )
    pp_split_points: list[int] | None = Field(
        None, description="first layer index of every stage after the first (n_stages - 1 increasing values); "
                          "None: layers split evenly"
    )
    fsdp_reshard_after_forward: bool = Field(
        True, description="true: free gathered parameters after forward (ZeRO-3); false: keep them (ZeRO-2)"
    )
    param_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="FSDP2 compute dtype of gathered parameters; auto: bf16 when train.precision is bf16"
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field("fp32", description="dtype of FSDP2 gradient reduce-scatter")
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    @model_validator(mode="after")
    def _check(self) -> "ParallelConfig":
        for name in ("dp_replicate", "dp_shard"):
            value = getattr(self, name)
            if value != -1 and value < 1:
                raise ValueError(f"{name} must be -1 (fill) or >= 1, got {value}")
        if self.pp_split_points is not None:
            points = self.pp_split_points
            if any(b <= a for a, b in zip(points, points[1:])) or (points and points[0] <= 0):
                raise ValueError(f"pp_split_points must be increasing layer indices above 0, got {points}")
        if self.pp_schedule == "interleaved_1f1b" and self.pp_stages_per_rank == 1:
            raise ValueError("pp_schedule=interleaved_1f1b needs pp_stages_per_rank >= 2")
        if self.pp_schedule != "interleaved_1f1b" and (self.pp_stages_per_rank or 1) > 1:
            raise ValueError(f"pp_stages_per_rank={self.pp_stages_per_rank} needs pp_schedule=interleaved_1f1b")
        return self

    @property
    def stages_per_rank(self) -> int:
        return self.pp_stages_per_rank or (2 if self.pp_schedule == "interleaved_1f1b" else 1)


class BenchmarkEvalConfig(Strict):
    """Benchmarks (`forgeline eval`'s tasks) scored on the model being trained, every `every` optimizer steps and at
    the last step; logged as eval/TASK/METRIC beside the training metrics (docs/eval.md). The task names and their
    files are checked when the stage starts, before any step."""

    tasks: list[str] = Field(default_factory=list, description="benchmark tasks (arc_easy, hellaswag, mmlu, gsm8k, "
                                                               "...); empty: none")
    every: int = Field(1000, gt=0, description="run them every N optimizer steps (and at the last step)")
    limit: int | None = Field(None, gt=0, description="only the first N documents of each task")
    sample: int | None = Field(None, gt=0, description="a stratified random sample of N documents per task, the "
                                                       "same ones every time (seed)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples; None: each task's own")
    data: dict[str, Path] = Field(default_factory=dict, description="a task's files, e.g. {arc_easy: "
                                                                    "ARC-Easy-Dev.jsonl}; default: ../shared/data's")
    batch_size: int = Field(16, gt=0, description="contexts per forward batch")
    seed: int = Field(1234, description="few-shot and sample draws")

    @model_validator(mode="after")
    def _check(self) -> "BenchmarkEvalConfig":
        if self.limit is not None and self.sample is not None:
            raise ValueError("set eval.limit or eval.sample, not both")
        repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if repeated:
            raise ValueError(f"eval.tasks lists {', '.join(repeated)} more than once")
        # a key that names no listed task is most likely a misspelt one, whose task would then read the default file
        stray = sorted(set(self.data) - set(self.tasks))
        if self.tasks and stray:
            raise ValueError(f"eval.data has {', '.join(stray)}, which eval.tasks does not list "
                             f"({', '.join(self.tasks)})")
        return self


PEFT_METHODS = ("lora", "dora", "qlora", "adapter")
BLOCK_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# group words a user may write in peft.target_modules, besides single names (forgeline's or Hugging Face's)
TARGET_GROUPS = {"attention": ("wq", "wk", "wv", "wo"), "mlp": ("w1", "w2", "w3"), "all-linear": BLOCK_LINEARS}
# the learning rate a parameter-efficient stage gets when train.lr is not set: adapters start at zero and need
# about ten times full fine-tuning's rate (LoRA and QLoRA papers: 1e-4 to 2e-4)
PEFT_DEFAULT_LR = 2e-4


class PeftConfig(Strict):
    """Train adapters on a frozen base instead of every weight (docs/peft.md)."""

    method: Literal["lora", "dora", "qlora", "adapter"] = Field(
        description="lora; dora (weight-decomposed LoRA); qlora (LoRA on a 4-bit NF4 base); adapter (bottleneck "
                    "adapters after attention and MLP, which cannot be merged)")
    r: int = Field(16, ge=1, description="LoRA rank (lora, dora, qlora)")
    alpha: float = Field(32.0, gt=0, description="LoRA scale numerator: the update is alpha / r * B A")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="LoRA targets: wq wk wv wo w1 w2 w3 output, their Hugging Face names (q_proj ... lm_head), or "
                    "attention, mlp, all-linear (every block projection)")
    use_rslora: bool = Field(False, description="scale alpha / sqrt(r) (rank-stabilised LoRA)")
    adapter_size: int = Field(64, ge=1, description="bottleneck width (method: adapter)")
    quant_block_size: int = Field(64, ge=2, description="weights per NF4 absmax block (qlora)")
    base_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="storage of the frozen base linear weights; auto: bf16 when train.precision is bf16 "
                            "(what autocast would cast them to anyway), else fp32")

    def expanded_targets(self) -> tuple[str, ...]:
        """target_modules with the group words replaced by the names they stand for (single names are checked
        against the model when the adapters are applied)."""
        out: list[str] = []
        for name in self.target_modules:
            out += TARGET_GROUPS.get(name, (name,))
        return tuple(dict.fromkeys(out))


class StageConfig(Strict):
    """What every training stage has; a stage's config adds its own `data:` section (and its objective's keys).

    `init` starts from a trained model: a forgeline run, checkpoint or model directory, a Hugging Face directory or
    a GGUF file; the model's shape and tokenizer then come from it and `model:` is not used.
    """

    run_dir: Path = Path("runs/run")
    seed: int = 0
    init: Path | None = Field(None, description="start from this model (run/checkpoint/model dir, HF dir, .gguf); "
                                                "None: a new model built from model:")
    tokenizer: Path | None = Field(None, description="None: the model's (init) or the dataset's tokenizer")
    model: ModelConfig = ModelConfig(preset="tiny")
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    stability: StabilityConfig = StabilityConfig()
    monitor: MonitorConfig = MonitorConfig()
    parallel: ParallelConfig = ParallelConfig()
    peft: PeftConfig | None = Field(None, description="adapters on a frozen base; None: every weight trains")
    eval: BenchmarkEvalConfig = BenchmarkEvalConfig()

    def seq_len(self) -> int:
        """The longest sequence a micro-batch holds (memory planning, the layout's checks); stages with data say
        theirs, the base can only say what the model allows."""
        return self.model.max_seq_len


class PretrainConfig(StageConfig):
    run_dir: Path = Path("runs/pretrain")
    tokenizer: Path | None = Field(None, description="None: the tokenizer saved with the dataset")
    data: DataConfig

    def seq_len(self) -> int:
        return self.data.seq_len


# ---------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning
# ---------------------------------------------------------------------------------------------------------------

# The seed's SFT hyperparameters; a user's own train.* keys override them one by one.
SFT_TRAIN_DEFAULTS: dict[str, Any] = dict(epochs=3, max_steps=None, lr=2e-5, global_batch_samples=128,
                                          warmup_ratio=0.03, micro_batch_size=4, weight_decay=0.0,
                                          min_lr_ratio=0.0, betas=(0.9, 0.999))


class SFTDataConfig(Strict):
    train: list[Path] = Field(min_length=1, description="JSONL, JSON or Parquet files (or directories, globs)")
    validation: list[Path] | None = Field(None, description="held-out files; None: val_fraction of train")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="share of train records held out (seeded)")
    format: Literal["auto", "instruction", "messages", "sharegpt"] = Field(
        "auto", description="instruction {instruction,input,output}, messages [{role,content}], sharegpt "
                            "[{from,value}]; auto: from the first record")
    fields: dict[str, str] = Field(default_factory=dict, description="renamed fields, e.g. {output: response}")
    system_prompt: str | None = Field(None, description="a system turn put before records that have none")
    instruction_style: Literal["alpaca", "plain"] = Field(
        "alpaca", description="instruction records as the user turn: the Stanford Alpaca prompt, or plain text "
                              "(the instruction, a blank line, the input)")
    template: str = Field("auto", description="chat template: auto (the model's, else chatml), model, chatml, "
                                             "llama3")
    add_special_tokens: bool = Field(False, description="add the template's special tokens the tokenizer lacks "
                                                        "(the embedding grows; new rows at the mean)")
    loss_on: Literal["assistant", "all", "last_assistant"] = Field(
        "assistant", description="which tokens carry the loss")
    max_length: int = Field(4096, gt=1, description="tokens per sample; longer samples are cut (and counted)")
    packing: bool = Field(True, description="several samples per sequence (best-fit decreasing), attention kept "
                                            "within each; false: one padded sample per row")
    on_error: Literal["raise", "skip"] = Field("raise", description="a record that does not fit: stop, or skip "
                                                                   "and count it")
    shuffle: bool = True


class SFTConfig(StageConfig):
    run_dir: Path = Path("runs/sft")
    data: SFTDataConfig

    @model_validator(mode="before")
    @classmethod
    def _sft_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            train = data.get("train")
            if train is None or isinstance(train, dict):
                defaults = dict(SFT_TRAIN_DEFAULTS)
                if data.get("peft"):
                    defaults["lr"] = PEFT_DEFAULT_LR
                return {**data, "train": {**defaults, **(train or {})}}
        return data

    def seq_len(self) -> int:
        return self.data.max_length


# ---------------------------------------------------------------------------------------------------------------
# Preference stages: reward model, DPO (and IPO, hinge, SimPO), ORPO, KTO
# ---------------------------------------------------------------------------------------------------------------

# What a preference stage trains with when train.* does not say (one pass; TRL's learning rates for full training;
# adapters start at zero and take a larger rate). A user's own train.* keys override them one by one.
PREFERENCE_TRAIN_DEFAULTS: dict[str, Any] = dict(epochs=1, max_steps=None, global_batch_samples=32,
                                                 micro_batch_size=4, warmup_ratio=0.1, weight_decay=0.0,
                                                 min_lr_ratio=0.0, betas=(0.9, 0.999), schedule="linear")
PREFERENCE_LR = {"rm": (1e-5, 1e-4), "dpo": (1e-6, 5e-5), "orpo": (8e-6, 1e-4), "kto": (1e-6, 5e-5)}  # full, peft


class PreferenceDataConfig(Strict):
    train: list[Path] = Field(min_length=1, description="JSONL (.jsonl.gz), JSON or Parquet files (or directories, "
                                                        "globs)")
    validation: list[Path] | None = Field(None, description="held-out files; None: val_fraction of train")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="share of train pairs held out (seeded)")
    format: Literal["auto", "pairs", "hh", "ranked", "unpaired"] = Field(
        "auto", description="pairs {prompt,chosen,rejected}; hh (two whole Human/Assistant dialogues); ranked "
                            "{prompt,responses,ranking|scores}; unpaired {prompt,completion,label} (kto); auto: "
                            "from the first record")
    fields: dict[str, str] = Field(default_factory=dict, description="renamed fields, e.g. {chosen: better}")
    system_prompt: str | None = Field(None, description="a system turn put before prompts that have none")
    template: str = Field("auto", description="chat template: auto (the model's, else chatml), model, chatml, "
                                             "llama3")
    max_length: int = Field(1024, gt=1, description="tokens of prompt + response; longer pairs lose prompt "
                                                    "tokens from the left first, then response tokens")
    max_prompt_length: int | None = Field(None, gt=0, description="prompt tokens kept (from the end); None: as "
                                                                  "many as leave room for the responses")
    on_error: Literal["raise", "skip"] = Field("raise", description="a record that does not fit: stop, or skip "
                                                                   "and count it")
    shuffle: bool = True

    @model_validator(mode="after")
    def _check_lengths(self) -> "PreferenceDataConfig":
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be below max_length="
                             f"{self.max_length} (the responses need room)")
        return self


class ReferenceSettings(Strict):
    reference: Literal["auto", "cached", "online"] = Field(
        "auto", description="the reference model's log-probs: cached (computed once before training, kept in "
                            "run_dir) or online (every step); auto: online with peft (the base with adapters "
                            "off, no second copy), else cached")
    reference_model: Path | None = Field(None, description="None: the reference is init (the starting policy)")


class DPOSettings(ReferenceSettings):
    beta: float = Field(0.1, gt=0, description="strength of the KL constraint (SimPO: the reward scale)")
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo (length-normalised, as TRL), hinge (SLiC), simpo "
                               "(reference-free, length-normalised, margin simpo_gamma)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO: the share of flipped labels "
                                                                  "(sigmoid, simpo)")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin")

    @model_validator(mode="after")
    def _check_smoothing(self) -> "DPOSettings":
        if self.label_smoothing and self.loss_type in ("ipo", "hinge"):
            raise ValueError(f"label_smoothing applies to loss_type sigmoid and simpo, not {self.loss_type}")
        return self


class RewardSettings(Strict):
    center_coef: float = Field(0.0, ge=0, description="reward centering: coef x (r_chosen + r_rejected)^2 keeps "
                                                      "rewards near zero")
    use_margin: bool = Field(True, description="subtract a pair's margin (data) inside the sigmoid")
    share_prompt: bool = Field(True, description="score chosen and rejected in one row over one copy of the prompt "
                                                 "(the same rewards from fewer tokens); not under tensor parallelism")


class ORPOSettings(Strict):
    beta: float = Field(0.1, gt=0, description="weight of the odds-ratio term (the paper's lambda)")


class KTOSettings(ReferenceSettings):
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0, description="weight of desirable (label true) examples")
    undesirable_weight: float = Field(1.0, gt=0, description="weight of undesirable (label false) examples")


class PreferenceStageConfig(StageConfig):
    """A stage trained on preference data from a model (`init`)."""

    stage: ClassVar[str]  # the command's name: which train defaults apply (PREFERENCE_LR)
    data: PreferenceDataConfig

    @model_validator(mode="before")
    @classmethod
    def _preference_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            train = data.get("train")
            if train is None or isinstance(train, dict):
                full_lr, peft_lr = PREFERENCE_LR[cls.stage]
                defaults = {**PREFERENCE_TRAIN_DEFAULTS, "lr": peft_lr if data.get("peft") else full_lr}
                return {**data, "train": {**defaults, **(train or {})}}
        return data

    def seq_len(self) -> int:
        return self.data.max_length


class RewardEvalConfig(BenchmarkEvalConfig):
    """A reward model's `eval:`, which can list no task (its own section, so that the error names eval.tasks)."""

    @field_validator("tasks")
    @classmethod
    def _no_tasks(cls, value: list[str]) -> list[str]:
        if value:
            raise ValueError("a reward model has a scalar head, not the LM head benchmarks are scored with; "
                             "benchmark the policy instead (eval.tasks in sft, dpo, orpo or kto, or forgeline eval)")
        return value


class RewardConfig(PreferenceStageConfig):
    run_dir: Path = Path("runs/rm")
    reward: RewardSettings = RewardSettings()
    eval: RewardEvalConfig = RewardEvalConfig()
    stage: ClassVar[str] = "rm"


class DPOConfig(PreferenceStageConfig):
    run_dir: Path = Path("runs/dpo")
    dpo: DPOSettings = DPOSettings()
    stage: ClassVar[str] = "dpo"


class ORPOConfig(PreferenceStageConfig):
    run_dir: Path = Path("runs/orpo")
    orpo: ORPOSettings = ORPOSettings()
    stage: ClassVar[str] = "orpo"


class KTOConfig(PreferenceStageConfig):
    run_dir: Path = Path("runs/kto")
    kto: KTOSettings = KTOSettings()
    stage: ClassVar[str] = "kto"


# ---------------------------------------------------------------------------------------------------------------
# Online RL: GRPO and RLOO on rollouts of the policy being trained
# ---------------------------------------------------------------------------------------------------------------

# TRL's rate for full training (adapters start at zero and take a larger one), a constant schedule, and the spike
# rollback watching the gradient norm (an RL loss is no positive quantity to compare with its mean) with a
# factor that a healthy run's step-to-step spread does not reach.
RL_TRAIN_DEFAULTS: dict[str, Any] = dict(max_steps=100, warmup_steps=0, schedule="constant", weight_decay=0.0,
                                         betas=(0.9, 0.999), micro_batch_size=8)
RL_LR = (1e-6, 1e-5)  # full, peft
RL_STABILITY_DEFAULTS: dict[str, Any] = dict(signal="grad_norm", spike_factor=5.0)


class PromptDataConfig(Strict):
    train: list[Path] = Field(min_length=1, description="JSONL, JSON or Parquet prompt records (or directories, "
                                                        "globs)")
    prompt_format: str = Field("{prompt}", description="the prompt text from a record's fields, e.g. "
                                                      "'Question: {question}\\nAnswer:'")
    template: str = Field("none", description="none: the text as it is; auto, model, chatml, llama3: rendered as a "
                                              "user turn of that chat template, the assistant's header after it")
    max_prompt_length: int | None = Field(512, gt=0, description="prompt tokens kept (from the end)")
    shuffle: bool = True


class RewardSpec(Strict):
    name: str = Field(description="a built-in reward (arithmetic, gsm8k, gsm8k_format, unit_tests) or "
                                  "module:function / path/to/file.py:function")
    weight: float = 1.0


class RolloutConfig(Strict):
    prompts_per_step: int = Field(8, gt=0, description="prompts per optimizer step over all data-parallel ranks")
    samples_per_prompt: int = Field(8, ge=2, description="completions sampled per prompt (the group)")
    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    stop: list[str] = Field(default_factory=list, description="stop strings besides the end-of-text token")
    ignore_eos: bool = Field(False, description="always generate max_new_tokens (benchmarks)")
    epochs: int = Field(1, ge=1, description="optimizer steps on each batch of rollouts (PPO's epochs, GRPO's mu)")


class PolicyGradientSettings(Strict):
    epsilon: float = Field(0.2, gt=0, lt=1, description="the ratio is clipped to [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: float | None = Field(None, gt=0, description="None: epsilon")
    reference_model: Path | None = Field(None, description="the KL reference; None: init (with peft, the base "
                                                           "with adapters off)")


class GRPOSettings(PolicyGradientSettings):
    beta: float = Field(0.0, ge=0, description="per-token KL penalty to the reference in the loss; 0: no reference")
    loss_averaging: Literal["token", "sequence"] = Field(
        "token", description="token: over every completion token of the step (DAPO); sequence: per completion, "
                             "then over completions (the GRPO paper)")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the group's reward std, the batch's, or nothing (Dr. GRPO)")


class RLOOSettings(PolicyGradientSettings):
    beta: float = Field(0.05, ge=0, description="beta x the completion's summed log-ratio to the reference is "
                                                "taken off its reward")
    normalize_advantages: bool = False


class OnlineRLStageConfig(StageConfig):
    stage: ClassVar[str]
    data: PromptDataConfig
    rollout: RolloutConfig = RolloutConfig()
    rewards: list[RewardSpec] = Field(min_length=1, description="summed with their weights")

    @model_validator(mode="before")
    @classmethod
    def _rl_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            train = data.get("train")
            if train is None or isinstance(train, dict):
                lr = RL_LR[1] if data.get("peft") else RL_LR[0]
                data["train"] = {**RL_TRAIN_DEFAULTS, "lr": lr, **(train or {})}
            stability = data.get("stability")
            if stability is None or isinstance(stability, dict):
                data["stability"] = {**RL_STABILITY_DEFAULTS, **(stability or {})}
            rewards = data.get("rewards")
            if isinstance(rewards, list):  # a bare name is a reward of weight 1
                data["rewards"] = [{"name": r} if isinstance(r, str) else r for r in rewards]
        return data

    def seq_len(self) -> int:
        return (self.data.max_prompt_length or self.model.max_seq_len) + self.rollout.max_new_tokens


class GRPOConfig(OnlineRLStageConfig):
    run_dir: Path = Path("runs/grpo")
    grpo: GRPOSettings = GRPOSettings()
    stage: ClassVar[str] = "grpo"


class RLOOConfig(OnlineRLStageConfig):
    run_dir: Path = Path("runs/rloo")
    rloo: RLOOSettings = RLOOSettings()
    stage: ClassVar[str] = "rloo"


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer training and data preparation
# ---------------------------------------------------------------------------------------------------------------


class TokenizerTrainConfig(Strict):
    inputs: list[Path] = Field(min_length=1, description="text, JSONL, JSON or Parquet files, directories or globs")
    output: Path = Field(description="directory for tokenizer.json and tokenizer_config.json")
    vocab_size: int = Field(8192, gt=0)
    text_field: str = Field("text", description="the text's key in JSONL/JSON records, its column in Parquet")
    text_separator: str = Field("\n\n", description="splits plain-text files into documents")
    min_frequency: int = Field(2, ge=1, description="a merge must occur at least this often")
    model_max_length: int = Field(2048, gt=0)


class DataPrepareConfig(Strict):
    inputs: list[Path] = Field(min_length=1, description="text, JSONL, JSON or Parquet files, directories or globs")
    tokenizer: Path = Field(description="a tokenizer directory or tokenizer.json")
    output: Path = Field(description="the dataset directory to write")
    text_field: str = Field("text", description="the text's key in JSONL/JSON records, its column in Parquet")
    text_separator: str = Field("\n\n", description="splits plain-text files into documents")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="share of documents held out for validation")
    shard_tokens: int = Field(100_000_000, gt=0, description="tokens per shard file")
    seed: int = Field(0, description="seeds the validation split")
    overwrite: bool = Field(False, description="replace an existing output directory")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are YAML scalars."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key.sub=value")
        key, raw = pair.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {pair!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _FLOAT.fullmatch(value):
            value = float(value)  # YAML 1.1 reads "3e-4" (no dot) as a string
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {pair!r} conflicts with {part}={child!r}")
            node = child
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping of keys to values")
    return data


def _field_names(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys at `loc` in the schema, for did-you-mean suggestions."""
    model: Any = schema
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def suggest_key(key: str, names: list[str]) -> str | None:
    """The valid key a misspelt one most likely meant.

    A shared prefix beats edit distance: `lr_rate` means `lr`, although difflib finds `min_lr_ratio` closer.
    """
    prefixed = [n for n in names if key.startswith(n) or n.startswith(key)]
    if prefixed:
        # the longest shared prefix first; among equals, the closest spelling
        return max(prefixed, key=lambda n: (min(len(n), len(key)), difflib.SequenceMatcher(None, key, n).ratio()))
    guess = difflib.get_close_matches(key, names, n=1)
    return guess[0] if guess else None


def format_validation_error(exc: ValidationError, schema: type[BaseModel], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p not in ("__root__",))
        field = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            names = _field_names(schema, loc[:-1])
            guess = suggest_key(str(loc[-1]), names)
            hint = f"; did you mean '{guess}'?" if guess else (f"; valid keys: {', '.join(names)}" if names else "")
            lines.append(f"{field}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"{field}: required but not given")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            given = err.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"{field}: {msg}{shown}")
    head = f"invalid config ({source})" if source else "invalid config"
    return head + ":\n  " + "\n  ".join(lines)


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read YAML (optional), apply dotted overrides, validate; every problem is one ConfigError naming the field."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return validate_config(schema, data, source=str(path) if path else "command line")


def validate_config(schema: type[T], data: dict[str, Any], *, source: str = "") -> T:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, schema, source)) from None


def dump_config(cfg: BaseModel) -> str:
    """The fully resolved config as YAML (paths as strings), saved with every run."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# Help: the keys of a schema, for `forgeline <command> --help`
# ---------------------------------------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    import types
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin is Literal:
        return "|".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, tuple):
        return str(list(value))
    return str(value)


def _sections(annotation: Any) -> list[type[BaseModel]]:
    import typing

    candidates = [annotation, *typing.get_args(annotation)]
    return [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]


def describe_keys(schema: type[BaseModel], *, sections: tuple[str, ...] | None = None) -> list[str]:
    """One line per settable key, nested sections dotted: `train.lr (float, default 0.0003): description`.

    Built from the schema itself so that the help can never list a key the config rejects, or miss one.
    `sections` keeps only those top-level sections (and the top-level scalar keys are dropped).
    """
    from pydantic_core import PydanticUndefined

    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str, instance: BaseModel | None, top: bool) -> None:
        for name, field in model.model_fields.items():
            if top and sections is not None and name not in sections:
                continue
            key = prefix + name
            sub = _sections(field.annotation)
            default = field.get_default(call_default_factory=True)
            if sub and (isinstance(default, BaseModel) or sub[0] is field.annotation):
                # a section: its keys, not the section itself
                walk(sub[0], key + ".", default if isinstance(default, BaseModel) else None, False)
                continue
            shown = "required" if default is PydanticUndefined else f"default {_default_text(default)}"
            if instance is not None and getattr(instance, name) != default:
                # the section's default differs from its class's (PretrainConfig.model is the tiny preset)
                shown += f"; {_default_text(getattr(instance, name))} when no {prefix}* key is given"
            line = f"{key} ({_type_name(field.annotation)}, {shown})"
            lines.append(line + (f": {field.description}" if field.description else ""))
            for section in sub:  # e.g. model.rope_scaling: None or a section of its own
                walk(section, key + ".", None, False)

    walk(schema, "", None, True)
    return lines
