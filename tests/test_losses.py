"""The fused, chunked output head + cross-entropy against the plain path F.cross_entropy(F.linear(h, W))."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from nanoseek.model import IGNORE_INDEX, DeepSeekV3, losses
from nanoseek.model.losses import linear_cross_entropy, mtp_linear_cross_entropy
from nanoseek.model.transformer import mtp_loss

from conftest import randomize, tiny_config


def problem(dtype=torch.float64, batch=3, seq=13, hidden=16, vocab=50, seed=0):
    """hidden (B, S, H) and head (V, H) as leaves, targets (B, S) with whole and scattered ignored rows."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(vocab, hidden, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    targets[0, :4] = IGNORE_INDEX
    targets[-1, 5] = IGNORE_INDEX
    return h, w, targets


def plain(h, w, targets):
    return F.cross_entropy(F.linear(h, w).flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def loss_and_grads(fn, h, w, targets):
    h.grad = w.grad = None
    loss = fn(h, w, targets)
    (2.5 * loss).backward()  # a non-unit upstream gradient, as the MTP weight gives
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk", [1, 8, 39, 1000])  # 39 tokens: 8 leaves a ragged last chunk
def test_equals_plain_path_in_float64(chunk):
    h, w, targets = problem()
    fused = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_size=chunk), h, w, targets)
    reference = loss_and_grads(
        lambda h, w, t: F.cross_entropy(F.linear(h, w).flatten(0, 1), t.flatten(), ignore_index=IGNORE_INDEX),
        h, w, targets)
    assert fused[0].dtype == torch.float64
    for ours, theirs in zip(fused, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    assert fused[1][0, :4].abs().max() == 0  # ignored rows get no gradient


def test_every_target_ignored_is_nan_like_plain():
    h, w, targets = problem()
    targets.fill_(IGNORE_INDEX)
    assert math.isnan(linear_cross_entropy(h, w, targets, chunk_size=8).item())
    assert math.isnan(plain(h, w, targets).item())


def test_bf16_weights_match_plain_bf16_within_rounding():
    h, w, targets = problem(torch.bfloat16, seq=64, hidden=64, vocab=300)
    fused = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_size=40), h, w, targets)
    reference = loss_and_grads(plain, h, w, targets)
    assert fused[0].dtype == torch.float32
    # Same bf16 logits, fp32 softmax: the loss agrees to fp32 summation order; the gradients to one bf16
    # rounding (the weight's is summed over chunks in fp32 before its single rounding).
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(fused[1:], reference[1:]):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2 * theirs.abs().max().item())


def test_autocast_runs_the_gemms_in_bf16_like_nn_linear():
    h, w, targets = problem(torch.float32, seq=64, hidden=64, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_size=40), h, w, targets)
        reference = loss_and_grads(plain, h, w, targets)
        exact = loss_and_grads(plain, h.detach().double().requires_grad_(), w.detach().double().requires_grad_(),
                               targets)
    assert fused[1].dtype == fused[2].dtype == torch.float32
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(fused[1:], reference[1:]):
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2 * theirs.abs().max().item())
    assert abs(fused[0].item() - exact[0].item()) > 1e-6  # bf16 GEMMs really ran (fp32 ones would be exact)


def count_ops(fn, name: str) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == name)


def test_gradients_are_only_computed_when_needed():
    h, w, targets = problem()
    run = lambda: linear_cross_entropy(h, w, targets, chunk_size=8)  # 39 tokens: 5 chunks
    assert count_ops(run, "aten::mm") == 15  # logits, then grads of h and of W, per chunk
    with torch.no_grad():
        assert count_ops(run, "aten::mm") == 5


def largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_logits_are_never_held_whole():
    tokens, vocab = 512, 4096
    h, w, targets = problem(torch.float32, batch=1, seq=tokens, hidden=32, vocab=vocab)
    whole = tokens * vocab * 4  # float32 logits, 8 MiB
    assert largest_allocation(lambda: plain(h, w, targets).backward()) >= whole
    assert largest_allocation(lambda: linear_cross_entropy(h, w, targets, chunk_size=64).backward()) <= whole / 8


def test_compute_loss_equals_the_logits_path_in_float64(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 7 * 512)  # 7-token chunks: ragged over 2 x 12 and 2 x 11
    model = DeepSeekV3(tiny_config(num_nextn_predict_layers=2))
    randomize(model, seed=3)
    model = model.double().train()
    ids = torch.randint(0, 512, (2, 12))
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    targets[1, 3] = IGNORE_INDEX

    out = model.compute_loss(ids, targets, mtp_weight=0.3, balance_alpha=0.0)
    out.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits, mtp_logits = model(ids, return_mtp=True)
    ce = lambda z, t: F.cross_entropy(z.flatten(0, 1), t.flatten(), ignore_index=IGNORE_INDEX)
    lm = ce(logits, targets)
    depth = (ce(mtp_logits[0], targets[:, 1:]) + ce(mtp_logits[1], targets[:, 2:])) / 2  # float64, unlike mtp_loss
    (lm + 0.3 * depth).backward()
    torch.testing.assert_close(out.lm_loss, lm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mtp_loss, depth, rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_mtp_depths_are_shifted_like_mtp_loss():
    h, w, targets = problem(torch.float32)  # mtp_loss computes in float32
    depths = [h[:, :-1].detach(), h[:, :-2].detach()]  # depth k sees S - k positions
    ours = mtp_linear_cross_entropy(depths, w, targets, chunk_size=5)
    torch.testing.assert_close(ours, mtp_loss([F.linear(d, w) for d in depths], targets), rtol=1e-6, atol=1e-6)
