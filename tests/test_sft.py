"""`nanoseek sft`: the assistant-only loss mask, padding that changes no conversation's loss, a step's gradient
independent of its micro-batches, bad chat data named by file and line, the command end to end with an exact
resume after SIGKILL, and the built-in cold-start conversations graded by the project's own checkers."""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_checkpoint, sigkill_once_logged, tiny_config, train_tokenizer, write_jsonl

from nanoseek.checkpoint import load_pretrained
from nanoseek.cli import main
from nanoseek.data import tasks
from nanoseek.data.chat import (
    ChatDataError,
    cold_start_conversations,
    cold_start_problems,
    encode_conversations,
    read_conversations,
)
from nanoseek.data.tokenizer import ASSISTANT, BOS, EOS, USER, apply_chat_template
from nanoseek.model import DeepSeekV3
from nanoseek.rewards import Sample, accuracy_reward, final_answer, format_reward
from nanoseek.train.loop import TrainingError
from nanoseek.train.metrics import read_metrics
from nanoseek.train.sft import SFT_TRAIN_DEFAULTS, Encoded, SFTConfig, SFTData, SFTStage, pad_batch, sft_trainer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("You are terse. What is the answer? Be brief, plus, is")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base"), tok)



# ---------------------------------------------------------------------- 1. the loss mask
@pytest.mark.parametrize("first_reply_reasons", [True, False])
def test_only_the_assistants_tokens_count(tok, first_reply_reasons):
    """system + user + assistant + user + assistant (reasoning inline in the last one, as reasoning_content in the
    first): the positions that count are exactly the last reply's (its reasoning, answer and end of sentence) and
    the first reply's when it is shown as written, i.e. unless its reasoning is dropped from the history (R1)."""
    first = {"role": "assistant", "content": "5"}
    if first_reply_reasons:
        first["reasoning_content"] = "2 plus 3 is 5"
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 3?"},
                first, {"role": "user", "content": "And 4 + 4?"},
                {"role": "assistant", "content": "<think>\n4 plus 4 is 8\n</think>\n\n8"}]
    last_reply = "<think>\n4 plus 4 is 8\n</think>\n\n8" + EOS
    text = (BOS + "You are terse." + USER + "What is 2 + 3?" + ASSISTANT + "5" + EOS + USER + "And 4 + 4?" +
            ASSISTANT + last_reply)
    assert apply_chat_template(messages, add_generation_prompt=False) == text  # the history shows the answer only
    (ids, mask), = encode_conversations(tok, [messages])
    assert ids == tok.encode(text)

    # Located independently: each reply's own encoding right after its <｜Assistant｜> tag.
    tags = [i for i, t in enumerate(ids) if t == tok.assistant_id]
    expected = set()
    for tag, reply, counts in zip(tags, ["5" + EOS, last_reply], [not first_reply_reasons, True]):
        reply_ids = tok.encode(reply)
        assert ids[tag + 1:tag + 1 + len(reply_ids)] == reply_ids
        if counts:
            expected |= set(range(tag + 1, tag + 1 + len(reply_ids)))
    assert {i for i, m in enumerate(mask) if m} == expected
    assert not any(mask[i] for i in tags)  # the <｜Assistant｜> tag itself never counts
    for part in ("You are terse.", "What is 2 + 3?", "And 4 + 4?"):  # nor system or user text
        part_ids = tok.encode(part)
        start = next(i for i in range(len(ids)) if ids[i:i + len(part_ids)] == part_ids)
        assert not any(mask[start:start + len(part_ids)])

    # The targets: position t predicts token t + 1, counted where that token is the assistant's.
    inputs, targets = pad_batch([(ids, mask)], pad_id=tok.pad_id)
    assert inputs[0].tolist() == ids[:-1]
    assert [t for t in range(len(ids) - 1) if targets[0, t] != -100] == sorted(i - 1 for i in expected)
    assert tok.decode(targets[0][targets[0] != -100].tolist()) == ("" if first_reply_reasons else "5" + EOS) + \
        last_reply


# ---------------------------------------------------------------------- 2. padding is exact
def row_losses(model, inputs, targets):
    logits = model(inputs).float()
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    valid = targets != -100
    return (per_token * valid).sum(1) / valid.sum(1)


def test_padded_rows_have_each_conversations_own_loss(tok):
    conversations = [c.messages for c in cold_start_conversations(5, seed=3)]
    conversations.append([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    rows = encode_conversations(tok, conversations)
    assert len({len(ids) for ids, _ in rows}) > 3  # really different lengths, so real padding
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(vocab_size=tok.vocab_size))
    with torch.no_grad():
        inputs, targets = pad_batch(rows, pad_id=tok.pad_id)
        together = row_losses(model, inputs, targets)
        alone = torch.cat([row_losses(model, *pad_batch([row], pad_id=tok.pad_id)) for row in rows])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
        # and the batch's loss is the mean over all of its assistant tokens
        out = model.compute_loss(inputs, targets, mtp_weight=0.0, balance_alpha=0.0)
        counts = (targets != -100).sum(1)
        assert float(out.lm_loss) == pytest.approx(float((alone * counts).sum() / counts.sum()), rel=1e-5)


# ---------------------------------------------------------------------- 3. micro-batches do not change the step
def encoded_rows(tok, n, seed=0, source="built-in"):
    return [Encoded(ids, mask, f"{source} #{i}") for i, (ids, mask) in
            enumerate(encode_conversations(tok, [c.messages for c in cold_start_conversations(n, seed=seed)]))]


def one_step_gradients(tok, rows, tmp_path, micro_batch_tokens):
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(vocab_size=tok.vocab_size))
    cfg = SFTConfig(batch_size=8, micro_batch_tokens=micro_batch_tokens, mtp_weight=0.3)
    train = replace(SFT_TRAIN_DEFAULTS, out_dir=str(tmp_path), tensorboard=False, grad_clip=1e9, device="cpu")
    trainer = sft_trainer(model, tok, SFTData(rows, [], {"train": 0, "heldout": 0}, None, False), cfg, train)
    trainer.optimizer.step = lambda: None  # keep the step's gradients for inspection
    trainer.optimizer.zero_grad = lambda set_to_none=True: None
    record = trainer.train_step()
    return record, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_a_steps_gradient_does_not_depend_on_its_micro_batches(tok, tmp_path):
    rows = encoded_rows(tok, 8)
    whole, grads = one_step_gradients(tok, rows, tmp_path / "a", 100_000)
    assert whole["micro_batches"] == 1
    for budget in (1, 300):  # a row per micro-batch; a few rows each
        split, split_grads = one_step_gradients(tok, rows, tmp_path / str(budget), budget)
        assert split["micro_batches"] > 1
        for key in ("loss", "lm_loss", "mtp_loss"):
            assert split[key] == pytest.approx(whole[key], rel=1e-5)
        assert split_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(split_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_refuses_other_training_data(tok):
    stage = SFTStage(encoded_rows(tok, 6), [], SFTConfig(), tiny_config(vocab_size=tok.vocab_size), tok.pad_id)
    stage.order.next(4)
    state = stage.state_dict()
    other = SFTStage(encoded_rows(tok, 6, seed=1), [], SFTConfig(), tiny_config(vocab_size=tok.vocab_size),
                     tok.pad_id)
    with pytest.raises(TrainingError, match="training conversations differ from the run's"):
        other.load_state_dict(state)
    again = SFTStage(encoded_rows(tok, 6), [], SFTConfig(), tiny_config(vocab_size=tok.vocab_size), tok.pad_id)
    again.load_state_dict(state)
    assert again.order.next(5) == stage.order.next(5)  # the same order on from the cursor, across the epoch's end


# ---------------------------------------------------------------------- 4. bad input
GOOD = {"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]}


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ('{"text": "hello"}', 'expected a JSON object with a "messages" list'),
    ({"messages": []}, 'expected a non-empty "messages" list'),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]},
     "message 1 has unknown role 'tool'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
     "message 1 is an empty assistant turn"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]},
     "no assistant turn: nothing to learn from"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                   {"role": "user", "content": "z"}]}, "the last message is a user message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]},
     "message 1 (assistant): content must be a string, got int"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "<think>y"}]},
     "message 1: the content opens <think> but never closes it"),
])
def test_bad_conversations_are_named_by_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, "", line, GOOD])  # the bad one is on line 3
    with pytest.raises(ChatDataError) as error:
        read_conversations([path])
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)


def test_bad_data_is_a_message_from_the_command(base, tmp_path, capsys):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, {"messages": [{"role": "bot", "content": "x"}]}])
    assert main(["sft", "--model", str(base), "--data", str(path), "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"nanoseek: error: {path}:2: message 0 has unknown role 'bot'" in err and "Traceback" not in err
    assert main(["sft", "--model", str(base), "--data", str(tmp_path / "missing.jsonl"),
                 "--out-dir", str(tmp_path / "run")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_conversations_longer_than_seq_len_are_skipped_and_counted(base, tmp_path, capsys):
    long = {"messages": [{"role": "user", "content": "What is 1 + 1? " * 30}, {"role": "assistant", "content": "2"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD] * 6 + [long] + [GOOD] * 3)
    args = ["sft", "--model", str(base), "--data", str(path), "--seq-len", "64", "--max-steps", "1",
            "--heldout-fraction", "0", "--no-tensorboard", "--out-dir", str(tmp_path / "run")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert (f"warning: skipped 1 training and 0 held-out conversations longer than seq_len=64 tokens (the first: "
            f"{path}:7") in err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["conversations"]["train"] == 9
    assert report["conversations"]["skipped_longer_than_seq_len"] == {"train": 1, "heldout": 0}
    assert main([*args[:-1], str(tmp_path / "run2"), "--seq-len", "8"]) == 2
    assert "all 10 training conversations are longer than seq_len=8 tokens" in capsys.readouterr().err


# ---------------------------------------------------------------------- 5. the command, and resume after a crash
def test_sft_command_runs_and_resumes_exactly_after_sigkill(base, tmp_path, capsys):
    conversations = cold_start_conversations(24, seed=5)
    rows = []
    for i, c in enumerate(conversations):  # half with inline reasoning, half with reasoning_content
        user, reply = c.messages
        if i % 2:
            reply = {"role": "assistant", "content": f"<think>\n{reply['reasoning_content']}\n</think>\n\n"
                                                     f"{reply['content']}"}
        rows.append({"messages": [user, reply]})
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    args = ["sft", "--model", str(base), "--data", str(data), "--seq-len", "256", "--batch-size", "4",
            "--micro-batch-tokens", "256", "--heldout-fraction", "0.2", "--max-steps", "12", "--save-every", "2",
            "--eval-every", "6", "--lr", "3e-3", "--warmup-steps", "1", "--no-tensorboard"]
    straight = tmp_path / "straight"
    assert main([*args, "--out-dir", str(straight)]) == 0
    assert f"report: {straight}/report.md" in capsys.readouterr().out
    run = json.loads((straight / "run.json").read_text())
    assert run["stage"] == "sft" and run["sft"]["batch_size"] == 4 and run["train"]["max_steps"] == 12
    report = json.loads((straight / "report.json").read_text())
    assert report["steps"] == 12 and report["conversations"]["heldout"] == 5 and report["chat_accuracy"] is None
    assert report["heldout_loss"]["after"] < report["heldout_loss"]["before"]
    assert (straight / "report.md").is_file() and (straight / "plots" / "loss.png").is_file()
    assert (straight / "checkpoints" / "step_000012" / "model" / "tokenizer.json").is_file()

    crashed = tmp_path / "crashed"  # killed in a child process once step 5 is logged, with no chance to save
    assert sigkill_once_logged([*args, "--out-dir", str(crashed)], crashed / "metrics.jsonl", 5) == -signal.SIGKILL
    last = int((crashed / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 4 <= last < 12  # it died between checkpoints, before the end
    assert main(["sft", "--resume", "--out-dir", str(crashed)]) == 0  # the run's own settings, from run.json

    def losses(out):
        return [(r["kind"], r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl")]
    assert losses(crashed) == losses(straight) and len(losses(straight)) == 14  # 12 steps, 2 held-out losses
    final = [load_pretrained(out / "checkpoints" / "step_000012" / "model").state_dict() for out in
             (straight, crashed)]
    for name, value in final[0].items():
        assert torch.equal(final[1][name], value), name


def test_sft_on_the_builtin_data_reports_the_chat_format_accuracy(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sft", "--model", str(base), "--builtin-conversations", "40", "--max-steps", "2", "--batch-size",
                 "4", "--eval-problems", "1", "--eval-max-new-tokens", "4", "--no-tensorboard",
                 "--out-dir", str(out)]) == 0
    assert "greedy chat-format accuracy" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == "built-in cold-start conversations" and report["conversations"]["heldout"] == 2
    assert set(report["chat_accuracy"]["after"]["per_task"]) == set(tasks.TASKS)


def test_the_checkpoints_chat_template_and_generation_settings_survive_fine_tuning(base, tmp_path):
    from nanoseek.checkpoint import resolve_checkpoint

    start = tmp_path / "hf"
    shutil.copytree(base, start)
    extra = {"chat_template.jinja": "{{ bos_token }}{% for m in messages %}{{ m.content }}<｜end▁of▁sentence｜>{% endfor %}",
             "generation_config.json": '{"temperature": 0.6, "top_p": 0.95}'}
    for name, text in extra.items():
        (start / name).write_text(text)
    out = tmp_path / "run"
    assert main(["sft", "--model", str(start), "--builtin-conversations", "20", "--max-steps", "1", "--batch-size",
                 "2", "--eval-problems", "0", "--no-tensorboard", "--out-dir", str(out)]) == 0
    model_dir = resolve_checkpoint(out)
    for name, text in extra.items():
        assert (model_dir / name).read_text() == text, name


# ---------------------------------------------------------------------- 6. the built-in cold-start data
def test_cold_start_conversations_parse_render_and_grade(tok, tmp_path):
    conversations = cold_start_conversations(70, seed=1)
    problems = cold_start_problems(70, seed=1)
    assert {p.task for p in problems} == set(tasks.TASKS)
    path = write_jsonl(tmp_path / "cold.jsonl", [{"messages": c.messages} for c in conversations])
    assert [c.messages for c in read_conversations([path])] == [c.messages for c in conversations]
    encoded = encode_conversations(tok, [c.messages for c in conversations])
    for conversation, problem, (ids, mask) in zip(conversations, problems, encoded):
        text = apply_chat_template(conversation.messages, add_generation_prompt=False)
        assert tok.decode(ids) == text and ids == tok.encode(text)  # encoding piece by piece round-trips
        prompt = apply_chat_template(conversation.messages[:1])  # what the engine is given at inference
        assert text.startswith(prompt) and prompt.endswith(ASSISTANT + "<think>\n")
        completion = text[len(prompt):].removesuffix(EOS)  # what the model learns to write after it
        sample = Sample(problem, completion)
        assert tasks.check_answer(problem, final_answer(completion))
        assert accuracy_reward(sample) == 1.0 and format_reward(sample) == 1.0
        assert problem.question in text and problem.steps in completion
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == "<think>\n" + completion + EOS
    heldout = cold_start_problems(70, seed=1, split="heldout")
    assert not {p.question for p in heldout} & {p.question for p in problems}
    assert cold_start_conversations(70, seed=1) == conversations  # deterministic
