"""DeepSeekMoE against float64 per-token references, and the two balancing mechanisms."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model.moe import MoE, Router, grouped_mm, sequence_balance_loss

from conftest import randomize, tiny_config


def reference_grouped(x, w, counts):
    out, start = [], 0
    for g, n in enumerate(counts):
        out.append(x[start:start + n] @ w[g])
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("counts", [[3, 5, 0, 8], [0, 0, 16, 0], [4, 4, 4, 4]])
@pytest.mark.parametrize("k,n", [(16, 24), (6, 10)])  # (6, 10): rows not 16-byte aligned -> padded bmm path
def test_grouped_mm_against_float64(counts, k, n):
    x = torch.randn(sum(counts), k)
    w = torch.randn(len(counts), n, k).transpose(1, 2)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = grouped_mm(x, w, offsets)
    expected = reference_grouped(x.double(), w.double(), counts)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, in float64: the definition, with no sorting or grouping."""
    c = moe.config
    out = torch.zeros_like(x, dtype=torch.float64)
    for t, token in enumerate(x.double()):
        s = token @ moe.gate.weight.double().T
        s = s.sigmoid() if c.scoring_func == "sigmoid" else s.softmax(-1)
        biased = s + moe.gate.e_score_correction_bias.double()
        groups = biased.view(c.n_group, -1)
        group_score = groups.topk(2).values.sum(-1) if c.scoring_func == "sigmoid" else groups.max(-1).values
        allowed = torch.zeros(c.n_group, dtype=torch.bool)
        allowed[group_score.topk(c.topk_group).indices] = True
        masked = torch.where(allowed.repeat_interleave(c.n_routed_experts // c.n_group), biased, -torch.inf)
        chosen = masked.topk(c.num_experts_per_tok).indices
        weights = s[chosen] / s[chosen].sum() if c.norm_topk_prob else s[chosen]
        for e, wt in zip(chosen.tolist(), weights * c.routed_scaling_factor):
            gu = moe.experts.gate_up_proj[e].double() @ token
            g, u = gu.chunk(2)
            out[t] += wt * (moe.experts.down_proj[e].double() @ (F.silu(g) * u))
        if moe.shared_experts is not None:
            se = moe.shared_experts
            out[t] += se.down_proj.weight.double() @ (F.silu(se.gate_proj.weight.double() @ token)
                                                     * (se.up_proj.weight.double() @ token))
    return out


@pytest.mark.parametrize("changes", [
    dict(),  # sigmoid, 2 groups of 4, top-1 group
    dict(n_group=4, topk_group=2, num_experts_per_tok=3),
    dict(scoring_func="softmax", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0),
])
def test_moe_matches_per_token_reference(changes):
    moe = MoE(tiny_config(**changes))
    randomize(moe, seed=3, std=0.3)
    x = torch.randn(2, 12, moe.config.hidden_size)
    out, counts, _ = moe(x)
    expected = reference_moe(moe, x.view(-1, x.shape[-1])).view_as(x)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)
    assert counts.sum() == 24 * moe.config.num_experts_per_tok  # no token dropped


def test_group_limited_routing_stays_inside_topk_groups():
    config = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=1.0)
    route = router(torch.randn(200, config.hidden_size))
    groups_used = (route.indices // 4).sort(dim=-1).values
    assert ((groups_used[:, 1:] != groups_used[:, :-1]).sum(-1) + 1 <= 2).all()


def test_bias_changes_selection_but_not_combine_weights():
    config = tiny_config(n_group=1, topk_group=1)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(64, config.hidden_size)
    before = router(x)
    router.e_score_correction_bias[3] = 10.0  # forces expert 3 into every token's top-k
    after = router(x)
    assert (after.indices == 3).any(-1).all() and not (before.indices == 3).any(-1).all()
    # The weights are the *unbiased* affinities of whichever experts were chosen, normalised.
    s = after.scores
    expected = s.gather(1, after.indices)
    expected = expected / expected.sum(-1, keepdim=True) * config.routed_scaling_factor
    torch.testing.assert_close(after.weights, expected)
    torch.testing.assert_close(after.scores, before.scores)


def max_violation(counts: torch.Tensor) -> float:
    return (counts.float().max() / counts.float().mean() - 1).item()


def test_bias_updates_balance_a_skewed_router():
    config = tiny_config(n_group=1, topk_group=1, bias_update_speed=0.01)
    router = Router(config)
    with torch.no_grad():
        router.weight.normal_(std=0.3)
        router.weight[:2, 0] += 3.0  # experts 0 and 1 attract every token whose first feature is large...
    x = torch.randn(4096, config.hidden_size)
    x[:, 0] = x[:, 0].abs() + 1  # ...which is all of them
    violations = []
    for _ in range(300):
        counts = torch.bincount(router(x).indices.flatten(), minlength=config.n_routed_experts)
        violations.append(max_violation(counts))
        router.update_bias(counts, config.bias_update_speed)
    # A fixed-size sign step ends in a small oscillation around balance: judge the last 20 steps.
    late = sum(violations[-20:]) / 20
    assert violations[0] > 1.5, violations[0]
    assert late < 0.2, late


def test_sequence_balance_loss_hand_computed():
    # One sequence of 2 tokens, 4 experts, top-1. Affinities already sum to 1 per token.
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    indices = torch.tensor([[0], [0]])
    # f = N_r/(K_r T) * hits = 4/2 * [2, 0, 0, 0] = [4, 0, 0, 0]; P = mean = [0.25, 0.25, 0.25, 0.25]
    assert sequence_balance_loss(scores, indices, batch=1).item() == pytest.approx(1.0)
    # Unbalanced *and* confident: P_0 = 0.7 -> 4 * 0.7 = 2.8
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    assert sequence_balance_loss(scores, indices, batch=1).item() == pytest.approx(2.8)
    # Two sequences are averaged; unnormalised (sigmoid) scores are normalised first.
    scores2 = torch.tensor([[2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]])
    both = sequence_balance_loss(torch.cat([scores, scores2]), torch.tensor([[0], [0], [1], [2]]), batch=2)
    # second sequence: f = 2*[0, 1, 1, 0] = [0, 2, 2, 0], P = 0.25 each -> 1.0
    assert both.item() == pytest.approx((2.8 + 1.0) / 2)


def test_balance_loss_gradient_reaches_the_router_only_through_affinities():
    moe = MoE(tiny_config()).train()
    randomize(moe, seed=4)
    _, _, balance = moe(torch.randn(2, 8, moe.config.hidden_size))
    balance.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.experts.gate_up_proj.grad is None
