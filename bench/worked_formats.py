"""Which way of writing worked addition does the `small` model learn to copy fastest? (issue 17)

The base model's arithmetic fails at one skill: copying the question's digits into the column steps. This trains
the `small` preset (MTP off) from scratch on worked addition problems only, character-level (digits are single
tokens either way), in one of three formats, then decodes 200 held-out problems greedily:

    A  the built-in format: `4 + 9 = 13, write 3 carry 1.` column by column, ones first
    B  the operands' digits restated with place names first (`49 has ones 9, tens 4.`), then A's steps
    E  the operands restated ones first (`Ones first: 4 -> 4, 49 -> 94.`), then A's steps

B and E turn the copy from the question into a copy at a fixed distance from the model's own restatement.

    python bench/worked_formats.py --format A --steps 600 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import torch

from nanoseek.config import PRESETS
from nanoseek.data import tasks
from nanoseek.model import DeepSeekV3

PLACES = ("ones", "tens", "hundreds", "thousands")


def restated(problem: tasks.Problem, fmt: str) -> str:
    """The problem as a document, its worked steps in format `fmt`."""
    if fmt == "A":
        steps = problem.steps
    else:
        a, b = (int(x) for x in problem.question.removeprefix("What is ").removesuffix("?").split(" + "))
        width = max(len(str(a)), len(str(b)))
        if fmt == "B":
            lines = [f"{n} has " + ", ".join(f"{PLACES[i]} {d}" for i, d in enumerate(tasks._columns(n, width))) + "."
                     for n in (a, b)]
        else:
            lines = ["Ones first: " + ", ".join(f"{n} -> {''.join(map(str, tasks._columns(n, width)))}"
                                               for n in (a, b)) + "."]
        steps = "\n".join(lines) + "\n" + problem.steps
    return f"Question: {problem.question}\n<think>\n{steps}\n</think>\n<answer>{problem.answer}</answer>"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--format", choices=("A", "B", "E"), default="A", help="how the worked steps are written")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of 8 x 256 characters")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the batches")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems decoded at the end")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    train = tasks.generate("addition", 30000, seed=args.seed, split="train", difficulty=1)
    heldout = tasks.generate("addition", args.problems, seed=args.seed + 1000, split="heldout", difficulty=1)
    bos, eos = "\x02", "\x03"
    text = "".join(bos + restated(p, args.format) + eos for p in train)
    vocab = sorted(set(text) | set("".join(restated(p, args.format) for p in heldout)))
    index = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([index[c] for c in text])
    model = DeepSeekV3(dataclasses.replace(PRESETS["small"], vocab_size=128, num_nextn_predict_layers=0))  # > len(vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    batch, seq = 8, 256
    started = time.perf_counter()
    for step in range(args.steps):
        # The pretraining schedule's shape: warmup, constant to half-way, cosine to 10%.
        half = args.steps // 2
        decay = 1.0 if step < half else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - half) / (args.steps - half)))
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * decay
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[i:i + seq] for i in starts])
        y = torch.stack([data[i + 1:i + seq + 1] for i in starts])
        model.compute_loss(x, y, mtp_weight=0.0, balance_alpha=1e-4).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    right = 0
    with torch.no_grad():
        for problem in heldout:
            ids = torch.tensor([[index[c] for c in bos + f"Question: {problem.question}\n<think>\n"]])
            completion = []
            for _ in range(160):
                token = int(model(ids)[0, -1].argmax())
                if vocab[token] == eos:
                    break
                completion.append(vocab[token])
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            right += tasks.check_answer(problem, tasks.extract_answer("".join(completion)) or "")
    print(json.dumps({"format": args.format, "steps": args.steps, "seed": args.seed,
                      "greedy_accuracy": right / len(heldout), "minutes": (time.perf_counter() - started) / 60}))


if __name__ == "__main__":
    main()
