"""Dense students (Qwen2, Llama): exact parity with transformers both ways, configs, losses, parameter counts."""

import itertools
import json
from dataclasses import fields

import pytest
import torch
from safetensors import safe_open

import nanoseek
from nanoseek.checkpoint import CheckpointError, load_pretrained, save_pretrained
from nanoseek.cli import main
from nanoseek.config import (ConfigError, DenseConfig, Llama3Scaling, config_from_hf_dict, get_preset,
                             load_config)
from nanoseek.model import DenseTransformer, build_model
from nanoseek.model.params import count_parameters

from conftest import randomize

transformers = pytest.importorskip("transformers")

SCALING = dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
SEQ = 64  # longer than SCALING's original context, so Llama 3's scaling changes the logits


def _cases():
    for kv, tied in itertools.product((4, 2, 1), (False, True)):  # 4 query heads: q:kv ratios 1, 2, 4
        yield f"qwen2-kv{kv}{'-tied' if tied else ''}", dict(family="qwen2", kv=kv, bias=True, tied=tied, scaling=False)
    for kv, bias, tied, scaling in itertools.product((4, 2, 1), (False, True), (False, True), (False, True)):
        name = f"llama-kv{kv}{'-bias' if bias else ''}{'-tied' if tied else ''}{'-llama3rope' if scaling else ''}"
        yield name, dict(family="llama", kv=kv, bias=bias, tied=tied, scaling=scaling)


CASES = dict(_cases())


def hf_config(family, kv, bias, tied, scaling):
    rope = {"rope_type": "default", "rope_theta": 500.0}
    if scaling:
        rope = {"rope_type": "llama3", "rope_theta": 500.0, **SCALING}
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                  rope_parameters=rope, bos_token_id=0, eos_token_id=1)
    if family == "qwen2":
        assert bias  # Qwen2 always has q/k/v biases
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(**common, attention_bias=bias)


def hf_model(path, family):
    cls = transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM
    return cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids) if isinstance(model, transformers.PreTrainedModel) else model(ids)
    return out.logits if hasattr(out, "logits") else out


def max_diff(a, b):
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_checkpoint_loads_with_equal_logits(case, tmp_path):
    spec = CASES[case]
    reference = (transformers.Qwen2ForCausalLM if spec["family"] == "qwen2"
                 else transformers.LlamaForCausalLM)(hf_config(**spec))
    randomize(reference, seed=1)
    reference.save_pretrained(tmp_path, max_shard_size="100KB")  # sharded: model.safetensors.index.json
    assert (tmp_path / "model.safetensors.index.json").is_file()
    reference = hf_model(tmp_path, spec["family"])

    model = nanoseek.from_pretrained(tmp_path).eval()
    assert isinstance(model, DenseTransformer)
    c = model.config
    assert (c.model_type, c.num_key_value_heads, c.attention_bias, c.tie_word_embeddings) == (
        spec["family"], spec["kv"], spec["bias"], spec["tied"])
    assert (c.rope_scaling is not None) == spec["scaling"]
    assert model.layers[0].self_attn.o_proj.bias is not None if spec["bias"] and spec["family"] == "llama" else \
        model.layers[0].self_attn.o_proj.bias is None
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    assert max_diff(logits(model, ids), logits(reference, ids)) < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_nanoseek_checkpoint_loads_in_transformers_with_equal_logits(case, tmp_path):
    spec = CASES[case]
    config = DenseConfig(model_type=spec["family"], vocab_size=256, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=spec["kv"],
                         attention_bias=spec["bias"], tie_word_embeddings=spec["tied"], rope_theta=500.0,
                         rope_scaling=Llama3Scaling(**SCALING) if spec["scaling"] else None, rms_norm_eps=1e-5,
                         max_position_embeddings=128)
    model = DenseTransformer(config).eval()
    randomize(model, seed=2)
    save_pretrained(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == spec["family"]
    assert hf["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[spec["family"]]]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not spec["tied"])  # a tied head is not saved, as transformers does
    reference = hf_model(tmp_path, spec["family"])
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    assert max_diff(logits(model, ids), logits(reference, ids)) < 1e-4

    again = load_pretrained(tmp_path)  # and back: the same tensors
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    if spec["tied"]:
        assert again.lm_head.weight is again.embed_tokens.weight


def test_tokenizer_files_are_copied_through(tmp_path):
    source, out = tmp_path / "hf", tmp_path / "out"
    reference = transformers.Qwen2ForCausalLM(hf_config("qwen2", 2, True, True, False))
    reference.save_pretrained(source)
    files = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"chat_template": "{{ x }}"}',
             "generation_config.json": '{"temperature": 0.6}'}
    for name, text in files.items():
        (source / name).write_text(text)
    save_pretrained(load_pretrained(source), out)
    for name, text in files.items():
        assert (out / name).read_text() == text
    explicit = tmp_path / "explicit"
    save_pretrained(DenseTransformer(get_preset("qwen2-tiny")), explicit, tokenizer_from=source)
    assert (explicit / "tokenizer.json").read_text() == files["tokenizer.json"]


def test_bf16_checkpoint_keeps_its_dtype_and_casts_on_request(tmp_path):
    model = DenseTransformer(get_preset("qwen2-tiny")).to(torch.bfloat16)
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_pretrained(tmp_path).lm_head.weight.dtype == torch.bfloat16
    assert load_pretrained(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_compute_loss_backward_and_no_moe_terms():
    torch.manual_seed(0)
    model = build_model(get_preset("qwen2-tiny"))
    assert isinstance(model, DenseTransformer) and not model.mtp and model.routers() == []
    ids = torch.randint(0, 512, (2, 16))
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    out = model.compute_loss(ids, targets, mtp_weight=0.3, balance_alpha=0.01)  # both ignored: no MTP, no MoE
    assert out.mtp_loss is None and out.expert_counts is None and out.balance_loss.item() == 0
    reference = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, reference)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.update_router_biases(torch.zeros(0, 0), 0.001)  # what the Trainer may call: nothing to update


def test_shared_trainer_trains_checkpoints_and_resumes_a_student(tmp_path):
    from nanoseek.train.loop import TrainConfig, Trainer
    from nanoseek.train.pretrain import LanguageModelStage, PretrainConfig

    from test_train_loop import PatternSource

    def trainer(max_steps):
        torch.manual_seed(0)
        model = build_model(get_preset("qwen2-tiny"))
        stage = LanguageModelStage(PatternSource(seq_len=16), PretrainConfig(seq_len=16, batch_size=8,
                                                                              micro_batch_size=4), model.config)
        cfg = TrainConfig(out_dir=str(tmp_path), max_steps=max_steps, lr=1e-2, warmup_steps=1, eval_every=0,
                          save_every=2, tensorboard=False, device="cpu", recompute="full")
        return Trainer(model, stage, cfg)

    first = trainer(4)
    records = [first.train_step() for _ in range(4)]
    assert all(r["loss"] == r["loss"] and not r["skipped"] for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    first.save()
    assert json.loads((tmp_path / "checkpoints" / "step_000004" / "model" / "config.json").read_text())[
        "model_type"] == "qwen2"
    second = trainer(6)
    assert second.resume() and second.step == 4
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize("changes,message", [
    (dict(num_attention_heads=4, num_key_value_heads=3),
     "'num_key_value_heads' = 3: must divide num_attention_heads=4"),
    (dict(model_type="mistral"), "'model_type' = 'mistral': unsupported; the dense families nanoseek builds are "
                                 "qwen2, llama"),
    (dict(hidden_size=60, num_attention_heads=8), "'num_attention_heads' = 8: must divide hidden_size=60"),
    (dict(model_type="qwen2", attention_bias=False), "'attention_bias' = False: Qwen2 always has q/k/v biases"),
    (dict(head_dim=15), "'head_dim' = 15: RoPE rotates pairs"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "llama3 scaling needs high_freq_factor"),
    (dict(rope_scaling=dict(SCALING, high_freq_factor=1.0)), "'rope_scaling.high_freq_factor' = 1.0: must exceed"),
])
def test_bad_dense_config_names_the_field(changes, message):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        DenseConfig(**{**base, **changes})


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    get_preset("qwen2-tiny").save(tmp_path / "config.json")
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "mistral"}))
    supported = "deepseek_v3, deepseek_v2, kimi_k2, qwen2, llama"
    with pytest.raises(ConfigError, match=f"model_type 'mistral', which nanoseek does not support; supported are "
                                          f"{supported}"):
        load_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model_type 'mistral'"):
        config_from_hf_dict({**hf, "model_type": "mistral"})
    with pytest.raises(ConfigError, match="'use_sliding_window' = True"):
        config_from_hf_dict({**hf, "use_sliding_window": True})
    with pytest.raises(ConfigError, match="'rope_scaling.rope_type' = 'yarn'"):
        config_from_hf_dict({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(TypeError, match="build_model"):
        nanoseek.DeepSeekV3(get_preset("qwen2-tiny"))


def test_mismatched_weights_are_refused(tmp_path):
    save_pretrained(DenseTransformer(get_preset("qwen2-tiny")), tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "llama", "attention_bias": False}))
    with pytest.raises(CheckpointError, match="_proj.bias' \\(a bias: does config.json's attention_bias match"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**hf, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape "
                                              r"\((128, 64|64, 128)\) in .* but config.json makes it"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["qwen2-tiny", "qwen2-small", "r1-distill-qwen-1.5b", "r1-distill-llama-8b"])
def test_dense_config_json_round_trip(name, tmp_path):
    config = get_preset(name)
    config.save(tmp_path / "config.json")
    assert load_config(tmp_path) == config
    hf = json.loads((tmp_path / "config.json").read_text())
    theirs = (transformers.Qwen2Config if config.model_type == "qwen2" else transformers.LlamaConfig)(**hf)
    for f in fields(DenseConfig):
        if hasattr(theirs, f.name) and f.name not in ("rope_scaling", "rope_theta"):
            assert getattr(theirs, f.name) == getattr(config, f.name), f.name
    # transformers 5 reads the released layout (rope_theta + rope_scaling) into rope_parameters, and writes that
    theirs.save_pretrained(tmp_path / "theirs")
    assert load_config(tmp_path / "theirs") == config


# ---------------------------------------------------------------------- the released students' sizes
RELEASED = {"r1-distill-qwen-1.5b": 1_777_088_000, "r1-distill-llama-8b": 8_030_261_248}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_student_parameter_counts(name, capsys):
    counts = count_parameters(get_preset(name))  # built on the meta device: no 8B parameters allocated
    assert counts.total == counts.activated == RELEASED[name] and counts.mtp == 0
    assert main(["info", "--preset", name]) == 0
    assert f"({RELEASED[name]:,}; all activated, no MTP)" in capsys.readouterr().out


def test_info_reads_a_student_config_json(tmp_path, capsys):
    get_preset("qwen2-small").save(tmp_path / "config.json")
    assert main(["info", "--config", str(tmp_path / "config.json")]) == 0
    out = capsys.readouterr().out
    assert "Qwen2ForCausalLM" in out and f"({count_parameters(get_preset('qwen2-small')).total:,};" in out
