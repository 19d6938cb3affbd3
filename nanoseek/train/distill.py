"""`nanoseek distill`: a teacher's reasoning distilled into a (smaller) student, as a stage of the shared training step.

Three methods (`--method`):

    sft        DeepSeek-R1's (paper, 2.4): the teacher answers prompts (the built-in tasks' training problems, or a
               user's problems JSONL) with k samples each, on the engine; the samples are rejection-filtered with
               `nanoseek sample`'s filter (run_sample: judge, select, the summary of kept rates and rejection
               reasons, written under out_dir/samples); the student is fine-tuned on the kept conversations with
               plain SFT: `nanoseek sft`'s data path (load_data: encode, held-out split) and its stage (SFTStage: the
               next-token loss on the assistant's tokens). Teacher and student may have different tokenizers: the
               student re-tokenizes the teacher's text.
    logit      the same kept samples, but the loss on their assistant tokens is the forward KL from the teacher's
               next-token distribution to the student's, KL(p_t || p_s), both softened by --kd-temperature and
               scaled by its square (Hinton et al.), mixed with the cross-entropy by --ce-weight:
               (1 - w) T^2 KL + w CE. The teacher runs (without gradients) on each micro-batch in the loss.
    on-policy  the student samples k completions of each of a step's prompts (`nanoseek grpo`'s prompts: fresh
               built-in training problems each step, or the user's problems cycled), and the teacher scores the
               student's own tokens (Agarwal et al.'s GKD; Thinking Machines' "on-policy distillation", used for
               Qwen3's small models). The per-token signal is the reverse KL, minimised by one of
               (--on-policy-loss):
                 sampled  a policy gradient with the per-token advantage A_t = -(log p_s(x_t) - log p_t(x_t)),
                          detached (discount 0: each token is credited only with its own term), through GRPO's own
                          policy_loss at ratio 1 (one update per batch of rollouts) aggregated over all the step's
                          tokens: the loss's value is then the sampled estimate of KL(p_s || p_t) per token, and
                          its gradient E[-A_t grad log p_s(x_t)] is the reverse KL's (Thinking Machines' method);
                 exact    the reverse KL summed over the whole vocabulary at each of the student's sampled
                          positions, sum_v p_s(v) (log p_s(v) - log p_t(v)), differentiated directly (lower
                          variance; possible because the vocabularies match).
               The estimate is unbiased for sampling at temperature 1 and top-p 1 (--temperature, --top-p).

logit and on-policy compare the two models' distributions token by token, so they need a teacher and a student that
share a tokenizer: the two tokenizer.json vocabularies (token -> id, added tokens included) must be equal, else a
DistillError names both files. The distributions are compared over the tokenizer's ids (a model's output head may
have padding rows past them, as Qwen2's has; those are dropped).

The student: any checkpoint nanoseek loads (`--student`: a nanoseek run or checkpoint directory, a Hugging Face
Qwen2/Llama directory), or a fresh one of a preset (`--student-preset`, with the teacher's tokenizer). The demo
student is the `qwen2-small` preset pretrained on the built-in corpus with the teacher's tokenizer:
`nanoseek pretrain --preset qwen2-small --tokenizer TEACHER/tokenizer.json --out-dir runs/student`.

A run is resumable exactly (--resume): the shared Trainer's checkpoints hold the data position and RNG states; the
teacher's samples are drawn once and read back from out_dir/samples on a resume.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.checkpoint import CheckpointError, load_pretrained, resolve_checkpoint, tokenizer_files
from nanoseek.config import DENSE_PRESETS, PRESETS, ConfigError, get_preset, load_config, require
from nanoseek.data.problems import read_problems
from nanoseek.data.tokenizer import ASSISTANT, END_THINK, THINK, USER, Tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.eval import check_template, problem_prompt
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import DeepSeekV3
from nanoseek.model.dense import build_model
from nanoseek.model.losses import IGNORE_INDEX, forward_kl, reverse_kl
from nanoseek.options import add_dataclass_options, field_comments, from_args
from nanoseek.sample import STOP_STRINGS, SampleConfig, run_sample, summary_markdown
from nanoseek.train.grpo import GRPOLossConfig, ProblemStream, UserProblemStream, pack_sequences, policy_loss
from nanoseek.train.loop import (LossTerms, StepBatch, TrainConfig, Trainer, TrainingError, add_resume_option,
                                 length_buckets, load_start_model, padding_id, pick_device, resume_arguments,
                                 run_settings, steps_for_epochs)
from nanoseek.train.metrics import plot_run, read_metrics
from nanoseek.train.sft import (SFT_TRAIN_DEFAULTS, SFT_UNUSED_OPTIONS, SFTBatch, SFTConfig, SFTData, SFTStage,
                                chat_accuracy, heldout_loss, load_data)

METHODS = ("sft", "logit", "on-policy")
ON_POLICY_LOSSES = ("sampled", "exact")
DEFAULT_STUDENT = "runs/student"
STUDENT_PRESETS = (*DENSE_PRESETS, *PRESETS)
# The nested sampling options that are the run's own, not the user's: the teacher samples into out_dir/samples
# (replaced on a new run) with the run's seed and device.
SAMPLE_OWN_OPTIONS = ("model", "out_dir", "overwrite", "seed", "device")
SAMPLES_DIR = "samples"
# The tokens of the chat format the student is trained and asked in (sft's).
CHAT_TOKENS = (USER, ASSISTANT, THINK, END_THINK)
# On-policy distillation's policy gradient: GRPO's policy_loss at ratio 1, over all of a step's tokens.
POLICY_GRADIENT = GRPOLossConfig(aggregation="token")


class DistillError(NanoseekError, ValueError):
    pass


@dataclass
class DistillConfig:
    """The distillation stage's own options: teacher, student, method, the SFT arm's batches, and the teacher's
    sampling and rejection filter (`sample`: `nanoseek sample`'s options; the shared ones: TrainConfig)."""

    teacher: str = "runs/r1/all-scenario"  # the teacher: a checkpoint directory, or a run directory (its latest);
                                           # default: the final model of `nanoseek r1`
    student: str = DEFAULT_STUDENT  # the student to train: a checkpoint or run directory (a nanoseek model or a
                                    # Hugging Face Qwen2/Llama one); default: a `nanoseek pretrain --preset
                                    # qwen2-small --out-dir runs/student` run
    # start from a fresh student of this preset instead of --student (`nanoseek info --preset NAME`), with the
    # teacher's tokenizer (none: --student)
    student_preset: str | None = None
    method: Literal["sft", "logit", "on-policy"] = "sft"  # sft: fine-tune on the teacher's rejection-filtered
                               # samples (DeepSeek-R1); logit: KL from the teacher's next-token distributions on those
                               # samples; on-policy: the teacher scores the student's own samples (reverse KL)
    kd_temperature: float = 1.0  # logit: the temperature both distributions are softened by (the KL is scaled by
                                 # its square)
    ce_weight: float = 0.0  # logit: the share w of the cross-entropy in the loss (1 - w) T^2 KL + w CE
    on_policy_loss: Literal["sampled", "exact"] = "sampled"  # on-policy: sampled (a policy gradient with the
                               # per-token advantage log p_teacher - log p_student of the sampled token) or exact (the
                               # reverse KL over the whole vocabulary at each sampled position)
    batch_size: int = 16  # sft, logit: conversations per optimizer step; on-policy: prompts per step (each with
                          # --k samples)
    micro_batch_tokens: int = 512  # padded tokens per forward/backward (a step's rows sorted by length)
    seq_len: int = 512  # sft, logit: tokens per conversation at most (longer ones are skipped and counted)
    heldout_fraction: float = 0.05  # sft, logit: share of the kept samples held out for the held-out loss
    epochs: float = 0.0  # sft, logit: passes over the kept samples: > 0 sets max_steps (0: max_steps decides)
    eval_conversations: int = 256  # sft, logit: held-out conversations per held-out loss (0: all of them)
    eval_problems: int = 20  # built-in held-out problems per task for the student's greedy accuracy (in
                             # --template) before and after (0: skip)
    eval_max_new_tokens: int = 160  # the length limit of that check's completions
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sample, dict):  # read back from a run's run.json
            self.sample = SampleConfig(**self.sample)
        need = _need
        need(self, self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}")
        need(self, self.on_policy_loss in ON_POLICY_LOSSES, "on_policy_loss",
             f"must be one of {', '.join(ON_POLICY_LOSSES)}")
        need(self, self.kd_temperature > 0, "kd_temperature", "must be > 0")
        need(self, 0 <= self.ce_weight <= 1, "ce_weight", "must be in [0, 1]")
        need(self, 0 <= self.heldout_fraction < 1, "heldout_fraction", "must be in [0, 1)")
        for name in ("batch_size", "micro_batch_tokens", "seq_len", "eval_max_new_tokens"):
            need(self, getattr(self, name) > 0, name, "must be > 0")
        for name in ("epochs", "eval_conversations", "eval_problems"):
            need(self, getattr(self, name) >= 0, name, "must be >= 0")
        need(self, bool(self.teacher), "teacher", "must name the teacher's checkpoint or run directory")
        if self.student_preset is not None:
            need(self, self.student_preset in STUDENT_PRESETS, "student_preset",
                 f"unknown preset; choose one of: {', '.join(STUDENT_PRESETS)}")
            need(self, self.student in ("", DEFAULT_STUDENT), "student_preset",
                 f"starts a fresh student, and --student {self.student} names one to load: pass one of them")
            self.student = ""
        else:
            need(self, bool(self.student), "student", "must name a checkpoint or run directory (or pass "
                 "--student-preset)")
        if self.method == "on-policy":
            need(self, not self.epochs, "epochs", "counts passes over the teacher's samples; on-policy distillation "
                 "samples the student afresh each step: set --max-steps")
            for name in ("tasks", "instructions", "data"):
                need(self.sample, not getattr(self.sample, name), name,
                     "chooses the teacher's samples of --method sft or logit; on-policy distillation draws its "
                     "prompts as `nanoseek grpo` does (the built-in tasks, or --problems)")

    def sft_config(self, samples: Path) -> SFTConfig:
        """`nanoseek sft`'s settings for the student's fine-tuning on the kept samples (samples/data.jsonl)."""
        return SFTConfig(model=self.student, data=(str(samples),), heldout_fraction=self.heldout_fraction,
                         difficulty=self.sample.difficulty, seq_len=self.seq_len, batch_size=self.batch_size,
                         micro_batch_tokens=self.micro_batch_tokens, epochs=self.epochs,
                         eval_conversations=self.eval_conversations, eval_problems=self.eval_problems,
                         eval_max_new_tokens=self.eval_max_new_tokens)


def _need(config: Any, ok: bool, name: str, why: str) -> None:
    require(config, ok, name, why, kind="distill option")


# ---------------------------------------------------------------------- teacher and student
def checkpoint_with_tokenizer(source: str, role: str, hint: str) -> Path:
    """The checkpoint directory of source (a run's latest), checked to exist and to hold a tokenizer.json."""
    path = resolve_checkpoint(source)
    if not path.is_dir():
        raise DistillError(f"no {role} at {path}: pass --{role} a checkpoint directory or a training run's directory"
                           f" ({hint})")
    if not (path / "tokenizer.json").is_file():
        raise DistillError(f"the {role} checkpoint {path} has no tokenizer.json: distillation needs the {role}'s "
                           "tokenizer (a Hugging Face checkpoint's tokenizer.json, or the `model/` of a nanoseek "
                           "checkpoint, which holds it)")
    return path


def open_model(path: Path, role: str) -> DeepSeekV3:
    """The model of a checkpoint directory; a config or checkpoint it cannot load is an error naming its role."""
    try:
        return load_pretrained(path)
    except (ConfigError, CheckpointError) as e:
        raise DistillError(f"the {role}: {e}") from None


def check_config(path: Path, role: str) -> None:
    """Read config.json of a checkpoint (its model_type and shape are checked) without loading the weights."""
    try:
        load_config(path)
    except ConfigError as e:
        raise DistillError(f"the {role}: {e}") from None


def shared_vocabulary(teacher: Path, student: Path, method: str) -> int:
    """The size of the tokenizer teacher and student share (checkpoint directories); a DistillError when their
    tokenizer.json vocabularies (token -> id, added tokens included) differ."""
    vocabs = [HFTokenizer.from_file(str(path / "tokenizer.json")).get_vocab(with_added_tokens=True)
              for path in (teacher, student)]
    if vocabs[0] != vocabs[1]:
        example = next((t for t in sorted(vocabs[0]) if vocabs[1].get(t) != vocabs[0][t]), None) or \
            next(t for t in sorted(vocabs[1]) if t not in vocabs[0])
        raise DistillError(
            f"{method} distillation needs a teacher and a student that share a tokenizer, and the teacher's "
            f"{teacher / 'tokenizer.json'} ({len(vocabs[0])} tokens) and the student's {student / 'tokenizer.json'} "
            f"({len(vocabs[1])} tokens) differ (e.g. token {example!r}: id {vocabs[0].get(example)} and "
            f"{vocabs[1].get(example)}). Use --method sft (the student learns the teacher's text in its own "
            "tokens), or a student with the teacher's tokenizer (`nanoseek pretrain --tokenizer "
            f"{teacher / 'tokenizer.json'}`, or --student-preset)")
    return len(vocabs[0])


@dataclass
class Student:
    """Where the student starts: its checkpoint (None: a fresh preset), tokenizer, model, and the tokenizer files its
    checkpoints carry (checkpoint.tokenizer_files: the tokenizer, a Hugging Face checkpoint's chat template, ...)."""

    path: Path | None
    tokenizer: Tokenizer
    model: DeepSeekV3
    files: dict[str, Path]


def open_student(distill: DistillConfig, teacher: Path, seed: int) -> Student:
    """The student as the run starts it: loaded from --student, or a fresh --student-preset model of the teacher's
    tokenizer, initialised with the run's seed."""
    if distill.student_preset is None:
        path = checkpoint_with_tokenizer(distill.student, "student", "e.g. `nanoseek pretrain --preset qwen2-small "
                                         f"--tokenizer {teacher / 'tokenizer.json'} --out-dir {DEFAULT_STUDENT}`; or "
                                         "--student-preset")
        try:
            _, tokenizer, model = load_start_model(str(path), distill.seq_len, CHAT_TOKENS, DistillError, "auto")
        except (ConfigError, CheckpointError) as e:
            raise DistillError(f"the student: {e}") from None
        return Student(path, tokenizer, model, tokenizer_files(path))
    tokenizer = Tokenizer.load(teacher)
    for token in CHAT_TOKENS:
        tokenizer.token_id(token)
    config = get_preset(distill.student_preset).replace(vocab_size=tokenizer.vocab_size,
                                                        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    if distill.seq_len > config.max_position_embeddings:
        raise DistillError(f"seq_len {distill.seq_len} is longer than the {distill.student_preset} preset's context "
                           f"({config.max_position_embeddings} tokens)")
    torch.manual_seed(seed)
    return Student(None, tokenizer, build_model(config), tokenizer_files(teacher))


def frozen(model: DeepSeekV3, device: torch.device) -> DeepSeekV3:
    """The teacher as the losses use it: on the run's device, in eval mode, without gradients."""
    return model.to(device).eval().requires_grad_(False)


def check_heads(teacher: DeepSeekV3, student: DeepSeekV3, vocab: int) -> None:
    """Both output heads must cover the shared tokenizer's ids (they may have padding rows past them)."""
    for role, model in (("teacher", teacher), ("student", student)):
        if model.config.vocab_size < vocab:
            raise DistillError(f"the {role}'s output head has {model.config.vocab_size} rows, fewer than its "
                               f"tokenizer's {vocab} tokens; its config.json does not match its tokenizer")


# ---------------------------------------------------------------------- sft and logit: the teacher's samples
class DistillSFTStage(SFTStage):
    """--method sft: `nanoseek sft`'s stage on the teacher's kept samples, saved as a `distill` run."""

    name = "distill"

    def __init__(self, distill: DistillConfig, data: SFTData, samples: Path, model_config: Any, pad_id: int,
                 seed: int):
        super().__init__(data.train, data.heldout, distill.sft_config(samples), model_config, pad_id, seed)
        self.distill = distill

    def settings(self) -> dict[str, Any]:
        return asdict(self.distill)


class LogitDistillStage(DistillSFTStage):
    """--method logit: the SFT stage's batches (the kept samples, assistant tokens only), with the forward KL from the
    teacher's next-token distributions as the loss (see the module's docstring)."""

    def __init__(self, distill: DistillConfig, data: SFTData, samples: Path, model_config: Any, pad_id: int,
                 seed: int, teacher: DeepSeekV3, vocab: int):
        super().__init__(distill, data, samples, model_config, pad_id, seed)
        self.teacher, self.vocab = teacher, vocab
        self.has_mtp = False  # the KL has no MTP term

    def loss(self, model: DeepSeekV3, batch: SFTBatch) -> LossTerms:
        """The micro-batch's mean over its assistant tokens of (1 - w) T^2 KL(p_t || p_s) + w CE, weighted by its
        share of the step's assistant tokens (as SFT's loss)."""
        keep = batch.targets != IGNORE_INDEX
        student = model(batch.input_ids)[keep][:, :self.vocab]  # (assistant tokens, vocab)
        with torch.no_grad():
            teacher = self.teacher(batch.input_ids)[keep][:, :self.vocab]
        t, w = self.distill.kd_temperature, self.distill.ce_weight
        kl = forward_kl(student, teacher, t).mean()
        ce = F.cross_entropy(student.float(), batch.targets[keep])
        loss = (1 - w) * t * t * kl + w * ce
        stats = {"loss": float(loss.detach()) * batch.share, "kl": float(kl.detach()) * batch.share,
                 "lm_loss": float(ce.detach()) * batch.share}
        return LossTerms(loss * batch.share, stats)


def teacher_samples(distill: DistillConfig, train: TrainConfig, teacher: Path, resume: bool,
                    progress: bool) -> tuple[Path, dict[str, Any]]:
    """The teacher's kept samples (out_dir/samples/data.jsonl) and `nanoseek sample`'s summary of them: drawn and
    filtered by run_sample on a new run, read back on a resume."""
    out = Path(train.out_dir) / SAMPLES_DIR
    if resume:
        if not (out / "summary.json").is_file() or not (out / "data.jsonl").is_file():
            raise DistillError(f"{out} lacks the teacher's samples the run trained on (data.jsonl, summary.json); a "
                               "resume needs them to continue with the same data")
        return out / "data.jsonl", json.loads((out / "summary.json").read_text())
    cfg = replace(distill.sample, model=str(teacher), out_dir=str(out), overwrite=True, seed=train.seed,
                  device=train.device)
    summary = run_sample(cfg, progress=progress)
    if not summary["rows_written"]:
        reasons = ", ".join(f"{reason} {n}" for reason, n in summary["rejected"].items() if n)
        raise DistillError(f"the teacher's {summary['samples']} samples were all rejected ({reasons}; see "
                           f"{out / 'summary.md'}): nothing to distill. Check the teacher (`nanoseek eval --model "
                           f"{teacher} --template {cfg.template}`), or draw more (--k, --problems-per-task)")
    return out / "data.jsonl", summary


# ---------------------------------------------------------------------- on-policy: the student's own samples
def on_policy_advantages(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """The per-token advantage of on-policy distillation at the student's sampled tokens: -(log p_s(x_t) -
    log p_t(x_t)), the negative of the per-token reverse-KL estimate, detached (a reward, not a path for gradients):
    positive where the teacher finds the student's token likelier than the student does."""
    return (teacher_logp - student_logp).detach()


class OnPolicyStage:
    """--method on-policy: each step, the student samples k completions of each of batch_size prompts on the engine;
    the loss (in length-sorted micro-batches) scores the student's tokens with the teacher's log-probabilities (see
    the module's docstring), normalised by all of the step's completion tokens."""

    name = "distill"
    flops_per_token = None

    def __init__(self, distill: DistillConfig, tokenizer: Tokenizer, teacher: DeepSeekV3,
                 problems: ProblemStream | UserProblemStream, vocab: int):
        self.distill, self.tokenizer, self.teacher, self.problems, self.vocab = (distill, tokenizer, teacher,
                                                                                  problems, vocab)
        self.engine: Engine | None = None  # made on the first step, on the trainer's model and device
        self.step_size = (1, 1)  # (completions, completion tokens) of the step being trained

    def settings(self) -> dict[str, Any]:
        return asdict(self.distill)

    def _prompts(self, problems: list) -> list[list[int]]:
        return [problem_prompt(self.tokenizer, p, self.distill.sample.template) for p in problems]

    def next_batch(self, trainer: Trainer) -> StepBatch:
        if trainer.dp_size != 1:
            raise TrainingError("nanoseek distill runs in one process (its batches have no data-parallel split yet)")
        d, s, tok = self.distill, self.distill.sample, self.tokenizer
        if self.engine is None:
            users = self.problems.problems if isinstance(self.problems, UserProblemStream) else []
            longest = max([512, *map(len, self._prompts(users))])
            self.engine = Engine(trainer.model, max_batch=d.batch_size * s.k, max_len=longest + s.max_tokens,
                                 tokenizer=tok)
        start = time.perf_counter()
        prompts = self._prompts(self.problems.next_batch(d.batch_size))
        outs = self.engine.generate([p for p in prompts for _ in range(s.k)], SamplingParams(
            max_new_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, stop_ids=tok.stop_ids,
            stop_strings=STOP_STRINGS, seed=trainer.cfg.seed * 1_000_003 + trainer.step * 10_007))
        generated = time.perf_counter()
        rows = [(prompts[i // s.k], out.tokens) for i, out in enumerate(outs)]
        lengths = [len(out.tokens) for out in outs]
        self.step_size = (len(rows), max(1, sum(lengths)))
        micro = [pack_sequences([rows[i] for i in bucket], trainer.device)
                 for bucket in length_buckets([len(p) + len(c) for p, c in rows], d.micro_batch_tokens)]
        record = {"length_mean": sum(lengths) / len(lengths), "length_max": max(lengths),
                  "generation_time": generated - start}
        return StepBatch(micro, sum(len(p) + len(c) for p, c in rows), record)

    def loss(self, model: DeepSeekV3, micro_batch: tuple[torch.Tensor, torch.Tensor]) -> LossTerms:
        sequences, prompt_lens = micro_batch
        inputs, targets = sequences.clamp(min=0)[:, :-1], sequences[:, 1:]
        positions = torch.arange(1, sequences.shape[1], device=sequences.device)[None]
        # The student's sampled tokens: after the prompt, not padding, among the shared tokenizer's ids.
        mask = (positions >= prompt_lens[:, None]) & (targets >= 0) & (targets < self.vocab)
        index = targets.clamp(0, self.vocab - 1).unsqueeze(-1)
        student = model(inputs)[..., :self.vocab].float()
        with torch.no_grad():
            teacher = self.teacher(inputs)[..., :self.vocab].float()
        logp = F.log_softmax(student, dim=-1).gather(-1, index).squeeze(-1)
        teacher_logp = F.log_softmax(teacher, dim=-1).gather(-1, index).squeeze(-1)
        rows, tokens = self.step_size
        if self.distill.on_policy_loss == "sampled":
            loss, _ = policy_loss(logp, logp.detach(), on_policy_advantages(logp, teacher_logp), mask,
                                  POLICY_GRADIENT, batch=(rows, tokens))
        else:
            loss = (reverse_kl(student, teacher) * mask).sum() / tokens
        # Logged: the sampled reverse-KL estimate per token, and the student's next-token cross-entropy on its own
        # samples (the loss plot's).
        estimate = ((logp.detach() - teacher_logp) * mask).sum() / tokens
        nll = -(logp.detach() * mask).sum() / tokens
        return LossTerms(loss, {"loss": float(loss.detach()), "reverse_kl": float(estimate), "lm_loss": float(nll)})

    def evaluate(self, trainer: Trainer) -> None:
        return None  # the student's accuracy is the report's (and `nanoseek eval`'s)

    def state_dict(self) -> dict[str, Any]:
        return self.problems.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.problems.load_state_dict(state)


def prompt_stream(distill: DistillConfig, seed: int) -> ProblemStream | UserProblemStream:
    """On-policy distillation's prompts, as `nanoseek grpo` draws them: the user's problems (--problems) cycled in a
    seeded order, or fresh built-in training problems each step."""
    s = distill.sample
    if s.problems:
        return UserProblemStream(read_problems(s.problems), seed, s.problems)
    return ProblemStream(seed, s.difficulty or None)


# ---------------------------------------------------------------------- the command
# The shared options with fine-tuning's defaults (`nanoseek sft`'s).
DISTILL_TRAIN_DEFAULTS = replace(SFT_TRAIN_DEFAULTS, out_dir="runs/distill")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The distill command's options (`nanoseek distill`)."""
    add_resume_option(parser)
    add_dataclass_options(parser, DistillConfig, skip=("sample", "student_preset"))
    parser.add_argument("--student-preset", choices=STUDENT_PRESETS, default=None,
                        help=field_comments(DistillConfig)["student_preset"])
    sampling = parser.add_argument_group(
        "sampling", "sft, logit: the teacher's samples and `nanoseek sample`'s rejection filter of them; on-policy: "
        "the student's rollouts (--problems, --difficulty, --k, --template, --temperature, --top-p, --max-tokens)")
    add_dataclass_options(sampling, SampleConfig, skip=SAMPLE_OWN_OPTIONS)
    add_dataclass_options(parser, TrainConfig, skip=SFT_UNUSED_OPTIONS, defaults=DISTILL_TRAIN_DEFAULTS)


def arguments(args: argparse.Namespace) -> dict[str, Any]:
    """run_distill()'s keyword arguments from the parsed options."""
    if args.resume:
        return resume_arguments(args)
    sample = from_args(SampleConfig, args)
    sample = replace(sample, **{name: getattr(SampleConfig(), name) for name in SAMPLE_OWN_OPTIONS})
    distill = DistillConfig(**{**vars(from_args(DistillConfig, args)), "sample": sample})
    return {"distill": distill, "train": from_args(TrainConfig, args)}


def run_distill(distill: DistillConfig | None = None, train: TrainConfig | None = None, resume: bool = False,
                progress: bool = True, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """`nanoseek distill`: train the student on the teacher by distill.method; -> the report (or, when a signal
    stopped the run, the Trainer's result). resume: continue the run in train.out_dir with its own saved settings
    (changes: see run_settings)."""
    distill, train = run_settings("distill", DistillConfig, distill, train, resume, changes,
                                  defaults=DISTILL_TRAIN_DEFAULTS)
    teacher_path = checkpoint_with_tokenizer(distill.teacher, "teacher", "`nanoseek r1` writes runs/r1/all-scenario")
    check_config(teacher_path, "teacher")
    student = open_student(distill, teacher_path, train.seed)
    check_template(student.tokenizer, distill.sample.template)
    device = pick_device(train.device)
    vocab = teacher = None
    if distill.method != "sft":
        vocab = (shared_vocabulary(teacher_path, student.path, distill.method) if student.path is not None
                 else student.tokenizer.vocab_size)
        teacher = frozen(open_model(teacher_path, "teacher"), device)
        check_heads(teacher, student.model, vocab)
    pad_id = padding_id(student.tokenizer)
    summary = None
    if distill.method == "on-policy":
        stage = OnPolicyStage(distill, student.tokenizer, teacher, prompt_stream(distill, train.seed), vocab)
        data = None
    else:
        samples, summary = teacher_samples(distill, train, teacher_path, resume, progress)
        data = load_data(distill.sft_config(samples), student.tokenizer, train.seed)
        if not resume:
            train = steps_for_epochs(distill.epochs, len(data.train), distill.batch_size, train,
                                     DISTILL_TRAIN_DEFAULTS.max_steps, DistillError)
        stage = (DistillSFTStage(distill, data, samples, student.model.config, pad_id, train.seed)
                 if distill.method == "sft" else
                 LogitDistillStage(distill, data, samples, student.model.config, pad_id, train.seed, teacher, vocab))
    trainer = Trainer(student.model, stage, train, model_files=student.files)
    result = trainer.fit(progress=progress, resume=resume)
    if result["stopped"] is not None:
        return result
    before = open_student(distill, teacher_path, train.seed).model.to(device)
    return write_report(trainer, distill, train, before, student, data, summary, result["minutes"])


# ---------------------------------------------------------------------- the report
def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def write_report(trainer: Trainer, distill: DistillConfig, train: TrainConfig, before: DeepSeekV3, student: Student,
                 data: SFTData | None, summary: dict[str, Any] | None, minutes: float) -> dict[str, Any]:
    """report.json and report.md of a finished run: the training loss and KL terms over the first and the last 10
    steps (fewer in a short run), the held-out loss on the kept samples before and after (sft, logit), the student's
    greedy accuracy on built-in held-out problems before and after, the teacher's sampling summary (kept rate per
    task, rejection reasons)."""
    out = Path(train.out_dir)
    sft_cfg = distill.sft_config(out / SAMPLES_DIR / "data.jsonl")
    pad_id = padding_id(student.tokenizer)
    heldout = None
    if data is not None and data.heldout:
        heldout = {"before": heldout_loss(before, data.heldout, sft_cfg, pad_id, trainer.device),
                   "after": heldout_loss(trainer.model, data.heldout, sft_cfg, pad_id, trainer.device)}
    accuracy = None
    if distill.eval_problems and not distill.sample.problems:
        template = distill.sample.template
        accuracy = {"template": template,
                    "before": chat_accuracy(before, student.tokenizer, sft_cfg, train.seed, template),
                    "after": chat_accuracy(trainer.model, student.tokenizer, sft_cfg, train.seed, template)}
    records = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"]
    window = max(1, min(10, len(records) // 2))  # first and last steps, apart in a short run
    first, last = records[:window], records[-window:]
    terms = [k for k in ("loss", "kl", "lm_loss", "reverse_kl") if _mean(records, k) is not None]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    report = {"method": distill.method, "teacher": str(resolve_checkpoint(distill.teacher)),
              "student": str(student.path) if student.path else f"a fresh {distill.student_preset} (preset)",
              "steps": trainer.step, "seed": train.seed, "minutes_this_run": minutes,
              "train_window_steps": window, "train_first_steps": {k: _mean(first, k) for k in terms},
              "train_last_steps": {k: _mean(last, k) for k in terms},
              "conversations": None if data is None else {"train": len(data.train), "heldout": len(data.heldout),
                                                          "skipped_longer_than_seq_len": data.skipped},
              "heldout_loss": heldout, "accuracy": accuracy, "sampling": summary,
              "checkpoint": str(out / "checkpoints" / latest)}
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    plot_run(out)
    (out / "report.md").write_text(_report_markdown(report, out))
    return report


def _report_markdown(r: dict[str, Any], out: Path) -> str:
    how = {"sft": "fine-tuned on the teacher's rejection-filtered samples (DeepSeek-R1's distillation)",
           "logit": "trained on the KL from the teacher's next-token distributions on its rejection-filtered samples",
           "on-policy": "trained on its own samples, scored by the teacher (reverse KL)"}[r["method"]]
    rows = "\n".join(f"| {k} | {r['train_first_steps'][k]:.4f} | {r['train_last_steps'][k]:.4f} |"
                     for k in r["train_first_steps"])
    parts = [(f"# Distillation report\n\nThe student ({r['student']}) {how}: teacher `{r['teacher']}`, method "
              f"`{r['method']}`, {r['steps']} steps (seed {r['seed']}), {r['minutes_this_run']:.1f} minutes in this "
              f"run. Checkpoint: `{r['checkpoint']}`."),
             (f"Training, means over the first and the last {r['train_window_steps']} steps:\n\n"
              f"| value | first | last |\n|---|---|---|\n{rows}")]
    if r["heldout_loss"]:
        loss = r["heldout_loss"]
        parts.append(f"Held-out loss on the kept samples' assistant tokens: {loss['before']:.3f} before, "
                     f"{loss['after']:.3f} after ({r['conversations']['heldout']} conversations held out of "
                     f"{r['conversations']['train'] + r['conversations']['heldout']}).")
    if r["accuracy"]:
        acc = r["accuracy"]
        table = "\n".join(f"| {task} | {100 * acc['before']['per_task'][task]:.0f}% | {100 * a:.0f}% |"
                          for task, a in acc["after"]["per_task"].items())
        parts.append(f"The student's greedy accuracy on held-out problems (`--template {acc['template']}`):\n\n"
                     f"| task | before | after |\n|---|---|---|\n{table}\n"
                     f"| mean | {100 * acc['before']['mean']:.1f}% | {100 * acc['after']['mean']:.1f}% |\n"
                     f"| format | {100 * acc['before']['format']:.1f}% | {100 * acc['after']['format']:.1f}% |")
    if r["sampling"]:
        parts.append(summary_markdown(r["sampling"], out / SAMPLES_DIR).replace(
            "# Rejection sampling", "## The teacher's samples (`nanoseek sample`'s filter)", 1).strip())
    parts.append("![loss](plots/loss.png)")
    return "\n\n".join(parts) + "\n"
