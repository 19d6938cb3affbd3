"""MTP speculative decoding against plain greedy decoding, batch 1, on held-out built-in problems.

Reports the draft acceptance rate, tokens per main-model forward, decode speed of both and the speedup, and
checks that both produce the same tokens. Writes bench/results/speculative-<device>.json.

    python bench/speculative.py --model runs/pretrain          # the embedded default's latest checkpoint
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import nanoseek
from nanoseek.checkpoint import resolve_checkpoint
from nanoseek.data import tasks
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.chat import encode_prompt
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.provenance import device_name, git_commit, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/pretrain")
    parser.add_argument("--problems", type=int, default=5, help="held-out problems per task")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    path = resolve_checkpoint(args.model)
    model = nanoseek.from_pretrained(path, device=args.device)
    tokenizer = Tokenizer.load(path)
    engine = Engine(model, max_batch=1, max_len=512, tokenizer=tokenizer)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop_ids=(tokenizer.eos_id,))
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": p.question}], "question")
               for name in tasks.TASKS for p in tasks.generate(name, args.problems, split="heldout", difficulty=1)]

    def timed(fn):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    engine.generate([prompts[0]], params)  # warm-up
    engine.generate_speculative(prompts[0], params)
    plain_tokens = spec_tokens = proposed = accepted = forwards = 0
    plain_time = spec_time = 0.0
    identical = True
    for prompt in prompts:
        (plain,), t_plain = timed(lambda: engine.generate([prompt], params))
        (spec, stats), t_spec = timed(lambda: engine.generate_speculative(prompt, params))
        identical &= plain.tokens == spec.tokens
        plain_tokens += len(plain.tokens)
        spec_tokens += len(spec.tokens)
        plain_time += t_plain
        spec_time += t_spec
        proposed += stats["proposed"]
        accepted += stats["accepted"]
        forwards += 1 + stats["proposed"]
    device = device_name(args.device)
    result = {
        "benchmark": "mtp_speculative_decoding", "device": device, "torch": torch.__version__,
        "git_commit": git_commit(),
        "model": str(path), "params": sum(p.numel() for p in model.parameters()), "batch": 1,
        "prompts": len(prompts), "identical_to_greedy": identical, "acceptance_rate": accepted / max(1, proposed),
        "tokens_per_forward": spec_tokens / forwards, "plain_tokens_per_s": plain_tokens / plain_time,
        "speculative_tokens_per_s": spec_tokens / spec_time, "speedup": (spec_tokens / spec_time) /
        (plain_tokens / plain_time),
    }
    print(json.dumps(result, indent=2))
    write_result(f"bench/results/speculative-{'cpu' if args.device == 'cpu' else device.replace(' ', '-').lower()}"
                 ".json", result)


if __name__ == "__main__":
    main()
