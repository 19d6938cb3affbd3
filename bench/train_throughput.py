"""Training throughput: nanoseek against Hugging Face transformers on the same weights and data, in the same run.

The issue's setting (../shared/anchors/gpu_anchor.py): `bench-1b`, sequence 2048, micro-batch 8, bf16 weights (no
fp32 master copy, as the anchor), fused AdamW, one optimizer step per micro-batch. On the CPU everything is float32
and the optimizer is the plain one. Both libraries start from one seeded nanoseek initialisation (exported with
save_pretrained, loaded by transformers' AutoModelForCausalLM) and see one token stream: a seeded sparse Markov
chain on the first min(V, 4096) token ids, each token followed by one of 4 successors fixed per token (loss falls
from ln V towards ln 4 = 1.39 nats as the model learns the table). The optimizer is the same for both: AdamW,
betas (0.9, 0.95), weight decay 0.1 on matrices, lr warmed up linearly over the first 10 steps, gradient clipping
at 1.0.

Runs (each a fresh model from the same initial weights):
  nanoseek parity    MTP off, no balancing (no bias update, no balance loss): HF's exact objective, for the losses
  nanoseek           MTP off, the full recipe of nanoseek/train/loop.py: compute_loss with the sequence-wise
                     balance loss and update_router_biases after each step
  nanoseek mtp       the same with the MTP module on (lambda 0.3)
  nanoseek parity    (CUDA) the parity run again with float32 master weights under bf16 autocast: its distance
  fp32-master        to the bf16 parity run is the bf16 noise that the nanoseek-vs-HF loss gap is judged against
  transformers       DeepseekV3ForCausalLM as it ships (sdpa attention, grouped_mm experts), labels = targets

Tokens/s count the timed steps after --warmup; MFU uses nanoseek.model.params.flops_per_token (the anchors'
formula) over the GPU's dense bf16 peak, plus the MTP module's FLOPs for the MTP run (reported separately).
Peak memory is torch.cuda.max_memory_allocated over the run (weights, optimizer and activations).

    python bench/train_throughput.py                                  # GPU: bench-1b, 50 steps, MTP off then on
    python bench/train_throughput.py --preset wide --find-max-micro-batch
    python bench/train_throughput.py --preset tiny --seq-len 64 --micro-batch 2 --steps 10 --warmup 2 \\
        --out bench/results/train_throughput-cpu-smoke.json      # CPU smoke (timings mean nothing)
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import nanoseek
from nanoseek.config import ModelConfig, get_preset
from nanoseek.model import DeepSeekV3
from nanoseek.model.moe import RoutedExperts
from nanoseek.model.params import count_parameters, flops_per_token
from nanoseek.provenance import device_name, git_commit, write_result
from nanoseek.train.loop import peak_flops

# A wider bench-1b (hidden 2048, V2-Lite's head dims) that trains on one 80 GB GPU in both libraries.
WIDE = {"hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 768, "num_hidden_layers": 8,
        "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
LR_WARMUP = 10
PARITY_TAIL = 5  # the final loss is the mean of the last steps' losses


def preset(name: str) -> ModelConfig:
    return get_preset("bench-1b").replace(**WIDE) if name == "wide" else get_preset(name)


def token_stream(vocab: int, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """(rows, seq_len + 1) token ids of the seeded Markov chain described in the module docstring."""
    g = torch.Generator().manual_seed(seed)
    states = min(vocab, 4096)
    successors = torch.randint(0, states, (states, 4), generator=g)
    choice = torch.randint(0, 4, (rows, seq_len), generator=g)
    seq = torch.empty(rows, seq_len + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, states, (rows,), generator=g)
    for t in range(seq_len):
        seq[:, t + 1] = successors[seq[:, t], choice[:, t]]
    return seq


def build_nanoseek(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int,
                   mtp: bool) -> DeepSeekV3:
    """The seeded initialisation, built on the device (the same weights every call). Only the parameters take
    `dtype`: RoPE frequencies and routing biases stay float32, as transformers keeps them."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = DeepSeekV3(config)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    if not mtp:
        model.mtp = nn.ModuleList()  # MTP off: its weights take no memory and no optimizer state
    return model.train()


def mtp_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """The MTP modules' training FLOPs per token, counted like flops_per_token: activated weights (routed experts
    at top-k of n), the shared output head applied once more per depth, and each depth's attention."""
    with torch.device("meta"):
        model = DeepSeekV3(config)
    total = 0.0
    for module in model.mtp:
        active = sum(p.numel() for p in module.parameters())
        for experts in (m for m in module.modules() if isinstance(m, RoutedExperts)):
            routed = sum(p.numel() for p in experts.parameters())
            active -= routed * (config.n_routed_experts - config.num_experts_per_tok) // config.n_routed_experts
        active += model.lm_head.weight.numel()
        total += 6 * active + 6 * seq_len * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    return total


@dataclass
class Run:
    name: str
    library: str  # "nanoseek" or "transformers"
    mtp: bool = False
    recipe: bool = False  # nanoseek's balancing (balance loss + bias update) on
    master_fp32: bool = False  # float32 weights under bf16 autocast instead of bf16 weights (CUDA)


# A step: (inputs, targets) -> (the next-token loss, detached; tokens per expert or None), after backward.
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def make_model(run: Run, config: ModelConfig, hf_dir: Path | None, device: torch.device, dtype: torch.dtype,
               seed: int) -> tuple[nn.Module, Step, Callable[[torch.Tensor | None], None]]:
    if run.library == "transformers":
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).train()

        def hf_step(x, y):
            y = y.contiguous()  # HF views the labels flat; y is already shifted, so it goes in as shift_labels
            loss = hf(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
            loss.backward()
            return loss.detach(), None

        return hf, hf_step, lambda counts: None

    model = build_nanoseek(config, device, torch.float32 if run.master_fp32 else dtype, seed, run.mtp)
    mtp_weight = config.mtp_loss_weight if run.mtp else 0.0
    alpha = config.aux_loss_alpha if run.recipe else 0.0
    speed = config.bias_update_speed if run.recipe else 0.0

    def step(x, y):
        out = model.compute_loss(x, y, mtp_weight=mtp_weight, balance_alpha=alpha)
        out.loss.backward()
        return out.lm_loss.detach(), out.expert_counts

    def after(counts):
        if speed > 0 and counts is not None:
            model.update_router_biases(counts, speed)  # as nanoseek/train/loop.py, once per optimizer step

    return model, step, after


def optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train(model: nn.Module, step: Step, after: Callable, data: torch.Tensor, lr: float, warmup: int,
          autocast: bool, device: torch.device) -> tuple[list[float], float]:
    """data (steps, B, S + 1) on the device -> per-step losses, seconds of the steps after `warmup`.

    No host sync inside the timed loop: losses stay on the device until the end."""
    opt = optimizer(model, lr, device)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    start = time.perf_counter()
    for i, batch in enumerate(data):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (i + 1) / LR_WARMUP)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, counts = step(batch[:, :-1], batch[:, 1:])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        after(counts)
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
    sync(device)
    return torch.stack(losses).float().tolist(), time.perf_counter() - start


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(run: Run, config: ModelConfig, hf_dir: Path, data: torch.Tensor, args, device, dtype) -> dict:
    free(device)
    model, step, after = make_model(run, config, hf_dir, device, dtype, args.seed)
    losses, seconds = train(model, step, after, data, args.lr, args.warmup, run.master_fp32, device)
    timed = len(data) - args.warmup
    tokens_per_s = timed * data.shape[1] * (data.shape[2] - 1) / seconds
    result = {"name": run.name, "library": run.library, "mtp": run.mtp, "balancing": run.recipe,
              "weights": "float32 master, bf16 autocast" if run.master_fp32 else str(dtype).removeprefix("torch."),
              "tokens_per_s": tokens_per_s, "step_s": seconds / timed, "losses": losses}
    if run.library == "transformers":
        result["attn_implementation"] = model.config._attn_implementation
        result["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    peak = peak_flops(device)
    seq_len = data.shape[2] - 1
    if peak:
        result["mfu"] = tokens_per_s * flops_per_token(config, seq_len) / peak
        if run.mtp:
            result["mfu_with_mtp_flops"] = tokens_per_s * (flops_per_token(config, seq_len)
                                                            + mtp_flops_per_token(config, seq_len)) / peak
    if device.type == "cuda":
        result["peak_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
    del model, step, after
    free(device)
    return result


def fits(run: Run, config: ModelConfig, hf_dir: Path, micro_batch: int, seq_len: int, args, device, dtype) -> bool:
    """Whether two training steps (the second with optimizer state allocated) run at this micro-batch."""
    free(device)
    try:
        model, step, after = make_model(run, config, hf_dir, device, dtype, args.seed)
        data = torch.randint(0, config.vocab_size, (2, micro_batch, seq_len + 1), device=device)
        train(model, step, after, data, args.lr, 0, run.master_fp32, device)
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    model = step = after = data = None  # drop every reference before emptying the cache
    free(device)
    return ok


def max_micro_batch(run: Run, config: ModelConfig, hf_dir: Path, args, device, dtype, limit: int = 1024) -> int:
    """Doubling from --micro-batch until a step runs out of memory, then bisection: the largest that fits
    (at most `limit`)."""
    check = lambda b: fits(run, config, hf_dir, b, args.seq_len, args, device, dtype)
    lo, hi = 0, args.micro_batch
    while check(hi):
        lo, hi = hi, 2 * hi
        if hi > limit:
            return lo  # the search stops here: at least this much fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if check(mid) else (lo, mid)
    return lo


def parity(runs: list[dict]) -> dict | None:
    """Final-loss gap nanoseek vs transformers, with the bf16 noise (bf16 vs float32-master nanoseek) beside it."""
    by_name = {r["name"]: r for r in runs}
    ours, theirs = by_name.get("nanoseek parity"), by_name.get("transformers")
    if ours is None or theirs is None or "losses" not in ours or "losses" not in theirs:
        return None
    final = lambda r: sum(r["losses"][-PARITY_TAIL:]) / len(r["losses"][-PARITY_TAIL:])
    out = {"final_loss_nanoseek": final(ours), "final_loss_transformers": final(theirs),
           "final_loss_difference": final(ours) - final(theirs),
           "max_step_difference": max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"])),
           "first_step_difference": ours["losses"][0] - theirs["losses"][0],
           "final_loss": f"mean of the last {PARITY_TAIL} steps' training losses"}
    noise = by_name.get("nanoseek parity fp32-master")
    if noise is not None:
        out["bf16_noise"] = abs(final(ours) - final(noise))
        out["within_bf16_noise"] = abs(out["final_loss_difference"]) <= max(out["bf16_noise"], 1e-3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench-1b", help="a nanoseek preset, or 'wide' (hidden 2048)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--mtp", choices=["off", "on", "both"], default="both")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--find-max-micro-batch", action="store_true", help="bisect on OOM (CUDA only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default: bench/results/train_throughput-<preset>-<device>.json")
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = preset(args.preset)
    rows = token_stream(config.vocab_size, args.steps * args.micro_batch, args.seq_len, args.seed)
    data = rows.view(args.steps, args.micro_batch, args.seq_len + 1).to(device)

    runs = [Run("nanoseek parity", "nanoseek")]
    if args.mtp in ("off", "both"):
        runs.append(Run("nanoseek", "nanoseek", recipe=True))
    if args.mtp in ("on", "both"):
        runs.append(Run("nanoseek mtp", "nanoseek", mtp=True, recipe=True))
    if device.type == "cuda":
        runs.append(Run("nanoseek parity fp32-master", "nanoseek", master_fp32=True))
    if not args.no_hf:
        runs.append(Run("transformers", "transformers"))

    counts = count_parameters(config)
    result = {
        "preset": args.preset, "config": config.to_hf_dict(),
        "params_M": {"total": counts.total / 1e6, "activated": counts.activated / 1e6,
                     "activated_without_embedding": counts.activated_without_embedding / 1e6, "mtp": counts.mtp / 1e6},
        "flops_per_token": flops_per_token(config, args.seq_len),
        "mtp_flops_per_token": mtp_flops_per_token(config, args.seq_len),
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": git_commit(),
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "steps": args.steps, "timed_steps": args.steps
        - args.warmup, "lr": args.lr, "seed": args.seed,
        "data": "seeded sparse Markov chain: first min(V, 4096) ids, 4 fixed successors per token (floor ln 4)",
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp)
        if not args.no_hf:
            import transformers

            transformers.logging.set_verbosity_error()  # the MTP layer is an expected "unexpected key"
            result["transformers"] = transformers.__version__
            nanoseek.save_pretrained(build_nanoseek(config, device, dtype, args.seed, mtp=True), hf_dir)
        for run in runs:
            try:
                r = measure(run, config, hf_dir, data, args, device, dtype)
            except Exception as e:  # one run failing (e.g. OOM) must not lose the others' numbers
                r = {"name": run.name, "error": repr(e)[:300]}
                free(device)
            result["runs"].append(r)
            if "error" in r:
                print(f"{run.name:30s} ERROR {r['error']}", flush=True)
            else:
                print(f"{run.name:30s} {r['tokens_per_s']:12,.0f} tok/s  mfu {r.get('mfu', float('nan')):6.1%}  "
                      f"peak {r.get('peak_memory_GB', float('nan')):6.1f} GB  loss {r['losses'][0]:.4f} -> "
                      f"{r['losses'][-1]:.4f}", flush=True)
            if args.find_max_micro_batch and device.type == "cuda" and not run.name.startswith("nanoseek parity"):
                r["max_micro_batch"] = max_micro_batch(run, config, hf_dir, args, device, dtype)
                print(f"{run.name:30s} largest micro-batch: {r['max_micro_batch']}", flush=True)
    speed = {r["name"]: r["tokens_per_s"] for r in result["runs"] if "tokens_per_s" in r}
    if "transformers" in speed:
        result["speedup_vs_transformers"] = {name: s / speed["transformers"] for name, s in speed.items()
                                             if name != "transformers"}
    result["parity"] = parity(result["runs"])
    print(json.dumps({"speedup_vs_transformers": result.get("speedup_vs_transformers"), "parity": result["parity"]},
                     indent=1))
    write_result(args.out or f"bench/results/train_throughput-{args.preset}-{device.type}.json", result)


if __name__ == "__main__":
    main()
