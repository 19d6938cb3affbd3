"""Checkpoint I/O: MTP kept, sharding, FP8 dequantization, atomic saves, and every class of bad checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint import INDEX_FILE, CheckpointError
from nanoseek.model.quant import FP8_MAX, quantize_blockwise

from conftest import randomize, tiny_config

transformers = pytest.importorskip("transformers")


def saved_model(tmp_path, **changes):
    model = nanoseek.DeepSeekV3(tiny_config(**changes)).eval()
    randomize(model, seed=6)
    nanoseek.save_pretrained(model, tmp_path)
    return model


def rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_mtp_layer_is_kept_where_transformers_drops_it(tmp_path):
    model = saved_model(tmp_path, num_nextn_predict_layers=1)
    on_disk = load_file(tmp_path / "model.safetensors")
    assert "model.layers.3.eh_proj.weight" in on_disk and "model.layers.3.shared_head.head.weight" in on_disk
    loaded = nanoseek.from_pretrained(tmp_path)
    assert len(loaded.mtp) == 1
    for name, tensor in model.mtp.state_dict().items():
        torch.testing.assert_close(loaded.mtp.state_dict()[name], tensor, rtol=0, atol=0)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    assert not any(k.startswith("model.layers.3.") for k in hf.state_dict())
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, return_mtp=True)[1][0], model(ids, return_mtp=True)[1][0])


def test_checkpoint_without_mtp_layers_loads_without_mtp(tmp_path):
    saved_model(tmp_path, num_nextn_predict_layers=0)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1  # transformers writes 1 whatever the weights hold
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="has no MTP layers"):
        assert len(nanoseek.from_pretrained(tmp_path).mtp) == 0


def test_sharded_round_trip(tmp_path):
    model = saved_model(tmp_path / "a")
    nanoseek.save_pretrained(model, tmp_path / "b", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "b" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = nanoseek.from_pretrained(tmp_path / "b")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def fp8_checkpoint(tmp_path):
    """A DeepSeek-style FP8 checkpoint: every linear weight of the blocks in e4m3 with 128x128 scales."""
    model = saved_model(tmp_path, hidden_size=160, q_lora_rank=144)  # 160 and 144 are not multiples of 128
    quantized = {}

    def edit(tensors):
        for key in list(tensors):
            if key.startswith("model.layers.") and key.endswith("proj.weight") and tensors[key].dim() == 2:
                q, scale_inv = quantize_blockwise(tensors[key])
                tensors[key], tensors[key.replace("weight", "weight_scale_inv")] = q, scale_inv
                quantized[key] = (q, scale_inv)
    rewrite(tmp_path, edit)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                     "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return model, quantized


def test_fp8_checkpoint_is_dequantized_blockwise(tmp_path):
    model, quantized = fp8_checkpoint(tmp_path)
    loaded = nanoseek.from_pretrained(tmp_path, dtype=torch.float32)
    key = "model.layers.1.self_attn.q_b_proj.weight"  # (4*24, 144): two column blocks
    q, scale_inv = quantized[key]
    weight = loaded.layers[1].self_attn.q_b_proj.weight
    assert scale_inv.shape == (1, 2)
    # block (0, 1) is columns 128..143: its own scale
    torch.testing.assert_close(weight[:, 128:], q[:, 128:].float() * scale_inv[0, 1], rtol=0, atol=0)
    torch.testing.assert_close(weight[:, :128], q[:, :128].float() * scale_inv[0, 0], rtol=0, atol=0)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, plus the subnormal step
    exact = model.layers[1].self_attn.q_b_proj.weight
    step = torch.cat([scale_inv[0, 0].expand(96, 128), scale_inv[0, 1].expand(96, 16)], dim=1) * 2.0**-9
    assert ((weight - exact).abs() <= exact.abs() * 2.0**-4 + step).all()
    assert scale_inv.max() <= exact.abs().max() / FP8_MAX * 1.0001
    # the routed experts were stored per expert in FP8 and come back stacked
    q3, s3 = quantized["model.layers.2.mlp.experts.3.down_proj.weight"]  # (160, 32): two row blocks
    down = loaded.layers[2].mlp.experts.down_proj[3]
    torch.testing.assert_close(down[:128], q3[:128].float() * s3[0, 0], rtol=0, atol=0)
    torch.testing.assert_close(down[128:], q3[128:].float() * s3[1, 0], rtol=0, atol=0)


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = saved_model(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("nanoseek.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        nanoseek.save_pretrained(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left behind
    nanoseek.from_pretrained(tmp_path / "ckpt")


BAD_CHECKPOINTS = {
    "missing tensor": (lambda t: t.pop("model.layers.0.self_attn.o_proj.weight"),
                       "is missing 1 tensors, e.g. 'layers.0.self_attn.o_proj.weight'"),
    "missing expert": (lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"),
                       "is missing 1 expert tensors, e.g. layers.1.mlp.experts.5.up_proj.weight"),
    "unexpected tensor": (lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}),
                          "has 1 tensors this config does not use, e.g. 'model.layers.0.self_attn.extra.weight'"),
    "unexpected expert": (lambda t: t.update({"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(32, 64)}),
                          "expert 8 of 8"),
    "wrong shape": (lambda t: t.update({"model.norm.weight": torch.ones(65)}),
                    "tensor 'norm.weight' has shape (65,) in the checkpoint but the config expects (64,)"),
    "fp8 without scale": (lambda t: t.update({"model.layers.0.mlp.up_proj.weight":
                                              t["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)}),
                          "model.layers.0.mlp.up_proj.weight is FP8 but the checkpoint has no "
                          "model.layers.0.mlp.up_proj.weight_scale_inv"),
    "fp8 scale of wrong shape": (lambda t: t.update({
        "model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn),
        "model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(2, 2)}),
        "weight_scale_inv has shape (2, 2), expected (1, 1)"),
    "mtp copy differs": (lambda t: t.update({"model.layers.3.embed_tokens.weight": torch.zeros(512, 64)}),
                         "model.layers.3.embed_tokens.weight differs from the main model's embed_tokens.weight"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_names_the_problem(case, tmp_path):
    saved_model(tmp_path)
    edit, message = BAD_CHECKPOINTS[case]
    rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        nanoseek.from_pretrained(tmp_path)
    assert message in str(err.value)


def test_truncated_file(tmp_path):
    saved_model(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors (cannot be read as safetensors|: tensor).*truncated"):
        nanoseek.from_pretrained(tmp_path)


def test_index_names_a_missing_shard(tmp_path):
    saved_model(tmp_path)
    nanoseek.save_pretrained(nanoseek.from_pretrained(tmp_path), tmp_path, max_shard_bytes=100_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1].name} is listed in {INDEX_FILE} but does not exist"):
        nanoseek.from_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here' is neither a checkpoint directory nor a preset"):
        nanoseek.from_pretrained(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model config"):
        nanoseek.from_pretrained(tmp_path / "empty")
    tiny_config().save(tmp_path / "empty" / "config.json")
    with pytest.raises(CheckpointError, match="no safetensors files"):
        nanoseek.from_pretrained(tmp_path / "empty")


def test_saved_config_carries_what_vllm_and_sglang_read(tmp_path):
    """vLLM's DeepSeek-V2/V3 loader builds the balancing bias only when topk_method is noaux_tc (without it, it
    stops with KeyError: ...mlp.gate.e_score_correction_bias); DeepSeek's released config.json files carry these."""
    from nanoseek.config import ModelConfig, get_preset

    torch.manual_seed(0)
    nanoseek.save_pretrained(nanoseek.DeepSeekV3(tiny_config()), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["topk_method"] == "noaux_tc" and config["scoring_func"] == "sigmoid"
    for key in ("n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "n_shared_experts",
                "moe_intermediate_size", "first_k_dense_replace", "moe_layer_freq", "kv_lora_rank", "q_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_nextn_predict_layers", "rope_theta"):
        assert key in config, key
    assert ModelConfig.load(tmp_path) == tiny_config()  # and it reads back unchanged
    softmax = get_preset("v2-lite-16b").to_hf_dict()
    assert softmax["topk_method"] == "greedy"  # no balancing bias: V2's plain top-k over softmax scores
