"""The rollout source: rows and targets from the policy's own samples, advantages within groups, micro-batches that
cover the step, exact resume (also in the middle of a batch optimised for several steps), and a failing reward that
skips its batch."""

from __future__ import annotations

import pytest
import torch

from forgeline.data.prompts import Prompt
from forgeline.errors import ForgelineError
from forgeline.kernels.cross_entropy import IGNORE_INDEX
from forgeline.model import ModelConfig, build_model
from forgeline.rl.rollout import RolloutSettings, RolloutSource


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=48, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=64,
                                   init_std=0.3))


PROMPTS = [Prompt(ids=[1 + i, 2 + i, 3], text=f"p{i}", record={"i": i}) for i in range(10)]


def count_sevens(prompts, completions, records):
    """A reward from the text: the test tokenizer-free source decodes nothing, so the texts are token lists."""
    return [float(c.count("7")) for c in completions], {"sevens": [float(c.count("7")) for c in completions]}, None


class Digits:
    """A tokenizer stand-in: token t is the character str(t % 10)."""

    eos_id = 0
    pad_id = 0
    bos_id = None

    def decode(self, ids, **kw):
        return "".join(str(t % 10) for t in ids)


def source(model, score=count_sevens, **overrides):
    settings = dict(prompts_per_step=4, group_size=3, max_new_tokens=6, temperature=1.0, epochs=1)
    settings.update(overrides)
    return RolloutSource(model, Digits(), PROMPTS, score, RolloutSettings(**settings), reference=None,
                         micro_batch_size=5, seed=3, log=lambda line: None)


def test_prefix_tree_batches_advantages_and_micro_batches(model):
    src = source(model)
    assert src.grad_accum_steps == 3  # 4 prompts x 3 samples in micro-batches of 5
    batches = [next(src) for _ in range(src.grad_accum_steps)]
    assert [b["targets"].shape[0] for b in batches] == [5, 5, 2]  # completions per micro-batch
    # rows: one per prompt in each micro-batch (completions 0-4: A A A B B; 5-9: B C C C D; 10-11: D D)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 3, 1]
    adv = torch.cat([b["advantages"] for b in batches]).view(4, 3)
    assert torch.allclose(adv.mean(1), torch.zeros(4), atol=1e-5)  # group-relative
    for b in batches:
        real = b["targets"] != IGNORE_INDEX
        assert b["n_units"] == int(real.sum())  # token averaging counts completion tokens
        flat = b["input_ids"].reshape(-1)
        for n in range(b["targets"].shape[0]):
            k = int(real[n].sum())
            row, first = divmod(int(b["gather"][n, 0]), b["input_ids"].shape[1])
            assert b["branch"][row, first] == 0 and b["branch"][row, first + 1] != 0 or k == 1
            # every later token is predicted by the position holding the token before it (teacher forcing)
            assert torch.equal(flat[b["gather"][n, 1:k]], b["targets"][n, :k - 1])
    metrics = src.pop_metrics()
    assert {"reward", "reward/sevens", "completion_length", "terminated", "rollouts_per_s"} <= metrics.keys()
    assert src.pop_metrics() == {}


def test_a_prefix_tree_batch_gives_the_log_probs_and_gradients_of_plain_rows(model):
    """The prompt run once for its group changes nothing: per-token log-probs and their gradients equal those of
    one [prompt | completion] row per completion."""
    from forgeline.objectives.policy_gradient import policy_logps, rollout_logps

    src = source(model, max_new_tokens=5)
    batch = next(src)
    tree = rollout_logps(model, batch)
    grads_tree = torch.autograd.grad(tree.sum(), list(model.parameters()), allow_unused=True)
    flat, T = batch["input_ids"].reshape(-1), batch["input_ids"].shape[1]
    plain = torch.zeros_like(tree)
    total = 0
    for n in range(batch["targets"].shape[0]):
        k = int((batch["targets"][n] != IGNORE_INDEX).sum())
        row, last_prompt = divmod(int(batch["gather"][n, 0]), T)
        prompt = batch["input_ids"][row, :last_prompt + 1].tolist()
        tokens = batch["targets"][n, :k].tolist()
        ids = torch.tensor([prompt + tokens[:-1]])
        targets = torch.full_like(ids, IGNORE_INDEX)
        targets[0, len(prompt) - 1:] = torch.tensor(tokens)
        lp = policy_logps(model, ids, targets)[0, len(prompt) - 1:]
        plain[n, :k] = lp.detach()
        total = total + lp.sum()
    grads_plain = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    assert torch.allclose(tree.detach(), plain, atol=1e-5)
    for a, b in zip(grads_tree, grads_plain):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)  # sums of ~10: float32 rounding
    del flat


def batches_of(src, n):
    return [next(src) for _ in range(n)]


@pytest.mark.parametrize("epochs", [1, 2])
def test_resume_continues_exactly(model, epochs):
    a = source(model, epochs=epochs)
    batches_of(a, a.grad_accum_steps)  # step 1: a new batch of rollouts (with epochs 2: one more step on it)
    state = a.state_dict()
    if epochs == 2:
        assert state["current"] is not None
    expected = batches_of(a, 2 * a.grad_accum_steps)
    b = source(model, epochs=epochs)
    import json

    b.load_state_dict(json.loads(json.dumps(state)))  # the state goes through trainer_state.json
    got = batches_of(b, 2 * b.grad_accum_steps)
    for x, y in zip(expected, got):
        assert torch.equal(x["targets"], y["targets"]) and torch.allclose(x["advantages"], y["advantages"])
    if epochs == 2:  # the second step trains on the first step's rollouts again
        again = source(model, epochs=2)
        first = batches_of(again, again.grad_accum_steps)
        second = batches_of(again, again.grad_accum_steps)
        assert all(torch.equal(p["targets"], q["targets"]) for p, q in zip(first, second))


def test_a_failing_reward_skips_its_batch_and_three_in_a_row_stop(model):
    calls = {"n": 0}
    lines = []

    def flaky(prompts, completions, records):
        calls["n"] += 1
        if calls["n"] == 1:
            return None, {}, "reward 'flaky' returned NaN for 2 completions"
        return [1.0] * len(completions), {}, None

    src = source(model, score=flaky)
    src.log = lines.append
    next(src)
    assert src.skipped == 1 and src.position == 8 and "returned NaN" in lines[0]
    assert src.pop_metrics()["skipped_batches"] == 1

    broken = source(model, score=lambda p, c, r: (None, {}, "reward 'x' raised ValueError: boom"))
    with pytest.raises(ForgelineError, match="failed on 3 batches of rollouts in a row"):
        next(broken)
