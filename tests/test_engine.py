"""The engine: latent cache + absorbed attention against the plain forward, batching, sampling, stops; requests
added, stepped, streamed and aborted one by one."""

import re
from dataclasses import replace

import pytest
import torch

from nanoseek.config import ConfigError
from nanoseek.errors import NanoseekError
from nanoseek.infer.cache import LatentKVCache
from nanoseek.infer.engine import Engine, EngineError, SamplingParams
from nanoseek.infer.sampling import sample
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


def test_compiled_decode_has_one_graph_for_batch_1_and_one_for_the_rest_with_the_eager_logits(model):
    """compile_decode: requests of different lengths through 3 slots make the batch grow and shrink (3, 2, 1) and
    the span move every step; two compiled graphs serve them all (batch 1, and every other size), with the oracle's
    tokens and the eager step's logits."""
    prompts = [[5, 9, 2], [7] * 9, [1, 2, 3, 4, 5], [300, 200, 100, 50, 25, 12, 6], [42] * 4]
    lengths = [10, 3, 7, 1, 12]
    stats = torch._dynamo.utils.counters["stats"]
    graphs = stats["unique_graphs"]
    engine = Engine(model, max_batch=3, max_len=64, compile_decode=True)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, lengths)]
    done = {}
    while engine.has_unfinished():
        done |= {out.request_id: out.completion for out in engine.step() if out.finished}
    assert stats["unique_graphs"] - graphs == 2
    for i, prompt, n in zip(ids, prompts, lengths):
        assert done[i].tokens == naive_greedy(model, prompt, n)
    eager = Engine(model, max_batch=3, max_len=64)
    with torch.no_grad():
        for e in (engine, eager):
            e._prefill([0, 1, 2], prompts[:3])
        torch.testing.assert_close(engine._decode(torch.tensor([4, 8, 15]), 10),
                                   eager._decode(torch.tensor([4, 8, 15]), 10), atol=1e-5, rtol=1e-5)


def test_compiled_and_static_decode_are_refused_together(model):
    with pytest.raises(EngineError, match="compile_decode and static_decode"):
        Engine(model, max_batch=2, max_len=32, static_decode=True, compile_decode=True)


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


def test_bad_requests_name_the_limit(model):
    engine = Engine(model, max_len=16)
    with pytest.raises(EngineError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams(max_new_tokens=4))
    with pytest.raises(EngineError, match="prompt 0 has 10 tokens \\+ max_new_tokens 8 = 18 > the cache's 16 tokens "
                                          "per sequence; raise the engine's max_len \\(--max-len\\)"):
        engine.generate([[1] * 10], SamplingParams(max_new_tokens=8))
    with pytest.raises(EngineError, match="the prompt has 10 tokens \\+ max_new_tokens 8 = 18 > the cache's 16"):
        engine.add_request([1] * 10, SamplingParams(max_new_tokens=8))
    with pytest.raises(EngineError, match="stop_strings need an Engine built with a tokenizer"):
        engine.generate([[1]], SamplingParams(max_new_tokens=4, stop_strings=("x",)))
    with pytest.raises(EngineError, match="speculative decoding is greedy"):
        engine.generate_speculative([1], SamplingParams(max_new_tokens=4, temperature=1.0))
    with pytest.raises(EngineError, match="drafts with the MTP module; this model has none"):
        Engine(DeepSeekV3(tiny_config(num_nextn_predict_layers=0)), max_len=16).generate_speculative([1])
    assert issubclass(EngineError, NanoseekError) and issubclass(EngineError, ValueError)
    assert not engine.has_unfinished()  # a rejected generate queued none of its prompts


@pytest.mark.parametrize("option, value, why", [("max_new_tokens", 0, "must be at least 1"),
                                                ("temperature", -0.5, "must be >= 0"),
                                                ("top_p", 0.0, "must be in \\(0, 1\\]"),
                                                ("top_p", 1.5, "must be in \\(0, 1\\]"),
                                                ("top_k", -1, "must be >= 0")])
def test_sampling_params_name_the_bad_option(option, value, why):
    with pytest.raises(ConfigError, match=f"invalid sampling option '{option}' = {re.escape(repr(value))}: {why}"):
        SamplingParams(**{option: value})


def run_interleaved(engine, arrivals):
    """arrivals: {step number: [(prompt, params), ...]} added just before that step -> (id -> tokens from the
    steps' outputs, id -> completion, the running ids seen in each step's outputs)."""
    tokens, completions, batches = {}, {}, []
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for prompt, params in arrivals.get(step, []):
            tokens[engine.add_request(prompt, params)] = []
        outputs = engine.step()
        batches.append({o.request_id for o in outputs})
        for out in outputs:
            assert len(out.new_tokens) == 1 and out.request_id not in completions
            tokens[out.request_id] += out.new_tokens
            if out.finished:
                completions[out.request_id] = out.completion
        step += 1
    return tokens, completions, batches


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=20)])
def test_requests_added_while_others_decode_get_the_tokens_generate_gives(model, sampling):
    prompts = [[5, 9, 2], [7] * 9, [1, 2, 3, 4, 5], [300, 200, 100, 50, 25], [42] * 4, [8, 8]]
    params = [SamplingParams(max_new_tokens=n, seed=10 + i, stop_ids=(3,), **sampling)
              for i, n in enumerate([12, 6, 9, 12, 3, 7])]
    engine = Engine(model, max_batch=3, max_len=64)
    arrivals = {0: [(prompts[0], params[0]), (prompts[1], params[1])], 2: [(prompts[2], params[2])],
                3: [(prompts[3], params[3]), (prompts[4], params[4])], 9: [(prompts[5], params[5])]}
    tokens, completions, batches = run_interleaved(engine, arrivals)
    assert batches[2] == {0, 1, 2}  # request 2 joined the running batch in the step it arrived
    assert 3 not in batches[3]  # no free slot yet: request 3 waited
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        alone = Engine(model, max_batch=1, max_len=64).generate([prompt], p)[0]
        assert tokens[i] == completions[i].tokens == alone.tokens
        assert completions[i].finish_reason == alone.finish_reason
    # generate is the same loop: request i with seed + i, whatever else shares the batch
    shared = SamplingParams(max_new_tokens=10, seed=10, **sampling)
    batched = Engine(model, max_batch=4, max_len=64).generate(prompts, shared)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, SamplingParams(max_new_tokens=10, seed=10 + i, **sampling))
        assert engine.generate([prompt], SamplingParams(max_new_tokens=10, seed=10 + i, **sampling))[0].tokens \
            == batched[i].tokens
    assert not engine.has_unfinished()  # generate stepped the requests added before it to their end too


def test_abort_frees_the_slot_at_once(model):
    engine = Engine(model, max_batch=1, max_len=64)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=4)
    first, second, third = (engine.add_request(p, params) for p in ([5, 9, 2], [7, 7, 7], [1, 2]))
    assert engine.unfinished == [first, second, third]
    assert [o.request_id for o in engine.step()] == [first]  # one slot: the others wait
    assert [o.request_id for o in engine.step()] == [first]
    assert engine.abort(first) and engine.abort(third)  # running, waiting
    assert engine.unfinished == [second]
    outputs = [engine.step() for _ in range(params.max_new_tokens)]
    assert all([o.request_id for o in step] == [second] for step in outputs)  # started in the freed slot
    assert outputs[-1][0].finish_reason == "length"
    assert [o.new_tokens[0] for step in outputs for o in step] == engine.generate([[7, 7, 7]], params)[0].tokens
    assert not engine.has_unfinished() and engine.step() == []
    assert not engine.abort(first) and not engine.abort(second) and not engine.abort(99)  # no-ops


@pytest.mark.parametrize("static_decode", [False, True])
def test_concurrent_streams_do_not_mix(model, static_decode):
    engine = Engine(model, max_batch=2, max_len=64, static_decode=static_decode)
    requests = [([5, 9, 2], SamplingParams(max_new_tokens=9, temperature=1.0, seed=1)),
                ([300, 200, 100, 50], SamplingParams(max_new_tokens=14, temperature=0.8, top_k=30, seed=2))]
    live = dict(enumerate(engine.stream(prompt, params) for prompt, params in requests))
    streamed = [[], []]
    while live:  # one token from each in turn
        for i, stream in list(live.items()):
            token = next(stream, None)
            if token is None:
                del live[i]
            else:
                streamed[i].append(token)
        if len(streamed[1]) == 1:
            assert len(engine.unfinished) == 2  # both run at once, each in its own slot
    for (prompt, params), tokens in zip(requests, streamed, strict=True):
        assert tokens == Engine(model, max_len=64).generate([prompt], params)[0].tokens


def test_closing_a_stream_early_aborts_its_request(model):
    engine = Engine(model, max_batch=1, max_len=64)
    stream = engine.stream([5, 9, 2], SamplingParams(max_new_tokens=20))
    next(stream)
    assert engine.has_unfinished()
    stream.close()
    assert not engine.has_unfinished()
    assert list(engine.stream([1, 2], SamplingParams(max_new_tokens=5))) == \
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=5))[0].tokens


def test_a_training_model_generates_in_eval_mode_and_keeps_training():
    model = DeepSeekV3(tiny_config(num_nextn_predict_layers=1)).eval()
    randomize(model, seed=21, std=0.1)
    prompts, params = [[5, 9, 2], [7, 1, 7, 1]], SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    expected = [c.tokens for c in Engine(model, max_len=64).generate(prompts, params)]
    expected_spec = Engine(model, max_len=64).generate_speculative(prompts[0], SamplingParams(max_new_tokens=8))[0]
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model.train()
    engine = Engine(model, max_len=64)
    assert model.training  # building the engine leaves the mode alone
    assert [c.tokens for c in engine.generate(prompts, params)] == expected
    assert model.training
    assert list(engine.stream(prompts[1], replace(params, seed=params.seed + 1))) == expected[1]  # as request 1
    assert engine.generate_speculative(prompts[0], SamplingParams(max_new_tokens=8))[0].tokens == expected_spec.tokens
    assert modes and not any(modes)  # every forward of the engine ran in eval mode
    assert all(m.training for m in model.modules())


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


@pytest.mark.parametrize("filters", [dict(), dict(top_p=0.8), dict(top_k=5)])
def test_batched_draws_equal_torch_multinomial_per_row(filters):
    """The sampler draws each row's noise from its own generator and takes one argmax for the batch; the oracle is
    torch.multinomial on each row's filtered probabilities with a generator of the same seed."""
    torch.manual_seed(0)
    for trial in range(40):
        logits = torch.randn(6, 50 + 37 * trial) * (1 + trial % 7)
        params = SamplingParams(temperature=0.4 + 0.05 * trial, **filters)
        got = sample(logits, [params] * 6, [torch.Generator().manual_seed(trial * 10 + i) for i in range(6)])
        scaled = logits / params.temperature
        if params.top_k:
            scaled = scaled.masked_fill(scaled < scaled.topk(params.top_k, dim=-1).values[:, -1:], float("-inf"))
        probs = scaled.softmax(dim=-1)
        if params.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            kept = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs > params.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, kept)
        want = [int(torch.multinomial(row, 1, generator=torch.Generator().manual_seed(trial * 10 + i)))
                for i, row in enumerate(probs)]
        assert got == want


def test_running_requests_keep_the_first_cache_slots_as_others_finish(model):
    """A finished request's slot takes over the last running request's cache rows, so the running requests hold
    the first slots and a decode reads the cache as one view; each request still gets the tokens it gets alone."""
    prompts = [[5, 9, 2], [7] * 9, [1, 2, 3, 4, 5], [300, 200, 100, 50, 25], [42] * 4]
    lengths = [3, 11, 5, 2, 8]
    engine = Engine(model, max_batch=4, max_len=64)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n, temperature=1.0, seed=i))
           for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.completion.tokens
        running = min(4, len(engine.unfinished))
        assert (engine.cache.lengths > 0).tolist() == [True] * running + [False] * (4 - running)
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        alone = Engine(model, max_batch=1, max_len=64).generate([p], SamplingParams(max_new_tokens=n, temperature=1.0,
                                                                                   seed=i))[0]
        assert done[ids[i]] == alone.tokens
