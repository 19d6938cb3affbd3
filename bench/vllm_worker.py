"""Run by bench/peers_cpu.py inside vLLM's own virtual environment: greedy decoding of given token prompts with
vLLM's offline engine, timed per batch size -> JSON (seconds of each repeat, and the tokens of the last one).

    python bench/vllm_worker.py MODEL_DIR REQUEST.json RESULT.json
REQUEST.json: {"prompts": [[ids...], ...], "batches": [1, 16], "new_tokens": 128, "repeats": 3}
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir, request_file, result_file = sys.argv[1:4]
    request = json.loads(open(request_file).read())
    longest = max(map(len, request["prompts"])) + request["new_tokens"]
    # On the CPU backend gpu_memory_utilization is the share of host memory vLLM reserves for its KV cache. On a CPU
    # with AMX vLLM picks its AMX_MLA attention, which takes only bfloat16 (or quantised) weights; CPU_MLA is its MLA
    # for float32 (what it runs on CPUs without AMX).
    llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype="float32", max_model_len=longest,
              gpu_memory_utilization=0.3, attention_backend="CPU_MLA")
    params = SamplingParams(max_tokens=request["new_tokens"], temperature=0.0, ignore_eos=True, detokenize=False)
    result = {"vllm": vllm.__version__, "batches": {}}
    for batch in request["batches"]:
        prompts = [TokensPrompt(prompt_token_ids=p) for p in request["prompts"][:batch]]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        seconds = []
        for _ in range(request["repeats"]):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
        result["batches"][str(batch)] = {"seconds": seconds, "tokens": [list(o.outputs[0].token_ids) for o in outputs]}
    with open(result_file, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM starts its engine in spawned processes, which re-import this file
    main()
