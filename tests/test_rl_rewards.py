"""Reward functions for online RL (forgeline.rl.rewards): the built-ins on hand-made completions, user functions by
module:function and file.py:function, weighted combinations, and every way a reward function can fail reported as
failed rows with a reason naming it."""

import math
import re
import sys
import textwrap

import pytest

from forgeline.data.synthetic import rl_records
from forgeline.errors import ConfigError, DataError
from forgeline.eval.sandbox import SandboxLimits
from forgeline.rl import (
    BUILTIN_REWARDS,
    RewardError,
    RewardSpec,
    UnitTestReward,
    build_reward,
    load_reward,
    parse_reward_specs,
    score_safely,
)


def _score(name, completions, records, prompts=None):
    prompts = prompts if prompts is not None else ["q"] * len(completions)
    return list(BUILTIN_REWARDS[name](prompts, completions, records))


# ---------------------------------------------------------------------------------------------------- built-ins


def test_arithmetic_is_an_exact_match_of_the_leading_integer():
    records = [{"answer": "85"}, {"answer": "85"}, {"answer": 85}, {"answer": "85"}, {"answer": "85"},
               {"answer": "0"}, {"answer": "85"}]
    completions = [" 85", "85.\nWhat is 1 + 1? 2", "85", "86", "The answer is 85", "0", "85.5"]
    assert _score("arithmetic", completions, records) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_arithmetic_on_generated_prompts():
    records = rl_records(5, seed=0)
    completions = [" " + r["answer"] for r in records[:3]] + [str(int(r["answer"]) + 1) for r in records[3:]]
    assert _score("arithmetic", completions, records, [r["prompt"] for r in records]) == [1, 1, 1, 0, 0]


def test_arithmetic_needs_an_integer_answer_in_the_record():
    with pytest.raises(DataError, match="row 0: the prompt record has no 'answer' field"):
        _score("arithmetic", ["1"], [{"prompt": "q"}])
    with pytest.raises(DataError, match="row 0: answer 'eight' is not an integer"):
        _score("arithmetic", ["1"], [{"answer": "eight"}])


GSM8K_SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 1,007"


@pytest.mark.parametrize("completion,answer,expected", [
    ("She sold 1,007 clips.", "1007", 1.0),  # thousands separator in the completion
    ("She sold 1007 clips.", GSM8K_SOLUTION, 1.0),  # ... and in the reference's "#### N"
    ("So 72 + 935 = 1007.\n#### 1007", GSM8K_SOLUTION, 1.0),
    ("It costs $5.", "5", 1.0),  # dollar sign and a final full stop dropped
    ("#### $5", "#### 5", 1.0),
    ("#### 5\nThen 7 more", "5", 1.0),  # the marked answer wins over the last number
    ("First 5, then 7", "5", 0.0),  # unmarked: the last number
    ("no number at all", "5", 0.0),
    ("5.00", "5", 0.0),  # the harness compares strings: 5.00 is not 5
])
def test_gsm8k_normalises_as_the_harness_does(completion, answer, expected):
    assert _score("gsm8k", [completion], [{"answer": answer}]) == [expected]


def test_gsm8k_format_wants_a_final_answer_line():
    completions = ["48 + 24 = 72\n#### 72", "The answer is 72", "#### -3", "####72"]
    assert _score("gsm8k_format", completions, [{}] * 4) == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox runs programs under Linux limits")
def test_unit_tests_run_each_program_in_the_sandbox():
    prompt = 'def add(a: int, b: int) -> int:\n    """Returns a + b."""\n'
    record = {"prompt": prompt, "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
              "entry_point": "add"}
    reward = UnitTestReward(limits=SandboxLimits(timeout_s=10), workers=2)
    # the model's prompt is wrapped in a chat turn here: the record's prompt is the code that is completed
    assert reward(["<|im_start|>user\n" + prompt] * 2, ["    return a + b\n", "    return a - b\n"],
                  [record, record]) == [1.0, 0.0]
    without_prompt = {k: v for k, v in record.items() if k != "prompt"}
    assert reward([prompt], ["    return a + b\n"], [without_prompt]) == [1.0]
    with pytest.raises(DataError, match="row 0: the prompt record has no 'entry_point' field"):
        reward([prompt], ["    return a + b\n"], [{"test": record["test"]}])


# ------------------------------------------------------------------------------------------------ user rewards


def _write(path, source):
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def test_a_user_module_function_from_the_working_directory(tmp_path, monkeypatch):
    _write(tmp_path / "my_rewards_cwd.py", """
        def length(prompts, completions, records):
            return [float(len(c)) for c in completions]

        class Scorer:
            @staticmethod
            def shout(prompts, completions, records):
                return [float(c.isupper()) for c in completions]

        threshold = 3
    """)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    assert load_reward("my_rewards_cwd:length")(["q"], ["abc"], [{}]) == [3.0]
    assert load_reward("my_rewards_cwd:Scorer.shout")(["q", "q"], ["AB", "ab"], [{}, {}]) == [1.0, 0.0]
    assert sys.path == path_before  # the working directory was on it for the import only
    with pytest.raises(ConfigError, match="'my_rewards_cwd:threshold': 'threshold' is a int, not a function"):
        load_reward("my_rewards_cwd:threshold")
    with pytest.raises(ConfigError, match="my_rewards_cwd has no 'missing'"):
        load_reward("my_rewards_cwd:missing")


def test_a_user_function_from_a_file_path(tmp_path):
    (tmp_path / "reward files").mkdir()
    path = _write(tmp_path / "reward files" / "rewards.py", """
        def exclaims(prompts, completions, records):
            return [1.0 if c.endswith("!") else 0.0 for c in completions]
    """)
    reward = build_reward([{"name": f"{path}:exclaims", "weight": 2.0}])
    assert reward(["q", "q"], ["yes!", "no"], [{}, {}]) == [2.0, 0.0]


@pytest.mark.parametrize("name,message", [
    ("no_such_reward_module_xyz:f", "no module named 'no_such_reward_module_xyz'"),
    ("/nowhere/rewards.py:f", "no such file /nowhere/rewards.py"),
    ("exactly", "unknown reward 'exactly': give a built-in (arithmetic, gsm8k, gsm8k_format, unit_tests)"),
    ("module:", "unknown reward 'module:'"),
    ("", "a reward must be named by a non-empty string"),
])
def test_a_missing_reward_is_one_clear_error(name, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_reward(name)


def test_a_user_module_that_fails_to_import_says_why(tmp_path, monkeypatch):
    _write(tmp_path / "broken_rewards_a.py", "import no_such_dependency_xyz\n")
    _write(tmp_path / "broken_rewards_b.py", "raise RuntimeError('needs a GPU')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="broken_rewards_a failed: No module named 'no_such_dependency_xyz'"):
        load_reward("broken_rewards_a:f")
    with pytest.raises(ConfigError, match="running .*broken_rewards_b.py failed: RuntimeError: needs a GPU"):
        load_reward(f"{tmp_path / 'broken_rewards_b.py'}:f")


# -------------------------------------------------------------------------------------------------- combining


def test_build_reward_sums_with_weights_and_keeps_the_parts():
    reward = build_reward(["arithmetic", {"name": "gsm8k_format", "weight": 0.5}])
    assert reward.names == ["arithmetic", "gsm8k_format"]
    result = reward.score(["q"] * 3, [" 85", "#### 85", "84"], [{"answer": "85"}] * 3)
    assert result.ok and result.failed == [] and result.reason is None
    assert result.parts == {"arithmetic": [1.0, 0.0, 0.0], "gsm8k_format": [0.0, 1.0, 0.0]}
    assert result.total == [1.0, 0.5, 0.0]
    assert result.means() == pytest.approx({"arithmetic": 1 / 3, "gsm8k_format": 1 / 3, "total": 0.5})
    assert reward(["q"], ["85"], [{"answer": "85"}]) == [1.0]


def test_specs_take_functions_and_refuse_bad_entries():
    def bonus(prompts, completions, records):
        return [0.25] * len(completions)

    specs = parse_reward_specs([bonus, RewardSpec("penalty", bonus, weight=-4)])
    assert [(s.name, s.weight) for s in specs] == [("bonus", 1.0), ("penalty", -4.0)]
    assert build_reward(specs)(["q"], ["c"], [{}]) == [-0.75]
    assert [s.name for s in parse_reward_specs("gsm8k")] == ["gsm8k"]
    for bad, message in [([], "rewards must be a non-empty list"),
                         (["gsm8k", {"name": "gsm8k", "weight": 2}], "'gsm8k' is listed twice"),
                         ([{"name": "gsm8k", "weight": "high"}], r"rewards\[0\].weight must be a finite number"),
                         ([{"name": "gsm8k", "weight": math.inf}], r"rewards\[0\].weight must be a finite number"),
                         ([{"name": "gsm8k", "scale": 2}], r"rewards\[0\]: unknown key 'scale'"),
                         ([{"weight": 2}], r"rewards\[0\]: missing 'name'"),
                         ([3], r"rewards\[0\] must be a reward name")]:
        with pytest.raises(ConfigError, match=message):
            parse_reward_specs(bad)


# ---------------------------------------------------------------------------------------------------- failures


def raises(prompts, completions, records):
    raise KeyError("answer")


def half_nan(prompts, completions, records):
    return [math.nan if i % 2 else 1.0 for i in range(len(completions))]


def infinite(prompts, completions, records):
    return [1.0, -math.inf, 1.0]


def too_few(prompts, completions, records):
    return [1.0]


def not_numbers(prompts, completions, records):
    return ["good"] * len(completions)


def returns_none(prompts, completions, records):
    return None


BATCH = (["q"] * 3, ["a", "b", "c"], [{}, {}, {}])


@pytest.mark.parametrize("function,failed,reason", [
    (raises, [0, 1, 2], "reward 'raises' raised KeyError: 'answer'"),
    (half_nan, [1], "reward 'half_nan' returned NaN for 1 of 3 rows (first: row 1)"),
    (infinite, [1], "reward 'infinite' returned inf for 1 of 3 rows (first: row 1)"),
    (too_few, [0, 1, 2], "reward 'too_few' returned 1 values for 3 completions"),
    (not_numbers, [0, 1, 2], "reward 'not_numbers' returned list, not one number per completion"),
    (returns_none, [0, 1, 2], "reward 'returns_none' returned NoneType, not one number per completion"),
])
def test_score_safely_reports_the_failed_rows_and_why(function, failed, reason):
    part = score_safely(function, *BATCH)
    assert not part.ok and part.failed == failed
    assert part.reason.startswith(reason) and "\n" not in part.reason
    assert [row for row, v in enumerate(part.values) if math.isnan(v)] == failed
    assert all(math.isfinite(v) for row, v in enumerate(part.values) if row not in failed)


def test_score_safely_keeps_the_exception_and_lets_interrupts_through():
    assert isinstance(score_safely(raises, *BATCH).error, KeyError)

    def interrupted(prompts, completions, records):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_safely(interrupted, *BATCH)
    with pytest.raises(ValueError, match="got 3 prompts, 2 completions, 3 records"):
        score_safely(half_nan, ["q"] * 3, ["a", "b"], [{}] * 3)


def test_a_failing_part_fails_the_combined_reward_and_names_the_function():
    reward = build_reward([RewardSpec("fine", lambda p, c, r: [1.0] * len(c)), RewardSpec("half_nan", half_nan)])
    result = reward.score(*BATCH)
    assert not result.ok and result.failed == [1]
    assert result.parts["fine"] == [1.0, 1.0, 1.0]
    assert result.total[0] == result.total[2] == 2.0 and math.isnan(result.total[1])
    assert result.reason == "reward 'half_nan' returned NaN for 1 of 3 rows (first: row 1)"
    assert result.means() == {"fine": 1.0, "half_nan": 1.0, "total": 2.0}
    with pytest.raises(RewardError, match="reward 'half_nan' returned NaN"):
        reward(*BATCH)
    reward = build_reward([RewardSpec("raises", raises), RewardSpec("too_few", too_few)])
    result = reward.score(*BATCH)
    assert result.failed == [0, 1, 2] and len(result.reasons) == 2 and result.means() == {}


def test_a_weighted_sum_that_overflows_is_a_failed_row():
    huge = RewardSpec("huge", lambda p, c, r: [1e308] * len(c), weight=10.0)
    result = build_reward([huge]).score(*BATCH)
    assert result.failed == [0, 1, 2] and "overflows" in result.reason
