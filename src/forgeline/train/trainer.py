"""The one training loop.

Every stage (pre-training, SFT, reward modelling, DPO, ORPO, ...) runs through `Trainer.fit`. What differs between
them is an objective and the collator that builds its batches, never a subclass:

    objective(model, batch) -> LossOutput(loss summed over the batch's units, count, tokens, metric sums)

(train/executor.py has the contract). The trainer divides by the number of units in the whole optimizer step (all
accumulation micro-batches on all ranks), so an update is the same whatever the micro-batch / accumulation / rank
split; metrics are reduced the same way, and tokens/s and MFU count the tokens processed, not the loss targets.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.distributed as torch_dist
from torch import nn

from ..config import CheckpointConfig, MonitorConfig, StabilityConfig, TrainConfig
from ..errors import CheckpointError, ConfigError
from ..model.formats.checkpoint import latest_checkpoint
from .checkpoint import FullCheckpointer, select_checkpoint
from .distributed import DistInfo, all_reduce_sum, unwrap
from .executor import Objective, StepExecutor, count_key
from .monitor import RunLogger, device_peak_flops, memory_stats
from .optim import LRSchedule, build_optimizer
from .stability import SpikeDetector, TrainingDiverged

# The TrainConfig fields the learning-rate schedule is computed from (absent ones are skipped).
SCHEDULE_FIELDS = ("lr", "schedule", "warmup_steps", "warmup_ratio", "max_steps", "decay_steps", "min_lr_ratio")

EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass(frozen=True)
class PeriodicEval:
    """An evaluation on its own cadence: `fn` runs every `every` optimizer steps and at the last step, on every rank
    (it may be collective), and its metrics are logged at that step. `describe` turns them into the line printed
    then and shown in the end-of-run summary under `name`; without it nothing is printed."""

    name: str
    every: int
    fn: EvalFn
    describe: Callable[[dict[str, float]], str] | None = None

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"{self.name}: an evaluation every {self.every} steps; expected at least 1")


class StatefulLoader(Protocol):
    def __next__(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    history: list[dict[str, Any]]
    events: list[dict[str, Any]]
    rollbacks: int
    skipped_nonfinite: int
    tokens_seen: int
    train_seconds: float
    final_eval: dict[str, float] = field(default_factory=dict)
    # per PeriodicEval name: (the step it last ran at, its metrics then)
    final_periodic: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)
    preempted: str | None = None  # the signal's name ("SIGTERM") when a signal stopped the run early
    checkpoint: Path | None = None  # the newest checkpoint this run wrote (rank 0; None on ranks that write none)


# SIGUSR1 is what Slurm sends ahead of a time limit (`#SBATCH --signal=USR1@120`); SIGTERM what Slurm, Kubernetes
# and torchrun send to stop a job.
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


class StopRequest:
    """Records a preemption signal for the loop to act on between steps. Later signals change nothing: one signal
    often arrives twice (Slurm signals every process of a step, and torchrun forwards what it got to its workers).
    SIGKILL or Ctrl-C (SIGINT, not handled here) stop the process at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; such a caller keeps the default
        for name in PREEMPTION_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum  # no printing here: the handler may interrupt a write to the same stream

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Trainer:
    def __init__(
        self,
        *,
        model: nn.Module,
        loss_fn: Objective,
        train_loader: StatefulLoader,
        train: TrainConfig,
        checkpoint: CheckpointConfig,
        stability: StabilityConfig,
        monitor: MonitorConfig,
        run_dir: Path,
        config_yaml: str,
        dist: DistInfo,
        grad_accum_steps: int = 1,
        flops_per_token: float | None = None,
        eval_fn: EvalFn | None = None,
        periodic_evals: Sequence[PeriodicEval] = (),
        sample_fn: Callable[[nn.Module], str] | None = None,
        executor: StepExecutor | None = None,
        checkpointer: Any | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        self.model = model  # possibly wrapped (DDP); `unwrap(model)` is what checkpoints hold
        self.loss_fn = loss_fn
        self.loader = train_loader
        self.cfg, self.ckpt_cfg, self.stab_cfg, self.mon_cfg = train, checkpoint, stability, monitor
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.config_yaml = config_yaml
        self.dist = dist
        self.grad_accum_steps = grad_accum_steps
        self.flops_per_token = flops_per_token
        self.eval_fn = eval_fn
        names = [p.name for p in periodic_evals]
        if len(set(names)) != len(names):
            raise ValueError(f"periodic evaluations need distinct names, got {names}")
        self.periodic_evals = tuple(periodic_evals)
        self.sample_fn = sample_fn
        self.executor = executor or StepExecutor(dist)
        if not self.executor.supports(loss_fn):
            raise ConfigError(f"{getattr(loss_fn, '__name__', loss_fn)!r} cannot run under this layout "
                              f"({type(self.executor).__name__}); choose another parallel layout")
        # Full checkpoints (safetensors, written by rank 0) for whole-model layouts; forgeline.parallel passes a
        # sharded (DCP) one. Both read either format, so a run may resume under another layout.
        self.checkpointer = checkpointer or FullCheckpointer()
        self.optimizer = optimizer or build_optimizer(
            unwrap(model), lr=train.lr, weight_decay=train.weight_decay, betas=train.betas, eps=train.eps
        )
        self.schedule = LRSchedule.from_config(train)
        self.detector = SpikeDetector(stability)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step = 0
        self.tokens_seen = 0
        self.rollbacks = 0
        self.skipped_nonfinite = 0
        self._tokens_this_run = 0
        self.grad_alerts = {"warmup": 0, "after": 0}  # this session's gradient-norm alerts
        self.stop_request = StopRequest()
        self._saved: tuple[int, Path | None] | None = None  # (step, path) of the last save
        # what a stage adds to every checkpoint's trainer_state.json (an adapter run: the base it adapts)
        self.extra_state: dict[str, Any] = {}

    # -- state ---------------------------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "rollbacks": self.rollbacks,
            "skipped_nonfinite": self.skipped_nonfinite,
            "data": self.loader.state_dict(),
            "schedule": self.schedule.state_dict(),
            # the config fields behind the schedule, so that a resume can say which of them changed
            "schedule_config": {k: getattr(self.cfg, k) for k in SCHEDULE_FIELDS if hasattr(self.cfg, k)},
            "stability": self.detector.state_dict(),
            "world_size": self.dist.world_size,
            **self.extra_state,
        }

    def save(self) -> Path | None:
        """Every rank calls this; the checkpointer returns once the checkpoint is complete and renamed into place."""
        path = self.checkpointer.save(
            self.checkpoint_dir, self.step, model=unwrap(self.model), optimizer=self.optimizer,
            trainer_state=self.trainer_state(), config_yaml=self.config_yaml, keep_last=self.ckpt_cfg.keep_last,
            dist=self.dist,
        )
        self._saved = (self.step, path)
        return path

    def restore(self, path: Path, *, restore_data: bool = True, resume: bool = False, verify: bool = True
                ) -> dict[str, Any]:
        """Load a checkpoint into the model, optimizer, schedule, detector and (with restore_data) the loader;
        returns its trainer state. `resume`: also the run-wide counters (a rollback keeps this session's count)."""
        state = self.checkpointer.load(path, model=unwrap(self.model), optimizer=self.optimizer, dist=self.dist,
                                       verify=verify)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        if resume:
            self.rollbacks = int(state.get("rollbacks", 0))
        self.schedule.load_state_dict(state["schedule"])
        self.detector.load_state_dict(state["stability"])
        if restore_data:
            self.loader.load_state_dict(state["data"])
        return state

    def _print_main(self, message: str) -> None:
        if self.dist.is_main:
            print(message, file=sys.stderr, flush=True)

    def find_checkpoint(self) -> Path | None:
        """The newest intact checkpoint (rank 0 verifies, reports and renames damaged ones); collective."""
        found, _ = select_checkpoint(self.checkpoint_dir, self.dist, report=self._print_main)
        return found

    def schedule_change(self, state: dict[str, Any]) -> str | None:
        """One line naming the schedule settings that differ from the checkpoint's, and what that does to the
        learning rate at the resumed step; None when the schedule is the same."""
        # The schedule's state holds the values it computes from (step aside); the same values, the same curve.
        saved = {k: v for k, v in state.get("schedule", {}).items() if k != "step"}
        current = {k: v for k, v in self.schedule.state_dict().items() if k != "step"}
        if saved == current:
            return None
        old = copy.copy(self.schedule)
        for key, value in saved.items():
            if hasattr(old, key):
                setattr(old, key, value)
        saved_cfg = state.get("schedule_config")
        if isinstance(saved_cfg, dict):
            changes = [f"train.{k} {saved_cfg[k]} -> {getattr(self.cfg, k)}" for k in SCHEDULE_FIELDS
                       if k in saved_cfg and hasattr(self.cfg, k) and saved_cfg[k] != getattr(self.cfg, k)]
        else:  # a checkpoint from before schedule_config: the schedule's own values
            changes = [f"schedule {k} {saved.get(k)} -> {current.get(k)}" for k in sorted(set(saved) | set(current))
                       if saved.get(k) != current.get(k)]
        before, after = old.lr_at(self.step), self.schedule.lr_at(self.step)
        effect = (f"the learning rate at step {self.step} changes from {before:.1e} to {after:.1e}" if before != after
                  else f"the learning rate at step {self.step} stays {after:.1e}; the schedule differs after it")
        return f"resume: {', '.join(changes) or 'the learning-rate schedule changed'}; {effect}"

    # -- one optimizer step --------------------------------------------------------------------------------------

    def _forward_backward(self, micro_batches: list[dict[str, Any]]) -> tuple[float, dict[str, float], int, int]:
        """Forward and backward of one step; returns the global mean loss, the global mean metrics, the units the
        loss is normalised by and the tokens processed, all summed over micro-batches and ranks."""
        ex = self.executor
        key = count_key(self.loss_fn)
        n_local = sum(int(b[key]) for b in micro_batches) if ex.counts_targets else 0
        n_global = int(all_reduce_sum(torch.tensor(n_local, dtype=torch.float64)).item())
        if n_global == 0:
            return float("nan"), {}, 0, 0
        # DDP and FSDP average gradients over the data-parallel ranks; scaling by their number turns that back into
        # a sum over all units.
        scale = ex.dp_size / n_global
        totals = ex.forward_backward(self.model, self.loss_fn, micro_batches, scale=scale,
                                     precision=self.cfg.precision, device=self.dist.device)
        # one reduction for the loss, the tokens and every metric (objectives report the same names every batch)
        names = sorted(totals.metrics)
        local = torch.tensor([float(totals.loss) if ex.reports_loss else 0.0,
                              float(totals.tokens) if ex.counts_targets else 0.0,
                              *[totals.metrics[k] if ex.reports_loss else 0.0 for k in names]], dtype=torch.float64)
        summed = all_reduce_sum(local).tolist()
        metrics = {k: v / n_global for k, v in zip(names, summed[2:])}
        return summed[0] / n_global, metrics, n_global, int(summed[1])

    def _watched(self, loss: float, grad_norm: float, metrics: dict[str, float]) -> float:
        """The value the spike test watches (stability.signal): the loss, the gradient norm, or a logged metric.
        An RL stage's loss can be negative or zero in a healthy run, so it watches something positive instead."""
        signal = self.stab_cfg.signal
        if signal == "loss":
            return loss
        if signal == "grad_norm":
            return grad_norm
        if signal not in metrics:
            raise ConfigError(f"stability.signal={signal!r}: this stage logs no such metric (it logs loss, grad_norm"
                              f"{', ' if metrics else ''}{', '.join(sorted(metrics))})")
        return float(metrics[signal])

    def _clip(self) -> float:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else math.inf
        return self.executor.clip_grad_norm(self.params, max_norm)

    def _rollback(self, loss: float, logger: RunLogger) -> None:
        self.rollbacks += 1
        if self.rollbacks > self.stab_cfg.max_rollbacks:
            raise TrainingDiverged(
                f"{self.stab_cfg.signal} spiked to {loss:.4f} (running mean {self.detector.mean:.4f}) at step "
                f"{self.step} after "
                f"{self.stab_cfg.max_rollbacks} rollbacks; the run is unstable. Lower train.lr, raise "
                f"train.warmup_steps, or inspect the data around this step (events.jsonl lists each spike)."
            )
        ckpt = self.find_checkpoint()
        if ckpt is None:
            raise TrainingDiverged(f"{self.stab_cfg.signal} spiked at step {self.step} and there is no intact "
                                   "checkpoint to roll back to")
        spike_step = self.step
        position_after_spike = self.loader.state_dict()
        self.restore(ckpt, restore_data=self.stab_cfg.skip_batches is not None, verify=False)
        if self.stab_cfg.skip_batches is None:
            # Skip every batch from the checkpoint through the spike: replaying them from the same weights tends to
            # reproduce it.
            self.loader.load_state_dict(position_after_spike)
            skipped = (spike_step - self.step + 1) * self.grad_accum_steps
        else:
            skipped = self.stab_cfg.skip_batches
            for _ in range(skipped):
                next(self.loader)
        self.optimizer.zero_grad(set_to_none=True)
        logger.event(
            spike_step, "rollback",
            f"{self.stab_cfg.signal} {loss:.4f} > {self.stab_cfg.spike_factor} x running mean; rolled back to {ckpt.name} "
            f"(step {self.step}) and skipped {skipped} micro-batches",
            loss=loss, to_step=self.step, checkpoint=str(ckpt), skipped_batches=skipped, rollbacks=self.rollbacks,
        )

    # -- the loop ------------------------------------------------------------------------------------------------

    def fit(self, *, resume: bool | str = False, resume_from: Path | None = None) -> TrainResult:
        """Train to `max_steps`. resume: False (start at step 0), True (continue from the newest intact checkpoint;
        an error when there is none) or "auto" (continue when there is one, else start at step 0). `resume_from`: a
        checkpoint the caller already chose and verified (pretrain does, before building anything)."""
        cfg = self.cfg
        if resume not in (False, True, "auto"):
            raise ConfigError(f"resume={resume!r}: expected False, True or 'auto'")
        schedule_note = None
        if resume_from is None and resume:
            resume_from = self.find_checkpoint()
            if resume_from is None and resume is True:
                raise CheckpointError(f"nothing to resume: {self.checkpoint_dir} holds no intact checkpoint")
            verify = True
        else:
            verify = False
        if resume_from is not None:
            state = self.restore(resume_from, resume=True, verify=verify)
            schedule_note = self.schedule_change(state)
        start_step = self.step
        logger = RunLogger(
            self.run_dir, enabled=self.dist.is_main, tensorboard=self.mon_cfg.tensorboard,
            progress=self.mon_cfg.progress, total_steps=cfg.max_steps, start_step=start_step,
        )
        if resume_from is not None:
            logger.print(f"resumed from step {start_step} ({self.tokens_seen:,} tokens seen)")
            if schedule_note:
                logger.print(schedule_note)
        peak = self.mon_cfg.peak_flops or device_peak_flops(self.dist.device, cfg.precision)
        if self.stab_cfg.max_rollbacks > 0 and latest_checkpoint(self.checkpoint_dir) is None:
            self.save()  # the spike rollback always needs a last good state to return to
        self.model.train()
        last_loss = None
        train_seconds = 0.0
        final_eval: dict[str, float] = {}
        final_periodic: dict[str, tuple[int, dict[str, float]]] = {}
        preempted = None
        self.stop_request.install()
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                lr = self.schedule.apply(self.optimizer)
                micro_batches = [next(self.loader) for _ in range(self.grad_accum_steps)]
                loss, step_metrics, n_units, n_tokens = self._forward_backward(micro_batches)
                if hasattr(self.loader, "pop_metrics"):  # a data source that measures its own work (rollouts)
                    step_metrics.update(self.loader.pop_metrics())
                grad_norm = self._clip()
                watched = self._watched(loss, grad_norm, step_metrics)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    self.executor.skip_step(self.optimizer)
                    self.skipped_nonfinite += 1
                    logger.event(self.step, "nonfinite",
                                 f"non-finite loss ({loss}) or gradient norm ({grad_norm}); update skipped",
                                 loss=loss if math.isfinite(loss) else str(loss),
                                 grad_norm=grad_norm if math.isfinite(grad_norm) else str(grad_norm))
                elif self.detector.is_spike(watched):
                    self._rollback(watched, logger)
                    continue
                else:
                    self.executor.optimizer_step(self.optimizer)
                    self.detector.update(watched)
                    last_loss = loss
                    if grad_norm > self.stab_cfg.grad_norm_alert:
                        # Large norms are normal while the learning rate warms up: counted for the summary and
                        # recorded, but not printed, so that a healthy run does not read like a failing one.
                        in_warmup = self.step < self.schedule.warmup_steps
                        self.grad_alerts["warmup" if in_warmup else "after"] += 1
                        logger.event(self.step, "grad_norm_alert",
                                     f"gradient norm {grad_norm:.2f} above {self.stab_cfg.grad_norm_alert}",
                                     echo=not in_warmup, grad_norm=grad_norm, warmup=in_warmup)
                if self.dist.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                train_seconds += dt
                self.schedule.advance()
                self.step += 1
                self.tokens_seen += n_tokens
                self._tokens_this_run += n_tokens
                if self.step % self.mon_cfg.log_every == 0 or self.step == cfg.max_steps:
                    tokens_per_s = n_tokens / dt
                    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": self.tokens_seen,
                               "step_tokens": n_tokens, "loss_units": n_units, "tokens_per_s": tokens_per_s,
                               "step_time_s": dt}
                    if self.flops_per_token:
                        metrics["mfu"] = self.flops_per_token * tokens_per_s / (peak * self.dist.world_size)
                    metrics.update(step_metrics)
                    metrics.update(memory_stats(self.dist.device))
                    logger.log(self.step, metrics)
                if self.eval_fn is not None and (self.step % self.mon_cfg.val_every == 0 or self.step == cfg.max_steps):
                    final_eval = self.eval_fn(self.model)
                    logger.log(self.step, final_eval)
                for periodic in self.periodic_evals:
                    if self.step % periodic.every == 0 or self.step == cfg.max_steps:
                        results = periodic.fn(self.model)
                        logger.log(self.step, results)
                        final_periodic[periodic.name] = (self.step, results)
                        if periodic.describe is not None:
                            logger.print(f"{periodic.name} @ step {self.step}: {periodic.describe(results)}")
                if self.sample_fn is not None and self.mon_cfg.sample_every and self.step % self.mon_cfg.sample_every == 0:
                    logger.print(f"sample @ step {self.step}: {self.sample_fn(unwrap(self.model))!r}")
                if self.step % self.ckpt_cfg.every == 0 or self.step == cfg.max_steps:
                    self.save()
                signum = self._agreed_stop_signal()
                if signum and self.step < cfg.max_steps:
                    if self._saved is None or self._saved[0] != self.step:
                        self.save()
                    preempted = signal_name(signum)
                    break
        finally:
            self.stop_request.uninstall()
            logger.close()
        result = TrainResult(
            steps=self.step, final_loss=last_loss, history=logger.history, events=logger.events,
            rollbacks=self.rollbacks, skipped_nonfinite=self.skipped_nonfinite, tokens_seen=self.tokens_seen,
            train_seconds=train_seconds, final_eval=final_eval, final_periodic=final_periodic, preempted=preempted,
            checkpoint=self._saved[1] if self._saved is not None else None,
        )
        self._summary(logger, result, start_step, peak)
        return result

    def _agreed_stop_signal(self) -> int:
        """The preemption signal any rank has received (0: none), the same on every rank so that all stop after the
        same step: one small all-reduce per step when there are several ranks."""
        signum = self.stop_request.signum or 0
        if self.dist.world_size > 1 and torch_dist.is_initialized():
            flag = torch.tensor([signum], dtype=torch.int64, device=self.dist.device)
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    def _summary(self, logger: RunLogger, result: TrainResult, start_step: int, peak: float) -> None:
        steps_run = result.steps - start_step
        rows = [("steps", f"{result.steps:,}"), ("tokens seen", f"{result.tokens_seen:,}")]
        if result.final_loss is not None:
            rows.append(("final train loss", f"{result.final_loss:.4f}"))
        for key in sorted(result.final_eval, key=lambda k: (k not in ("val_loss", "val_ppl", "val_bpb"), k)):
            if key.startswith("val_"):
                rows.append((key.replace("_", " "), f"{result.final_eval[key]:.4f}"))
        for periodic in self.periodic_evals:
            if periodic.describe is not None and periodic.name in result.final_periodic:
                step, metrics = result.final_periodic[periodic.name]
                rows.append((f"{periodic.name} (step {step})", periodic.describe(metrics)))
        if steps_run and result.train_seconds > 0:
            tps = self._tokens_this_run / result.train_seconds
            rows.append(("tokens/s (mean)", f"{tps:,.0f}"))
            if self.flops_per_token:
                rows.append(("MFU", f"{100 * self.flops_per_token * tps / (peak * self.dist.world_size):.1f}%"))
        if sum(self.grad_alerts.values()):
            rows.append(("gradient-norm alerts", f"{self.grad_alerts['warmup']} in warmup, {self.grad_alerts['after']} "
                                                 "after (events.jsonl)"))
        rows += [("rollbacks", str(result.rollbacks)), ("skipped non-finite", str(result.skipped_nonfinite)),
                 ("train time", f"{result.train_seconds:.1f} s"), ("run dir", str(self.run_dir))]
        logger.summary_table("forgeline run summary", rows)

