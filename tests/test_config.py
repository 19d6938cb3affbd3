import json

import pytest

from nanoseek.config import PRESETS, ConfigError, ModelConfig, YarnScaling, get_preset

from conftest import tiny_config

# The released DeepSeek-V3 config.json (the fields that matter; HF's own file has a few more).
RELEASED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
    "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "aux_loss_alpha": 0.001, "seq_aux": True,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_released_v3_config_reads_as_the_v3_preset():
    config = ModelConfig.from_hf_dict(RELEASED_V3)
    assert config.replace(aux_loss_alpha=0.0001) == get_preset("v3-671b")
    assert config.aux_loss_alpha == 0.001  # the file's value wins over the paper's default
    assert config.softmax_scale == pytest.approx(192**-0.5 * (0.1 * __import__("math").log(40) + 1) ** 2)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_through_config_json(name, tmp_path):
    config = get_preset(name)
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path) == config
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"


def test_v2_lite_shapes():
    c = get_preset("v2-lite-16b")
    assert (c.q_lora_rank, c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (None, 64, 2, 6)
    assert (c.num_hidden_layers, c.first_k_dense_replace, c.scoring_func) == (27, 1, "softmax")


def test_bench_1b_matches_the_anchor():
    c = get_preset("bench-1b")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace, c.intermediate_size) == \
        (32768, 1024, 12, 1, 2816)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == \
        (384, 256, 64, 32, 64)
    assert (c.n_routed_experts, c.moe_intermediate_size, c.num_experts_per_tok, c.n_shared_experts) == (64, 512, 6, 1)
    assert (c.n_group, c.topk_group, c.routed_scaling_factor, c.tie_word_embeddings) == (8, 4, 2.5, False)


BAD = [
    (dict(n_group=3), "'n_group' = 3: the groups must divide n_routed_experts=8"),
    (dict(num_experts_per_tok=9), "'num_experts_per_tok' = 9: top-k must be between 1 and n_routed_experts=8"),
    (dict(topk_group=3), "'topk_group' = 3: must be between 1 and n_group=2"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "'topk_group' = 1: 1 groups of 2 experts hold fewer"),
    (dict(qk_rope_head_dim=7), "'qk_rope_head_dim' = 7: RoPE rotates pairs"),
    (dict(hidden_size=0), "'hidden_size' = 0: must be a positive integer"),
    (dict(q_lora_rank=0), "'q_lora_rank' = 0: must be a positive integer, or null"),
    (dict(first_k_dense_replace=5), "'first_k_dense_replace' = 5: more dense layers than num_hidden_layers=3"),
    (dict(scoring_func="relu"), "'scoring_func' = 'relu': must be 'sigmoid' or 'softmax'"),
    (dict(eos_token_id=512), "'eos_token_id' = 512: must be a token id below 512"),
    (dict(n_group=8, topk_group=8), "'n_group' = 8: sigmoid routing scores a group by its top-2"),
    (dict(rope_scaling=YarnScaling(factor=0)), "'rope_scaling.factor' = 0: must be > 0"),
    (dict(rope_scaling=YarnScaling(beta_fast=1, beta_slow=2)), "'rope_scaling.beta_fast' = 1: must exceed"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(BAD)])
def test_bad_config_names_the_field(changes, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(**changes)
    assert message in str(err.value)


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"hidden_act": "gelu"}, "'hidden_act' = 'gelu'"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "'rope_scaling.type' = 'linear'"),
    ({"rope_scaling": {"type": "yarn"}}, "YaRN needs a 'factor'"),
    ({"n_group": 7}, "'n_group' = 7"),
])
def test_bad_config_json_names_the_field(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_hf_dict({**RELEASED_V3, **changes})


def test_unreadable_config_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        ModelConfig.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model config"):
        ModelConfig.load(tmp_path / "missing")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of: tiny, small"):
        get_preset("huge")
