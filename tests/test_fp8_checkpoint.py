"""FP8 export (DeepSeek-V3's released format) read back by nanoseek's loader and by transformers."""

import json

import pytest
import torch
from safetensors import safe_open

import nanoseek
from nanoseek.checkpoint import save_pretrained

from conftest import randomize, tiny_config

transformers = pytest.importorskip("transformers")

# Every quantized dimension is <= 128 or a multiple of 128 (transformers' CPU dequantization needs it, see below).
ALIGNED = {"hidden_size": 256, "intermediate_size": 384, "moe_intermediate_size": 128, "q_lora_rank": 128}
QUANTIZED = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def exported(tmp_path, **changes):
    model = nanoseek.DeepSeekV3(tiny_config(**changes)).eval()
    randomize(model, seed=4, std=0.05)
    save_pretrained(model, tmp_path, fp8=True)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
    return model, tensors


def test_fp8_export_layout_and_config(tmp_path):
    _, tensors = exported(tmp_path, **ALIGNED)
    fp8 = {k for k, v in tensors.items() if v.dtype == torch.float8_e4m3fn}
    assert fp8 and all(k.rsplit(".", 2)[-2] in QUANTIZED for k in fp8)
    # the main blocks' and the MTP block's linears, and every routed expert one by one
    for key in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.kv_b_proj.weight",
                "model.layers.2.mlp.experts.7.up_proj.weight", "model.layers.2.mlp.shared_experts.gate_proj.weight",
                "model.layers.3.self_attn.o_proj.weight"):
        assert key in fp8
    kept = ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
            "model.layers.1.input_layernorm.weight", "model.layers.3.eh_proj.weight",
            "model.layers.3.shared_head.head.weight", "model.layers.1.mlp.gate.e_score_correction_bias")
    assert all(tensors[k].dtype == torch.float32 for k in kept)
    for key in fp8:
        weight, scale = tensors[key], tensors[key.replace("weight", "weight_scale_inv")]
        assert scale.dtype == torch.float32
        assert scale.shape == tuple(-(-d // 128) for d in weight.shape)
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 3)  # (256, 384)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                             "activation_scheme": "dynamic"}


@pytest.mark.parametrize("shape", ["aligned", "ragged"])
def test_nanoseek_reads_its_fp8_export_within_the_e4m3_bound(tmp_path, shape):
    changes = ALIGNED if shape == "aligned" else {"hidden_size": 160, "q_lora_rank": 144}
    if shape == "ragged":
        with pytest.warns(UserWarning, match="transformers 5.x dequantizes them wrongly"):
            model, tensors = exported(tmp_path, **changes)
    else:
        model, tensors = exported(tmp_path, **changes)
    loaded = nanoseek.from_pretrained(tmp_path, dtype=torch.float32)
    original, back = model.state_dict(), loaded.state_dict()
    assert original.keys() == back.keys()
    n_quantized = 0
    for name, exact in original.items():
        if not name.endswith(("_proj", "_proj.weight")) or "eh_proj" in name:
            torch.testing.assert_close(back[name], exact, rtol=0, atol=0)
            continue
        n_quantized += 1
        # E4M3 with scale s = block max / 448: |w' - w| <= |w| 2^-4 + s 2^-10 (half an ulp; half a subnormal step).
        blocks = torch.nn.functional.pad(exact.abs(), (0, -exact.shape[-1] % 128, 0, -exact.shape[-2] % 128))
        amax = blocks.unflatten(-1, (-1, 128)).unflatten(-3, (-1, 128)).amax(dim=(-3, -1))
        s = (amax / 448).repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :exact.shape[-2], :exact.shape[-1]]
        err = (back[name] - exact).abs()
        assert (err <= (exact.abs() * 2.0**-4 + s * 2.0**-10) * (1 + 1e-6)).all(), name
        assert err.max() > 0, name  # really quantized
    assert n_quantized >= 20
    if shape == "ragged":  # the partial last block has its own scale: q_b_proj (96, 144) has blocks (0, 0), (0, 1)
        q = tensors["model.layers.1.self_attn.q_b_proj.weight"].float()
        s = tensors["model.layers.1.self_attn.q_b_proj.weight_scale_inv"]
        torch.testing.assert_close(loaded.layers[1].self_attn.q_b_proj.weight,
                                   torch.cat([q[:, :128] * s[0, 0], q[:, 128:] * s[0, 1]], dim=1), rtol=0, atol=0)


def test_transformers_loads_the_fp8_export_on_the_cpu(tmp_path):
    """transformers 5.x needs accelerate for FP8 checkpoints; without a GPU it dequantizes them on load (and warns),
    which gives exactly nanoseek's dequantized weights."""
    pytest.importorskip("accelerate", reason="transformers loads FP8 checkpoints only with accelerate installed")
    exported(tmp_path, **ALIGNED)
    ours = nanoseek.from_pretrained(tmp_path, dtype=torch.float32).eval()
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    key = "model.layers.2.mlp.experts.gate_up_proj"  # transformers stacks the experts like nanoseek
    torch.testing.assert_close(theirs.state_dict()[key], ours.layers[2].mlp.experts.gate_up_proj, rtol=0, atol=0)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
