"""R1-Zero GRPO: nanoseek's GRPO stage against TRL's GRPOTrainer, from the same weights, in the same run.

Both trainers start from one nanoseek model exported to the Hugging Face format (save_pretrained; transformers
loads it as DeepseekV3ForCausalLM, the tokenizer as a PreTrainedTokenizerFast saved beside it) and train for the
same number of steps with the same settings:

  prompts     nanoseek's ProblemStream order (seed, difficulty), prompt = bos + tasks.format_prompt(problem); the
              TRL dataset holds the same problems in the same order (shuffle_dataset=False), each step takes the
              next --prompts-per-step of them, each repeated G times. The script checks that TRL's tokenizer
              turns each prompt into nanoseek's token ids, and that TRL's reward calls saw the same problems.
  rewards     nanoseek's r1_zero_rewards (accuracy 1.0, format --format-weight): each of its functions is one TRL
              reward function (TRL's reward_weights = nanoseek's weights), called on the completion decoded by
              nanoseek's tokenizer from TRL's completion_ids (eos removed) and the problem's dataset columns.
  sampling    G completions per prompt, up to --max-new-tokens, temperature --temperature, top_p 1, no top-k,
              stopping at eos (the eos token is part of the completion and of the loss in both; nanoseek's
              stop at </answer> is turned off, as TRL has none).
  loss        the clipped surrogate with eps_low/eps_high, beta * k3 KL against the initial model, advantages
              (r - group mean) / (group std + 1e-4) (--no-scale-std: r - mean), aggregated over all tokens
              (nanoseek "token" = TRL "dapo"), per sequence ("sequence" = "grpo") or over G * B * max tokens
              ("constant" = "dr_grpo"); mu policy updates per batch (TRL num_iterations).
  optimizer   torch AdamW, betas (0.9, 0.95), eps 1e-8, weight decay 0, gradient clipping at 1.0, and nanoseek's
              learning-rate schedule (linear warmup over --warmup-steps, then constant): TRL gets the same
              optimizer and a LambdaLR with nanoseek's `learning_rate` through `optimizers=`.
  precision   CPU: float32 for both. CUDA (--precision auto): float32 weights and optimizer under bf16 autocast
              for both: TRL's bf16=True (accelerate wraps the model's forward in autocast, generation included);
              nanoseek's trainer is built (its engine's CUDA graphs captured) and stepped inside
              torch.autocast("cuda", torch.bfloat16, cache_enabled=False).

Time per step: wall time from the start of a step (sampling included) to the end of the optimizer step, with a CUDA
synchronisation at both ends (TRL: a TrainerCallback's on_step_begin/on_step_end; nanoseek: around
Trainer.train_step). The mean excludes the first step (warm-up, CUDA graph capture). Rewards per step: the
mean total and the mean of each reward function over the step's G * B completions (TRL's logged `reward`,
`rewards/<name>/mean`; nanoseek's `reward`, `reward_<name>`).

What cannot be matched exactly (also in the JSON's "differences"):
  - The random draws: TRL samples with HF generate from torch's global generator, nanoseek's engine from one
    seeded generator per request, so the two runs see different completions and their reward curves differ by
    sampling noise even with equal algorithms. Compare curves over many steps (and seeds), not step by step.
  - Generation: HF generate decodes the left-padded batch with its dynamic cache until every row has stopped
    (finished rows keep going as padding); nanoseek's engine uses its latent KV cache with continuous batching.
  - TRL computes the training log-probabilities from logits / temperature; nanoseek from the raw logits (the
    sampling distribution only at --temperature 1, the default).
  - nanoseek's own default drops groups whose rewards are all equal (GRPOConfig.drop_uninformative, DAPO's
    dynamic sampling without refill); TRL keeps them (zero advantage, but their tokens count in the "dapo"
    normaliser). The benchmark keeps them in nanoseek too; --drop-uninformative runs nanoseek's default.
  - TRL's text `completions` drop special tokens (</think> is one in nanoseek's tokenizer), which is why the reward
    functions decode `completion_ids` instead.
  - With mu > 1 TRL counts each of the mu updates as a trainer step (max_steps = steps * mu, generation every mu
    steps); its step times are summed per batch of rollouts.
  - MTP modules are removed from the model for both (GRPO does not use them); TRL's MoE auxiliary loss is off
    (router_aux_loss_coef 0) as nanoseek's GRPO step adds no balance loss and no bias update.

    # GPU: the issue's size (bench-1b, random weights, 512-token BPE trained here): time per step
    python bench/grpo_vs_trl.py --steps 20
    # GPU: a trained base model (the embedded pretraining run): time per step and reward curves
    python bench/grpo_vs_trl.py --model runs/pretrain --steps 60 --out bench/results/grpo_vs_trl-pretrain-gpu.json
    # CPU smoke (timings mean nothing at this size)
    python bench/grpo_vs_trl.py --model runs/pretrain --steps 3 --prompts-per-step 2 --group-size 4 \\
        --max-new-tokens 48 --out bench/results/grpo_vs_trl-cpu-smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.checkpoint import load_pretrained, resolve_checkpoint, save_pretrained
from nanoseek.config import get_preset
from nanoseek.data import tasks
from nanoseek.data.tokenizer import BOS, EOS, PAD, Tokenizer
from nanoseek.model import DeepSeekV3
from nanoseek.provenance import device_name, git_commit, write_result
from nanoseek.train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig, GRPOLossConfig, ProblemStream, grpo_trainer
from nanoseek.train.loop import TrainConfig, learning_rate
from nanoseek.rewards import RewardSet, Sample, r1_zero_rewards

LOSS_TYPES = {"token": "dapo", "sequence": "grpo", "constant": "dr_grpo"}  # nanoseek aggregation -> TRL loss_type
# DeepSeek-V3/R1's chat format (nanoseek.data.tokenizer.apply_chat_template) for the exported tokenizer: replies
# before the last user message without their reasoning, later ones with it (inline or as reasoning_content); the
# benchmark's prompts are plain text, so TRL never applies it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='', last_user=-1) %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = ns.system + ('\n\n' if ns.system else '') + m['content'] %}"
    "{% elif m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{{ ns.system }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set content = m['content'] %}"
    "{% set reasoning = (m.get('reasoning_content') or '') | trim %}"
    "{% if '</think>' in content %}{% set reasoning = content.split('</think>')[0] | trim %}"
    "{% if reasoning.startswith('<think>') %}{% set reasoning = reasoning[7:] | trim %}{% endif %}"
    "{% set content = content.split('</think>', 1)[1] | trim %}{% endif %}"
    "{% if reasoning and loop.index0 > ns.last_user %}"
    "{{ '<｜Assistant｜><think>\n' + reasoning + '\n</think>\n\n' + content + eos_token }}"
    "{% else %}{{ '<｜Assistant｜>' + content + eos_token }}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------- the model, its HF export, the data
def build_model(args) -> tuple[DeepSeekV3, Tokenizer, str]:
    """-> the float32 base model on the CPU (MTP removed), its tokenizer, and where it came from."""
    if args.model:
        path = resolve_checkpoint(args.model)
        tokenizer = Tokenizer.load(path)
        model = load_pretrained(path, dtype=torch.float32)
        source = str(path)
    else:  # the anchor probe's setting: the preset's shape, random weights, a small BPE trained here
        tokenizer = Tokenizer.train(tasks.corpus(4000, seed=args.seed), vocab_size=args.vocab_size)
        config = get_preset(args.preset).replace(vocab_size=tokenizer.vocab_size)
        torch.manual_seed(args.seed)
        model = DeepSeekV3(config)
        source = f"preset {args.preset}, random weights (seed {args.seed}), vocab {tokenizer.vocab_size} (BPE trained here)"
    model.mtp = nn.ModuleList()  # GRPO trains the main model only
    model.config = model.config.replace(num_nextn_predict_layers=0)
    return model.float().eval(), tokenizer, source


def export_hf(model: DeepSeekV3, tokenizer: Tokenizer, directory: Path):
    """The model as a HF DeepSeek-V3 directory with its tokenizer as a PreTrainedTokenizerFast; -> that tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    save_pretrained(model, directory)
    file = tokenizer.save(directory)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(file), bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                     padding_side="left")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)  # what a user of the exported directory gets


def trl_prompt_texts(problems: list[tasks.Problem], tokenizer: Tokenizer, hf_tok) -> tuple[list[str], bool]:
    """The prompt strings for TRL such that its tokenization (processing_class(text=prompts)) gives nanoseek's ids
    (bos + format_prompt); -> (texts, whether the HF tokenizer adds bos itself)."""
    want = [tokenizer.encode(tasks.format_prompt(p), bos=True) for p in problems]
    plain = [tasks.format_prompt(p) for p in problems]
    for adds_bos, texts in ((True, plain), (False, [BOS + t for t in plain])):
        if hf_tok(text=texts)["input_ids"] == want:
            return texts, adds_bos
    raise RuntimeError("the exported HF tokenizer does not reproduce nanoseek's prompt token ids")


def reward_functions(rewards: RewardSet, tokenizer: Tokenizer, seen: list[str]):
    """nanoseek's reward functions in TRL's signature, one per function; `seen` collects the questions scored."""
    eos = tokenizer.eos_id

    def make(name, fn):
        def reward(completions, completion_ids, task, question, answer, steps, difficulty, **_):
            if name == next(iter(rewards.functions)):
                seen.extend(question)
            out = []
            for ids, *fields in zip(completion_ids, task, question, answer, steps, difficulty, strict=True):
                text = tokenizer.decode([t for t in ids if t != eos])
                try:
                    out.append(float(fn(Sample(tasks.Problem(*fields), text, len(ids)))))
                except Exception:  # noqa: BLE001 - as RewardSet: a malformed completion scores 0
                    out.append(0.0)
            return out

        reward.__name__ = name
        return reward

    return [make(name, fn) for name, fn in rewards.functions.items()], [rewards.weights.get(n, 1.0)
                                                                          for n in rewards.functions]


def logits_max_diff(hf_dir: Path, hf, prompt: list[int], device: torch.device) -> float:
    """max |logits| difference between nanoseek's load of the exported directory and transformers', float32."""
    model = load_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        a = model(ids).float()
        b = hf(ids).logits.float()
    del model
    return float((a - b).abs().max())


def autocast_ctx(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


# ---------------------------------------------------------------------- the two runs
def run_trl(args, hf_dir: Path, hf_tok, tokenizer: Tokenizer, problems, prompt_texts, train_cfg: TrainConfig,
            device: torch.device, bf16: bool, work: Path) -> dict[str, Any]:
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    seen: list[str] = []
    funcs, weights = reward_functions(r1_zero_rewards(format_weight=args.format_weight), tokenizer, seen)
    columns = {f.name: [getattr(p, f.name) for p in problems] for f in dataclasses.fields(tasks.Problem)}
    dataset = Dataset.from_dict({"prompt": prompt_texts, **columns})
    transformers.set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device)
    parity = logits_max_diff(hf_dir, model.eval(), tokenizer.encode(prompt_texts[0].removeprefix(BOS), bos=True),
                             device)
    model.train()
    config = TRLConfig(
        output_dir=str(work / "trl"), max_steps=args.steps * args.mu, per_device_train_batch_size=args.prompts_per_step
        * args.group_size, gradient_accumulation_steps=1, steps_per_generation=1, num_generations=args.group_size,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        learning_rate=args.lr, weight_decay=0.0, adam_beta1=train_cfg.beta1, adam_beta2=train_cfg.beta2,
        max_grad_norm=train_cfg.grad_clip, epsilon=args.eps_low, epsilon_high=args.eps_high, beta=args.beta,
        num_iterations=args.mu, loss_type=LOSS_TYPES[args.aggregation],
        scale_rewards="group" if args.scale_std else "none", reward_weights=weights, use_vllm=False,
        gradient_checkpointing=False, bf16=bf16, fp16=False, use_cpu=device.type != "cuda", logging_steps=1,
        report_to="none", save_strategy="no", shuffle_dataset=False, seed=args.seed, router_aux_loss_coef=0.0,
        log_completions=False, disable_tqdm=True, dataloader_num_workers=0, mask_truncated_completions=False)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(train_cfg.beta1, train_cfg.beta2), fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate(s // args.mu, train_cfg) / train_cfg.lr)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.logs: list[dict] = []
            self.start = 0.0

        def on_step_begin(self, *a, **k):
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            self.times.append(time.perf_counter() - self.start)

        def on_log(self, _args, state, _control, logs=None, **k):
            if logs and "reward" in logs:
                self.logs.append({"global_step": state.global_step, **logs})

    timer = Timer()
    trainer = TRLTrainer(model=model, reward_funcs=funcs, args=config, train_dataset=dataset, processing_class=hf_tok,
                         callbacks=[timer], optimizers=(optimizer, schedule))
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    times = [sum(timer.times[i:i + args.mu]) for i in range(0, len(timer.times), args.mu)]
    names = [f.__name__ for f in funcs]
    logs = timer.logs
    result = {
        "library": "trl", "logits_max_abs_diff_vs_nanoseek": parity, "wall_s": wall, "step_time_s": times,
        "reward": [log["reward"] for log in logs],
        **{f"reward_{n}": [log.get(f"rewards/{n}/mean") for log in logs] for n in names},
        "length_mean": [log.get("completions/mean_length") for log in logs],
        "loss": [log.get("loss") for log in logs], "lr": [log.get("learning_rate") for log in logs],
        "trl_logged_step_time_s": [log.get("step_time") for log in logs], "questions_seen": seen,
        "last_log": logs[-1] if logs else None,
    }
    del trainer, model, optimizer
    return result


def run_nanoseek(args, hf_dir: Path, tokenizer: Tokenizer, train_cfg: TrainConfig, device: torch.device, bf16: bool,
                 ) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = load_pretrained(hf_dir, dtype=torch.float32)
    grpo = GRPOConfig(group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0, mu=args.mu,
                      drop_uninformative=args.drop_uninformative, format_weight=args.format_weight,
                      difficulty=args.difficulty, stop_at_answer=False,
                      loss=GRPOLossConfig(eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta,
                                          aggregation=args.aggregation, max_tokens=args.max_new_tokens,
                                          scale_std=args.scale_std))
    with autocast_ctx(device, bf16):
        trainer = grpo_trainer(model, tokenizer, train_cfg, grpo)
    records, times = [], []
    started = time.perf_counter()
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        with autocast_ctx(device, bf16):
            record = trainer.train_step()
        sync(device)
        times.append(time.perf_counter() - start)
        records.append(record)
        print(f"nanoseek step {record['step']}: {times[-1]:.2f} s, reward {record['reward']:.3f}", flush=True)
    wall = time.perf_counter() - started
    result = {
        "library": "nanoseek", "wall_s": wall, "step_time_s": times,
        "reward": [r["reward"] for r in records],
        **{k: [r[k] for r in records] for k in records[0] if k.startswith("reward_")},
        "length_mean": [r["length_mean"] for r in records], "loss": [r["loss"] for r in records],
        "lr": [r["lr"] for r in records], "generation_time_s": [r["generation_time"] for r in records],
        "update_time_s": [r["update_time"] for r in records], "groups_kept": [r["groups_kept"] for r in records],
    }
    del trainer, model
    return result


def summary(run: dict[str, Any]) -> dict[str, Any]:
    times, rewards = run["step_time_s"], run["reward"]
    half = len(rewards) // 2
    out = {"mean_step_time_s_after_first": _mean(times[1:]) if len(times) > 1 else times[0],
           "first_step_time_s": times[0], "total_step_time_s": sum(times), "reward_mean": _mean(rewards),
           "reward_mean_last_half": _mean(rewards[half:])}
    for key, values in run.items():
        if key.startswith("reward_"):
            out[f"{key}_mean"] = _mean(values)
    return out


def differences(args, device: torch.device) -> list[str]:
    """What differs between the two setups (see the module docstring)."""
    out = [
        ("sampling: different random streams (HF generate on torch's global generator vs one seeded generator per "
         "request in nanoseek's engine), so the runs see different completions; reward curves differ by sampling "
         "noise"),
        ("generation: HF generate decodes the left-padded batch with a dynamic cache until every row stops; "
         "nanoseek's engine uses its latent KV cache with continuous batching"
         + (" and CUDA-graph decode steps" if device.type == "cuda" else "")),
        ("TRL computes training log-probabilities from logits / temperature, nanoseek from the raw logits (equal at "
         f"temperature 1; this run: {args.temperature})"),
        ("uninformative groups (all rewards equal): "
         + ("dropped by nanoseek (its default), kept by TRL, which changes the token normaliser"
            if args.drop_uninformative else "kept by both (nanoseek's default drops them)")),
        ("rewards: TRL's reward functions decode completion_ids with nanoseek's tokenizer (TRL's text completions "
         "skip special tokens such as </think>)"),
        ("MTP removed in both; TRL's MoE auxiliary loss off (router_aux_loss_coef 0), nanoseek's GRPO step has no "
         "balance loss and no router-bias update"),
        ("step time: TRL's from a TrainerCallback (on_step_begin to on_step_end; its logging after the step is not "
         "counted), nanoseek's around Trainer.train_step"),
    ]
    if args.mu > 1:
        out.append("mu > 1: TRL counts each update as a trainer step; its times are summed per batch of rollouts")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a nanoseek run or checkpoint directory (default: --preset "
                        "with random weights and a BPE trained here)")
    parser.add_argument("--preset", default="bench-1b")
    parser.add_argument("--vocab-size", type=int, default=512, help="the in-script BPE's size (no --model)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8, help="G")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--lr", type=float, default=GRPO_TRAIN_DEFAULTS.lr)
    parser.add_argument("--warmup-steps", type=int, default=GRPO_TRAIN_DEFAULTS.warmup_steps)
    parser.add_argument("--eps-low", type=float, default=GRPOLossConfig.eps_low)
    parser.add_argument("--eps-high", type=float, default=GRPOLossConfig.eps_high)
    parser.add_argument("--beta", type=float, default=GRPOLossConfig.beta)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--mu", type=int, default=1, help="policy updates per batch of rollouts (TRL num_iterations)")
    parser.add_argument("--aggregation", choices=list(LOSS_TYPES), default=GRPOLossConfig.aggregation)
    parser.add_argument("--no-scale-std", dest="scale_std", action="store_false", help="Dr. GRPO's advantage")
    parser.add_argument("--format-weight", type=float, default=GRPOConfig.format_weight)
    parser.add_argument("--difficulty", type=int, default=GRPOConfig.difficulty)
    parser.add_argument("--drop-uninformative", action="store_true", help="nanoseek's default (TRL cannot)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast over float32 weights on CUDA, float32 on the CPU; bf16: the "
                        "autocast on any device (to check the CUDA path's numerics on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["both", "trl", "nanoseek"], default="both")
    parser.add_argument("--out", default=None, help="result JSON (default: bench/results/grpo_vs_trl-<device>.json)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.precision == "bf16" or (device.type == "cuda" and args.precision == "auto")
    model, tokenizer, source = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    train_cfg = dataclasses.replace(GRPO_TRAIN_DEFAULTS, max_steps=args.steps, lr=args.lr,
                                    warmup_steps=args.warmup_steps, decay_start=1.0, weight_decay=0.0,
                                    save_every=0, eval_every=0, seed=args.seed, tensorboard=False,
                                    device=device.type, precision="fp32")
    problems = ProblemStream(args.seed, args.difficulty).next_batch(args.steps * args.prompts_per_step)
    result: dict[str, Any] = {
        "label": "CPU smoke test: checks the script; the timings mean nothing at this size" if device.type == "cpu"
        else "GPU comparison",
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": git_commit(),
        "model": source, "params_M": n_params / 1e6, "vocab_size": tokenizer.vocab_size,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "only")} | {
            "completions_per_step": args.prompts_per_step * args.group_size, "trl_loss_type": LOSS_TYPES[
                args.aggregation], "trl_scale_rewards": "group" if args.scale_std else "none",
            "optimizer": "AdamW betas (0.9, 0.95) eps 1e-8 weight decay 0, grad clip 1.0",
            "lr_schedule": f"linear warmup over {args.warmup_steps} steps ((step+1)/warmup), then constant",
            "precision": {"nanoseek": "float32 weights under torch.autocast bf16 (cache off)" if bf16 else "float32",
                          "trl": "float32 weights, bf16=True (accelerate autocast)" if bf16 else "float32"},
            "reward_weights": {"accuracy": 1.0, "format": args.format_weight}},
        "differences": differences(args, device),
    }
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        pass

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf_dir = work / "hf"
        hf_tok = export_hf(model, tokenizer, hf_dir)
        del model
        prompt_texts, adds_bos = trl_prompt_texts(problems, tokenizer, hf_tok)
        result["settings"]["trl_prompt"] = ("format_prompt(problem); the HF tokenizer adds bos" if adds_bos
                                            else "bos string + format_prompt(problem)")
        if args.only in ("both", "trl"):
            import trl

            result["trl"] = trl.__version__
            runs["trl"] = run_trl(args, hf_dir, hf_tok, tokenizer, problems, prompt_texts, train_cfg, device, bf16,
                                  work)
            want = [p.question for p in problems for _ in range(args.group_size)]
            runs["trl"]["same_prompts_as_nanoseek"] = runs["trl"].pop("questions_seen") == want
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.only in ("both", "nanoseek"):
            runs["nanoseek"] = run_nanoseek(args, hf_dir, tokenizer, train_cfg, device, bf16)
    result["runs"] = runs
    result["summary"] = {name: summary(run) for name, run in runs.items()}
    if len(runs) == 2:
        s = result["summary"]
        ratio = s["nanoseek"]["mean_step_time_s_after_first"] / s["trl"]["mean_step_time_s_after_first"]
        result["comparison"] = {
            "nanoseek_over_trl_step_time": ratio, "speedup": 1 / ratio, "at_most_half_of_trl": ratio <= 0.5,
            "reward_mean_nanoseek_minus_trl": s["nanoseek"]["reward_mean"] - s["trl"]["reward_mean"],
            "reward_last_half_nanoseek_minus_trl": s["nanoseek"]["reward_mean_last_half"]
            - s["trl"]["reward_mean_last_half"]}
    for name, s in result["summary"].items():
        print(f"{name:9s} {s['mean_step_time_s_after_first']:8.3f} s/step (first {s['first_step_time_s']:.2f} s)  "
              f"reward mean {s['reward_mean']:.3f}, last half {s['reward_mean_last_half']:.3f}")
    if "comparison" in result:
        print(f"nanoseek / TRL time per step: {result['comparison']['nanoseek_over_trl_step_time']:.3f}")
    write_result(args.out or f"bench/results/grpo_vs_trl-{device.type}.json", result)


if __name__ == "__main__":
    main()
