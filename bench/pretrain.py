"""Pre-training throughput: forgeline's `Trainer.fit` against a plain PyTorch loop over Hugging Face's LlamaForCausalLM.

Both sides train the same Llama shape from the same random weights (copied HF -> forgeline, so their losses can be
compared step by step) on the same token batches:

* HF: `LlamaForCausalLM` (attn_implementation="sdpa", use_cache=False), forward with labels (its own loss, fp32
  upcast of the logits), backward, `clip_grad_norm_(1.0)`, `torch.optim.AdamW` with its default implementation,
  `zero_grad`. bf16: `torch.autocast("cpu", torch.bfloat16)` around forward + loss, fp32 weights.
* forgeline: `Trainer(...).fit()` with `causal_lm_loss` (fused AdamW, chunked linear + cross-entropy, its own bf16
  autocast), logging to metrics.jsonl only; the step times are the ones the trainer itself measures and records in
  `history` (each block of steps is one more `fit()` call on the same trainer). Differences in how bf16 is
  computed: under bf16 autocast on a CPU without AMX, forgeline runs the attention (SDPA) in fp32, HF in bf16; and
  where this CPU's fp32 units outrun its bf16 dot products (measured at start-up, `train.bf16_matmul=auto`, see
  src/forgeline/kernels/bf16_matmul.py) forgeline computes the bf16 matrix products as fp32 GEMMs on the bf16 values:
  the same products and fp32 sums, rounded to bf16 at the same points, on the faster units.

Warm-up steps are excluded; the timed steps of the two frameworks are interleaved step by step in ABBA order
(HF, forgeline | forgeline, HF | ...) so that drift in machine load hits both. Tokens/s = batch * seq_len / median
step time. MFU = training_flops_per_token * tokens/s / (square-matmul peak of the same precision measured in this
run; for bf16 the larger of the bf16 and fp32 peaks, since bf16 values can be multiplied on either unit). Each row
also reports the 1-minute load average and the CPU used by other processes while it ran.

    OMP_NUM_THREADS=2 .venv/bin/python bench/pretrain.py [--shapes ref-tiny,ref-small] [--precisions fp32,bf16]
        [--steps 20] [--small-steps 8] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SHAPES = {
    "ref-tiny": dict(vocab=8192, dim=256, layers=4, heads=8, kv_heads=4, ffn=688, seq=256, batch=8),
    "ref-small": dict(vocab=16384, dim=512, layers=8, heads=8, kv_heads=4, ffn=1376, seq=512, batch=8),
}
ROPE_THETA = 10000.0
NORM_EPS = 1e-5
LR, BETAS, EPS, WEIGHT_DECAY = 3e-4, (0.9, 0.95), 1e-8, 0.1


def load1() -> float:
    try:
        with open("/proc/loadavg") as fh:
            return float(fh.read().split()[0])
    except OSError:
        return float("nan")


class OtherCPU:
    """CPU time used by *other* processes over an interval, in cores (0 .. number of CPUs): all busy time from
    /proc/stat minus this process's own. Unlike the load average it does not count the benchmark itself."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
            with open("/proc/self/stat") as fh:
                own = fh.read().rsplit(")", 1)[1].split()
            busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait
            return busy, int(own[11]) + int(own[12]), time.perf_counter()  # utime + stime of all our threads
        except (OSError, ValueError, IndexError):
            return None

    def cores(self) -> float:
        end = self._sample()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return float("nan")
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, other / self.hz / (end[2] - self.start[2]))


def matmul_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 1.5) -> float:
    """FLOP/s of a square size^3 matmul with the current thread count (best of short windows)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2.0 * size**3 / (time.perf_counter() - t0))
    return best


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def build_hf(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["dim"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["ffn"], max_position_embeddings=shape["seq"], rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, tie_word_embeddings=False,
        use_cache=False, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg)
    model.train()
    return model


def build_forgeline(shape: dict, hf_model):
    from forgeline.model.config import ModelConfig
    from forgeline.model.transformer import build_model

    cfg = ModelConfig(
        vocab_size=shape["vocab"], dim=shape["dim"], n_layers=shape["layers"], n_heads=shape["heads"],
        n_kv_heads=shape["kv_heads"], ffn_dim=shape["ffn"], max_seq_len=shape["seq"], norm_eps=NORM_EPS,
        rope_theta=ROPE_THETA, tie_embeddings=False,
    )
    model = build_model(cfg)
    hf = hf_model.state_dict()
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        names.update({
            p + "attention_norm.weight": q + "input_layernorm.weight",
            p + "ffn_norm.weight": q + "post_attention_layernorm.weight",
            p + "attention.wq.weight": q + "self_attn.q_proj.weight",
            p + "attention.wk.weight": q + "self_attn.k_proj.weight",
            p + "attention.wv.weight": q + "self_attn.v_proj.weight",
            p + "attention.wo.weight": q + "self_attn.o_proj.weight",
            p + "feed_forward.w1.weight": q + "mlp.gate_proj.weight",
            p + "feed_forward.w3.weight": q + "mlp.up_proj.weight",
            p + "feed_forward.w2.weight": q + "mlp.down_proj.weight",
        })
    own = model.state_dict()
    assert set(own) == set(names), sorted(set(own) ^ set(names))
    model.load_state_dict({k: hf[v].detach().clone() for k, v in names.items()})
    return model, cfg


# ---------------------------------------------------------------------------------------------------------------
# Data: one deterministic stream of random token sequences, the same batches for both frameworks
# ---------------------------------------------------------------------------------------------------------------


def make_batches(shape: dict, n: int, seed: int = 1234) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"] + 1), generator=g)
        out.append({"input_ids": seq[:, :-1].contiguous(), "targets": seq[:, 1:].contiguous(),
                    "n_targets": shape["batch"] * shape["seq"]})
    return out


class ListLoader:
    """The stateful-loader protocol the Trainer needs, over a fixed list of batches (cycled)."""

    def __init__(self, batches: list[dict]):
        self.batches, self.pos = batches, 0

    def __next__(self) -> dict:
        batch = self.batches[self.pos % len(self.batches)]
        self.pos += 1
        return batch

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])


# ---------------------------------------------------------------------------------------------------------------
# The two training loops
# ---------------------------------------------------------------------------------------------------------------


class HFRunner:
    def __init__(self, model, batches: list[dict], precision: str):
        self.model, self.batches, self.precision = model, batches, precision
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        self.pos = 0
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self) -> None:
        batch = self.batches[self.pos % len(self.batches)]
        self.pos += 1
        t0 = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else _null()
        with ctx:
            out = self.model(input_ids=batch["input_ids"], labels=batch["targets"], shift_labels=batch["targets"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        self.times.append(time.perf_counter() - t0)
        self.losses.append(loss)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class ForgelineRunner:
    """Drives the real `Trainer.fit`; each `run(k)` raises max_steps by k and calls fit() again (same trainer,
    same optimizer state), so forgeline's steps can be interleaved with HF's."""

    def __init__(self, model, cfg, batches: list[dict], precision: str, seq_len: int, peak: float, run_dir: Path):
        from forgeline.config import CheckpointConfig, MonitorConfig, StabilityConfig, TrainConfig
        from forgeline.model.config import training_flops_per_token
        from forgeline.objectives import causal_lm_loss
        from forgeline.train.distributed import DistInfo
        from forgeline.train.trainer import Trainer

        train = TrainConfig(max_steps=1, micro_batch_size=batches[0]["input_ids"].shape[0], lr=LR, min_lr_ratio=1.0,
                            warmup_steps=0, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS, grad_clip=1.0,
                            precision=precision, device="cpu")
        self.trainer = Trainer(
            model=model, loss_fn=causal_lm_loss, train_loader=ListLoader(batches), train=train,
            checkpoint=CheckpointConfig(every=10**9, keep_last=1),
            # No rollbacks (so no initial checkpoint) and no spike detection: this is a speed run.
            stability=StabilityConfig(max_rollbacks=0, warmup_steps=10**9),
            monitor=MonitorConfig(log_every=1, tensorboard=False, progress=False, peak_flops=peak),
            run_dir=run_dir, config_yaml="# bench/pretrain.py\n", dist=DistInfo(),
            flops_per_token=training_flops_per_token(cfg, seq_len),
        )
        self.done = 0
        self.times: list[float] = []
        self.losses: list[float] = []

    def run(self, k: int) -> None:
        self.done += k
        self.trainer.cfg.max_steps = self.done
        # the trainer prints an end-of-run summary table at the end of every fit(), i.e. every block: hide it
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            result = self.trainer.fit()
        new = result.history  # this call's steps (each fit() logs afresh)
        assert len(new) == k, (len(new), k)
        self.times += [h["step_time_s"] for h in new]
        self.losses += [h["loss"] for h in new]


# ---------------------------------------------------------------------------------------------------------------


def bench_one(shape_name: str, precision: str, warmup: int, timed: int, block: int, peaks: dict,
              tmp: Path) -> dict:
    from forgeline.model.config import training_flops_per_token

    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    hf_model = build_hf(shape)
    fl_model, fl_cfg = build_forgeline(shape, hf_model)
    batches = make_batches(shape, warmup + timed)
    peak = peaks[precision]
    hf = HFRunner(hf_model, batches, precision)
    fl = ForgelineRunner(fl_model, fl_cfg, batches, precision, shape["seq"], peak, tmp / f"{shape_name}-{precision}")
    fpt = training_flops_per_token(fl_cfg, shape["seq"])

    load_start = load1()
    others = OtherCPU()
    # Warm-up (untimed), then blocks in ABBA order: HF, FL | FL, HF | HF, FL ...
    for _ in range(warmup):
        hf.step()
    fl.run(warmup)
    blocks = [min(block, timed - i) for i in range(0, timed, block)]
    for r, k in enumerate(blocks):
        if k == 0:
            continue
        order = (hf, fl) if r % 2 == 0 else (fl, hf)
        for runner in order:
            if runner is hf:
                for _ in range(k):
                    hf.step()
            else:
                fl.run(k)
    load_end = load1()
    other_cores = others.cores()

    tokens = shape["batch"] * shape["seq"]
    hf_t, fl_t = hf.times[warmup:], fl.times[warmup:]
    hf_tps, fl_tps = tokens / statistics.median(hf_t), tokens / statistics.median(fl_t)
    res = {
        "shape": shape_name, "precision": precision, **shape, "warmup_steps": warmup, "timed_steps": len(hf_t),
        "flops_per_token": fpt, "peak_flops": peak,
        "hf_tokens_per_s": hf_tps, "forgeline_tokens_per_s": fl_tps, "ratio": fl_tps / hf_tps,
        "hf_mfu": fpt * hf_tps / peak, "forgeline_mfu": fpt * fl_tps / peak,
        "hf_step_times": hf_t, "forgeline_step_times": fl_t,
        # HF and forgeline steps of the same index ran next to each other: the median of their ratios is the figure
        # least moved by slow drift of the machine's speed
        "paired_ratio": statistics.median(h / f for h, f in zip(hf_t, fl_t)),
        "hf_mean_tokens_per_s": tokens / statistics.mean(hf_t),
        "forgeline_mean_tokens_per_s": tokens / statistics.mean(fl_t),
        "hf_losses": hf.losses, "forgeline_losses": fl.losses,
        "load_start": load_start, "load_end": load_end, "other_processes_cpu_cores": other_cores,
    }
    print(f"[{shape_name} {precision}] HF {hf_tps:,.0f} tok/s (MFU {100 * res['hf_mfu']:.1f}%) | forgeline "
          f"{fl_tps:,.0f} tok/s (MFU {100 * res['forgeline_mfu']:.1f}%) | ratio {res['ratio']:.2f}x "
          f"(paired {res['paired_ratio']:.2f}x) | "
          f"load {load_start:.2f} -> {load_end:.2f}, other processes {other_cores:.2f} cores", flush=True)
    if other_cores > 0.25:
        print(f"    WARNING: other processes used {other_cores:.2f} CPU cores during this row: noisy figures",
              file=sys.stderr, flush=True)
    print(f"    step losses, first / last: HF {hf.losses[0]:.4f} / {hf.losses[-1]:.4f}   forgeline "
          f"{fl.losses[0]:.4f} / {fl.losses[-1]:.4f}", flush=True)
    del hf, fl, hf_model, fl_model
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="ref-tiny,ref-small", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--steps", type=int, default=20,
                    help="timed steps per framework for ref-tiny; larger shapes get fewer (see --small-steps)")
    ap.add_argument("--small-steps", type=int, default=None,
                    help="timed steps for ref-small (default: 8 when --steps is 20, scaled with it, at least 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3 for ref-tiny, 2 for ref-small)")
    ap.add_argument("--block", type=int, default=None,
                    help="timed steps per framework per interleaved block (default 1: HF, FL, FL, HF, ...)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; known: {', '.join(SHAPES)}")
    for p in precisions:
        if p not in ("fp32", "bf16"):
            ap.error(f"unknown precision {p!r}; use fp32 or bf16")

    torch.set_num_threads(args.threads)
    load0 = load1()
    print(f"torch {torch.__version__}, {args.threads} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"1-min load {load0:.2f}", flush=True)
    if load0 > 0.5:
        print(f"WARNING: the 1-minute load average is {load0:.2f} (> 0.5): another process is using the CPU and "
              f"the figures below will be noisy and low", file=sys.stderr, flush=True)
    measured = {"fp32": matmul_peak(torch.float32)}
    if "bf16" in precisions:
        measured["bf16"] = matmul_peak(torch.bfloat16)
    print("matmul peak 2048^3: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in measured.items())
          + f" (load {load1():.2f})", flush=True)
    # the MFU denominator of bf16 rows: the faster of the two ways to multiply bf16 values on this machine
    peaks = {"fp32": measured["fp32"]}
    if "bf16" in measured:
        peaks["bf16"] = max(measured["bf16"], measured["fp32"])

    results = []
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None  # the trainer's end-of-fit checkpoints go to RAM
    with tempfile.TemporaryDirectory(prefix="forgeline-bench-", dir=shm) as tmp:
        for shape in shapes:
            small = shape != "ref-tiny"
            timed = (args.small_steps or max(2, round(args.steps * 0.4))) if small else args.steps
            warmup = args.warmup if args.warmup is not None else (2 if small else 3)
            for precision in precisions:
                block = args.block or 1
                results.append(bench_one(shape, precision, warmup, timed, block, peaks, Path(tmp)))

    print()
    print("| shape | precision | HF tok/s | forgeline tok/s | ratio | HF MFU | forgeline MFU | load | others "
          "| paired ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['shape']} | {r['precision']} | {r['hf_tokens_per_s']:,.0f} | {r['forgeline_tokens_per_s']:,.0f} | "
              f"{r['ratio']:.2f}x | {100 * r['hf_mfu']:.1f}% | {100 * r['forgeline_mfu']:.1f}% | "
              f"{r['load_start']:.2f}-{r['load_end']:.2f} | {r['other_processes_cpu_cores']:.2f} | "
              f"{r['paired_ratio']:.2f}x |")
    print("\npeaks: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
          + f"; tokens/s from the median step time over {', '.join(str(r['timed_steps']) for r in results)} timed "
          f"steps; load: 1-minute load average before -> after each row (it counts this benchmark's own "
          f"{args.threads} threads); others: CPU cores used by other processes during the row; paired ratio: "
          f"median over i of HF step i time / forgeline step i time (run next to each other)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "peaks": peaks,
                                         "load_at_start": load0, "results": results}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
