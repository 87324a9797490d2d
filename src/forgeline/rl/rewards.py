"""Reward functions for GRPO, RLOO and PPO.

A reward function is ``f(prompts, completions, records) -> one float per completion``: the prompts as given to the
model, the generated completions, and the prompt dataset's record of each row (holding the reference ``answer``, a
program's ``test``, ...). Rewards are named in a run's config as a list of ``name`` or ``{name, weight}``:

* built-ins (``BUILTIN_REWARDS``): ``arithmetic`` (exact match of :func:`forgeline.data.synthetic.answer_of` with
  ``record["answer"]``), ``gsm8k`` (exact match after GSM8K's normalisation: the completion's ``#### N`` answer, else
  its last number, against ``record["answer"]``, a full GSM8K solution or just the number), ``gsm8k_format`` (1.0
  when the completion has the ``#### N`` answer that GSM8K's strict match reads) and ``unit_tests`` (HumanEval-style:
  ``record["prompt"]`` (else the prompt) + completion + ``record["test"]`` + ``check(record["entry_point"])`` run in
  :mod:`forgeline.eval.sandbox`, 1.0 when it passes);
* ``module:function``, imported from PYTHONPATH or the working directory, or ``path/to/file.py:function``.

:func:`build_reward` combines them into a :class:`CombinedReward`: calling it gives the weighted sums, its ``score``
method a :class:`RewardResult` with each function's values too, for logging. A function that raises, returns the
wrong number of values or returns NaN or inf fails its rows (:func:`score_safely`): they are listed with a one-line
reason naming the function, for the RL loop to report and skip the batch. Nothing is turned into a zero.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..data.synthetic import answer_of
from ..errors import ConfigError, DataError, ForgelineError
from ..eval.sandbox import SandboxLimits, build_program, run_many
from ..eval.tasks.gsm8k import flexible_answer, normalise, strict_answer

__all__ = [
    "BUILTIN_REWARDS",
    "CombinedReward",
    "PartScore",
    "RewardError",
    "RewardFunction",
    "RewardResult",
    "RewardSpec",
    "UnitTestReward",
    "arithmetic_reward",
    "build_reward",
    "gsm8k_format_reward",
    "gsm8k_reward",
    "load_reward",
    "parse_reward_specs",
    "score_safely",
]

RewardFunction = Callable[[Sequence[str], Sequence[str], Sequence[dict]], Sequence[float]]


class RewardError(ForgelineError):
    """A reward function failed on a batch; the message names the function and what it did."""


# ----------------------------------------------------------------------------------------------------- built-ins


def _field(record: Any, key: str, row: int) -> Any:
    if not isinstance(record, Mapping) or record.get(key) is None:
        present = ", ".join(repr(k) for k in list(record)[:10]) if isinstance(record, Mapping) else "not a mapping"
        raise DataError(f"row {row}: the prompt record has no {key!r} field (fields: {present or 'none'})")
    return record[key]


def arithmetic_reward(prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]) -> list[float]:
    scores = []
    for row, (completion, record) in enumerate(zip(completions, records)):
        gold = answer_of(str(_field(record, "answer", row)))
        if gold is None:
            raise DataError(f"row {row}: answer {record['answer']!r} is not an integer")
        scores.append(float(answer_of(completion) == gold))
    return scores


def _gsm8k_reference(answer: Any, row: int) -> str:
    text = str(answer)
    final = strict_answer(text)
    gold = normalise(final if final is not None else text)
    if not gold:
        raise DataError(f"row {row}: answer {text[-60:]!r} holds no final number")
    return gold


def gsm8k_reward(prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]) -> list[float]:
    scores = []
    for row, (completion, record) in enumerate(zip(completions, records)):
        gold = _gsm8k_reference(_field(record, "answer", row), row)
        # The answer the completion marks as final when it marks one, as strict match reads it; else the last
        # number, as flexible extract does, so a right answer counts before the format is learned.
        got = strict_answer(completion)
        got = got if got is not None else flexible_answer(completion)
        scores.append(float(got is not None and normalise(got) == gold))
    return scores


def gsm8k_format_reward(prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]) -> list[float]:
    return [float(strict_answer(completion) is not None) for completion in completions]


@dataclass(frozen=True)
class UnitTestReward:
    """HumanEval-style: 1.0 when the completed program passes its tests in the sandbox, `workers` at a time."""

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]) -> list[float]:
        programs = []
        for row, (prompt, completion, record) in enumerate(zip(prompts, completions, records)):
            # The record's own prompt is the code the completion continues; the model's prompt may be wrapped in a
            # chat template or few-shot examples that are no part of the program.
            code = record.get("prompt") if isinstance(record, Mapping) and record.get("prompt") is not None else prompt
            programs.append(build_program(str(code), completion, str(_field(record, "test", row)),
                                          str(_field(record, "entry_point", row))))
        return [float(result.passed) for result in run_many(programs, self.limits, workers=self.workers)]


BUILTIN_REWARDS: dict[str, RewardFunction] = {
    "arithmetic": arithmetic_reward,
    "gsm8k": gsm8k_reward,
    "gsm8k_format": gsm8k_format_reward,
    "unit_tests": UnitTestReward(),
}


# ------------------------------------------------------------------------------------------------- user rewards


def load_reward(name: str) -> RewardFunction:
    """A built-in by name, or ``module:function`` / ``path/to/file.py:function`` (the function may be dotted,
    ``module:Class.method``)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a reward must be named by a non-empty string, got {name!r}")
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    source, _, attribute = name.rpartition(":")
    if not source or not attribute:
        raise ConfigError(f"unknown reward {name!r}: give a built-in ({', '.join(BUILTIN_REWARDS)}), "
                          "module:function or path/to/file.py:function")
    module = _load_file(name, source) if source.endswith(".py") else _import_module(name, source)
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ConfigError(f"reward {name!r}: {source} has no {attribute!r}")
        found = getattr(found, part)
    if not callable(found):
        raise ConfigError(f"reward {name!r}: {attribute!r} is a {type(found).__name__}, not a function")
    return found


def _import_module(name: str, module_name: str) -> ModuleType:
    # `forgeline` runs as a console script, whose sys.path lacks the working directory that `python -m` would add.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"reward {name!r}: no module named {e.name!r} on PYTHONPATH or in the working "
                              f"directory {cwd}") from None
        raise ConfigError(f"reward {name!r}: importing {module_name} failed: {e}") from e
    except Exception as e:
        raise ConfigError(f"reward {name!r}: importing {module_name} failed: {type(e).__name__}: {e}") from e
    finally:
        if added:
            sys.path.remove(cwd)


def _load_file(name: str, file: str) -> ModuleType:
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"reward {name!r}: no such file {file}")
    # A name of its own per file, so two rewards.py files in different directories do not replace each other.
    module_name = f"forgeline_reward_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"reward {name!r}: {file} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickle find a module's classes through sys.modules
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ConfigError(f"reward {name!r}: running {file} failed: {type(e).__name__}: {e}") from e
    return module


# ---------------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class PartScore:
    """One function's values on a batch. NaN marks a failed row; `reason` says why, `error` is what it raised."""

    values: list[float]
    failed: list[int]
    reason: str | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


def _name_of(function: Callable) -> str:
    return getattr(function, "__name__", None) or type(function).__name__


def _failed_all(n: int, reason: str, error: BaseException | None = None) -> PartScore:
    return PartScore([math.nan] * n, list(range(n)), reason, error)


def _check_batch(prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]) -> int:
    # Mismatched lengths are the calling loop's bug, not the reward function's: an exception, not a failed batch.
    if not len(prompts) == len(completions) == len(records):
        raise ValueError(f"a reward batch needs one prompt and one record per completion; got {len(prompts)} "
                         f"prompts, {len(completions)} completions, {len(records)} records")
    return len(completions)


def score_safely(function: RewardFunction, prompts: Sequence[str], completions: Sequence[str],
                 records: Sequence[dict], *, name: str | None = None) -> PartScore:
    """Run one reward function on a batch. An exception, a non-number, the wrong number of values fail every row;
    NaN or inf fails its own rows. Exceptions other than ``Exception`` (KeyboardInterrupt) propagate."""
    n = _check_batch(prompts, completions, records)
    name = name or _name_of(function)
    try:
        returned = function(prompts, completions, records)
    except Exception as e:
        message = str(e).strip().splitlines()
        return _failed_all(n, f"reward {name!r} raised {type(e).__name__}" + (f": {message[0]}" if message else ""), e)
    try:
        values = [float(v) for v in returned]
    except Exception as e:  # not iterable, not numbers, a tensor of several elements per row
        return _failed_all(n, f"reward {name!r} returned {type(returned).__name__}, not one number per completion "
                              f"({e})", e)
    if len(values) != n:
        return _failed_all(n, f"reward {name!r} returned {len(values)} values for {n} completions")
    bad = [row for row, value in enumerate(values) if not math.isfinite(value)]
    if not bad:
        return PartScore(values, [])
    what = sorted({"NaN" if math.isnan(values[row]) else "inf" for row in bad})
    for row in bad:
        values[row] = math.nan
    return PartScore(values, bad, f"reward {name!r} returned {' and '.join(what)} for {len(bad)} of {n} rows "
                                  f"(first: row {bad[0]})")


# -------------------------------------------------------------------------------------------------- combining


@dataclass(frozen=True)
class RewardSpec:
    name: str
    function: RewardFunction
    weight: float = 1.0


@dataclass(frozen=True)
class RewardResult:
    """A batch's weighted sums (`total`) and each function's values by name (`parts`); `failed` rows (NaN in
    `total`) and one `reasons` line per failing function."""

    total: list[float]
    parts: dict[str, list[float]]
    failed: list[int]
    reasons: list[str]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def reason(self) -> str | None:
        return "; ".join(self.reasons) or None

    def means(self) -> dict[str, float]:
        """Each function's mean and the total's over the rows that did not fail, for the run's log."""
        failed = set(self.failed)
        rows = [row for row in range(len(self.total)) if row not in failed]
        if not rows:
            return {}
        out = {name: sum(values[row] for row in rows) / len(rows) for name, values in self.parts.items()}
        out["total"] = sum(self.total[row] for row in rows) / len(rows)
        return out


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}.weight must be a finite number, got {value!r}")
    return float(value)


def _spec(item: Any, where: str) -> RewardSpec:
    if isinstance(item, RewardSpec):
        if not callable(item.function):
            raise ConfigError(f"{where}: the function of reward {item.name!r} is a {type(item.function).__name__}")
        return RewardSpec(item.name, item.function, _weight(item.weight, where))
    if isinstance(item, str):
        return RewardSpec(item, load_reward(item))
    if isinstance(item, Mapping):
        unknown = sorted(set(item) - {"name", "weight"}, key=str)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; a reward is {{name, weight}}")
        if "name" not in item:
            raise ConfigError(f"{where}: missing 'name' (a built-in, module:function or path/to/file.py:function)")
        return RewardSpec(item["name"], load_reward(item["name"]), _weight(item.get("weight", 1.0), where))
    if callable(item):
        return RewardSpec(_name_of(item), item)
    raise ConfigError(f"{where} must be a reward name or {{name, weight}}, got {type(item).__name__}")


def parse_reward_specs(specs: Any) -> list[RewardSpec]:
    """Names, ``{name, weight}`` mappings, RewardSpecs or functions (one, or a list of them) to RewardSpecs."""
    items = [specs] if isinstance(specs, (str, Mapping, RewardSpec)) or callable(specs) else specs
    if not isinstance(items, Sequence) or not items:
        raise ConfigError(f"rewards must be a non-empty list of reward names or {{name, weight}}, got {specs!r}")
    parsed = [_spec(item, f"rewards[{i}]") for i, item in enumerate(items)]
    names = [spec.name for spec in parsed]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise ConfigError(f"rewards: {twice!r} is listed twice; give it once, with the weight it should have")
    return parsed


class CombinedReward:
    """The weighted sum of several reward functions; itself a RewardFunction (raising RewardError on a failed
    batch), with `score` for the per-function values and failures."""

    def __init__(self, specs: Sequence[RewardSpec]):
        self.specs = list(specs)

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def score(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]) -> RewardResult:
        n = _check_batch(prompts, completions, records)
        parts, failed, reasons = {}, set(), []
        for spec in self.specs:
            part = score_safely(spec.function, prompts, completions, records, name=spec.name)
            parts[spec.name] = part.values
            failed.update(part.failed)
            if part.reason:
                reasons.append(part.reason)
        # sum, not math.fsum: fsum raises on an overflow, which is reported below as a failed row instead
        total = [math.nan if row in failed else sum(spec.weight * parts[spec.name][row] for spec in self.specs)
                 for row in range(n)]
        overflow = [row for row in range(n) if row not in failed and not math.isfinite(total[row])]
        if overflow:
            reasons.append(f"the weighted sum of rewards overflows for {len(overflow)} of {n} rows "
                           f"(first: row {overflow[0]})")
            failed.update(overflow)
            for row in overflow:
                total[row] = math.nan
        return RewardResult(total, parts, sorted(failed), reasons)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]) -> list[float]:
        result = self.score(prompts, completions, records)
        if not result.ok:
            raise RewardError(result.reason)
        return result.total


def build_reward(specs: Any) -> CombinedReward:
    """One reward from a config's list of names and ``{name, weight}`` (see :func:`parse_reward_specs`)."""
    return CombinedReward(parse_reward_specs(specs))
