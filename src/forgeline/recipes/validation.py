"""Held-out loss for any stage whose objective is a summed loss over counted targets: every rank evaluates its
share of the validation batches under the run's layout, and the sums are reduced before dividing."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..train.distributed import all_reduce_sum, reshard_fsdp
from ..train.executor import StepExecutor
from .setup import Run


def loss_eval_fn(run: Run, val_loader, loss_fn, *, max_batches: int | None = None,
                 tokens_per_byte: float | None = None) -> Callable[[torch.nn.Module], dict[str, float]]:
    """`val_loss` (mean over targets), `val_ppl`, and with `tokens_per_byte` the bits per byte of the text, which
    make runs with different tokenizers comparable."""
    executor = run.executor or StepExecutor(run.dist)
    cfg = run.cfg
    limit = max_batches or cfg.monitor.val_batches

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        for batch in val_loader.iter_eval_batches(limit):
            loss = executor.evaluate(model, loss_fn, batch, precision=cfg.train.precision, device=run.dist.device)
            if executor.reports_loss:
                loss_sum += loss
            if executor.counts_targets:
                count += int(batch["n_targets"])
        loss_sum, count = all_reduce_sum(loss_sum), all_reduce_sum(count)
        model.train(was_training)
        reshard_fsdp(model)
        if count.item() == 0:
            return {}
        val_loss = float(loss_sum / count)
        out: dict[str, Any] = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if tokens_per_byte is not None:  # nats/token -> bits/token -> bits/byte
            out["val_bpb"] = val_loss / math.log(2) * tokens_per_byte
        return out

    return evaluate


def objective_eval_fn(run: Run, val_loader, objective, *, max_batches: int | None = None
                      ) -> Callable[[torch.nn.Module], dict[str, float]]:
    """`val_loss` and `val_<metric>` for every metric the objective reports, each a mean over the held-out units
    the objective counts (pairs, examples): the preference stages' held-out accuracy, margins and rewards."""
    from ..train.executor import autocast_context, count_key, to_device

    key = count_key(objective)
    cfg = run.cfg
    limit = max_batches or cfg.monitor.val_batches

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        names: list[str] | None = None
        sums: list[float] = []
        for batch in val_loader.iter_eval_batches(limit):
            with autocast_context(run.dist.device, cfg.train.precision):
                out = objective(model, to_device(batch, run.dist.device))
            if names is None:
                names = sorted(out.metrics)
                sums = [0.0] * (len(names) + 2)
            values = [float(out.loss), float(out.count)] + [out.metrics[n] for n in names]
            sums = [a + b for a, b in zip(sums, values)]
        totals = all_reduce_sum(torch.tensor(sums, dtype=torch.float64)).tolist()
        model.train(was_training)
        reshard_fsdp(model)
        if not names and not totals or totals[1] == 0:
            return {}
        n = totals[1]
        out = {"val_loss": totals[0] / n, f"val_{key}": n}
        out.update({f"val_{name}": value / n for name, value in zip(names or [], totals[2:])})
        return out

    return evaluate
