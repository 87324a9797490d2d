"""Packing and padding of SFT samples (forgeline.data.packing): bin packing, batch layout, exactness, the loader."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from forgeline.data.packing import (
    IGNORE_INDEX,
    SFTLoader,
    TokenizedSample,
    best_fit_decreasing,
    collate_packed,
    collate_padded,
)
from forgeline.errors import ConfigError, DataError
from forgeline.model import ModelConfig, build_model

VOCAB = 97


def _samples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(0, VOCAB, size=n)
        mask = rng.random(n) < 0.6
        mask[-1] = True  # every sample has at least one target
        out.append(TokenizedSample(ids, mask))
    return out


# ------------------------------------------------------------------------------------------------ bin packing


def test_best_fit_decreasing_takes_the_tightest_bin():
    # 6 opens bin 0 (4 left), 5 opens bin 1 (5 left), 4 fills bin 0 exactly rather than going to the roomier bin 1,
    # then 3 and 2 fill bin 1.
    assert best_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    assert best_fit_decreasing([], 10) == []
    with pytest.raises(ValueError, match="item 1 has length 11"):
        best_fit_decreasing([3, 11], 10)
    with pytest.raises(ConfigError, match="capacity must be a positive integer"):
        best_fit_decreasing([3], 0)


def test_best_fit_decreasing_places_everything_once_and_packs_tightly():
    rng = random.Random(0)
    for _ in range(20):
        capacity = rng.randint(16, 512)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 300))]
        bins = best_fit_decreasing(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        # BFD never needs more than 11/9 OPT + 6/9 bins, and OPT >= the total over the capacity
        assert len(bins) <= 11 / 9 * max(math.ceil(sum(lengths) / capacity), sum(n > capacity / 2 for n in lengths)) + 1
        # no two bins could have been merged
        loads = sorted(sum(lengths[i] for i in b) for b in bins)
        assert len(loads) < 2 or loads[0] + loads[1] > capacity
        assert best_fit_decreasing(lengths, capacity) == bins


# -------------------------------------------------------------------------------------------------- batches


def test_packed_batch_layout():
    a = TokenizedSample([10, 11, 12, 13], [0, 0, 1, 1])
    b = TokenizedSample([20, 21, 22], [0, 1, 1])
    c = TokenizedSample([30, 31], [0, 1])
    batch = collate_packed([[a, b], [c]], seq_len=8, pad_id=0)
    I = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 20, 21, 22, 0], [30, 31, 0, 0, 0, 0, 0, 0]]
    # position i predicts token i + 1 of its own sample, if learned; a sample's last position predicts nothing
    assert batch["targets"].tolist() == [[I, 12, 13, I, 21, 22, I, I], [31, I, I, I, I, I, I, I]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 2], [0, 0, 1, 1, 1, 1, 1, 1]]
    assert batch["n_targets"] == 5 == a.n_targets + b.n_targets + c.n_targets
    assert batch["n_tokens"] == 9
    with pytest.raises(ValueError, match="more than seq_len=6"):
        collate_packed([[a, b]], seq_len=6, pad_id=0)


def test_padded_batch_layout():
    a = TokenizedSample([10, 11, 12], [0, 1, 1])
    b = TokenizedSample([20], [0])
    batch = collate_padded([a, b], pad_id=5, pad_to_multiple_of=4)
    I = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[10, 11, 12, 5], [20, 5, 5, 5]]
    assert batch["targets"].tolist() == [[11, 12, I, I], [I, I, I, I]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    assert "doc_ids" not in batch and batch["n_targets"] == 2 and batch["n_tokens"] == 4


# ----------------------------------------------------------------------------------- exactness on a model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    return build_model(cfg).float()


def _token_losses(model, input_ids, targets, **kw):
    hidden = model(input_ids, return_hidden=True, **kw)
    logits = F.linear(hidden, model.output.weight)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(targets.shape)


def _reference(model, samples):
    """Each sample alone: its summed loss, and the gradients of the sum over all samples."""
    model.zero_grad()
    losses = []
    for s in samples:
        ids = torch.from_numpy(s.input_ids)[None]
        targets = torch.from_numpy(s.targets())[None]
        loss = _token_losses(model, ids, targets).sum()
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_batch_equals_samples_one_by_one(model):
    samples = _samples([5, 9, 13, 7, 3, 11, 17, 2, 6], seed=1)
    expected, expected_grads = _reference(model, samples)
    rows = best_fit_decreasing([len(s) for s in samples], 24)
    assert any(len(r) > 2 for r in rows)  # several samples share a row
    batch = collate_packed([[samples[i] for i in r] for r in rows], 24, pad_id=0)
    model.zero_grad()
    per_token = _token_losses(model, batch["input_ids"], batch["targets"],
                              position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
    per_token.sum().backward()
    got = torch.zeros(len(samples))
    for r, row in enumerate(rows):
        for d, i in enumerate(row):
            got[i] = per_token[r][batch["doc_ids"][r] == d].sum()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    assert batch["n_targets"] == sum(s.n_targets for s in samples) == int((batch["targets"] != IGNORE_INDEX).sum())


def test_packed_batch_without_doc_ids_leaks_between_samples(model):
    # The check above can fail: without doc_ids a sample attends to the one before it in the row.
    samples = _samples([5, 9, 13], seed=2)
    expected, _ = _reference(model, samples)
    batch = collate_packed([samples], 32, pad_id=0)
    with torch.no_grad():
        leaky = _token_losses(model, batch["input_ids"], batch["targets"], position_ids=batch["position_ids"])
    leaky_second = leaky[0][batch["doc_ids"][0] == 1].sum()
    assert abs(float(leaky_second) - float(expected[1])) > 1e-3


def test_padded_batch_equals_samples_one_by_one(model):
    samples = _samples([5, 9, 13, 2], seed=3)
    expected, expected_grads = _reference(model, samples)
    batch = collate_padded(samples, pad_id=0)
    model.zero_grad()
    per_token = _token_losses(model, batch["input_ids"], batch["targets"])
    per_token.sum().backward()
    torch.testing.assert_close(per_token.sum(dim=1), expected, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    with torch.no_grad():  # the padding mask, when given, changes nothing for the real tokens
        masked = _token_losses(model, batch["input_ids"], batch["targets"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(masked.sum(dim=1), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- the loader


@pytest.mark.parametrize("packing", [True, False])
def test_loader_covers_every_sample_each_epoch_in_a_seeded_order(packing):
    samples = _samples([random.Random(i).randint(2, 30) for i in range(40)], seed=4)
    loader = SFTLoader(samples, seq_len=32, micro_batch_size=1, pad_id=0, packing=packing, seed=7)
    assert loader.batches_per_epoch == len(loader.rows)
    epoch = [next(loader) for _ in range(loader.batches_per_epoch)]
    assert sum(b["n_tokens"] for b in epoch) == sum(len(s) for s in samples)
    assert sum(b["n_targets"] for b in epoch) == sum(s.n_targets for s in samples)
    if packing:
        assert len(loader.rows) < len(samples) and loader.fill > 0.8
    again = SFTLoader(samples, seq_len=32, micro_batch_size=1, pad_id=0, packing=packing, seed=7)
    assert all(torch.equal(next(again)["input_ids"], b["input_ids"]) for b in epoch)
    other = SFTLoader(samples, seq_len=32, micro_batch_size=1, pad_id=0, packing=packing, seed=8)
    assert not all(torch.equal(next(other)["input_ids"], b["input_ids"]) for b in epoch)
    # the next epoch visits the rows in another order
    assert not all(torch.equal(next(loader)["input_ids"], b["input_ids"]) for b in epoch)


def test_loader_resumes_exactly_and_shards_over_ranks():
    samples = _samples([random.Random(i).randint(2, 20) for i in range(60)], seed=5)
    kw = dict(seq_len=24, pad_id=0, seed=3)
    whole = SFTLoader(samples, micro_batch_size=4, **kw)
    stream = [next(whole) for _ in range(2 * whole.batches_per_epoch + 1)]
    first = SFTLoader(samples, micro_batch_size=4, **kw)
    for _ in range(5):
        next(first)
    resumed = SFTLoader(samples, micro_batch_size=4, **kw)
    resumed.load_state_dict(first.state_dict())
    for b in stream[5:]:
        assert torch.equal(next(resumed)["input_ids"], b["input_ids"])
    # two ranks with half the micro-batch each see the rows of the single-rank batches, split between them
    ranks = [SFTLoader(samples, micro_batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    for b in stream[:6]:
        parts = [next(loader)["input_ids"] for loader in ranks]
        assert torch.equal(torch.cat(parts), b["input_ids"])
    with pytest.raises(DataError, match="seed was 3, is now 4"):
        SFTLoader(samples, micro_batch_size=4, seq_len=24, pad_id=0, seed=4).load_state_dict(first.state_dict())
    with pytest.raises(DataError, match="took 4 rows per optimizer step, this one takes 8"):
        SFTLoader(samples, micro_batch_size=8, **kw).load_state_dict(first.state_dict())


def test_loader_eval_batches_cover_every_row_once_on_every_rank_count():
    samples = _samples([random.Random(i).randint(2, 20) for i in range(25)], seed=6)
    total = sum(s.n_targets for s in samples)
    for world in (1, 2, 3):
        loaders = [SFTLoader(samples, seq_len=24, micro_batch_size=2, pad_id=0, rank=r, world_size=world)
                   for r in range(world)]
        batches = [list(loader.iter_eval_batches()) for loader in loaders]
        assert len({len(b) for b in batches}) == 1  # every rank runs the same number of steps
        assert sum(b["n_targets"] for rank in batches for b in rank) == total
    loader = loaders[0]
    assert loader.batch_in_epoch == 0 and len(list(loader.iter_eval_batches(max_batches=1))) == 1
    # a validation set smaller than one step: fine for evaluation only
    with pytest.raises(DataError, match="fewer than one optimizer step needs"):
        SFTLoader(samples[:3], seq_len=24, micro_batch_size=8, pad_id=0)
    for packing in (True, False):
        small = SFTLoader(samples[:3], seq_len=24, micro_batch_size=8, pad_id=0, packing=packing, rank=1,
                          world_size=2, eval_only=True, pad_to_multiple_of=4)
        [filler] = list(small.iter_eval_batches())  # rank 1 gets no rows: padding only, nothing learned
        assert filler["n_targets"] == 0 and filler["input_ids"].shape[1] % 4 == 0
        with pytest.raises(TypeError, match="eval_only"):
            next(small)


def test_loader_errors():
    samples = _samples([5, 40], seed=7)
    with pytest.raises(DataError, match="a sample has 40 tokens, more than seq_len=32"):
        SFTLoader(samples, seq_len=32, micro_batch_size=1, pad_id=0)
    with pytest.raises(DataError, match="fewer than one optimizer step needs"):
        SFTLoader(samples[:1], seq_len=32, micro_batch_size=2, pad_id=0)
    with pytest.raises(DataError, match="no SFT samples"):
        SFTLoader([], seq_len=32, micro_batch_size=1, pad_id=0)
    with pytest.raises(ConfigError, match="micro_batch_size must be an integer >= 1"):
        SFTLoader(samples, seq_len=64, micro_batch_size=0, pad_id=0)
    with pytest.raises(ConfigError, match="rank must be below world_size"):
        SFTLoader(samples, seq_len=64, micro_batch_size=1, pad_id=0, rank=1)
