"""Distributed layouts on CPU: tokens/s and per-rank peak memory of forgeline's trainer under each layout.

ref-small (vocab 16384, d 512, 8 layers, 8 query / 4 key-value heads, SwiGLU 1376, seq 512) with a global batch of
8 sequences per optimizer step, trained by `Trainer.fit` exactly as `forgeline pretrain` runs it, under:

    1 process        (2 threads: the whole machine)
    DDP x2           2 processes x 1 thread, 4 sequences each
    FSDP2 x2         ZeRO-3 (reshard after forward), 4 sequences each
    TP x2            tensor + sequence parallel, both ranks on the same 8 sequences
    PP x2            1F1B, 2 stages of 4 layers, 2 pipeline micro-batches of 4

Tokens/s = 8 x 512 / median optimizer-step time over the timed steps (warm-up steps excluded), as the trainer
records it. Peak memory per rank = the process's peak resident set (ru_maxrss) minus its resident set just before
the model was built (Python, torch and gloo themselves excluded); CPU torch has no allocator statistics, so this
is the honest measure. The machine's 1-minute load average is printed with every row: on a busy machine the
numbers are not comparable.

    .venv/bin/python bench/distributed.py [--layouts single,ddp,fsdp,tp,pp] [--steps 6] [--warmup 2]
        [--precision fp32|bf16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(vocab_size=16384, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1376, max_seq_len=512)
SEQ, GLOBAL_BATCH = 512, 8
LAYOUTS = {
    # name: (processes, threads per process, parallel overrides, micro-batch per data-parallel rank)
    "single": (1, 2, {}, 8),
    "ddp": (2, 1, {}, 4),
    "fsdp": (2, 1, {"dp_shard": -1}, 4),
    "tp": (2, 1, {"tp": 2}, 8),
    "pp": (2, 1, {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 2}, 8),
}
LABELS = {"single": "1 process", "ddp": "DDP x2", "fsdp": "FSDP2 x2 (ZeRO-3)", "tp": "TP x2 (+SP)",
          "pp": "PP x2 (1F1B)"}


def load1() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def rss_mb() -> float:
    """Current resident set of this process, MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class SyntheticLoader:
    """Random tokens; global micro-batch k is the same on every layout, rank r takes its data-parallel slice."""

    def __init__(self, micro_batch: int, dp_rank: int, vocab: int):
        self.micro_batch, self.dp_rank, self.vocab, self.k = micro_batch, dp_rank, vocab, 0

    def __next__(self):
        import torch

        g = torch.Generator().manual_seed(self.k)
        tokens = torch.randint(0, self.vocab, (GLOBAL_BATCH, SEQ + 1), generator=g)
        rows = tokens[self.dp_rank * self.micro_batch:(self.dp_rank + 1) * self.micro_batch]
        self.k += 1
        return {"input_ids": rows[:, :-1].contiguous(), "targets": rows[:, 1:].contiguous(), "doc_ids": None,
                "n_targets": rows.shape[0] * SEQ}

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, state):
        self.k = state["k"]


def worker(args) -> None:
    import torch

    from forgeline.config import PretrainConfig, validate_config
    from forgeline.model import build_model, training_flops_per_token
    from forgeline.parallel.layout import resolve_layout
    from forgeline.train.distributed import init_distributed, shutdown
    from forgeline.recipes.setup import prepare_whole_model as prepare_model, seed_everything
    from forgeline.train.trainer import Trainer

    n, threads, parallel, micro = LAYOUTS[args.layout]
    torch.set_num_threads(threads)
    dist = init_distributed("cpu")
    run_dir = Path(args.run_dir)
    cfg = validate_config(PretrainConfig, {
        "run_dir": str(run_dir), "model": SHAPE, "data": {"dataset": "unused", "seq_len": SEQ},
        "train": {"max_steps": args.warmup + args.steps, "micro_batch_size": micro, "lr": 3e-4, "warmup_steps": 1,
                  "precision": args.precision},
        "checkpoint": {"every": 10**6}, "stability": {"max_rollbacks": 0},
        "monitor": {"tensorboard": False, "progress": False, "val_every": 10**6, "peak_flops": 1e12},
        "parallel": parallel,
    })
    layout = resolve_layout(cfg.parallel, dist.world_size, cfg.model)
    base = rss_mb()
    seed_everything(0)
    model = build_model(cfg.model)
    executor = checkpointer = None
    if layout.is_plain_data_parallel:
        wrapped = prepare_model(model, cfg, dist)
    else:
        from forgeline.parallel.apply import parallelize
        from forgeline.parallel.checkpoint import ShardedCheckpointer

        par = parallelize(model, cfg, layout, dist)
        wrapped, executor, checkpointer = par.model, par.executor, ShardedCheckpointer(layout.describe())
    from forgeline.objectives import causal_lm_loss

    trainer = Trainer(model=wrapped, loss_fn=causal_lm_loss,
                      train_loader=SyntheticLoader(micro, layout.dp_rank(dist.rank), SHAPE["vocab_size"]),
                      train=cfg.train, checkpoint=cfg.checkpoint, stability=cfg.stability, monitor=cfg.monitor,
                      run_dir=run_dir, config_yaml="", dist=dist, executor=executor, checkpointer=checkpointer,
                      flops_per_token=training_flops_per_token(cfg.model, SEQ))
    result = trainer.fit()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    mine = {"rank": dist.rank, "peak_rss_mb": peak, "base_rss_mb": base, "peak_minus_base_mb": peak - base}
    everyone = [mine]
    if dist.world_size > 1:
        import torch.distributed as tdist

        everyone = [None] * dist.world_size
        tdist.all_gather_object(everyone, mine)
    if dist.is_main:
        times = [h["step_time_s"] for h in result.history[args.warmup:]]
        losses = [h["loss"] for h in result.history]
        out = {"layout": args.layout, "processes": n, "threads_per_process": threads,
               "describe": layout.describe(), "step_time_median_s": statistics.median(times),
               "tokens_per_s": GLOBAL_BATCH * SEQ / statistics.median(times), "losses": losses, "ranks": everyone,
               "load1_after": load1()}
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(name: str, args, tmp: Path) -> dict:
    n, threads, _, _ = LAYOUTS[name]
    out = tmp / f"{name}.json"
    common = ["--worker", "--layout", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--precision", args.precision, "--run-dir", str(tmp / name), "--json-out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if n == 1:
        command = [sys.executable, __file__, *common]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                   str(free_port()), __file__, *common]
    load_before = load1()
    t0 = time.time()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["load1_before"], result["wall_s"] = load_before, time.time() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    print(f"ref-small {SHAPE}, seq {SEQ}, global batch {GLOBAL_BATCH}, {args.precision}, "
          f"{args.warmup} warm-up + {args.steps} timed steps; {os.cpu_count()} CPUs")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.layouts.split(","):
            r = run_layout(name, args, Path(tmp))
            results.append(r)
            peaks = [rank["peak_minus_base_mb"] for rank in r["ranks"]]
            print(f"{LABELS[name]:<20} {r['tokens_per_s']:8.0f} tok/s  step {r['step_time_median_s']:6.2f} s  "
                  f"peak/rank {max(peaks):7.0f} MiB (RSS {max(x['peak_rss_mb'] for x in r['ranks']):6.0f})  "
                  f"load {r['load1_before']:.2f}->{r['load1_after']:.2f}", flush=True)
    ref = results[0]["losses"]
    print("\n| layout | processes x threads | tokens/s | step (s) | peak memory per rank (MiB, over baseline) | "
          "peak RSS per rank (MiB) | max |loss - 1st layout's| | load before -> after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        peaks = ", ".join(f"{x['peak_minus_base_mb']:.0f}" for x in r["ranks"])
        rss = ", ".join(f"{x['peak_rss_mb']:.0f}" for x in r["ranks"])
        diff = max(abs(a - b) for a, b in zip(r["losses"], ref))
        print(f"| {LABELS[r['layout']]} | {r['processes']} x {r['threads_per_process']} | {r['tokens_per_s']:.0f} | "
              f"{r['step_time_median_s']:.2f} | {peaks} | {rss} | {diff:.1e} | {r['load1_before']:.2f} -> "
              f"{r['load1_after']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
