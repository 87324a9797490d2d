"""Model-level parity of the preference objectives (objectives/preference.py) with TRL 1.16's trainers: the whole
objective on a model, loss AND the gradient of every weight.

A tiny random Llama-shaped forgeline model is exported with `export_hf` and loaded in transformers, so that
forgeline's model and the `LlamaForCausalLM` (`LlamaForSequenceClassification` for the reward model) hold the same
weights. The same pairs (token ids: a shared prompt, responses of different lengths) go to forgeline as
`collate_pairs` / `collate_unpaired` batches and to TRL in its own collators' formats. Forgeline's loss per pair
(per example) is `out.loss / out.count`; TRL's trainers return the batch mean. Both are backpropagated, and the
gradients are compared weight by weight (forgeline names mapped with `forgeline_to_hf_name`).

Every case runs through TRL's own trainer code, on an instance made without its __init__ (`object.__new__` plus the
attributes the loss code reads), on the real transformers model:
    DPO sigmoid / ipo / hinge   DPOTrainer.compute_loss, TRL's fused LM head (`add_fused_lm_head`) on the policy, the
                                reference a second transformers model (`ref_model`, TRL computes its log-probs)
    cDPO (label_smoothing)      TRL 1.16's DPOTrainer ignores label_smoothing in "sigmoid"; its one conservative-DPO
                                form is CPOTrainer's "sigmoid" (reference-free), so forgeline's DPO runs against a
                                zero reference there
    SimPO                       CPOTrainer.compute_loss, loss_type="simpo", cpo_alpha=0
    ORPO                        ORPOTrainer.compute_loss
    KTO                         KTOTrainer.compute_loss with the KL rows, reference a second transformers model
    reward model                RewardTrainer.compute_loss on LlamaForSequenceClassification (with and without margin,
                                with centering)

On forgeline's side the reference log-probs are cached in the batch (`cached_reference`: the loader's `reference`
table, computed with `FrozenReference` on the forgeline copy of the reference), as the recipes do.

Conventions that differ, and how the batches here make them agree:
  * ORPO's NLL term: forgeline's is each chosen response's mean token NLL, averaged over pairs; TRL's is ONE mean over
    every token of the chosen rows -- prompt tokens included (its labels are all attended tokens). The ORPO batch has
    one-token prompts (the first token is never a target) and chosen responses of one length, so both are the same
    number; test_orpo_trl_nll_covers_the_prompt pins TRL's convention on longer prompts.
  * KTO's KL rows: TRL pairs prompt i with the completion of example i-1 (completions rotated by one within the
    batch); forgeline's `collate_unpaired` takes the partners explicitly, here the same ones.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from forgeline.data.packing import TokenizedSample
from forgeline.data.preference import TokenizedCompletion, TokenizedPair
from forgeline.data.preference_batches import collate_pairs, collate_unpaired
from forgeline.model import ModelConfig, build_model
from forgeline.model.formats.hf import export_hf, forgeline_to_hf_name
from forgeline.model.heads import to_reward_model
from forgeline.objectives.preference import (DPOObjective, FrozenReference, KTOObjective, ORPOObjective,
                                             RewardObjective, cached_reference, response_logps)

from test_generate import make_tokenizer  # noqa: E402

# CPO (SimPO) and ORPO live in trl.experimental in 1.16, whose import warns that the API may change.
# TRL's disable_gradient_checkpointing reads transformers' deprecated `is_gradient_checkpointing`.
pytestmark = [pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

TRL_VERSION = "1.16.0"  # the release whose trainer code these tests drive (see test_preference_losses.py)
# fp32: on the loss, absolute (relative above 1: IPO's is ~22); on gradients, relative to the largest gradient entry of
# the case (over all weights)
TOL = 1e-5
VOCAB = 320
PAD = 0  # no sequence below contains it (transformers' classifier reads the last non-pad token)

# Pairs as token ids: prompt, chosen, rejected (different lengths everywhere; none contains PAD).
PAIRS = [
    ([5, 17, 33], [88, 3, 19, 240], [88, 45, 2]),
    ([101, 7, 250, 64, 9], [77, 150], [300, 8, 8, 120, 15]),
    ([42, 11], [6, 6, 200, 31, 99, 12], [71]),
]
MARGINS = [0.5, 0.0, 1.25]
# ORPO: one-token prompts and chosen responses of one length (see the module docstring).
ORPO_PAIRS = [
    ([5], [88, 3, 19, 240], [88, 45, 2]),
    ([101], [77, 150, 21, 9], [300, 8, 8, 120, 15, 4]),
    ([42], [6, 200, 31, 99], [71]),
]
# KTO: prompt, completion, desirable?
UNPAIRED = [
    ([5, 17, 33], [88, 3, 19, 240], True),
    ([101, 7, 250, 64, 9], [300, 8, 8, 120, 15], False),
    ([42, 11], [6, 6, 200, 31, 99, 12], True),
    ([9, 140], [71, 2], False),
]


@pytest.fixture(scope="module")
def trl():
    return pytest.importorskip("trl")


# --------------------------------------------------------------------------------------------------------------------
# models


def _tiny_lm(seed: int):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=128,
                      init_std=0.1)
    return build_model(cfg).float()


def _perturb(model, seed: int, scale: float):
    """Every weight moved (norms off 1), so that no parameter is trivially right."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _to_hf(model, directory, auto_class, tok):
    hf = auto_class.from_pretrained(export_hf(model, directory, tokenizer=tok), dtype=torch.float32)
    ours = {forgeline_to_hf_name(n): p for n, p in model.named_parameters()}
    theirs = dict(hf.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert torch.equal(p.detach(), theirs[name].detach()), name
    return hf.train()


@pytest.fixture(scope="module")
def models(trl, tmp_path_factory):
    """The policy, the reference (the policy before its last perturbation) and a reward model; each as forgeline's and
    as transformers' copy. The transformers policy carries TRL's fused LM head (DPOTrainer's outputs, a superset of
    KTOTrainer's), the reference the plain one, as the trainers' __init__ add them."""
    import transformers
    from trl.trainer.utils import add_fused_lm_head

    root = tmp_path_factory.mktemp("parity")
    tok = make_tokenizer()  # export_hf writes one beside the weights; the tests use token ids directly
    assert tok.pad_id == PAD
    ref = _perturb(_tiny_lm(0), 1, 0.05)
    policy = _perturb(copy.deepcopy(ref), 2, 0.03)
    reward = _perturb(to_reward_model(_tiny_lm(3), PAD), 4, 0.05)
    hf_policy = _to_hf(policy, root / "policy", transformers.AutoModelForCausalLM, tok)
    hf_ref = _to_hf(ref, root / "ref", transformers.AutoModelForCausalLM, tok)
    hf_reward = _to_hf(reward, root / "reward", transformers.AutoModelForSequenceClassification, tok)
    assert type(hf_policy).__name__ == "LlamaForCausalLM"
    assert type(hf_reward).__name__ == "LlamaForSequenceClassification"
    add_fused_lm_head(hf_policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(hf_ref)
    for m in (ref, hf_ref):
        m.requires_grad_(False)
    return SimpleNamespace(policy=policy, ref=ref, reward=reward, hf_policy=hf_policy, hf_ref=hf_ref,
                           hf_reward=hf_reward)


# --------------------------------------------------------------------------------------------------------------------
# data


def _sample(prompt, response) -> TokenizedSample:
    return TokenizedSample(np.array(prompt + response), np.array([False] * len(prompt) + [True] * len(response)))


def _pairs(rows, margins=None) -> list[TokenizedPair]:
    margins = margins or [None] * len(rows)
    return [TokenizedPair(_sample(p, c), _sample(p, r), m, prompt_length=len(p)) for (p, c, r), m in zip(rows, margins)]


def _with_reference(collate, ref_model, **kwargs):
    """A batch the way the loader makes it once the recipe has cached the reference: `collate(..., reference=table)`,
    the table (items x 2 columns) computed by forgeline's FrozenReference."""
    batch = collate(**kwargs)
    logps = FrozenReference(ref_model)(None, batch)
    table = logps.reshape(2, -1).T.numpy().astype(np.float64)
    again = collate(**kwargs, reference=table)
    assert torch.equal(again["ref_logps"], logps)
    return again


# --------------------------------------------------------------------------------------------------------------------
# running and comparing


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def gather_for_metrics(x):
        return x


def _bare(cls, **attrs):
    """An instance of a TRL trainer made without its __init__, holding just what its loss code reads."""
    obj = object.__new__(cls)
    defaults = dict(accelerator=_Accelerator(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                    _stored_metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                    aux_loss_enabled=False, is_encoder_decoder=False, _peft_has_been_casted_to_bf16=False,
                    args=SimpleNamespace(device=torch.device("cpu"), gradient_checkpointing_kwargs=None))
    for name, value in {**defaults, **attrs}.items():
        setattr(obj, name, value)
    return obj


def _ours(objective, model, batch):
    """forgeline: the loss per pair (example) and the gradient of every weight, by transformers name."""
    model.zero_grad(set_to_none=True)
    out = objective(model, batch)
    loss = out.loss / out.count
    loss.backward()
    return loss.detach(), {forgeline_to_hf_name(n): p.grad.detach().clone() for n, p in model.named_parameters()}


def _theirs(compute_loss, model):
    """TRL: the trainer's loss (the batch mean) and the gradient of every weight."""
    model.zero_grad(set_to_none=True)
    loss = compute_loss()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_same(ours, theirs, what: str) -> None:
    (loss, grads), (their_loss, their_grads) = ours, theirs
    assert torch.isfinite(loss) and loss.item() != 0.0, what
    loss_diff = abs(loss.item() - their_loss.item())
    assert loss_diff <= TOL * max(1.0, abs(their_loss.item())), (
        f"{what}: loss {loss.item()!r} vs TRL {their_loss.item()!r}")
    assert grads.keys() == their_grads.keys(), what
    scale = max(g.abs().max().item() for g in their_grads.values())
    assert scale > 0, what
    diffs = {name: (grads[name] - their_grads[name]).abs().max().item() for name in grads}
    worst = max(diffs, key=diffs.get)
    print(f"\n{what}: loss {loss.item():.6f} (|diff| {loss_diff:.1e}), gradients: max |diff| {diffs[worst]:.1e} "
          f"({worst}), scale {scale:.1e}")
    assert diffs[worst] <= TOL * scale, f"{what}: gradient of {worst} differs by {diffs[worst]} (scale {scale})"


# --------------------------------------------------------------------------------------------------------------------
# DPO, cDPO, SimPO, ORPO


def _dpo_features(rows):
    return [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in rows]


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.1), ("hinge", 0.5)])
def test_dpo_matches_trl_dpo_trainer(models, loss_type, beta):
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    pairs = _pairs(PAIRS)
    B = len(pairs)
    batch = _with_reference(collate_pairs, models.ref, pairs=pairs, pad_id=PAD, index=range(B), weight=[1.0] * B)
    ours = _ours(DPOObjective(beta=beta, loss_type=loss_type, reference=cached_reference), models.policy, batch)

    trainer = _bare(DPOTrainer, model=models.hf_policy, ref_model=models.hf_ref, beta=beta, loss_types=[loss_type],
                    loss_weights=[1.0], label_smoothing=0.0, f_divergence_type="reverse_kl", ld_alpha=None,
                    precompute_ref_logps=False, use_weighting=False)
    inputs = DataCollatorForPreference(pad_token_id=PAD)(_dpo_features(PAIRS))
    theirs = _theirs(lambda: trainer.compute_loss(models.hf_policy, inputs), models.hf_policy)
    _assert_same(ours, theirs, f"DPO {loss_type}")


def _cpo_features(rows):
    """CPO's / ORPO's tokenized rows (their tokenize_row's keys): prompt, prompt + response, labels -100 on the
    prompt."""
    out = []
    for p, c, r in rows:
        row = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
        for side, response in (("chosen", c), ("rejected", r)):
            row[f"{side}_input_ids"] = p + response
            row[f"{side}_attention_mask"] = [1] * (len(p) + len(response))
            row[f"{side}_labels"] = [-100] * len(p) + response
        out.append(row)
    return out


def _trl_cpo_loss(model, rows, **attrs):
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.utils import DPODataCollatorWithPadding

    trainer = _bare(CPOTrainer, pad_token_id=PAD, alpha=0.0, cpo_alpha=0.0, **attrs)
    inputs = DPODataCollatorWithPadding(pad_token_id=PAD)(_cpo_features(rows))
    return trainer.compute_loss(model, inputs)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo_trainer(models, label_smoothing):
    beta, gamma = 2.0, 0.5
    pairs = _pairs(PAIRS)
    B = len(pairs)
    batch = collate_pairs(pairs, PAD, index=range(B), weight=[1.0] * B)
    ours = _ours(DPOObjective(beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=label_smoothing),
                 models.policy, batch)
    theirs = _theirs(lambda: _trl_cpo_loss(models.hf_policy, PAIRS, beta=beta, loss_type="simpo",
                                           simpo_gamma=gamma, label_smoothing=label_smoothing), models.hf_policy)
    _assert_same(ours, theirs, f"SimPO label_smoothing={label_smoothing}")


def test_conservative_dpo_matches_trl_cpo_trainer_sigmoid(models):
    """cDPO (label_smoothing > 0) against CPOTrainer's "sigmoid": reference-free there, so forgeline's reference is a
    cached zero (the log-ratios are then the policy's log-probs)."""
    beta, eps = 0.1, 0.1
    pairs = _pairs(PAIRS)
    B = len(pairs)
    batch = collate_pairs(pairs, PAD, index=range(B), weight=[1.0] * B, reference=np.zeros((B, 2)))
    ours = _ours(DPOObjective(beta=beta, label_smoothing=eps, reference=cached_reference), models.policy, batch)
    theirs = _theirs(lambda: _trl_cpo_loss(models.hf_policy, PAIRS, beta=beta, loss_type="sigmoid",
                                           simpo_gamma=None, label_smoothing=eps), models.hf_policy)
    _assert_same(ours, theirs, "cDPO (CPO sigmoid)")


def _trl_orpo(model, rows, beta):
    from trl.experimental.orpo import ORPOTrainer
    from trl.experimental.utils import DPODataCollatorWithPadding

    trainer = _bare(ORPOTrainer, beta=beta, padding_value=PAD)
    inputs = DPODataCollatorWithPadding(pad_token_id=PAD)(_cpo_features(rows))
    return trainer.compute_loss(model, inputs), trainer


def test_orpo_matches_trl_orpo_trainer(models):
    beta = 0.1
    assert len({len(p) for p, _, _ in ORPO_PAIRS}) == 1 and len(ORPO_PAIRS[0][0]) == 1
    assert len({len(c) for _, c, _ in ORPO_PAIRS}) == 1 and len({len(r) for _, _, r in ORPO_PAIRS}) > 1
    pairs = _pairs(ORPO_PAIRS)
    B = len(pairs)
    batch = collate_pairs(pairs, PAD, index=range(B), weight=[1.0] * B)
    ours = _ours(ORPOObjective(beta=beta), models.policy, batch)
    theirs = _theirs(lambda: _trl_orpo(models.hf_policy, ORPO_PAIRS, beta)[0], models.hf_policy)
    _assert_same(ours, theirs, "ORPO")


def test_orpo_trl_nll_covers_the_prompt(models):
    """The documented difference: TRL's ORPO NLL is the mean over every token of the chosen rows, prompt included;
    forgeline's is over the responses only. Pinned here so that a TRL change is noticed."""
    with torch.no_grad():
        _, trainer = _trl_orpo(models.hf_policy, PAIRS, 0.1)
        their_nll = trainer._stored_metrics["train"]["nll_loss"][-1]
        whole = collate_pairs(_pairs([([], p + c, p + r) for p, c, r in PAIRS]), PAD, index=range(len(PAIRS)),
                              weight=[1.0] * len(PAIRS))
        logps, lengths = response_logps(models.policy, whole["input_ids"], whole["targets"])
    B = len(PAIRS)
    assert their_nll == pytest.approx(-(logps[:B].sum() / lengths[:B].sum()).item(), abs=TOL)
    ours = ORPOObjective(beta=0.1)(models.policy, collate_pairs(_pairs(PAIRS), PAD, index=range(B), weight=[1.0] * B))
    assert abs(ours.metrics["nll"] / B - their_nll) > 1e-3


# --------------------------------------------------------------------------------------------------------------------
# KTO


def test_kto_matches_trl_kto_trainer(models):
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer

    beta, dw, uw = 0.5, 1.0, 1.33
    examples = [TokenizedCompletion(_sample(p, c), len(p), label) for p, c, label in UNPAIRED]
    n = len(examples)
    # TRL's KL completions: `completion_ids` rotated by one within the batch (KTOTrainer._prepare_dataset's
    # add_kl_completion_ids): prompt i goes with the completion of example i - 1.
    partners = [examples[(i - 1) % n] for i in range(n)]
    batch = _with_reference(collate_unpaired, models.ref, examples=examples, partners=partners, pad_id=PAD,
                            max_length=128, index=range(n), weight=[1.0] * n)
    ours = _ours(KTOObjective(beta=beta, desirable_weight=dw, undesirable_weight=uw, reference=cached_reference),
                 models.policy, batch)

    trainer = _bare(KTOTrainer, model=models.hf_policy, ref_model=models.hf_ref, beta=beta, loss_type="kto",
                    desirable_weight=dw, undesirable_weight=uw, calculate_KL=True, precompute_ref_logps=False)
    completions = [c for _, c, _ in UNPAIRED]
    kl_completions = [completions[-1]] + completions[:-1]
    features = [{"prompt_ids": p, "completion_ids": c, "KL_completion_ids": k, "label": label}
                for (p, c, label), k in zip(UNPAIRED, kl_completions)]
    inputs = DataCollatorForUnpairedPreference(pad_token_id=PAD)(features)
    theirs = _theirs(lambda: trainer.compute_loss(models.hf_policy, inputs), models.hf_policy)

    their_kl = trainer._metrics["train"]["kl"][-1]
    assert their_kl > 0  # the KL term is active (not clamped to 0)
    _assert_same(ours, theirs, "KTO")


# --------------------------------------------------------------------------------------------------------------------
# reward model


@pytest.mark.parametrize("use_margin,center", [(False, None), (True, None), (True, 0.01)],
                         ids=["plain", "margin", "margin-centered"])
def test_reward_model_matches_trl_reward_trainer(models, use_margin, center):
    from trl.trainer.reward_trainer import DataCollatorForPreference, RewardTrainer

    pairs = _pairs(PAIRS, MARGINS)
    B = len(pairs)
    batch = collate_pairs(pairs, PAD, index=range(B), weight=[1.0] * B)
    ours = _ours(RewardObjective(center_coef=center or 0.0, use_margin=use_margin), models.reward, batch)

    trainer = _bare(RewardTrainer, model=models.hf_reward,
                    args=SimpleNamespace(center_rewards_coefficient=center))
    features = [{"chosen_ids": p + c, "rejected_ids": p + r} for p, c, r in PAIRS]
    if use_margin:
        for feature, margin in zip(features, MARGINS):
            feature["margin"] = margin
    inputs = DataCollatorForPreference(pad_token_id=PAD)(features)
    theirs = _theirs(lambda: trainer.compute_loss(models.hf_reward, inputs), models.hf_reward)
    _assert_same(ours, theirs, f"reward model margin={use_margin} center={center}")
