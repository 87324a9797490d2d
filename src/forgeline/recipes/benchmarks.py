"""Benchmarks during training: a stage config's `eval:` section (config.BenchmarkEvalConfig) as one of the trainer's
periodic evaluations.

The scores are `forgeline eval`'s: the same request engine, prompts and scoring, run on the weights being trained,
so that the scores logged at the last step equal `forgeline eval` of the exported model with the same settings. They
are logged as eval/TASK/METRIC (the mean) and eval/TASK/METRIC_stderr, and eval/seconds says what they cost.

Everything that can be wrong with the section is found before the first step: the layout, the names, the files and
their documents in `check_benchmark_config` (called with the layout checks, before any process group exists or any
model is loaded), the tokenizer when `benchmark_evals` builds the engine on the placed model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import StageConfig
from ..errors import ConfigError
from ..parallel.layout import Layout
from ..train.distributed import reshard_fsdp
from ..train.trainer import PeriodicEval

if TYPE_CHECKING:
    from .setup import Run

NAME = "benchmarks"


def _task_classes() -> dict[str, type]:
    from ..eval.tasks import task_classes

    return task_classes()


def check_benchmark_config(cfg: StageConfig, layout: Layout) -> None:
    """The layout, the task names and every task's documents, for a stage whose `eval.tasks` is set; one
    ConfigError naming the field (or the DataError of a malformed file, naming its line) otherwise."""
    if not cfg.eval.tasks:
        return
    if layout.pp > 1:
        raise ConfigError(f"eval.tasks: benchmarks score with the LM head on every rank, and parallel.pp={layout.pp} "
                          "splits the model into pipeline stages; benchmark the exported model (forgeline eval) or "
                          "train under FSDP2 (parallel.dp_shard) or tensor parallelism (parallel.tp)")
    if layout.tp > 1 and cfg.parallel.sequence_parallel:
        raise ConfigError(f"eval.tasks: sequence parallelism splits every forward's tokens over the parallel.tp="
                          f"{layout.tp} ranks, and benchmark requests come in lengths of every size (generation one "
                          "token at a time); set parallel.sequence_parallel=false, or benchmark the exported model "
                          "with forgeline eval")
    from ..eval.tasks import get_task

    for name, path in task_files(cfg).items():
        if not get_task(name, path=path, num_fewshot=cfg.eval.num_fewshot, seed=cfg.eval.seed).docs():
            raise ConfigError(f"eval.data.{name}: {path} holds no documents")


def task_files(cfg: StageConfig) -> dict[str, Path]:
    """Each listed task's file or folder: eval.data's, else the task's copy in the shared data folder."""
    from ..eval.tasks import shared_data

    classes = _task_classes()
    unknown = [name for name in cfg.eval.tasks if name not in classes]
    if unknown:
        raise ConfigError(f"eval.tasks: unknown task{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(n) for n in unknown)}; the tasks are: {', '.join(sorted(classes))}")
    files = {}
    for name in cfg.eval.tasks:
        given = cfg.eval.data.get(name)
        path = Path(given) if given is not None else shared_data() / classes[name].default_path
        if not path.exists():
            if given is not None:
                raise ConfigError(f"eval.data.{name}: {path} does not exist")
            raise ConfigError(f"eval.data.{name} is not set and {name}'s default file {path} does not exist; set "
                              f"eval.data.{name} to the benchmark's file")
        files[name] = path
    return files


def benchmark_evals(run: Run) -> list[PeriodicEval]:
    """The periodic evaluation `run.cfg.eval` asks for (none when it lists no task) on the placed model; its engine
    is built now, so that a tokenizer it cannot use stops the stage before it trains."""
    from ..eval.engine import RequestEngine
    from ..eval.run import evaluate

    ecfg = run.cfg.eval
    if not ecfg.tasks:
        return []
    files = task_files(run.cfg)
    # Under DDP each rank scores its share of the requests and the results are gathered; a model whose forward is
    # collective (FSDP2, tensor parallelism, DeepSpeed ZeRO-3) needs every rank to run the same forwards. run.model is
    # the module itself under every wrapper (DDP, compile, DeepSpeed's engine), sharded in place under FSDP2 and TP.
    engine = RequestEngine(run.model, run.tokenizer, batch_size=ecfg.batch_size, shard=run.whole_model)
    data = {name: str(path) for name, path in files.items()}
    device = run.dist.device

    def run_benchmarks(model: torch.nn.Module) -> dict[str, float]:
        started = time.perf_counter()
        # Generation draws from the global generator; training's random stream (adapter dropout) must not depend
        # on whether benchmarks ran.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            results = evaluate(engine, ecfg.tasks, data=data, num_fewshot=ecfg.num_fewshot, limit=ecfg.limit,
                               sample=ecfg.sample, seed=ecfg.seed, report=None)
        reshard_fsdp(model)
        out: dict[str, float] = {}
        for result in results:
            for metric, summary in result.metrics.items():
                out[f"eval/{result.task}/{metric}"] = summary["mean"]
                out[f"eval/{result.task}/{metric}_stderr"] = summary["stderr"]
        out["eval/seconds"] = time.perf_counter() - started
        return out

    return [PeriodicEval(name=NAME, every=ecfg.every, fn=run_benchmarks, describe=describe)]


def describe(metrics: dict[str, float]) -> str:
    """'arc_easy acc 0.2500 ± 0.2500, acc_norm 0.5000 ± 0.2887; mmlu acc 0.2600 ± 0.0120 (1.2 s)' from
    run_benchmarks' metrics."""
    tasks: dict[str, list[str]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[2].endswith("_stderr"):
            continue
        _, task, metric = parts
        stderr = metrics.get(f"{key}_stderr")
        tasks.setdefault(task, []).append(f"{metric} {value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
    text = "; ".join(f"{task} {', '.join(values)}" for task, values in tasks.items())
    if "eval/seconds" in metrics:
        text += f" ({metrics['eval/seconds']:.1f} s)"
    return text
