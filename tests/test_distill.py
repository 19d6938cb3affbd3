"""`nanoseek distill`: the KL losses and the on-policy advantage against hand-worked values, each method end to end on
tiny models (a tiny DeepSeek-V3 teacher, a qwen2-tiny student) with its checkpoint and report, an exact resume after a
crash, and the bad inputs: differing tokenizers, an unsupported model_type, head counts that do not divide, a
checkpoint without a tokenizer, contradictory options."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import crash_training_at, save_tiny_checkpoint, train_tokenizer

import nanoseek.sample as sampling
from nanoseek.checkpoint import load_pretrained, save_pretrained
from nanoseek.cli import build_parser, main
from nanoseek.config import get_preset
from nanoseek.model.dense import build_model
from nanoseek.model.losses import forward_kl, reverse_kl
from nanoseek.sample import Drawn
from nanoseek.eval import problem_prompt
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.train.distill import POLICY_GRADIENT, DistillConfig, OnPolicyStage, on_policy_advantages
from nanoseek.train.grpo import ProblemStream, pack_sequences, policy_loss
from nanoseek.train.loop import Trainer
from nanoseek.train.metrics import read_metrics

TEACHER_P = [0.6, 0.3, 0.1]
STUDENT_P = [0.2, 0.4, 0.4]


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) in float64, by the definition."""
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def tempered(p: list[float], t: float) -> list[float]:
    """softmax(log p / t): p^(1/t), normalised."""
    w = [a ** (1 / t) for a in p]
    return [a / sum(w) for a in w]


# ---------------------------------------------------------------------- 1. the losses by hand
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_of_two_tiny_distributions(temperature):
    student = torch.tensor(STUDENT_P).log().requires_grad_()
    teacher = torch.tensor(TEACHER_P).log() + 3.0  # a shift of the logits is the same distribution
    value = forward_kl(student, teacher, temperature)
    t, s = tempered(TEACHER_P, temperature), tempered(STUDENT_P, temperature)
    assert float(value.detach()) == pytest.approx(kl(t, s), rel=1e-6)
    if temperature == 1.0:
        # 0.6 ln 3 + 0.3 ln 0.75 + 0.1 ln 0.25, worked by hand
        assert float(value.detach()) == pytest.approx(0.6 * math.log(3) + 0.3 * math.log(0.75) + 0.1 * math.log(0.25))
    value.backward()  # d KL(t || s) / d student logits = (s - t) / temperature
    expected = [(b - a) / temperature for a, b in zip(t, s)]
    torch.testing.assert_close(student.grad, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_reverse_kl_of_two_tiny_distributions():
    student = torch.tensor(STUDENT_P).log().requires_grad_()
    teacher = torch.tensor(TEACHER_P).log()
    value = reverse_kl(student, teacher)
    # 0.2 ln(1/3) + 0.4 ln(4/3) + 0.4 ln 4, worked by hand; not the forward KL
    assert float(value.detach()) == pytest.approx(0.2 * math.log(1 / 3) + 0.4 * math.log(4 / 3) + 0.4 * math.log(4))
    assert float(value.detach()) == pytest.approx(kl(STUDENT_P, TEACHER_P), rel=1e-6)
    assert abs(float(value.detach()) - kl(TEACHER_P, STUDENT_P)) > 0.01  # 0.450 against the forward KL's 0.434
    value.backward()  # d KL(s || t) / d z_v = s_v (log s_v - log t_v - KL)
    expected = [s * (math.log(s / t) - kl(STUDENT_P, TEACHER_P)) for s, t in zip(STUDENT_P, TEACHER_P)]
    torch.testing.assert_close(student.grad, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_the_losses_are_per_position_and_zero_for_equal_distributions():
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    for loss in (forward_kl, reverse_kl):
        out = loss(logits, logits)
        assert out.shape == (2, 3) and out.dtype == torch.float64 and out.abs().max() < 1e-12
        other = torch.randn(2, 3, 5, dtype=torch.float64)
        assert (loss(logits, other) > 0).all()


def test_the_on_policy_advantage_and_its_policy_gradient():
    """A token the student gives 0.5 and the teacher 0.25: the student is too sure of it, advantage ln(0.25/0.5) =
    -ln 2 < 0; one the teacher gives 0.8 and the student 0.2: +ln 4. The policy-gradient loss (GRPO's at ratio 1,
    per-token advantages, over all tokens) is the mean of log p_s - log p_t over the sampled tokens (padding
    masked), and its gradient on log p_s(x_t) is -A_t / tokens: up where the teacher likes the token better."""
    student = torch.tensor([[0.5, 0.2, 0.9]]).log().requires_grad_()
    teacher = torch.tensor([[0.25, 0.8, 0.1]]).log()
    mask = torch.tensor([[True, True, False]])
    advantage = on_policy_advantages(student, teacher)
    assert not advantage.requires_grad
    torch.testing.assert_close(advantage[0, :2], torch.tensor([-math.log(2), math.log(4)]))
    loss, _ = policy_loss(student, student.detach(), advantage, mask, POLICY_GRADIENT, batch=(1, 2))
    assert float(loss.detach()) == pytest.approx((math.log(2) - math.log(4)) / 2)  # the sampled reverse-KL estimate
    loss.backward()
    torch.testing.assert_close(student.grad, torch.tensor([[math.log(2) / 2, -math.log(4) / 2, 0.0]]))


# ---------------------------------------------------------------------- fixtures: a teacher and students
@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("So the answer is")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tok):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("teacher"), tok)


def save_student(path, tokenizer, **changes):
    """A random qwen2-tiny of the tokenizer's vocabulary, with the tokenizer, as a checkpoint directory."""
    torch.manual_seed(1)
    config = get_preset("qwen2-tiny").replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                              eos_token_id=tokenizer.eos_id, **changes)
    save_pretrained(build_model(config), path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory, tok):
    return save_student(tmp_path_factory.mktemp("student"), tok)


@pytest.fixture(scope="module")
def foreign_student(tmp_path_factory):
    """A student of another tokenizer (trained on other text)."""
    return save_student(tmp_path_factory.mktemp("foreign"), train_tokenizer("Lorem ipsum dolor sit amet " * 40))


def teacher_answers(model, tokenizer, problems, cfg, progress=False):
    """A teacher that knows the answers: per problem its worked steps and answer, once right and once wrong."""
    samples = []
    for i, p in enumerate(problems):
        right = f"{p.steps}\nSo the answer is {p.answer}.\n</think>\n\n<answer>{p.answer}</answer>"
        samples += [Drawn(i, right, 30), Drawn(i, right.replace(f"<answer>{p.answer}", "<answer>x"), 30)]
    return samples[:len(problems) * cfg.k]


@pytest.fixture
def right_teacher(monkeypatch):
    monkeypatch.setattr(sampling, "draw", teacher_answers)


COMMON = ["--max-steps", "6", "--lr", "3e-3", "--warmup-steps", "1", "--eval-problems", "1",
          "--eval-max-new-tokens", "4", "--no-tensorboard"]
SAMPLED = ["--problems-per-task", "2", "--k", "2", "--batch-size", "4", "--heldout-fraction", "0.15"]
ON_POLICY = ["--method", "on-policy", "--k", "2", "--batch-size", "2", "--max-tokens", "8", "--temperature", "1",
             "--top-p", "1", "--lr", "1e-2"]


def train_losses(out, key="loss"):
    return [r[key] for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"]


# ---------------------------------------------------------------------- 2. each method end to end
def test_sft_distills_the_kept_samples_into_a_student_of_another_tokenizer(teacher, foreign_student, right_teacher,
                                                                         tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--student", str(foreign_student), *SAMPLED, *COMMON,
                 "--out-dir", str(out)]) == 0, capsys.readouterr().err
    assert f"report: {out}/report.md" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    sampled = report["sampling"]
    assert (sampled["samples"], sampled["kept"], sampled["rejected"]["wrong"]) == (28, 14, 14)
    assert set(sampled["per_task"]) == set(sampling.tasks.TASKS) and sampled["kept_rate"] == 0.5
    assert report["conversations"]["train"] + report["conversations"]["heldout"] == 14
    assert report["train_last_steps"]["loss"] < report["train_first_steps"]["loss"]
    assert report["heldout_loss"]["after"] < report["heldout_loss"]["before"]
    assert set(report["accuracy"]["after"]["per_task"]) == set(sampling.tasks.TASKS)
    markdown = (out / "report.md").read_text()
    assert "The teacher's samples" in markdown and "| total | 14 | 14 | 28 | 14 | 50.0% |" in markdown
    model_dir = out / "checkpoints" / "step_000006" / "model"
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen2"
    assert (model_dir / "tokenizer.json").read_text() == (foreign_student / "tokenizer.json").read_text()
    assert json.loads((out / "run.json").read_text())["distill"]["method"] == "sft"


def test_logit_distillation_from_a_fresh_preset_student(teacher, tok, right_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher), "--student-preset", "qwen2-tiny", "--method", "logit",
            "--kd-temperature", "2", *SAMPLED, *COMMON]
    assert main([*args, "--out-dir", str(out)]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["student"] == "a fresh qwen2-tiny (preset)"
    first, last = report["train_first_steps"], report["train_last_steps"]
    assert last["kl"] < first["kl"] and last["loss"] < first["loss"]
    assert report["heldout_loss"] is not None and report["sampling"]["kept"] == 14
    model = load_pretrained(out / "checkpoints" / "step_000006" / "model")
    assert model.config.vocab_size == tok.vocab_size and model.config.num_key_value_heads == 2

    mixed = tmp_path / "mixed"  # the loss is (1 - w) T^2 KL + w CE
    assert main([*args, "--ce-weight", "0.25", "--max-steps", "2", "--out-dir", str(mixed)]) == 0
    records = [r for r in read_metrics(mixed / "metrics.jsonl") if r.get("kind") == "train"]
    for record in read_metrics(out / "metrics.jsonl")[:2] + records:
        if record.get("kind") == "train":
            w = 0.25 if record in records else 0.0
            assert record["loss"] == pytest.approx((1 - w) * 4 * record["kl"] + w * record["lm_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def near_teacher(tmp_path_factory, student):
    """The student with its output head moved by noise: a teacher the student can match exactly."""
    model = load_pretrained(student)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.lm_head.weight.add_(0.3 * torch.randn(model.lm_head.weight.shape, generator=gen))
    path = tmp_path_factory.mktemp("near_teacher")
    save_pretrained(model, path)
    return path


def test_exact_on_policy_distillation_lowers_the_reverse_kl(near_teacher, student, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(near_teacher), "--student", str(student), *COMMON, *ON_POLICY,
                 "--on-policy-loss", "exact", "--k", "8", "--batch-size", "4", "--lr", "3e-3", "--max-steps", "10",
                 "--out-dir", str(out)]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["sampling"] is None and report["heldout_loss"] is None and report["train_window_steps"] == 5
    first, last = report["train_first_steps"], report["train_last_steps"]
    assert last["reverse_kl"] < 0.9 * first["reverse_kl"] and last["loss"] < 0.9 * first["loss"]
    assert (out / "checkpoints" / "step_000010" / "model" / "tokenizer.json").is_file()


def test_the_sampled_loss_is_the_reverse_kl_estimate(teacher, student, tmp_path, capsys):
    """A short run of the policy-gradient form: each step's loss is its sampled reverse-KL estimate (and the estimate
    is the exact reverse KL's: next test)."""
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--student", str(student), *COMMON, *ON_POLICY,
                 "--max-steps", "3", "--out-dir", str(out)]) == 0, capsys.readouterr().err
    records = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"]
    assert len(records) == 3 and all(r["loss"] == pytest.approx(r["reverse_kl"], rel=1e-5) for r in records)
    assert json.loads((out / "run.json").read_text())["distill"]["on_policy_loss"] == "sampled"


def test_the_sampled_estimate_and_gradient_agree_with_the_exact_reverse_kl(near_teacher, student, tok):
    """On 256 of the student's samples the sampled loss (mean of log p_s - log p_t over sampled tokens) is within 5%
    of the exact reverse KL averaged over the same positions, and the two losses' gradients point the same way."""
    model, teacher = load_pretrained(student), load_pretrained(near_teacher).eval().requires_grad_(False)
    prompts = [problem_prompt(tok, p, "chat") for p in ProblemStream(0, 1).next_batch(4)]
    engine = Engine(model, max_batch=256, max_len=600, tokenizer=tok)
    outs = engine.generate([p for p in prompts for _ in range(64)],
                           SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=1))
    batch = pack_sequences([(prompts[i // 64], o.tokens) for i, o in enumerate(outs)], "cpu")
    values, grads = {}, {}
    for loss in ("sampled", "exact"):
        config = DistillConfig(method="on-policy", on_policy_loss=loss)
        stage = OnPolicyStage(config, tok, teacher, ProblemStream(0, 1), tok.vocab_size)
        stage.step_size = (len(outs), sum(len(o.tokens) for o in outs))
        model.zero_grad()
        terms = stage.loss(model, batch)
        terms.loss.backward()
        values[loss] = float(terms.loss.detach())
        grads[loss] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert values["sampled"] == pytest.approx(values["exact"], rel=0.05) and values["exact"] > 1
    cosine = grads["sampled"] @ grads["exact"] / (grads["sampled"].norm() * grads["exact"].norm())
    assert cosine > 0.3


# ---------------------------------------------------------------------- 3. resume after a crash
@pytest.mark.parametrize("method", ["logit", "on-policy"])
def test_distill_resumes_exactly_after_a_crash(teacher, student, right_teacher, tmp_path, monkeypatch, method,
                                               capsys):
    args = ["distill", "--teacher", str(teacher), "--student", str(student), *COMMON, "--save-every", "2",
            "--eval-every", "3", "--eval-problems", "0"]
    args += [*SAMPLED, "--method", "logit"] if method == "logit" else [*ON_POLICY, "--on-policy-loss", "exact"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main([*args, "--out-dir", str(straight)]) == 0, capsys.readouterr().err
    real = crash_training_at(monkeypatch, 3)  # past the step-2 checkpoint, before the next: nothing more is saved
    assert main([*args, "--out-dir", str(crashed)]) == 130
    assert (crashed / "checkpoints" / "latest").read_text() == "step_000002"
    monkeypatch.setattr(Trainer, "train_step", real)
    monkeypatch.setattr(sampling, "draw", None)  # a resume reads the teacher's samples back, never draws again
    assert main(["distill", "--resume", "--out-dir", str(crashed)]) == 0, capsys.readouterr().err

    def losses(out):
        return [(r["kind"], r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl")]
    assert losses(crashed) == losses(straight) and len(losses(straight)) >= 6
    final = [load_pretrained(out / "checkpoints" / "step_000006" / "model").state_dict() for out in
             (straight, crashed)]
    for name, value in final[0].items():
        assert torch.equal(final[1][name], value), name


# ---------------------------------------------------------------------- 4. bad input
@pytest.mark.parametrize("method", ["logit", "on-policy"])
def test_a_student_of_another_tokenizer_is_refused_for_logit_and_on_policy(teacher, foreign_student, method,
                                                                           tmp_path, capsys):
    assert main(["distill", "--teacher", str(teacher), "--student", str(foreign_student), "--method", method,
                 "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (f"nanoseek: error: {method} distillation needs a teacher and a student that share a tokenizer, and the "
            f"teacher's {teacher / 'tokenizer.json'} (") in err
    assert f"the student's {foreign_student / 'tokenizer.json'} (" in err and "Use --method sft" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints").exists()


def test_an_unsupported_model_type_lists_the_supported_ones(teacher, student, tmp_path, capsys):
    bad = tmp_path / "mistral"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (bad / name).write_bytes((student / name).read_bytes())
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    for role, args in (("teacher", ["--teacher", str(bad), "--student", str(student)]),
                       ("student", ["--teacher", str(teacher), "--student", str(bad)])):
        assert main(["distill", *args, "--out-dir", str(tmp_path / "run")]) == 2
        assert (f"nanoseek: error: the {role}: {bad / 'config.json'}: config.json has model_type 'mistral', which nanoseek does not "
                "support; supported are deepseek_v3, deepseek_v2, kimi_k2, qwen2, llama") in capsys.readouterr().err


def test_head_counts_that_do_not_divide_name_the_field(teacher, tok, tmp_path, capsys):
    bad = save_student(tmp_path / "bad", tok)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    assert main(["distill", "--teacher", str(teacher), "--student", str(bad), "--out-dir", str(tmp_path / "r")]) == 2
    assert (f"nanoseek: error: the student: {bad / 'config.json'}: invalid config field 'num_key_value_heads' = 3: must divide "
            "num_attention_heads=4") in capsys.readouterr().err


def test_a_checkpoint_without_a_tokenizer_is_named(teacher, student, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((student / name).read_bytes())
    for role, args in (("teacher", ["--teacher", str(bare), "--student", str(student)]),
                       ("student", ["--teacher", str(teacher), "--student", str(bare)])):
        assert main(["distill", *args, "--out-dir", str(tmp_path / "run")]) == 2
        assert (f"nanoseek: error: the {role} checkpoint {bare} has no tokenizer.json: distillation needs the "
                f"{role}'s tokenizer") in capsys.readouterr().err
    assert main(["distill", "--teacher", str(teacher), "--student", str(tmp_path / "absent"), "--out-dir",
                 str(tmp_path / "run")]) == 2
    assert (f"no student at {tmp_path / 'absent'}: pass --student a checkpoint directory or a training run's "
            "directory (e.g. `nanoseek pretrain --preset qwen2-small") in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--student-preset", "qwen2-tiny", "--student", "x"],
     "'student_preset' = 'qwen2-tiny': starts a fresh student, and --student x names one to load"),
    (["--student-preset", "gpt2"], "argument --student-preset: invalid choice: 'gpt2'"),
    (["--method", "on-policy", "--epochs", "1"], "'epochs' = 1.0: counts passes over the teacher's samples"),
    (["--method", "on-policy", "--tasks", "addition"], "'tasks' = ('addition',): chooses the teacher's samples"),
    (["--ce-weight", "1.5"], "invalid distill option 'ce_weight' = 1.5: must be in [0, 1]"),
    (["--kd-temperature", "0"], "invalid distill option 'kd_temperature' = 0.0: must be > 0"),
    (["--method", "reverse"], "argument --method: invalid choice: 'reverse'"),
])
def test_bad_options_exit_2_with_a_message(args, message, tmp_path, capsys):
    assert main(["distill", *args, "--out-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_methods_and_defaults():  # every option's help line: tests/test_cli.py
    text = build_parser()._subparsers._group_actions[0].choices["distill"].format_help()
    assert "--method {sft,logit,on-policy}" in text and "--on-policy-loss {sampled,exact}" in text
    assert "(default: runs/r1/all-scenario)" in text and "(default: runs/student)" in text
