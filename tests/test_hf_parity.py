"""Parity with the independent implementation: transformers' DeepseekV3ForCausalLM (float32)."""

import pytest
import torch

import nanoseek
from nanoseek.config import YarnScaling

from conftest import randomize, tiny_config

transformers = pytest.importorskip("transformers")

YARN = YarnScaling(factor=4.0, original_max_position_embeddings=16, beta_fast=32, beta_slow=1, mscale=1.0,
                   mscale_all_dim=1.0)
CASES = {
    # query compression, sigmoid routing with n_group>1, first layer dense, interleaved RoPE
    "qlora-groups-dense-first": dict(q_lora_rank=32, n_group=4, topk_group=2, first_k_dense_replace=1),
    # no query compression, YaRN on (positions beyond the original context), every layer MoE
    "no-qlora-yarn-all-moe": dict(q_lora_rank=None, rope_scaling=YARN, max_position_embeddings=64,
                                  first_k_dense_replace=0, n_group=2, topk_group=1),
    # YaRN with mscale != mscale_all_dim (cos/sin scaled too), the rotate-half RoPE layout, top-3 of 8
    "yarn-mscale-half-rope": dict(rope_scaling=YarnScaling(factor=8.0, original_max_position_embeddings=8,
                                                           mscale=0.707, mscale_all_dim=1.0),
                                  max_position_embeddings=64, rope_interleave=False, num_experts_per_tok=3,
                                  n_group=1, topk_group=1, routed_scaling_factor=1.5),
    # two dense layers, two shared experts, tied embeddings, no top-k normalisation
    "two-dense-tied-two-shared": dict(num_hidden_layers=4, first_k_dense_replace=2, n_shared_experts=2,
                                     tie_word_embeddings=True, norm_topk_prob=False, n_group=4, topk_group=3),
}


def hf_model(path):
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                               dtype=torch.float32)
    return model.eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_checkpoint_loads_with_equal_logits(case, tmp_path):
    config = tiny_config(num_nextn_predict_layers=0, **CASES[case])
    hf_config = transformers.DeepseekV3Config(**{k: v for k, v in config.to_hf_dict().items()
                                                if k not in ("architectures", "model_type", "nanoseek",
                                                             "rope_scaling", "rope_theta")},
                                              rope_parameters=_hf_rope(config))
    reference = transformers.DeepseekV3ForCausalLM(hf_config)
    randomize(reference, seed=1)
    reference.save_pretrained(tmp_path)
    reference = hf_model(tmp_path)

    model = nanoseek.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, config.vocab_size, (2, 48))
    with torch.no_grad():
        ours = model(ids)
    theirs = hf_logits(reference, ids)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_nanoseek_checkpoint_loads_in_transformers_with_equal_logits(case, tmp_path):
    config = tiny_config(**CASES[case])
    model = nanoseek.DeepSeekV3(config).eval()
    randomize(model, seed=2)
    nanoseek.save_pretrained(model, tmp_path)
    reference = hf_model(tmp_path)
    ids = torch.randint(0, config.vocab_size, (2, 48))
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(ours, hf_logits(reference, ids), atol=1e-4, rtol=1e-4)


def _hf_rope(config):
    params = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        y = config.rope_scaling
        params = {"rope_type": "yarn", "rope_theta": config.rope_theta, "factor": y.factor,
                  "original_max_position_embeddings": y.original_max_position_embeddings,
                  "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "mscale": y.mscale,
                  "mscale_all_dim": y.mscale_all_dim}
    return params


@pytest.mark.parametrize("topk_method,groups", [("greedy", {}), ("group_limited_greedy", dict(n_group=4, topk_group=2))])
def test_deepseek_v2_checkpoint_softmax_routing(topk_method, groups, tmp_path):
    """DeepSeek-V2(-Lite) layout: softmax routing without top-k normalisation, no query compression."""
    v2 = transformers.DeepseekV2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, routed_scaling_factor=1.5, topk_method=topk_method, bos_token_id=0, eos_token_id=1, **groups)
    reference = transformers.DeepseekV2ForCausalLM(v2)
    randomize(reference, seed=3)
    reference.save_pretrained(tmp_path)
    reference = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = nanoseek.from_pretrained(tmp_path).eval()
    assert model.config.scoring_func == "softmax" and model.config.q_lora_rank is None
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
