"""What a run reports: metrics.jsonl, TensorBoard events, a progress bar, events, an end-of-run summary, MFU."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Published dense bf16 peaks (FLOP/s) for the GPUs people train on; on CPU the peak is measured instead.
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul on this CPU with the current thread count: the honest MFU denominator on CPUs,
    whose peak depends on thread count, ISA and what else is running."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    n, start = 0, time.perf_counter()
    while True:
        a @ b
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed > seconds and n >= 3:
            return 2.0 * size**3 * n / elapsed


def device_peak_flops(device: torch.device, precision: str) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BF16_PEAK.items():
            if key in name:
                return peak if precision == "bf16" else peak / 2  # TF32 tensor cores: half the bf16 rate
        return 100e12
    if precision == "bf16":  # bf16 products may run on the fp32 units where those are faster (bf16_matmul.py)
        return max(measure_matmul_peak(torch.bfloat16), measure_matmul_peak(torch.float32))
    return measure_matmul_peak(torch.float32)


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem_alloc_gb": torch.cuda.memory_allocated(device) / 2**30,
                "mem_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = 0
    return {"mem_rss_gb": rss / 2**30, "mem_peak_gb": peak_kb / 2**20}


class RunLogger:
    """Writes metrics and events of rank 0; other ranks get a logger that does nothing but count."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, progress: bool, total_steps: int,
                 start_step: int = 0):
        self.enabled = enabled
        self.run_dir = run_dir
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._tb = None
        self._progress = None
        self._task = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(run_dir / "metrics.jsonl", start_step)
        self._truncate(run_dir / "events.jsonl", start_step)
        self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self._events = open(run_dir / "events.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events past the resumed step, so a resumed run's curves do not double back.
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.progress import TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=False,
                disable=not sys.stderr.isatty() and os.environ.get("FORGELINE_PROGRESS") != "1",
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
            self._progress.start()

    @staticmethod
    def _truncate(path: Path, start_step: int) -> None:
        """On resume, drop the records written after the checkpoint we resume from (they will be redone)."""
        if not path.exists():
            return
        if start_step == 0:
            path.unlink()
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        path.write_text("".join(k + "\n" for k in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **metrics}
        self.history.append(record)
        if not self.enabled:
            return
        self._metrics.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key,
                                        value, step)
        if self._progress is not None and "loss" in metrics:
            info = f"loss {metrics['loss']:.4f}  lr {metrics.get('lr', 0):.2e}  {metrics.get('tokens_per_s', 0):,.0f} tok/s"
            self._progress.update(self._task, completed=step, info=info)

    def event(self, step: int, kind: str, message: str, *, echo: bool = True, **fields: Any) -> None:
        """Record an event in events.jsonl; `echo` also prints it."""
        record = {"step": step, "event": kind, "message": message, **fields}
        self.events.append(record)
        if not self.enabled:
            return
        self._events.write(json.dumps(record) + "\n")
        if echo:
            self.print(f"[{kind}] step {step}: {message}")

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None and self._progress.live.is_started:
            self._progress.console.print(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        self._metrics.close()
        self._events.close()

    def summary_table(self, title: str, rows: list[tuple[str, str]]) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, show_header=False)
        table.add_column("metric", style="bold")
        table.add_column("value", justify="right")
        for key, value in rows:
            table.add_row(key, value)
        Console(stderr=True).print(table)
