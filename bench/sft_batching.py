"""How `nanoseek sft` batches conversations, measured: each conversation right-padded to its own row (rows of a step
sorted by length and cut into micro-batches of a padded-token budget) against conversations packed into full rows
with a block-diagonal causal mask (attention kept inside each conversation; SDPA with an explicit mask).

The forward + backward of the `small` preset over the same steps of built-in cold-start conversations (a step: 16
conversations drawn at random, as the stage draws them) with each layout; times are medians over the steps, the
layouts interleaved step by step so that a background load hits them alike. The packed variant swaps the attention
forward for one that takes the mask (the model itself only runs is_causal); its losses are checked equal.

`python bench/sft_batching.py` (a few minutes on a 2-core CPU); `--quick` for a smoke run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from nanoseek.config import get_preset
from nanoseek.data import tasks
from nanoseek.data.chat import cold_start_conversations, encode_conversations
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.model import DeepSeekV3
from nanoseek.provenance import device_name, git_commit, write_result
from nanoseek.train.sft import micro_batches, pad_batch

MASK: list[torch.Tensor | None] = [None]  # the packed layout's (rows, 1, S, S) mask while it runs


CAUSAL_SDPA = F.scaled_dot_product_attention


def document_masked_sdpa(q, k, v, is_causal=False, scale=None, **kwargs):
    """The model's causal SDPA call with MASK (the packed rows' document mask) in place of is_causal; installed as
    F.scaled_dot_product_attention while the packed layout runs, so the model's own attention code is measured."""
    if MASK[0] is None:
        return CAUSAL_SDPA(q, k, v, is_causal=is_causal, scale=scale, **kwargs)
    seq = q.shape[-2]  # the MTP depth runs on S - k positions
    return CAUSAL_SDPA(q, k, v, attn_mask=MASK[0][..., :seq, :seq], scale=scale, **kwargs)


def packed_micro_batches(rows: list[tuple[list[int], list[bool]]], seq: int, pad_id: int
                         ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The conversations packed first-fit into rows of `seq` input tokens (one micro-batch of all rows), with the
    block-diagonal causal mask (rows, 1, seq, seq): a token sees the earlier tokens of its own conversation only
    (the padding at a row's end is one more block, so that no query row is fully masked)."""
    bins: list[list[int]] = []
    for i, (ids, _) in enumerate(rows):
        fit = next((b for b in bins if sum(len(rows[j][0]) - 1 for j in b) + len(ids) - 1 <= seq), None)
        bins.append([i]) if fit is None else fit.append(i)
    inputs = torch.full((len(bins), seq), pad_id, dtype=torch.long)
    targets = torch.full((len(bins), seq), -100, dtype=torch.long)
    doc = torch.full((len(bins), seq), -1, dtype=torch.long)
    for r, b in enumerate(bins):
        at = 0
        for j in b:
            x, y = pad_batch([rows[j]], pad_id)
            inputs[r, at:at + x.shape[1]], targets[r, at:at + x.shape[1]] = x[0], y[0]
            doc[r, at:at + x.shape[1]] = j
            at += x.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return [(inputs, targets, mask.unsqueeze(1))]


def step_time(model: DeepSeekV3, micro: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> tuple:
    """One step's forward + backward over its micro-batches -> (seconds, summed assistant-token loss)."""
    start = time.perf_counter()
    total = 0.0
    for inputs, targets, mask in micro:
        MASK[0] = mask
        out = model.compute_loss(inputs, targets, mtp_weight=0.1, balance_alpha=0.0)
        n = int((targets != -100).sum())
        out.loss.backward()
        total += float(out.lm_loss.detach()) * n
    model.zero_grad(set_to_none=True)
    MASK[0] = None
    return time.perf_counter() - start, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 steps")
    parser.add_argument("--steps", type=int, default=12, help="steps timed per layout")
    parser.add_argument("--batch-size", type=int, default=16, help="conversations per step")
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    preset = get_preset("small")
    tokenizer = Tokenizer.train(tasks.corpus(5000, seed=0, difficulty=1), preset.vocab_size)
    conversations = cold_start_conversations(1000, seed=0)
    encoded = encode_conversations(tokenizer, [c.messages for c in conversations])
    torch.manual_seed(0)
    model = DeepSeekV3(preset.replace(vocab_size=tokenizer.vocab_size))
    F.scaled_dot_product_attention = document_masked_sdpa
    rng = random.Random(0)
    draws = [rng.sample(range(len(encoded)), args.batch_size) for _ in range(steps + 1)]
    layouts = {f"padded, micro-batches of {budget} tokens": budget for budget in (4096, 2048, 1024, 512)}
    layouts |= {f"packed rows of {seq} tokens, document mask": -seq for seq in (512, 1024)}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    padded_tokens: dict[str, int] = dict.fromkeys(layouts, 0)
    real = 0
    for index, draw in enumerate(draws):  # the first draw warms up
        rows = [encoded[i] for i in draw]
        losses = {}
        for name, size in layouts.items():
            if size > 0:
                micro = [(x, y, None) for x, y in micro_batches(rows, size, pad_id=tokenizer.pad_id)]
            else:
                micro = packed_micro_batches(rows, -size, pad_id=tokenizer.pad_id)
            seconds, losses[name] = step_time(model, micro)
            if index:
                times[name].append(seconds)
                padded_tokens[name] += sum(x.numel() for x, _, _ in micro)
        first = next(iter(losses.values()))
        assert all(abs(v - first) <= 1e-4 * abs(first) for v in losses.values()), losses
        if index:
            real += sum(len(ids) - 1 for ids, _ in rows)
    results = [{"layout": name, "step_ms": 1000 * statistics.median(times[name]),
                "pad_fraction": 1 - real / padded_tokens[name]} for name in layouts]
    for r in results:
        print(f"{r['layout']:<42} {r['step_ms']:8.1f} ms/step   padding {100 * r['pad_fraction']:5.1f}%")
    write_result(f"bench/results/sft-batching-cpu{'-smoke' if args.quick else ''}.json",
                 {"device": device_name(torch.device("cpu")), "commit": git_commit(),
                  "threads": torch.get_num_threads(), "steps": steps, "batch_size": args.batch_size,
                  "results": results})


if __name__ == "__main__":
    main()
