"""The kernel-level measurements behind docs/performance.md: each choice the decode and training paths make, timed
against its alternatives at the sizes the embedded models run, with the largest difference between them.

- latent cache rows read as a view vs gathered per layer (the attention core: scores and weighted sum);
- routed experts: `_grouped_mm` vs every expert on every token (dense GEMMs) vs the chosen experts' weights
  gathered per token into a bmm;
- training attention: SDPA with v padded to the query/key head dim (flash kernel) vs unpadded (math fallback);
- the MoE dispatch gather: `index_select` vs advanced indexing, forward + backward.

`python bench/cpu_kernels.py` (about a minute); `--quick` for a smoke run. Times are medians in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nanoseek.config import get_preset
from nanoseek.model.moe import MoE, Routing, run_local_experts
from nanoseek.provenance import device_name, git_commit, write_result


def median_us(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(max(2, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def cache_reads(repeats: int) -> list[dict]:
    layers, slots, max_len, rank, span, heads = 5, 129, 192, 512, 130, 4
    rows = []
    for batch in (1, 16, 32, 128):
        cache = torch.randn(layers, slots, max_len, rank)
        q = torch.randn(batch, heads, rank)
        index = torch.arange(batch)

        def attend(latent: torch.Tensor) -> torch.Tensor:
            return torch.bmm(torch.bmm(q, latent.mT), latent)

        gathered = median_us(lambda: attend(cache[2, index, :span]), repeats)
        viewed = median_us(lambda: attend(cache[2, :batch, :span]), repeats)
        diff = (attend(cache[2, index, :span]) - attend(cache[2, :batch, :span])).abs().max().item()
        rows.append({"batch": batch, "gather_us": gathered, "view_us": viewed, "max_abs_diff": diff})
    return rows


def dense_experts(moe: MoE, tokens: torch.Tensor, route: Routing) -> torch.Tensor:
    """Every expert on every token; unchosen experts weigh 0."""
    experts = moe.experts
    gate, up = torch.einsum("td,efd->etf", tokens, experts.gate_up_proj).chunk(2, dim=-1)
    out = torch.bmm(F.silu(gate) * up, experts.down_proj.transpose(1, 2))  # (E, T, d)
    weights = torch.zeros(tokens.shape[0], out.shape[0]).scatter_(1, route.indices, route.weights)
    return torch.einsum("etd,te->td", out, weights)


def gathered_experts(moe: MoE, tokens: torch.Tensor, route: Routing) -> torch.Tensor:
    """Each (token, chosen expert) pair's weights gathered into one bmm."""
    experts, chosen = moe.experts, route.indices.flatten()
    x = tokens.repeat_interleave(route.indices.shape[1], 0)[:, :, None]
    gate, up = torch.bmm(experts.gate_up_proj[chosen], x).squeeze(-1).chunk(2, dim=-1)
    out = torch.bmm(experts.down_proj[chosen], (F.silu(gate) * up)[:, :, None]).squeeze(-1)
    return (out.view(*route.indices.shape, -1) * route.weights[..., None]).sum(1)


def experts(repeats: int) -> list[dict]:
    rows = []
    for n_experts, top_k in ((8, 2), (64, 6)):
        config = get_preset("small").replace(n_routed_experts=n_experts, num_experts_per_tok=top_k, n_group=1,
                                              topk_group=1)
        moe = MoE(config).eval()
        for p in moe.parameters():
            torch.nn.init.normal_(p, 0.0, 0.05)
        for n_tokens in (1, 16, 32, 128):
            tokens = torch.randn(n_tokens, config.hidden_size)
            with torch.no_grad():
                route = moe.gate(tokens)
                reference = run_local_experts(moe.experts, tokens, route)
                row = {"experts": n_experts, "top_k": top_k, "tokens": n_tokens}
                for name, fn in (("grouped_mm", lambda: run_local_experts(moe.experts, tokens, route)),
                                 ("dense", lambda: dense_experts(moe, tokens, route)),
                                 ("gathered", lambda: gathered_experts(moe, tokens, route))):
                    if name == "gathered" and n_tokens * top_k > 256:
                        continue  # copies every chosen expert's weights once per token: minutes at this size
                    row[f"{name}_us"] = median_us(fn, max(3, repeats // 4 if n_tokens >= 128 else repeats))
                    row[f"{name}_max_abs_diff"] = (fn() - reference).abs().max().item()
            rows.append(row)
    return rows


def training_attention(repeats: int) -> dict:
    batch, heads, seq, qk_dim, v_dim = 8, 4, 256, 48, 32
    q, k = (torch.randn(batch, heads, seq, qk_dim, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, heads, seq, v_dim, requires_grad=True)

    def attend(padded: bool) -> torch.Tensor:
        value = F.pad(v, (0, qk_dim - v_dim)) if padded else v
        return F.scaled_dot_product_attention(q, k, value, is_causal=True, scale=0.1)[..., :v_dim]

    result = {"shape": [batch, heads, seq, qk_dim, v_dim]}
    for padded in (False, True):
        name = "padded" if padded else "unpadded"
        result[f"{name}_forward_backward_us"] = median_us(lambda: attend(padded).sum().backward(), repeats // 4)
        with torch.no_grad():
            result[f"{name}_forward_us"] = median_us(lambda: attend(padded), repeats // 4)
    with torch.no_grad():
        result["max_abs_diff"] = (attend(True) - attend(False)).abs().max().item()
    return result


def dispatch_gather(repeats: int) -> dict:
    tokens = torch.randn(2048, 256, requires_grad=True)
    source = torch.randint(0, 2048, (4096,))
    grad = torch.randn(4096, 256)
    return {"rows": 4096, "indexing_us": median_us(lambda: tokens[source].backward(grad), repeats // 4),
            "index_select_us": median_us(lambda: tokens.index_select(0, source).backward(grad), repeats // 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats: check that the script runs")
    parser.add_argument("--out", default="bench/results/cpu-kernels-cpu.json", help="result JSON")
    args = parser.parse_args()
    repeats = 8 if args.quick else 100
    torch.manual_seed(0)
    result = {"benchmark": "cpu_kernels", "device": device_name("cpu"), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "git_commit": git_commit(), "repeats": repeats,
              "cache_reads": cache_reads(repeats), "experts": experts(repeats),
              "training_attention": training_attention(repeats), "dispatch_gather": dispatch_gather(repeats)}
    for row in result["cache_reads"]:
        print(f"cache rows, batch {row['batch']}: gather {row['gather_us']:.0f} us, view {row['view_us']:.0f} us")
    for row in result["experts"]:
        times = ", ".join(f"{k[:-3]} {v:.0f} us" for k, v in row.items() if k.endswith("_us"))
        print(f"experts {row['experts']} top-{row['top_k']}, {row['tokens']} tokens: {times}")
    att = result["training_attention"]
    print(f"training attention fwd+bwd: unpadded {att['unpadded_forward_backward_us']:.0f} us, padded "
          f"{att['padded_forward_backward_us']:.0f} us (max diff {att['max_abs_diff']:.1e})")
    gather = result["dispatch_gather"]
    print(f"dispatch gather fwd+bwd: indexing {gather['indexing_us']:.0f} us, index_select "
          f"{gather['index_select_us']:.0f} us")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
