"""The chunked linear + cross-entropy against the plain F.linear + F.cross_entropy reference."""

import pytest
import torch
import torch.nn.functional as F

from forgeline.kernels.cross_entropy import IGNORE_INDEX, cross_entropy_sum, fused_linear_cross_entropy
from forgeline.objectives.causal_lm import causal_lm_loss


def reference(hidden, weight, targets):
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight)
    return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def make(n=200, d=48, vocab=300, dtype=torch.float32, ignore_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(vocab, d, generator=g) * 0.3).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = IGNORE_INDEX
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, *, autocast=False, grad_scale=0.37):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, w, targets)
    (loss * grad_scale).backward()  # a non-unit grad_output, as the trainer's 1/n_targets scaling gives
    return loss.detach(), h.grad, w.grad


def close(a, b, rtol, atol):
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


def rel_err(a, exact):
    return ((a.float() - exact.float()).norm() / exact.float().norm()).item()


def check_low_precision(fused, ref, exact):
    """bf16 matmuls round differently chunk by chunk: the fused result must be as close to the exact fp32 answer
    as the reference is, and elementwise close to the reference at the scale of the tensor."""
    close(fused[0], ref[0], rtol=1e-4, atol=1e-3)
    for f, r, e in zip(fused[1:], ref[1:], exact[1:]):
        assert rel_err(f, e) <= 1.5 * rel_err(r, e) + 1e-4
        close(f, r, rtol=2e-2, atol=1e-2 * r.abs().max().item())


@pytest.mark.parametrize("chunk_bytes", [None, 64 * 4 * 300, 1])  # default, several chunks, minimum chunk
@pytest.mark.parametrize("ignore_frac", [0.0, 0.25])
def test_fp32_matches_reference(chunk_bytes, ignore_frac):
    hidden, weight, targets = make(ignore_frac=ignore_frac)
    fused = loss_and_grads(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_bytes=chunk_bytes),
                           hidden, weight, targets)
    ref = loss_and_grads(reference, hidden, weight, targets)
    assert fused[0].dtype == torch.float32
    close(fused[0], ref[0], rtol=1e-5, atol=1e-4)
    close(fused[1], ref[1], rtol=1e-5, atol=1e-6)
    close(fused[2], ref[2], rtol=1e-5, atol=1e-6)
    if ignore_frac:
        ignored = targets == IGNORE_INDEX
        assert ignored.any() and (fused[1][ignored] == 0).all()


def test_bf16_autocast_matches_reference():
    """Under autocast both take the bf16 matmul; the loss and softmax are fp32 in both."""
    hidden, weight, targets = make(n=256, d=64, vocab=512)
    fused = loss_and_grads(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_bytes=64 * 4 * 512),
                           hidden, weight, targets, autocast=True)
    ref = loss_and_grads(reference, hidden, weight, targets, autocast=True)
    assert fused[1].dtype == ref[1].dtype == torch.float32 and fused[2].dtype == torch.float32
    exact = loss_and_grads(reference, hidden, weight, targets)
    check_low_precision(fused, ref, exact)
    close(fused[0], exact[0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("autocast, mode", [(False, "native"), (True, "native"), (True, "fp32")])
def test_a_frozen_head_gets_the_same_hidden_gradient_and_no_weight_gradient(autocast, mode, monkeypatch):
    """Adapters train under a frozen LM head: its V x d gradient is never computed, the hidden one is unchanged."""
    from forgeline.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "bf16_matmul_mode", lambda device: mode)
    hidden, weight, targets = make(n=256, d=64, vocab=512)
    fn = lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_bytes=32 * 4 * 512)  # noqa: E731
    trained = loss_and_grads(fn, hidden, weight, targets, autocast=autocast)
    h = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, weight, targets)  # weight does not require grad
    (loss * 0.37).backward()
    assert torch.equal(loss.detach(), trained[0])
    assert torch.equal(h.grad, trained[1])


def test_bf16_tensors_match_reference():
    """A model held in bf16 (no autocast): gradients come back in bf16, like the reference's."""
    hidden, weight, targets = make(n=256, d=64, vocab=512, dtype=torch.bfloat16)
    fused = loss_and_grads(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_bytes=64 * 4 * 512),
                           hidden, weight, targets)
    ref = loss_and_grads(reference, hidden, weight, targets)
    assert fused[1].dtype == fused[2].dtype == torch.bfloat16
    exact = loss_and_grads(reference, hidden.float(), weight.float(), targets)
    check_low_precision(fused, ref, exact)


def test_all_ignored_gives_zero_loss_and_gradients():
    hidden, weight, targets = make(ignore_frac=1.0)
    loss, gh, gw = loss_and_grads(cross_entropy_sum, hidden, weight, targets)
    assert loss.item() == 0.0
    assert (gh == 0).all() and (gw == 0).all()


def test_out_of_range_target_raises():
    hidden, weight, targets = make(ignore_frac=0.0)
    targets[3] = weight.shape[0]
    with pytest.raises(IndexError):
        fused_linear_cross_entropy(hidden.requires_grad_(), weight, targets)


def test_no_grad_path_matches_reference(monkeypatch):
    import forgeline.kernels.cross_entropy as C

    monkeypatch.setattr(C, "CHUNK_BYTES", 64 * 4 * 700)  # several chunks
    hidden, weight, targets = make(n=3000, vocab=700)
    with torch.no_grad():
        close(cross_entropy_sum(hidden, weight, targets), reference(hidden, weight, targets), rtol=1e-5, atol=1e-3)


def test_small_logits_take_the_plain_path(monkeypatch):
    """Logits that fit in one chunk gain nothing from fusion: the plain ops run, with their exact numerics."""
    import forgeline.kernels.cross_entropy as C

    def fail(*args, **kwargs):
        raise AssertionError("the fused path ran")

    monkeypatch.setattr(C, "fused_linear_cross_entropy", fail)
    hidden, weight, targets = make(n=64, vocab=64)
    got = loss_and_grads(cross_entropy_sum, hidden, weight, targets)
    ref = loss_and_grads(reference, hidden, weight, targets)
    for a, b in zip(got, ref):
        close(a, b, rtol=0, atol=0)


def test_causal_lm_loss_gradients_match_plain_path(monkeypatch):
    """Through the model: every parameter's gradient equals the one from full logits + F.cross_entropy."""
    import forgeline.kernels.cross_entropy as C
    from forgeline.model.config import ModelConfig
    from forgeline.model.transformer import build_model

    monkeypatch.setattr(C, "CHUNK_BYTES", 16 * 4 * 97)  # 16-row chunks: the fused path, several chunks
    calls = []
    fused = C.fused_linear_cross_entropy
    monkeypatch.setattr(C, "fused_linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)
    model = build_model(cfg)
    tokens = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    targets[0, :5] = IGNORE_INDEX
    batch = {"input_ids": tokens, "targets": targets, "n_targets": int((targets != IGNORE_INDEX).sum())}

    loss = causal_lm_loss(model, batch).loss
    loss.backward()
    assert calls, "the fused path did not run"
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_loss = reference(model(tokens, return_hidden=True), model.output.weight, targets)
    ref_loss.backward()
    close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-4)
    for name, p in model.named_parameters():
        close(fused[name], p.grad, rtol=1e-4, atol=1e-6)


def test_bf16_several_gradient_groups(monkeypatch):
    """Low precision keeps the logits' gradient per group of rows; several groups sum to the same gradients."""
    import forgeline.kernels.cross_entropy as C

    hidden, weight, targets = make(n=300, d=64, vocab=512)
    run = lambda: loss_and_grads(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_bytes=32 * 4 * 512),
                                 hidden, weight, targets, autocast=True)
    one_group = run()
    monkeypatch.setattr(C, "LOW_PRECISION_GROUP_BYTES", 64 * 512 * 2)  # 64-row groups of two 32-row chunks
    groups = run()
    ref = loss_and_grads(reference, hidden, weight, targets, autocast=True)
    exact = loss_and_grads(reference, hidden, weight, targets)
    check_low_precision(groups, ref, exact)
    close(groups[0], one_group[0], rtol=1e-6, atol=1e-4)
    close(groups[1], one_group[1], rtol=0, atol=0)  # the hidden gradient does not depend on the grouping
