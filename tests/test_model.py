"""The model's losses, causality and gradients, and Multi-Token Prediction."""

import math

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.model import IGNORE_INDEX, DeepSeekV3
from nanoseek.model.transformer import mtp_loss

from conftest import randomize, tiny_config


def make_model(**changes) -> DeepSeekV3:
    model = DeepSeekV3(tiny_config(**changes))
    randomize(model, seed=5)
    return model


def test_mtp_loss_hand_computed():
    # D = 2 depths, vocabulary of 2, one sequence of 3 positions; targets[t] is the token after input t.
    targets = torch.tensor([[1, 0, 1]])
    ln3 = math.log(3)
    depth1 = torch.tensor([[[0.0, ln3], [0.0, 0.0]]])  # positions 0, 1 predict targets[1:] = [0, 1]
    depth2 = torch.tensor([[[ln3, 0.0]]])  # position 0 predicts targets[2:] = [1]
    # depth 1: -log(1/4) = ln 4 and -log(1/2) = ln 2, mean 1.5 ln 2; depth 2: -log(1/4) = 2 ln 2
    assert mtp_loss([depth1, depth2], targets).item() == pytest.approx((1.5 + 2.0) / 2 * math.log(2))
    # ignored targets drop out of the mean
    masked = torch.tensor([[1, IGNORE_INDEX, 1]])
    assert mtp_loss([depth1], masked).item() == pytest.approx(math.log(2))


def test_compute_loss_combines_the_terms():
    model = make_model(num_nextn_predict_layers=2, mtp_loss_weight=0.3, aux_loss_alpha=0.01).train()
    ids = torch.randint(0, 512, (2, 12))
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    out = model.compute_loss(ids, targets)
    logits, mtp_logits = model(ids, return_mtp=True)
    assert [m.shape[1] for m in mtp_logits] == [11, 10]
    lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.lm_loss, lm)
    torch.testing.assert_close(out.mtp_loss, mtp_loss(mtp_logits, targets))
    torch.testing.assert_close(out.loss, lm + 0.3 * out.mtp_loss + 0.01 * out.balance_loss)
    # 2 main MoE layers + 2 MTP blocks, each routing 24 or fewer tokens to top-2 experts
    assert out.expert_counts.shape == (4, 8)
    assert out.expert_counts.sum(-1).tolist() == [48, 48, 44, 40]


def test_mtp_switches_off():
    ids = torch.randint(0, 512, (1, 8))
    assert make_model().compute_loss(ids, ids, mtp_weight=0.0).mtp_loss is None
    off = make_model(num_nextn_predict_layers=0)
    assert off.compute_loss(ids, ids).mtp_loss is None and len(off.mtp) == 0


def test_logits_are_causal_including_mtp():
    model = make_model().eval()
    ids = torch.randint(0, 512, (1, 16))
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % 512
    with torch.no_grad():
        a, (ma,) = model(ids, return_mtp=True)
        b, (mb,) = model(changed, return_mtp=True)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9], b[:, 9])
    # MTP depth 1 at position t reads the embedding of input t+1: position 8 is the first to change.
    torch.testing.assert_close(ma[:, :8], mb[:, :8])
    assert not torch.allclose(ma[:, 8], mb[:, 8])


def test_every_parameter_gets_a_gradient():
    model = make_model().train()
    ids = torch.randint(0, 512, (2, 16))
    model.compute_loss(ids, torch.roll(ids, -1, 1), balance_alpha=0.01).loss.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []


def test_update_router_biases_moves_busy_experts_down():
    model = make_model()
    counts = torch.zeros(len(model.routers()), 8)
    counts[:, 0] = 100
    bias = torch.stack([r.e_score_correction_bias for r in model.routers()])
    model.update_router_biases(counts, speed=0.01)
    after = torch.stack([r.e_score_correction_bias for r in model.routers()])
    torch.testing.assert_close(after[:, 0] - bias[:, 0], torch.full((3,), -0.01))
    torch.testing.assert_close(after[:, 1:] - bias[:, 1:], torch.full((3, 7), 0.01))
    model.update_router_biases(counts[:2], speed=0.01)  # MTP off: only the 2 main MoE layers routed
    final = torch.stack([r.e_score_correction_bias for r in model.routers()])
    torch.testing.assert_close(final[2], after[2])
    assert not torch.equal(final[:2], after[:2])
    with pytest.raises(ValueError, match="expert_counts has 1 rows; this model has 2 MoE layers and 3 routers"):
        model.update_router_biases(counts[:1])


def test_from_pretrained_preset_is_seeded():
    a, b = nanoseek.from_pretrained("tiny", seed=1), nanoseek.from_pretrained("tiny", seed=1)
    torch.testing.assert_close(a.lm_head.weight, b.lm_head.weight)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor a preset"):
        nanoseek.from_pretrained("no-such-thing")


def test_casting_to_bf16_keeps_rope_frequencies_and_balancing_bias_in_float32():
    model = DeepSeekV3(tiny_config())
    model.layers[1].mlp.gate.e_score_correction_bias += 1.0 + 2**-12  # a step bf16 cannot hold next to 1
    positions = torch.tensor([[4000, 4001]])
    cos32, sin32 = model.rotary(positions)
    model.to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    bias = model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.all(bias == 1.0 + 2**-12)
    cos16, sin16 = model.rotary(positions)
    assert torch.equal(cos16, cos32) and torch.equal(sin16, sin32)
    assert model.embed_tokens.weight.dtype == torch.bfloat16  # everything else is cast


# ---------------------------------------------------------------------- packed documents
def test_document_causal_mask_by_hand():
    from nanoseek.model.attention import document_causal_mask

    bos = 0
    mask = document_causal_mask(torch.tensor([[7, bos, 5, 6, bos, 9]]), bos)[0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],  # tokens before the first bos: a document of their own
                             [0, 1, 0, 0, 0, 0],
                             [0, 1, 1, 0, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 0, 0, 0, 1, 0],
                             [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("dense", [False, True])
def test_a_masked_packed_row_is_each_document_run_alone(dense):
    """With the document mask, each document of a packed row gets the hidden states it gets alone, from position 0
    (RoPE scores depend only on relative positions); without it, the later documents see the earlier ones."""
    from nanoseek.config import get_preset
    from nanoseek.model.attention import document_causal_mask
    from nanoseek.model.dense import build_model

    config = get_preset("qwen2-tiny") if dense else tiny_config()
    torch.manual_seed(0)
    model = build_model(config).double()
    randomize(model, seed=1)
    bos = config.bos_token_id
    docs = [[bos, 5, 9, 14], [bos, 3], [bos, 8, 8, 21, 4, 2]]
    row = torch.tensor([sum(docs, [])])

    def hidden(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        cos, sin = model.rope(ids.shape[1])
        return model.run_layers(model.embed_tokens(ids), cos, sin, mask=mask)[0]

    with torch.no_grad():
        packed = hidden(row, document_causal_mask(row, bos))[0]
        alone = torch.cat([hidden(torch.tensor([d]), None)[0] for d in docs])
        unmasked = hidden(row, None)[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)  # the router scores in float32: ~1e-6
    assert (unmasked[len(docs[0]):] - alone[len(docs[0]):]).abs().max() > 1e-3
    loss = model.compute_loss(row, torch.roll(row, -1, 1), document_mask=True).loss
    assert torch.isfinite(loss)
