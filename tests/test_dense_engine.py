"""The engine on dense students (Qwen2/Llama): the grouped-query KV cache against the full forward (logits and greedy
tokens, batched, continuous batching, aborts), seeded sampling, a transformers-saved checkpoint, and the training
stages (SFT, GRPO) on a student."""

import json
from dataclasses import replace

import pytest
import torch

import nanoseek
from nanoseek.config import DenseConfig, Llama3Scaling, get_preset
from nanoseek.infer.cache import GQAKVCache, LatentKVCache, SlotCache, make_cache
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import DenseTransformer, build_model

from conftest import randomize

# Both families with 2 query heads per key/value head; the Llama one with Llama 3's RoPE scaling (its original
# context of 32 is shorter than the sequences here, so the scaling changes the logits) and no biases.
CONFIGS = {
    "qwen2-tiny": get_preset("qwen2-tiny"),
    "llama-tiny": DenseConfig(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                              rope_scaling=Llama3Scaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                         original_max_position_embeddings=32),
                              rms_norm_eps=1e-5, max_position_embeddings=256, bos_token_id=0, eos_token_id=1),
}
PROMPTS = [[5, 9, 2], [7] * 9, [1, 2, 3, 4, 5], [300, 200, 100, 50, 25, 12, 6, 3, 2, 1, 0, 44, 45], [42] * 4]


@pytest.fixture(params=list(CONFIGS), scope="module")
def model(request):
    torch.manual_seed(0)
    m = build_model(CONFIGS[request.param]).eval()
    randomize(m, seed=21, std=0.1)
    assert isinstance(m, DenseTransformer) and m.config.kv_groups == 2
    return m


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]  # (S, V): the forward without a cache


def naive_greedy(model, prompt, n):
    """The oracle: recompute the whole sequence for every token, no cache."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(full_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def test_the_engine_picks_the_cache_of_the_models_kind(capsys):
    from nanoseek.cli import main

    dense = nanoseek.from_pretrained("qwen2-tiny")
    assert isinstance(dense, DenseTransformer)
    engine = Engine(dense, max_batch=3, max_len=64)
    c = dense.config
    assert isinstance(engine.cache, GQAKVCache) and isinstance(engine.cache, SlotCache)
    assert engine.cache.k.shape == (c.num_hidden_layers, 3, c.num_key_value_heads, 64, c.head_dim)
    assert engine.cache.values_per_token == 2 * c.num_key_value_heads * c.head_dim * c.num_hidden_layers == 128
    assert engine.cache.bytes_reserved == 3 * 64 * 128 * 4
    assert isinstance(make_cache(get_preset("tiny"), 2, 16), LatentKVCache)
    assert isinstance(Engine(nanoseek.from_pretrained("tiny"), max_len=16).cache, LatentKVCache)
    small = get_preset("qwen2-small")  # `nanoseek info` states what the cache holds
    assert main(["info", "--preset", "qwen2-small"]) == 0
    per_layer = make_cache(small, 1, 8).values_per_token // small.num_hidden_layers
    assert f"KV cache {per_layer} values/token/layer" in capsys.readouterr().out and per_layer == 2 * 2 * 32


def test_pretrain_builds_a_student_from_its_preset(tmp_path):
    import json

    from nanoseek.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--out-dir", str(out), "--preset", "qwen2-small", "--builtin-docs", "300",
                 "--max-steps", "2", "--save-every", "2", "--eval-every", "0", "--seq-len", "32", "--batch-size", "4",
                 "--micro-batch-size", "4", "--eval-problems", "0", "--no-tensorboard"]) == 0
    model_dir = out / "checkpoints" / "step_000002" / "model"
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    # The report shows the plots written, and a dense model has no expert load to plot.
    report = (out / "report.md").read_text()
    assert "plots/loss.png" in report and "expert_load" not in report
    assert not (out / "plots" / "expert_load.png").exists()
    model = nanoseek.from_pretrained(model_dir)
    assert isinstance(model, DenseTransformer) and model.config.num_key_value_heads == 2
    assert len(Engine(model, max_len=16).generate([[0, 5, 6]], SamplingParams(max_new_tokens=4))[0].tokens) == 4


# static: the padded fixed shapes CUDA graphs replay; compiled: the torch.compile'd step over the key/value cache
@pytest.mark.parametrize("mode", ["eager", "static", "compiled"])
def test_cached_prefill_and_decode_logits_equal_the_full_forward(model, mode):
    """Right-padded batched prefill into scattered slots, then decode steps of the rows together (teacher-forced):
    every row's logits are those of its own full forward."""
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[1]]
    slots = [2, 0, 1]  # prompt i into slot slots[i]; the first forward's rows [2, 0] are gathered, not a view
    gen = torch.Generator().manual_seed(5)
    continuations = [torch.randint(0, 512, (6,), generator=gen).tolist() for _ in prompts]
    by_slot = [slots.index(s) for s in range(3)]  # the prompt in each slot
    engine = Engine(model, max_batch=3, max_len=32, static_decode=mode == "static", compile_decode=mode == "compiled")
    with torch.no_grad():
        got = [engine._prefill(slots, prompts, token_budget=2 * 13)]  # two forwards: [0, 1] padded, then [2]
        for step in range(6):  # a decode step runs slots 0, 1, 2 in order
            span = max(map(len, prompts)) + step + 1
            got.append(engine._decode(torch.tensor([continuations[p][step] for p in by_slot]), span)[slots])
    got = torch.stack(got, 1)  # (prompts, 7, V)
    expected = torch.stack([full_logits(model, p + c)[len(p) - 1:] for p, c in zip(prompts, continuations)])
    diff = (got - expected).abs().max().item()
    assert diff < 1e-4, diff
    assert engine.cache.lengths[slots].tolist() == [len(p) + 6 for p in prompts]


def test_greedy_decode_equals_the_full_forward_with_continuous_batching_and_an_abort(model):
    """Two slots for four requests: slots are reused as requests finish, one request joins mid-decode and one is
    aborted (its slot taken over by the last running row's cache). Every finished request's tokens are the
    full-forward greedy ones."""
    lengths = {0: 10, 1: 4, 2: 8, 3: 6}
    engine = Engine(model, max_batch=2, max_len=64)
    ids = [engine.add_request(PROMPTS[i], SamplingParams(max_new_tokens=lengths[i])) for i in range(3)]
    finished = {}

    def step():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.completion

    for _ in range(3):
        step()
    late = engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=lengths[3]))  # joins mid-decode
    step()
    aborted = engine._unfinished[ids[0]]
    assert aborted.slot == 0 and engine._running[1].id == ids[2]
    assert engine.abort(ids[0])  # the request in slot 1 moves into slot 0
    assert engine._running[0].id == ids[2] and engine.cache.lengths[1] == 0
    while engine.has_unfinished():
        step()
    assert ids[0] not in finished and aborted.completion.finish_reason == "abort"
    tokens = aborted.completion.tokens
    assert len(tokens) == 4 and tokens == naive_greedy(model, PROMPTS[0], 4)
    for request, prompt in ((ids[1], 1), (ids[2], 2), (late, 3)):
        assert finished[request].tokens == naive_greedy(model, PROMPTS[prompt], lengths[prompt]), request
        assert finished[request].finish_reason == "length"


def test_batched_generate_equals_the_oracle_and_the_requests_alone(model):
    params = SamplingParams(max_new_tokens=8)
    together = Engine(model, max_batch=8, max_len=64).generate(PROMPTS, params)
    narrow = Engine(model, max_batch=2, max_len=64, static_decode=True).generate(PROMPTS, params)
    for prompt, a, b in zip(PROMPTS, together, narrow):
        assert a.tokens == b.tokens == naive_greedy(model, prompt, 8)


def test_seeded_sampling_is_reproducible(model):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    engine = Engine(model, max_batch=4, max_len=64)
    a = engine.generate(PROMPTS[:3], params)
    b = Engine(model, max_batch=2, max_len=64).generate(PROMPTS[:3], params)  # other batching, same draws
    assert [r.tokens for r in a] == [r.tokens for r in b]
    other = engine.generate(PROMPTS[:3], replace(params, seed=4))
    assert [r.tokens for r in other] != [r.tokens for r in a]


def test_generate_on_a_transformers_saved_qwen2(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    reference = transformers.Qwen2ForCausalLM(config)
    randomize(reference, seed=3)
    reference.save_pretrained(tmp_path)
    model = nanoseek.from_pretrained(tmp_path)
    assert isinstance(model, DenseTransformer)
    prompts = [[5, 9, 2, 17], [3] * 7]
    outs = Engine(model, max_batch=2, max_len=64).generate(prompts, SamplingParams(max_new_tokens=10))
    reference = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        assert out.tokens == naive_greedy(model, prompt, 10)
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
        assert out.tokens == theirs[0, len(prompt):].tolist()


# ---------------------------------------------------------------------- training stages on a student
@pytest.fixture(scope="module")
def tokenizer():
    from nanoseek.data.tokenizer import Tokenizer

    return Tokenizer.train([f"Question: What is {a} + {b}?\n<think>\n{a + b}" for a in range(20)
                            for b in range(20)], 300)


def student(vocab_size):
    torch.manual_seed(0)
    return build_model(get_preset("qwen2-tiny").replace(vocab_size=vocab_size))


def test_an_sft_step_trains_a_student(tokenizer, tmp_path):
    from nanoseek.data.chat import cold_start_conversations, encode_conversations
    from nanoseek.train.sft import SFT_TRAIN_DEFAULTS, Encoded, SFTConfig, SFTData, sft_trainer

    rows = [Encoded(ids, mask, f"#{i}") for i, (ids, mask) in
            enumerate(encode_conversations(tokenizer, [c.messages for c in cold_start_conversations(4, seed=0)]))]
    model = student(tokenizer.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = replace(SFT_TRAIN_DEFAULTS, out_dir=str(tmp_path), tensorboard=False, device="cpu")
    trainer = sft_trainer(model, tokenizer, SFTData(rows, [], {"train": 0, "heldout": 0}, None, False),
                          SFTConfig(batch_size=4, micro_batch_tokens=10_000, mtp_weight=0.3), train)
    record = trainer.train_step()
    assert record["loss"] == record["loss"] and record["mtp_loss"] is None  # finite; no MTP on a student
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_grpo_step_trains_a_student(tokenizer, tmp_path):
    from nanoseek.rewards import RewardSet, format_reward
    from nanoseek.train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig, grpo_trainer

    varying = RewardSet({"accuracy": lambda s: float(len(set(s.completion)) % 2), "format": format_reward},
                        {"accuracy": 1.0, "format": 0.0})
    model = student(tokenizer.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = replace(GRPO_TRAIN_DEFAULTS, out_dir=str(tmp_path), lr=1e-2, tensorboard=False, device="cpu")
    trainer = grpo_trainer(model, tokenizer, train, GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=6),
                           varying)
    record = trainer.train_step()
    assert isinstance(trainer.stage.engine.cache, GQAKVCache)  # the rollouts ran on the student's KV cache
    assert record["groups_kept"] > 0 and record["loss"] == record["loss"]
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_generation_stops_on_the_end_ids_the_checkpoint_declares(tmp_path):
    """A Llama-3-style checkpoint ends its turns in <|eot_id|>, which only tokenizer_config.json's eos_token and
    generation_config.json's eos_token_id name. `nanoseek generate` stops where transformers' generate does."""
    transformers = pytest.importorskip("transformers")
    from test_chat_template import LLAMA_SPECIALS, tiny_bpe

    from nanoseek.cli import main
    from nanoseek.data.tokenizer import BOS, EOS, PAD, Tokenizer

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_bpe((BOS, EOS, PAD, *LLAMA_SPECIALS)),
                                                  bos_token=BOS, eos_token="<|eot_id|>", pad_token=PAD)
    hf_tok.save_pretrained(tmp_path)
    config = transformers.Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    reference = transformers.Qwen2ForCausalLM(config).eval()
    randomize(reference, seed=3)
    prompt = torch.tensor([[0, *hf_tok("What is 2+3?", add_special_tokens=False).input_ids]])  # bos + the text
    mask = torch.ones_like(prompt)  # else generate takes the bos for padding
    with torch.no_grad():
        free = reference.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                  pad_token_id=2)
    eot = hf_tok.convert_tokens_to_ids("<|eot_id|>")
    stop = int(free[0, prompt.shape[1] + 4])  # the 5th free token: the declared list must end the reply early
    reference.generation_config.eos_token_id = [1, eot, stop]
    reference.save_pretrained(tmp_path)

    assert Tokenizer.load(tmp_path).stop_ids == (1, eot, stop)  # DeepSeek's eos, then the checkpoint's, once each
    reference = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():  # its own generation_config.json: it stops at the first declared end id
        theirs = reference.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                    pad_token_id=2)[0, prompt.shape[1]:]
    assert len(theirs) <= 5 and int(theirs[-1]) in (1, eot, stop)
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    prompts.write_text("What is 2+3?\n")
    assert main(["generate", str(prompts), "--model", str(tmp_path), "--template", "raw", "--max-new-tokens", "16",
                 "--device", "cpu", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["finish_reason"] == "stop" and row["tokens"] == len(theirs)
    assert row["content"] == hf_tok.decode(theirs[:-1]).strip()  # the text, without the token that ended it
