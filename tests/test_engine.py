"""The engine: latent cache + absorbed attention against the plain forward, batching, sampling, stops."""

import pytest
import torch

from nanoseek.infer.cache import LatentKVCache
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import DeepSeekV3

from conftest import randomize, tiny_config


@pytest.fixture
def model():
    m = DeepSeekV3(tiny_config(q_lora_rank=None, n_group=1, topk_group=1)).eval()
    randomize(m, seed=11, std=0.1)
    return m


def naive_greedy(model, prompt, n):
    """The oracle: recompute the whole sequence for every token, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("changes", [dict(), dict(q_lora_rank=32, rope_interleave=False)])
def test_absorbed_decode_equals_the_expanded_full_forward(changes):
    model = DeepSeekV3(tiny_config(**changes)).eval()
    randomize(model, seed=12, std=0.1)
    ids = torch.randint(0, 512, (2, 14))
    with torch.no_grad():
        full = model(ids)  # expanded form, no cache
        cache = LatentKVCache(model.config, slots=2, max_len=32).bind(torch.arange(2))
        prefill = model(ids[:, :6], cache=cache)  # absorbed form over a 6-token prompt
        cache.advance(6)
        steps = []
        for t in range(6, 14):
            steps.append(model(ids[:, t:t + 1], cache=cache)[:, -1])
            cache.advance(1)
    torch.testing.assert_close(prefill, full[:, :6], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 6:], atol=1e-5, rtol=1e-4)


def test_cache_holds_only_the_latent_and_rope_key(model):
    engine = Engine(model, max_batch=3, max_len=64)
    c = model.config
    assert engine.cache.values_per_token == (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers == 120
    assert engine.cache.bytes_reserved == 3 * 64 * 120 * 4


@pytest.mark.parametrize("static_decode", [False, True])  # True: the padded fixed shapes CUDA graphs replay
def test_greedy_matches_the_uncached_oracle_and_batching_changes_nothing(model, static_decode):
    prompts = [[5, 9, 2], [7] * 9, [1, 2, 3, 4, 5], [300, 200, 100, 50, 25, 12, 6], [42] * 4]
    params = SamplingParams(max_new_tokens=10)
    batched = Engine(model, max_batch=8, max_len=64, static_decode=static_decode).generate(prompts, params)
    # continuous batching: slots reused (and with static_decode, batches of 3 padded to 4)
    narrow = Engine(model, max_batch=3, max_len=64, static_decode=static_decode).generate(prompts, params)
    for prompt, b, n in zip(prompts, batched, narrow):
        expected = naive_greedy(model, prompt, 10)
        assert b.tokens == expected and n.tokens == expected
        assert b.finish_reason == "length"


@pytest.mark.parametrize("token_budget", [8, 8192])  # 8: one prompt per forward; 8192: all in one padded forward
def test_batched_prefill_gives_each_prompt_its_own_last_logits(model, token_budget):
    prompts = [[5, 9, 2], [7] * 9, [300, 200, 100, 50]]
    engine = Engine(model, max_batch=3, max_len=32)
    logits = engine._prefill([2, 0, 1], prompts, token_budget=token_budget)
    with torch.no_grad():
        expected = torch.stack([model(torch.tensor([p]))[0, -1] for p in prompts])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    assert engine.cache.lengths.tolist() == [9, 4, 3]


def test_sampling_is_seeded_per_request(model):
    prompts = [[5, 9, 2], [7, 7, 7, 7]]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    engine = Engine(model, max_batch=4, max_len=64)
    a = engine.generate(prompts, params)
    b = engine.generate(prompts, params)
    alone = engine.generate(prompts[:1], params)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert a[0].tokens == alone[0].tokens  # request 0's draws do not depend on request 1
    other = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=4))
    assert [r.tokens for r in other] != [r.tokens for r in a]
    static = Engine(model, max_batch=4, max_len=64, static_decode=True).generate(prompts, params)
    assert [r.tokens for r in static] == [r.tokens for r in a]


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    engine = Engine(model, max_len=64)
    greedy = engine.generate([[4, 5, 6]], SamplingParams(max_new_tokens=8))[0].tokens
    for params in (SamplingParams(max_new_tokens=8, temperature=2.0, top_k=1),
                   SamplingParams(max_new_tokens=8, temperature=2.0, top_p=1e-6)):
        assert engine.generate([[4, 5, 6]], params)[0].tokens == greedy


def test_stop_ids(model):
    engine = Engine(model, max_len=64)
    free = engine.generate([[4, 5, 6]], SamplingParams(max_new_tokens=8))[0].tokens
    stopped = engine.generate([[4, 5, 6]], SamplingParams(max_new_tokens=8, stop_ids=(free[2],)))[0]
    assert stopped.tokens == free[:free.index(free[2]) + 1] and stopped.finish_reason == "stop"


def test_bad_requests(model):
    engine = Engine(model, max_len=16)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="prompt 0 \\(10 tokens\\) \\+ max_new_tokens 8 exceeds the cache's 16"):
        engine.generate([[1] * 10], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="stop_strings need an Engine built with a tokenizer"):
        engine.generate([[1]], SamplingParams(max_new_tokens=4, stop_strings=("x",)))


@pytest.mark.parametrize("seed", [0, 1])
def test_speculative_greedy_equals_plain_greedy(seed):
    model = DeepSeekV3(tiny_config(num_nextn_predict_layers=1)).eval()
    randomize(model, seed=20 + seed, std=0.1)
    engine = Engine(model, max_len=96)
    params = SamplingParams(max_new_tokens=40)
    for prompt in ([5, 9, 2], [7, 1, 7, 1, 7, 1, 7], [100, 200, 300, 400]):
        plain = engine.generate([prompt], params)[0].tokens
        spec, stats = engine.generate_speculative(prompt, params)
        assert spec.tokens == plain
        assert stats["proposed"] >= 1 and 0 <= stats["acceptance_rate"] <= 1


def test_speculative_accepts_every_draft_when_the_mtp_module_is_right():
    """A model whose main output and MTP output both copy the input token: every draft is verified."""
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(num_nextn_predict_layers=1)).eval()
    with torch.no_grad():
        # embedding = identity-like code; lm_head reads it back; all blocks' outputs zeroed -> logits ~ x + ...
        for p in model.parameters():
            p.zero_()
        for module in model.modules():
            if hasattr(module, "weight") and module.__class__.__name__ == "RMSNorm":
                module.weight.fill_(1.0)
        code = torch.randn(512, 64)
        model.embed_tokens.weight.copy_(code)
        model.lm_head.weight.copy_(code)
        model.mtp[0].eh_proj.weight[:, :64].copy_(torch.eye(64))  # MTP passes the next token's embedding
    engine = Engine(model, max_len=64)
    completion, stats = engine.generate_speculative([3, 4, 5], SamplingParams(max_new_tokens=10))
    assert completion.tokens == engine.generate([[3, 4, 5]], SamplingParams(max_new_tokens=10))[0].tokens
    assert stats["acceptance_rate"] == 1.0 and stats["tokens_per_forward"] > 1.5
