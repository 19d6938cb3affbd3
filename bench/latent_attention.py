"""Absorbed MLA decode: the engine's latent attention against SDPA with enable_gqa (what it ran before), in one
process, on the same model and prompts, alternating. SDPA falls back to its math kernel when a mask comes with
enable_gqa, and that kernel copies the shared latent to every head at every step.

    python bench/latent_attention.py --shape small 576 --batches 1 16 32

`576` is the `small` preset with DeepSeek-V3's latent (kv_lora_rank 512 + rope 64). Reports tokens/s (the min
of --repeats alternating runs of each) and checks that both produce the same greedy tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanoseek  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.infer.engine import Engine, SamplingParams  # noqa: E402
from nanoseek.model.attention import MultiHeadLatentAttention  # noqa: E402
from nanoseek.provenance import device_name, git_commit, write_result  # noqa: E402


def sdpa_absorbed(self, q_nope, q_rope, latent, k_rope, mask):
    """The previous form: multi-query attention through SDPA with enable_gqa (key [latent; k_rope], value latent)."""
    c = self.config
    w = self.kv_b_proj.weight.unflatten(0, (self.n_heads, c.qk_nope_head_dim + c.v_head_dim))
    w_uk, w_uv = w.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
    q = torch.cat([torch.einsum("bshd,hdr->bshr", q_nope, w_uk), q_rope], dim=-1).transpose(1, 2)
    k = torch.cat([latent, k_rope], dim=-1).unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, latent.unsqueeze(1), attn_mask=mask.unsqueeze(1),
                                         scale=self.softmax_scale, enable_gqa=True)
    return self.o_proj(torch.einsum("bhsr,hvr->bshv", out, w_uv).flatten(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", nargs="+", default=["small", "576"], choices=["small", "576"],
                        help="the model: the small preset, or it with the 576-wide latent")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32], help="requests decoded together")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per request")
    parser.add_argument("--repeats", type=int, default=4, help="alternating runs of each; the fastest counts")
    parser.add_argument("--out", default="bench/results/latent-attention-cpu.json", help="result JSON")
    args = parser.parse_args()

    latent_attention = MultiHeadLatentAttention._absorbed
    results = []
    for shape in args.shape:
        config = get_preset("small")
        if shape == "576":
            config = config.replace(kv_lora_rank=512, qk_rope_head_dim=64)
        torch.manual_seed(0)
        model = nanoseek.DeepSeekV3(config).eval()
        generator = torch.Generator().manual_seed(1)
        for batch in args.batches:
            prompts = [torch.randint(3, config.vocab_size, (args.prompt_len,), generator=generator).tolist()
                       for _ in range(batch)]
            times: dict[str, list[float]] = {"sdpa": [], "latent": []}
            tokens: dict[str, list[list[int]]] = {}
            for _ in range(args.repeats):
                for name, form in (("sdpa", sdpa_absorbed), ("latent", latent_attention)):
                    MultiHeadLatentAttention._absorbed = form
                    engine = Engine(model, max_batch=batch, max_len=args.prompt_len + args.new_tokens)
                    start = time.perf_counter()
                    out = engine.generate(prompts, SamplingParams(max_new_tokens=args.new_tokens))
                    times[name].append(time.perf_counter() - start)
                    tokens[name] = [c.tokens for c in out]
            MultiHeadLatentAttention._absorbed = latent_attention
            n = batch * args.new_tokens
            row = {"shape": shape, "batch": batch, "sdpa_tok_s": n / min(times["sdpa"]),
                   "latent_tok_s": n / min(times["latent"]), "speedup": min(times["sdpa"]) / min(times["latent"]),
                   "same_tokens": tokens["sdpa"] == tokens["latent"]}
            results.append(row)
            print(f"{shape} batch {batch}: SDPA {row['sdpa_tok_s']:.0f} tok/s, latent {row['latent_tok_s']:.0f} tok/s, "
                  f"x{row['speedup']:.2f}, same tokens: {row['same_tokens']}", flush=True)
    write_result(args.out, {"benchmark": "latent_attention", "device": device_name("cpu"), "torch": torch.__version__,
                            "git_commit": git_commit(), "threads": torch.get_num_threads(),
                            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                            "results": results})


if __name__ == "__main__":
    main()
