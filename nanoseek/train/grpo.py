"""Group Relative Policy Optimization (DeepSeekMath / DeepSeek-R1): the advantage, the loss, the update.

For each prompt, G completions are sampled; a completion's advantage is its reward relative to its group,
A = (r - mean) / (std + eps), or r - mean without the std scaling (Dr. GRPO). No value model. The loss per
token is the clipped surrogate -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) (separate epsilons are
DAPO's clip-higher) plus beta times the k3 estimate of KL(policy || reference), aggregated per sequence
(GRPO), over all tokens (DAPO), or over a constant token budget (Dr. GRPO).

`nanoseek grpo` draws its prompts from the built-in tasks' training problems (ProblemStream), or from a user's
problems JSONL (`--problems`, UserProblemStream: a seeded shuffle per epoch); a problem becomes a prompt as
`nanoseek eval` asks it (eval.problem_prompt, `--template`), and its accuracy reward is its built-in task's checker
or math-verify (rewards.are_right, a step's math-verify checks run concurrently). `--language-weight` adds R1's
language-consistency reward to accuracy and format.

R1's all-scenario RL (`--general-share`, `--reward-model`): a share of each step's prompts are general prompts
(`--general-prompts` JSONL, or the built-in non-reasoning instructions; GeneralPromptStream), asked in the chat
template and scored only by a reward model of `nanoseek rm` on the text after `</think>`; the reasoning problems keep
only the rule rewards (MixedPromptStream draws both, rewards.RewardRouter scores each sample by its source).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from nanoseek.checkpoint import load_pretrained, resolve_checkpoint, tokenizer_files
from nanoseek.config import require
from nanoseek.data import tasks
from nanoseek.data.chat import ChatDataError, _lines, instruction_conversations, jsonl_files
from nanoseek.data.problems import problems_fingerprint, read_problems
from nanoseek.data.tokenizer import Tokenizer, chat_pieces
from nanoseek.eval import PROBLEM_TEMPLATES, check_template, problem_prompt
from nanoseek.infer.chat import encode_prompt
from nanoseek.infer.engine import Completion, Engine, SamplingParams
from nanoseek.model import DeepSeekV3
from nanoseek.options import add_dataclass_options, from_args
from nanoseek.train.loop import (EpochOrder, LossTerms, StepBatch, TrainConfig, Trainer, TrainingError,
                                 add_resume_option, length_buckets, pick_device, resume_arguments, run_settings)
from nanoseek.train.metrics import read_metrics
from nanoseek.rewards import (GENERAL, REASONING, GeneralPrompt, RewardRouter, RewardSet, Sample, Scorer,
                              prompt_source, r1_zero_rewards, reward_model_reward)

AGGREGATIONS = ("sequence", "token", "constant")
LANGUAGES = ("en", "zh")


@dataclass
class GRPOLossConfig:
    eps_low: float = 0.2  # the ratio's clip below: 1 - eps_low
    eps_high: float = 0.28  # the ratio's clip above: 1 + eps_high (> eps_low is DAPO's clip-higher)
    beta: float = 0.0  # KL coefficient; 0 keeps no reference model
    # How the per-token losses add up: "sequence" (GRPO: a mean per completion), "token" (DAPO: a mean over all
    # completion tokens), "constant" (Dr. GRPO: / (completions * max_tokens)).
    aggregation: Literal["sequence", "token", "constant"] = "token"
    max_tokens: int = 256  # the constant of "constant" aggregation: the completion length budget
    scale_std: bool = True  # False is Dr. GRPO's unscaled advantage
    std_eps: float = 1e-4  # added to a group's reward std before dividing by it

    def __post_init__(self) -> None:
        _need(self, self.aggregation in AGGREGATIONS, "aggregation", f"must be one of {AGGREGATIONS}")
        _need(self, 0 <= self.eps_low < 1, "eps_low", "must be in [0, 1)")
        _need(self, self.eps_high >= 0, "eps_high", "must be >= 0")
        _need(self, self.beta >= 0, "beta", "must be >= 0 (0 keeps no reference model)")
        _need(self, self.max_tokens > 0, "max_tokens", "must be > 0")
        _need(self, self.std_eps > 0, "std_eps", "must be > 0")


_need = partial(require, kind="GRPO option")


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (prompts, G) -> advantages (prompts, G), relative to each prompt's group."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_std:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(prompts,) True where the group's rewards differ: an all-equal group has zero advantage everywhere and
    only dilutes the batch (DAPO's dynamic sampling drops it)."""
    return rewards.max(dim=1).values > rewards.min(dim=1).values


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference) at tokens sampled from the policy:
    exp(ref - logp) - (ref - logp) - 1, unbiased and never negative."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cfg: GRPOLossConfig, ref_logp: torch.Tensor | None = None, batch: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """logp, old_logp, ref_logp, mask (B, T) over completion tokens; advantages (B,) per completion, or (B, T) per
    token (on-policy distillation's) -> loss, stats.

    batch = (sequences, completion tokens) of the whole update when these B rows are one micro-batch of it:
    the loss and the stats are then this micro-batch's shares, which add up to the whole batch's values.
    """
    mask = mask.to(logp.dtype)
    rows, n = batch or (mask.shape[0], int(mask.sum()))
    n = max(1, n)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if cfg.beta:
        per_token = per_token + cfg.beta * kl
    if cfg.aggregation == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / rows
    elif cfg.aggregation == "token":
        loss = (per_token * mask).sum() / n
    else:  # "constant" (GRPOLossConfig checks the name)
        loss = (per_token * mask).sum() / (rows * cfg.max_tokens)
    is_clipped = ((ratio < 1 - cfg.eps_low) & (adv < 0)) | ((ratio > 1 + cfg.eps_high) & (adv > 0))
    stats = {"clip_fraction": float((is_clipped * mask).sum() / n), "kl": float((kl * mask).sum() / n)}
    return loss, stats


def completion_logprobs(model: DeepSeekV3, sequences: torch.Tensor, prompt_lens: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sequences (B, S) = prompt + completion, right-padded; prompt_lens (B,).

    -> log-probabilities (B, S-1) of each next token, the mask of completion tokens (B, S-1) (padding is
    marked by the caller with -1 in `sequences`), and the entropy of each next-token distribution (B, S-1).
    """
    valid = sequences >= 0
    inputs = sequences.clamp(min=0)
    logits = model(inputs[:, :-1]).float()
    logp_all = F.log_softmax(logits, dim=-1)
    targets = inputs[:, 1:]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    positions = torch.arange(1, sequences.shape[1], device=sequences.device)[None]
    mask = (positions >= prompt_lens[:, None]) & valid[:, 1:]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, mask, entropy


def pack_sequences(rows: Sequence[tuple[list[int], list[int]]], device: torch.device | str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, completion) token lists -> sequences (rows, longest) of prompt + completion right-padded with -1 (the
    padding completion_logprobs masks), and the prompt lengths (rows,), on device."""
    sequences = torch.full((len(rows), max(len(p) + len(c) for p, c in rows)), -1, dtype=torch.long)
    for r, (prompt, completion) in enumerate(rows):
        sequences[r, :len(prompt) + len(completion)] = torch.tensor(prompt + completion)
    return sequences.to(device), torch.tensor([len(p) for p, _ in rows]).to(device)


# ---------------------------------------------------------------------- the stage: `nanoseek grpo`
@dataclass
class GRPOConfig:
    """The GRPO stage's own options: its base model, rollouts, rewards and loss (the shared ones: TrainConfig)."""

    model: str = "runs/pretrain"  # the base model: a checkpoint directory, or a run directory (its latest one)
    problems: tuple[str, ...] = ()  # problems JSONL files or directories of them ({"question", "answer", optional
                                    # "task"} per line; `####` or \boxed{} answers; none: the built-in tasks)
    template: Literal["question", "chat", "r1-zero"] = "question"  # how a problem becomes a prompt, as `nanoseek
                                    # eval --template`: question (the built-in corpus's format), chat (DeepSeek's
                                    # chat format: models fine-tuned by `nanoseek sft`), r1-zero (R1-Zero's prompt)
    group_size: int = 8  # G completions per prompt
    prompts_per_step: int = 16  # prompts per step (all data-parallel ranks together)
    max_new_tokens: int = 160  # the rollouts' completion length limit (the evaluation's budget)
    temperature: float = 1.0  # rollouts' sampling temperature
    top_p: float = 1.0  # rollouts' nucleus sampling
    mu: int = 1  # policy updates per batch of rollouts (> 1 makes the ratio against the sampler matter)
    drop_uninformative: bool = True  # skip groups whose rewards are all equal (zero advantage)
    format_weight: float = 0.2  # the base model already writes the format; accuracy is what is to be learned
    language_weight: float = 0.0  # R1's language-consistency reward weight (the share of the reasoning's words in
                                  # --language, summed with accuracy); 0 = off
    language: Literal["en", "zh"] = "en"  # the target language of the reasoning, for --language-weight
    reward_model: str = ""  # a reward model of `nanoseek rm` (its run or a checkpoint) scoring the general prompts'
                            # replies on their text after </think>; empty = none
    general_share: float = 0.0  # share of each step's prompts that are general prompts scored by --reward-model
                                # (R1's all-scenario RL); the rest are reasoning problems scored by the rule rewards
    general_prompts: tuple[str, ...] = ()  # general prompts JSONL files or directories ({"prompt": ...} or
                                           # {"messages": [...]} per line; none: the built-in non-reasoning
                                           # instructions)
    difficulty: int | None = 1  # the level of the training problems (the evaluation's); None: the corpus's mix
    update_tokens: int = 4096  # padded tokens per forward/backward of the update (micro-batches of similar length)
    stop_at_answer: bool = True  # rollouts end at </answer> as the evaluation's do (else only at eos or the limit)
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):  # read back from a run's run.json
            self.loss = GRPOLossConfig(**self.loss)
        self.problems, self.general_prompts = tuple(self.problems), tuple(self.general_prompts)
        _need(self, self.template in PROBLEM_TEMPLATES, "template", f"must be one of {', '.join(PROBLEM_TEMPLATES)}")
        _need(self, self.group_size >= 2, "group_size", "must be >= 2: the advantage compares completions of a prompt")
        for name in ("prompts_per_step", "max_new_tokens", "mu", "update_tokens"):
            _need(self, getattr(self, name) > 0, name, "must be > 0")
        _need(self, self.temperature > 0, "temperature", "must be > 0: GRPO needs different samples per prompt")
        _need(self, 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _need(self, self.format_weight >= 0, "format_weight", "must be >= 0")
        _need(self, self.difficulty in (None, 1, 2, 3), "difficulty", "must be 1, 2, 3 or None (the corpus's mix)")
        _need(self, self.language_weight >= 0, "language_weight", "must be >= 0 (0: off)")
        _need(self, self.language in LANGUAGES, "language", f"must be one of {', '.join(LANGUAGES)}")
        _need(self, 0 <= self.general_share < 1, "general_share", "must be in [0, 1): the rest of a step's prompts "
              "are reasoning problems")
        if self.general_share:
            _need(self, bool(self.reward_model), "general_share", "needs a reward model to score the general "
                  "prompts: pass --reward-model (a `nanoseek rm` run or checkpoint) with --general-share")
            general = round(self.general_share * self.prompts_per_step)
            _need(self, 0 < general < self.prompts_per_step, "general_share", f"gives {general} general prompts of "
                  f"the {self.prompts_per_step} per step (--prompts-per-step); a step needs at least one general "
                  "and one reasoning prompt")
        else:
            _need(self, not self.reward_model, "reward_model", "scores only general prompts: pass --general-share "
                  "> 0 too")
            _need(self, not self.general_prompts, "general_prompts", "are drawn only with --general-share > 0")


class ProblemStream:
    """Training problems of the built-in tasks, drawn in a seeded order; the position resumes exactly."""

    def __init__(self, seed: int = 0, difficulty: int | None = None):
        self.seed, self.difficulty, self.cursor = seed, difficulty, 0

    def next_batch(self, n: int) -> list[tasks.Problem]:
        names = list(tasks.TASKS)
        batch = [tasks.generate(names[(self.cursor + i) % len(names)], 1, seed=self.seed * 1_000_003 +
                                self.cursor + i, split="train", difficulty=self.difficulty)[0] for i in range(n)]
        self.cursor += n
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "fingerprint" in state:
            raise TrainingError("the run's checkpoint was trained on a user's problems (--problems), not on the "
                                "built-in tasks")
        self.cursor = state["cursor"]


class UserProblemStream:
    """A user's problems (data/problems.read_problems), cycled in a seeded shuffle per epoch (EpochOrder); the
    state holds the cursor, the epoch and the problems' fingerprint, so a resume continues with the very same
    prompts, and a resume on other problems is refused."""

    kind, salt = "problems", "grpo"  # what the messages call the items; the order's salt
    fingerprint_of = staticmethod(problems_fingerprint)

    def __init__(self, problems: Sequence[tasks.Problem], seed: int = 0, source: tuple[str, ...] = ()):
        if not problems:
            raise TrainingError(f"no {self.kind} to train on")
        self.problems, self.source = list(problems), tuple(map(str, source))
        self.order = EpochOrder(len(self.problems), seed, self.salt)
        self.fingerprint = self.fingerprint_of(self.problems)

    def next_batch(self, n: int) -> list[tasks.Problem]:
        return [self.problems[i] for i in self.order.next(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.order.cursor, "epoch": self.order.epoch, "problems": len(self.problems),
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            then = (f"{state['problems']} {self.kind} then" if "problems" in state else "the built-in tasks' "
                    "problems then")
            raise TrainingError(f"the {self.kind} of {', '.join(self.source) or 'this run'} differ from the ones the "
                                f"run was trained on ({then}, {len(self.problems)} now, or their text changed); a "
                                f"resume needs the same {self.kind} to continue with the same prompts")
        self.order.cursor = state["cursor"]


def general_prompts_fingerprint(prompts: Iterable[GeneralPrompt]) -> str:
    """A digest of the general prompts' messages, in order."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps(prompt.messages, ensure_ascii=False, sort_keys=True).encode())
    return digest.hexdigest()[:16]


class GeneralPromptStream(UserProblemStream):
    """General prompts, cycled as a user's problems are (their own seeded order), their position and fingerprint
    in the state."""

    kind, salt = "general prompts", "grpo-general"
    fingerprint_of = staticmethod(general_prompts_fingerprint)


class MixedPromptStream:
    """All-scenario RL's prompts: of each batch of n, round(share * n) general prompts, spread evenly over it, and
    reasoning problems in the other places; the state holds both streams' positions."""

    def __init__(self, reasoning: ProblemStream | UserProblemStream, general: GeneralPromptStream, share: float):
        self.reasoning, self.general, self.share = reasoning, general, share

    def next_batch(self, n: int) -> list[tasks.Problem | GeneralPrompt]:
        k = round(self.share * n)
        general, reasoning = iter(self.general.next_batch(k)), iter(self.reasoning.next_batch(n - k))
        return [next(general) if (i + 1) * k // n > i * k // n else next(reasoning) for i in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"reasoning": self.reasoning.state_dict(), "general": self.general.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reasoning.load_state_dict(state["reasoning"])
        self.general.load_state_dict(state["general"])


PromptStream = ProblemStream | UserProblemStream | MixedPromptStream
BUILTIN_GENERAL_PROMPTS = 1000  # built-in instructions a run cycles through when no general prompts are given


def parse_general_prompt(line: str, where: str) -> GeneralPrompt:
    """One JSONL line -> its general prompt: {"prompt": "..."} (a user turn) or {"messages": [...]} ending with the
    user's turn; a ChatDataError naming `where` if it is neither."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ChatDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
        raise ChatDataError(f'{where}: expected a JSON object with either a "prompt" string or a "messages" list')
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ChatDataError(f'{where}: "prompt" must be a non-empty string')
        return GeneralPrompt(({"role": "user", "content": row["prompt"]},), where)
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    try:
        chat_pieces(messages)  # the chat template's checks: objects, roles, string contents
    except ValueError as e:
        raise ChatDataError(f"{where}: {e}") from None
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ChatDataError(f"{where}: the last message must be a non-empty user message: the prompt the policy "
                            "answers")
    return GeneralPrompt(tuple(messages), where)


def read_general_prompts(paths: Iterable[str | Path]) -> list[GeneralPrompt]:
    """The general prompts of JSONL files (or directories of them), in file and line order; blank lines are
    skipped, a bad line or a file without a prompt is a ChatDataError naming its file (and line)."""
    prompts: list[GeneralPrompt] = []
    for file in jsonl_files(paths):
        before = len(prompts)
        with open(file, encoding="utf-8") as f:
            for number, line in _lines(f, file):
                if line.strip():
                    prompts.append(parse_general_prompt(line, f"{file}:{number}"))
        if len(prompts) == before:
            raise ChatDataError(f"{file} holds no general prompts")
    return prompts


def builtin_general_prompts(seed: int) -> list[GeneralPrompt]:
    """The built-in non-reasoning instructions (data/chat.instruction_conversations, train split) as general
    prompts: their user turns."""
    return [GeneralPrompt(tuple(c.messages[:1]), c.source)
            for c in instruction_conversations(BUILTIN_GENERAL_PROMPTS, seed)]


def problem_source(grpo: GRPOConfig, seed: int) -> PromptStream:
    """The prompts of a GRPO run: the user's problems (grpo.problems, read and checked now) or the built-in tasks';
    with grpo.general_share, mixed with general prompts (grpo.general_prompts, or the built-in instructions)."""
    if grpo.problems:
        reasoning: ProblemStream | UserProblemStream = UserProblemStream(read_problems(grpo.problems), seed,
                                                                         grpo.problems)
    else:
        reasoning = ProblemStream(seed, grpo.difficulty)
    if not grpo.general_share:
        return reasoning
    general = (read_general_prompts(grpo.general_prompts) if grpo.general_prompts else
               builtin_general_prompts(seed))
    return MixedPromptStream(reasoning, GeneralPromptStream(general, seed, grpo.general_prompts), grpo.general_share)


def open_reward_model(path: str, device: torch.device | str = "cpu") -> Scorer:
    """The reward model of a `nanoseek rm` run or checkpoint, on `device`."""
    from nanoseek.train.reward_model import load_reward_model  # it imports this module

    if not Path(path).exists():
        raise TrainingError(f"no reward model at {path} (--reward-model): no such file or directory; train one "
                            "with `nanoseek rm` and pass its run directory or one of its checkpoints")
    return load_reward_model(path, device)


def grpo_rewards(cfg: GRPOConfig, device: torch.device | str = "cpu", reward_model: Scorer | None = None
                 ) -> RewardRouter:
    """A run's rewards by prompt source: the rule rewards (accuracy, format, language consistency) for reasoning
    problems; with general prompts, the reward model's score of the text after </think> ("helpfulness") for them,
    `reward_model` or cfg.reward_model's (loaded on `device`)."""
    sets = {REASONING: r1_zero_rewards(cfg.format_weight, language_weight=cfg.language_weight,
                                       language=cfg.language)}
    if cfg.general_share:
        scorer = reward_model or open_reward_model(cfg.reward_model, device)
        sets[GENERAL] = RewardSet({"helpfulness": reward_model_reward(scorer)}, {"helpfulness": 1.0})
    return RewardRouter(sets)


class GRPOStage:
    """GRPO's part of the shared step: sample G completions per prompt on the engine, score them with the rewards,
    and supply the policy loss of the kept groups in length-sorted micro-batches.

    Under data parallelism every rank draws the same prompts and generates for its share of them (with the seeds
    the whole batch would give them on one process); advantages are per group, so they need no communication,
    and the loss is normalised by the whole batch's rows and tokens, so the summed gradients are one process's."""

    name = "grpo"
    flops_per_token = None

    def __init__(self, tokenizer: Tokenizer, problems: PromptStream, cfg: GRPOConfig,
                 rewards: RewardSet | RewardRouter | None = None):
        self.cfg, self.tokenizer, self.problems = cfg, tokenizer, problems
        # A RewardSet scores the reasoning problems; None: grpo_rewards(cfg), made on the first step.
        self.rewards = RewardRouter({REASONING: rewards}) if isinstance(rewards, RewardSet) else rewards
        self.engine: Engine | None = None  # made on the first step, on the trainer's model and device
        self.reference: DeepSeekV3 | None = None  # the frozen initial policy of the KL term (beta > 0)

    def settings(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def prepare(self, trainer: Trainer) -> None:
        """Build the engine (and the reference model, and the rewards) on the trainer's model; the first step does
        it."""
        g = self.cfg
        if g.prompts_per_step % trainer.dp_size:
            raise TrainingError(f"prompts_per_step {g.prompts_per_step} does not split into {trainer.dp_size} "
                                "data-parallel ranks; make it a multiple of the number of ranks")
        check_template(self.tokenizer, g.template)
        streams = [self.problems]
        if isinstance(self.problems, MixedPromptStream):
            check_template(self.tokenizer, "chat")  # the general prompts' template
            streams = [self.problems.reasoning, self.problems.general]
        if self.rewards is None:
            self.rewards = grpo_rewards(g, trainer.device)
        if g.general_share and GENERAL not in self.rewards.sets:
            raise TrainingError("the rewards score no general prompts; give the stage a reward set for them")
        # Prompt tokens: the built-in problems' and instructions' are far shorter; a user's may be longer.
        longest = max([512, *(len(self._prompt(p)) for s in streams if isinstance(s, UserProblemStream)
                              for p in s.problems)])
        self.engine = Engine(trainer.model, max_batch=g.prompts_per_step // trainer.dp_size * g.group_size,
                             max_len=longest + g.max_new_tokens, tokenizer=self.tokenizer)
        if g.loss.beta:
            self.reference = copy.deepcopy(trainer.model).eval().requires_grad_(False)

    def next_batch(self, trainer: Trainer) -> StepBatch:
        g, tok = self.cfg, self.tokenizer
        if self.engine is None:
            self.prepare(trainer)
        start = time.perf_counter()
        problems = self.problems.next_batch(g.prompts_per_step)
        share = g.prompts_per_step // trainer.dp_size
        first = trainer.dp_rank * share  # this rank's prompts: [first, first + share)
        mine = problems[first:first + share]
        prompts = [self._prompt(p) for p in mine]
        outs = self.engine.generate([p for p in prompts for _ in range(g.group_size)], SamplingParams(
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, stop_ids=tok.stop_ids,
            stop_strings=("</answer>",) if g.stop_at_answer else (),
            seed=trainer.cfg.seed * 1_000_003 + trainer.step * 10_007 + first * g.group_size))
        generated = time.perf_counter()
        texts = [tok.decode([t for t in out.tokens if t not in tok.stop_ids]) for out in outs]
        scores = self.rewards.score([Sample(mine[i // g.group_size], text, len(out.tokens))
                                     for i, (text, out) in enumerate(zip(texts, outs))])
        rewards = torch.tensor([s["total"] for s in scores]).view(share, g.group_size)
        advantages = group_advantages(rewards, g.loss.scale_std, g.loss.std_eps).flatten()
        keep = informative_groups(rewards) if g.drop_uninformative else torch.ones(share, dtype=torch.bool)
        rows = [i for i in range(len(outs)) if keep[i // g.group_size]]
        lengths = [len(o.tokens) for o in outs]
        # The update is normalised by the whole batch (all ranks): its kept rows and their completion tokens.
        kept_rows, kept_tokens = trainer.all_reduce_sum([float(len(rows)), float(sum(lengths[i] for i in rows))])
        self.batch_size = (int(kept_rows), int(kept_tokens))
        micro = []
        if rows:
            buckets = length_buckets([len(prompts[i // g.group_size]) + lengths[i] for i in rows], g.update_tokens)
            with torch.no_grad(), trainer.autocast_context():
                for bucket in buckets:
                    seq, lens, adv = self._pack([rows[j] for j in bucket], prompts, outs, advantages, trainer.device)
                    old = completion_logprobs(trainer.model, seq, lens)[0] if g.mu > 1 else None
                    ref = completion_logprobs(self.reference, seq, lens)[0] if self.reference else None
                    micro.append((seq, lens, adv, old, ref))
        # The log shows the whole batch: every rank's samples, in rank order (= one process's order).
        gathered = trainer.all_gather((scores, lengths, [(prompt_source(p), p.task) for p in mine
                                                         for _ in range(g.group_size)], int(keep.sum()),
                                       generated - start))
        scores = [s for part in gathered for s in part[0]]
        lengths = [n for part in gathered for n in part[1]]
        labels = [label for part in gathered for label in part[2]]
        record = {"loss": 0.0, **reward_record(scores, labels, mixed=len(self.rewards.sets) > 1),
                  "length_mean": _mean(lengths), "length_max": max(lengths),
                  "groups_kept": sum(part[3] for part in gathered), "entropy": float("nan"), "clip_fraction": 0.0,
                  "kl": 0.0, "generation_time": max(part[4] for part in gathered)}
        return StepBatch(micro, sum(lengths), record, updates=g.mu)

    def loss(self, model: DeepSeekV3, micro_batch: tuple) -> LossTerms:
        sequences, prompt_lens, advantages, old_logp, ref_logp = micro_batch
        logp, mask, entropy = completion_logprobs(model, sequences, prompt_lens)
        loss, stats = policy_loss(logp, logp.detach() if old_logp is None else old_logp, advantages, mask,
                                  self.cfg.loss, ref_logp, batch=self.batch_size)
        stats["loss"] = float(loss.detach())
        stats["entropy"] = float((entropy.detach() * mask).sum()) / max(1, self.batch_size[1])
        return LossTerms(loss, stats)

    def _prompt(self, problem: tasks.Problem | GeneralPrompt) -> list[int]:
        """A problem's prompt as `nanoseek eval` asks it (--template); a general prompt in the chat template."""
        if isinstance(problem, GeneralPrompt):
            return encode_prompt(self.tokenizer, list(problem.messages), "chat")
        return problem_prompt(self.tokenizer, problem, self.cfg.template)

    def evaluate(self, trainer: Trainer) -> None:
        return None  # the held-out evaluation of an RL run is `nanoseek eval`'s

    def state_dict(self) -> dict[str, Any]:
        return self.problems.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.problems.load_state_dict(state)

    def _pack(self, rows: list[int], prompts: list[list[int]], outs: list[Completion], advantages: torch.Tensor,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Completions `rows` with their prompts -> sequences (rows, longest) right-padded with -1, prompt
        lengths (rows,) and advantages (rows,), on the model's device."""
        g = self.cfg.group_size
        sequences, prompt_lens = pack_sequences([(prompts[i // g], outs[i].tokens) for i in rows], device)
        return sequences, prompt_lens, advantages[rows].to(device)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def reward_record(scores: Sequence[dict[str, float]], labels: Sequence[tuple[str, str]], mixed: bool = False
                  ) -> dict[str, float]:
    """A step's reward metrics from its samples' scores and (source, task) labels: the mean total reward; the
    accuracy and format rate, each reward term's mean (reward_<term>) and the accuracy per task over the samples
    that term scored (so a reasoning term never averages in a general prompt's sample); mixed: each source's mean
    total reward (reward_<source>)."""
    def mean_of(key: str, task: str | None = None) -> float:
        return _mean(s[key] for s, (_, t) in zip(scores, labels) if key in s and (task is None or t == task))

    record = {"reward": float(torch.tensor([s["total"] for s in scores]).mean()),
              "accuracy": mean_of("accuracy"), "format_rate": mean_of("format"),
              **{f"reward_{k}": mean_of(k) for s in scores for k in s if k != "total"},
              **{f"accuracy_{task}": mean_of("accuracy", task) for s, (_, task) in zip(scores, labels)
                 if "accuracy" in s}}
    if mixed:
        record.update({f"reward_{source}": _mean(s["total"] for s, (src, _) in zip(scores, labels) if src == source)
                       for source, _ in labels})
    return record


# The shared options with RL's defaults: a small learning rate, constant for the first half and then a cosine to a
# tenth, no weight decay. The decay made R1-Zero's gain larger and steadier from the same bases (docs/pretraining.md,
# "GRPO's schedule": +11.4 / +9.9 against +9.4 / +6.0 with a constant rate). 300 steps: the `narrow` base's steps
# cost about 0.7 of `small`'s. More steps gained more where a higher learning rate did not ("A narrower model"), but
# 420 steps took up to 13 minutes and 360 up to 11.7 on a 2-core CPU, too many for the pipeline's 25 with a margin
# ("The acceptance round").
GRPO_TRAIN_DEFAULTS = TrainConfig(out_dir="runs/grpo", max_steps=300, lr=1.5e-4, warmup_steps=5, decay_start=0.5,
                                  weight_decay=0.0, save_every=20, eval_every=0, keep_last=2)
# Shared options a GRPO run has no use for: its loss has no balance term and its forward returns no expert loads
# (so the balancing biases stay), and it has no periodic held-out loss.
GRPO_UNUSED_OPTIONS = ("bias_update_speed", "aux_alpha", "eval_every")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The GRPO command's options (`nanoseek grpo`, and the torchrun entry's `grpo`)."""
    add_resume_option(parser)
    add_dataclass_options(parser, GRPOConfig, skip=("loss",))
    add_dataclass_options(parser, GRPOLossConfig)
    add_dataclass_options(parser, TrainConfig, skip=GRPO_UNUSED_OPTIONS, defaults=GRPO_TRAIN_DEFAULTS)


def arguments(args: argparse.Namespace) -> dict[str, Any]:
    """run_grpo()'s keyword arguments from the parsed options."""
    if args.resume:
        return resume_arguments(args)
    grpo = GRPOConfig(**{**vars(from_args(GRPOConfig, args)), "loss": from_args(GRPOLossConfig, args)})
    return {"grpo": grpo, "train": from_args(TrainConfig, args)}


def grpo_trainer(model: DeepSeekV3, tokenizer: Tokenizer, train: TrainConfig, grpo: GRPOConfig,
                 rewards: RewardSet | RewardRouter | None = None, model_files: dict[str, Path] | None = None,
                 problems: PromptStream | None = None) -> Trainer:
    """The shared Trainer with the GRPO stage on its problems (default: problem_source's, from grpo and the seed)."""
    problems = problems if problems is not None else problem_source(grpo, train.seed)
    stage = GRPOStage(tokenizer, problems, grpo, rewards)
    return Trainer(model, stage, train, model_files=model_files)


def run_grpo(grpo: GRPOConfig | None = None, train: TrainConfig | None = None, resume: bool = False,
             progress: bool = True, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """`nanoseek grpo`: R1-Zero from the base model grpo.model (a checkpoint, or a run's latest one).
    resume: continue the run in train.out_dir with its own saved settings (changes: see run_settings)."""
    grpo, train = run_settings("grpo", GRPOConfig, grpo, train, resume, changes, defaults=GRPO_TRAIN_DEFAULTS)
    out = Path(train.out_dir)
    # A user's problems and general prompts, and the reward model, are checked before the model is loaded.
    problems = problem_source(grpo, train.seed)
    rewards = grpo_rewards(grpo, pick_device(train.device))
    path = resolve_checkpoint(grpo.model)
    tokenizer = Tokenizer.load(path)
    trainer = grpo_trainer(load_pretrained(path), tokenizer, train, grpo, rewards,
                           model_files=tokenizer_files(path), problems=problems)
    result = trainer.fit(progress=progress, resume=resume)
    if result["stopped"] is None:
        write_report(out, path, result["step"], result["minutes"], train.seed, grpo.problems)
    return result


def write_report(out: Path, base: Path, steps: int, minutes: float, seed: int, problems: tuple[str, ...] = ()
                 ) -> dict[str, Any]:
    """report.json and report.md of a finished GRPO run: the last 10 steps' means, and the plots."""
    last = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"][-10:]
    summary = {k: _mean(r[k] for r in last) for k in ("reward", "accuracy", "format_rate", "length_mean")}
    source = ", ".join(map(str, problems)) or "the built-in tasks' training problems"
    report = {"base_model": str(base), "steps": steps, "seed": seed, "problems": source, "minutes_this_run": minutes,
              "last_10_steps": summary}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    evaluate = (f"Accuracy: `nanoseek eval --model {out} --problems HELDOUT.jsonl` (a file of problems it did not "
                "train on)." if problems else f"Held-out accuracy: `nanoseek eval --model {out}`.")
    (out / "report.md").write_text(f"""# GRPO report

R1-Zero from `{base}` on {source}, {steps} steps (seed {seed}), {minutes:.1f} minutes in this run.
Means over the last 10 steps: reward {summary['reward']:.3f}, accuracy {100 * summary['accuracy']:.1f}%,
format {100 * summary['format_rate']:.1f}%, completion length {summary['length_mean']:.1f} tokens.
{evaluate}

![reward](plots/reward.png)
![completion length](plots/length.png)
![loss](plots/loss.png)
![learning rate](plots/lr.png)
""")
    return report
