"""The chunked log-prob primitive against plain log_softmax + gather: values and gradients, masks, frozen heads."""

import pytest
import torch

from forgeline.kernels.cross_entropy import IGNORE_INDEX
from forgeline.kernels.logprobs import packed_sequence_logprobs, sequence_logprobs, token_logprobs


def _reference(hidden, weight, targets):
    logits = torch.nn.functional.linear(hidden, weight).float()
    logp = torch.log_softmax(logits, dim=-1)
    safe = targets.clamp(min=0)
    out = logp.gather(-1, safe[..., None]).squeeze(-1)
    return torch.where(targets == IGNORE_INDEX, torch.zeros_like(out), out)


def _inputs(seed=0, B=3, T=7, d=16, V=53):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g)
    weight = torch.randn(V, d, generator=g) * 0.3
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = IGNORE_INDEX
    targets[-1, -3:] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_bytes", [None, 4 * 53 * 2])  # one chunk; 2-row chunks (many chunks, a short tail)
def test_values_and_gradients_match_plain_log_softmax(chunk_bytes):
    hidden, weight, targets = _inputs()
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(5))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = token_logprobs(h1, w1, targets, chunk_bytes=chunk_bytes)
    (got * upstream).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = _reference(h2, w2, targets)
    (want * upstream).sum().backward()
    assert got.shape == targets.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert bool((got[targets == IGNORE_INDEX] == 0).all())
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)
    assert bool((h1.grad[targets == IGNORE_INDEX] == 0).all())


def test_frozen_head_gets_no_gradient_and_hidden_gradient_is_unchanged():
    hidden, weight, targets = _inputs(seed=1)
    h1 = hidden.clone().requires_grad_()
    token_logprobs(h1, weight, targets, chunk_bytes=4 * 53 * 3).sum().backward()
    h2 = hidden.clone().requires_grad_()
    _reference(h2, weight, targets).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_matches_the_bf16_reference():
    hidden, weight, targets = _inputs(seed=2, d=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logprobs(hidden, weight, targets, chunk_bytes=4 * 53 * 4)
        want = _reference(hidden, weight, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)  # same bf16 products, fp32 softmax on both sides


def test_sequence_sums_and_counts():
    hidden, weight, targets = _inputs(seed=3)
    sums, counts = sequence_logprobs(hidden, weight, targets)
    ref = _reference(hidden, weight, targets)
    torch.testing.assert_close(sums, ref.sum(-1))
    assert counts.tolist() == [5, 7, 4]


def test_packed_documents_sum_separately():
    hidden, weight, targets = _inputs(seed=4, B=2, T=6)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 3, 3]])
    per_token = token_logprobs(hidden, weight, targets)
    sums, counts = packed_sequence_logprobs(per_token, targets, doc_ids, 4)
    ref = _reference(hidden, weight, targets).reshape(-1)
    ids = doc_ids.reshape(-1)
    for doc in range(4):
        torch.testing.assert_close(sums[doc], ref[ids == doc].sum())
        assert counts[doc] == int((targets.reshape(-1)[ids == doc] != IGNORE_INDEX).sum())


def test_all_targets_ignored_gives_zeros_and_keeps_the_graph():
    hidden, weight, _ = _inputs(seed=5)
    targets = torch.full(hidden.shape[:2], IGNORE_INDEX)
    h = hidden.clone().requires_grad_()
    out = token_logprobs(h, weight, targets)
    out.sum().backward()
    assert bool((out == 0).all()) and bool((h.grad == 0).all())


def test_out_of_range_target_is_an_error():
    hidden, weight, targets = _inputs(seed=6)
    targets[1, 1] = weight.shape[0]
    with pytest.raises(IndexError):
        token_logprobs(hidden, weight, targets)
