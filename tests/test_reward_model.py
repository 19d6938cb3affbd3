"""`nanoseek rm`: the Bradley-Terry loss by hand, a reward read at each row's last real token (padding and
micro-batches change nothing), the GRPO reward that judges only the text after </think>, bad preference files named
by file and line, the built-in pairs, the command learning an easy preference with an exact resume after SIGKILL,
and its options."""

from __future__ import annotations

import json
import math
import random
import signal
from dataclasses import replace

import pytest
import torch
from conftest import save_tiny_checkpoint, sigkill_once_logged, tiny_config, train_tokenizer, write_jsonl
from safetensors.torch import load_file

from nanoseek.checkpoint import load_pretrained
from nanoseek.cli import main
from nanoseek.data import tasks
from nanoseek.data.chat import check_instruction
from nanoseek.data.preferences import (REJECTED_KINDS, PreferenceDataError, builtin_pairs, final_summary,
                                       read_pairs)
from nanoseek.model import DeepSeekV3
from nanoseek.model.losses import bradley_terry_loss
from nanoseek.rewards import RewardSet, Sample, reward_model_reward
from nanoseek.train.loop import TrainingError
from nanoseek.train.metrics import read_metrics
from nanoseek.train.reward_model import (HEAD_FILE, RM_TRAIN_DEFAULTS, RewardModel, RMConfig, RMData, RMError,
                                         RMStage, encode_pairs, load_reward_model, new_head, rm_trainer)

WORDS = "What is the answer? please Say hello to Repeat after me last word of Write number in words capital letters"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(WORDS)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base"), tok)


# ---------------------------------------------------------------------- 1. the loss and the reward
def test_bradley_terry_loss_by_hand():
    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]))
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-7)  # 0.31326...
    assert float(loss) == pytest.approx(0.3132617, abs=1e-7)
    chosen = torch.tensor([1.0, 0.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, torch.tensor([0.0, 1.0]))  # one pair ranked right, one wrong: the mean
    assert float(loss.detach()) == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2,
                                                 abs=1e-6)
    loss.backward()  # d/d r_chosen = -sigmoid(r_rejected - r_chosen) / pairs
    torch.testing.assert_close(chosen.grad, -torch.sigmoid(torch.tensor([-1.0, 1.0])) / 2)


def random_reward_model(tok) -> RewardModel:
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(vocab_size=tok.vocab_size))
    return RewardModel(model, new_head(model.config.hidden_size, seed=0), tok, max_tokens=64)


def test_a_reward_does_not_depend_on_its_batch_or_padding(tok):
    rm = random_reward_model(tok)
    prompts = ["Say hello to Ada.", "What is the last word of: apple river stone", "Write the number 42 in words."]
    responses = ["Hello, Ada!", "stone", "There are a few ways to look at this. The answer is forty-two. " * 3]
    together = rm.score(prompts, responses)  # several micro-batches of 64 padded tokens, rows of different lengths
    alone = [rm.score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(together)) == 3 and rm.score([], []) == []
    assert rm.model.training and rm.head.training  # scored in eval mode, and the modes given back


def test_the_reward_model_reward_reads_only_the_summary(tok):
    rm = random_reward_model(tok)
    reward = reward_model_reward(rm)
    problem = tasks.Problem("greeting", "Say hello to Ada.", "Hello, Ada!", "", 1)
    first = Sample(problem, "I should greet Ada warmly.\n</think>\n\nHello, Ada!")
    second = Sample(problem, "<think>\nThe user wants a greeting; 2 + 2 = 4, unrelated.\n</think>\n\nHello, Ada!")
    no_think = Sample(problem, "Hello, Ada!")
    other = Sample(problem, "I should greet Ada warmly.\n</think>\n\nHello, Grace!")
    assert reward(first) == reward(second) == reward(no_think)  # the same summary, whatever the reasoning
    assert abs(reward(other) - reward(first)) > 1e-4  # another summary, another reward
    scores = reward.batched([first, second, no_think, other])  # one call of score, rows padded together
    assert scores == pytest.approx([reward(s) for s in (first, second, no_think, other)], abs=1e-6)
    assert RewardSet({"helpfulness": reward}, {"helpfulness": 0.5})(first)["total"] == pytest.approx(scores[0] / 2,
                                                                                                     abs=1e-6)
    assert final_summary("a </think> b </think> c ") == "c" and final_summary(" plain ") == "plain"
    # A stray, unclosed <think> in the summary is dropped: the reply is still judged (the template would refuse it).
    assert final_summary("x </think> Hello, <think>Ada!") == "Hello, Ada!"
    assert reward(Sample(problem, "x </think> Hello, <think>Ada!")) == pytest.approx(reward(first), abs=1e-6)


def one_step(tok, tmp_path, micro_batch_tokens):
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(vocab_size=tok.vocab_size))
    pairs, _ = encode_pairs(tok, builtin_pairs(8, seed=1), seq_len=256)
    data = RMData(pairs, [], {}, {}, builtin=True)
    train = replace(RM_TRAIN_DEFAULTS, out_dir=str(tmp_path), tensorboard=False, grad_clip=1e9, device="cpu")
    trainer = rm_trainer(model, tok, data, RMConfig(batch_size=8, micro_batch_tokens=micro_batch_tokens), train)
    trainer.optimizer.step = lambda: None  # keep the step's gradients for inspection
    trainer.optimizer.zero_grad = lambda set_to_none=True: None
    record = trainer.train_step()
    parameters = [*model.named_parameters(), *(("head." + n, p) for n, p in trainer.head.named_parameters())]
    return record, {name: p.grad.clone() for name, p in parameters if p.grad is not None}


def test_a_steps_gradient_does_not_depend_on_its_micro_batches(tok, tmp_path):
    whole, grads = one_step(tok, tmp_path / "a", 100_000)
    assert whole["micro_batches"] == 1 and "head.weight" in grads and "head.bias" in grads
    split, split_grads = one_step(tok, tmp_path / "b", 1)  # a pair per micro-batch
    assert split["micro_batches"] == 8
    for key in ("loss", "accuracy", "margin"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7)
    assert split_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_refuses_other_training_pairs(tok):
    config = tiny_config(vocab_size=tok.vocab_size)
    stage = RMStage(encode_pairs(tok, builtin_pairs(6), 256)[0], [], RMConfig(), config, tok.pad_id)
    stage.order.next(4)
    other = RMStage(encode_pairs(tok, builtin_pairs(6, seed=1), 256)[0], [], RMConfig(), config, tok.pad_id)
    with pytest.raises(TrainingError, match="the training pairs differ from the run's"):
        other.load_state_dict(stage.state_dict())


# ---------------------------------------------------------------------- 2. preference files
GOOD = {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ('["a", "b"]', 'expected a JSON object with "prompt", "chosen" and "rejected"'),
    ({"prompt": "x", "chosen": "y"}, "no 'rejected' field"),
    ({"prompt": "x"}, "no 'chosen' or 'rejected' field"),
    ({"chosen": "y", "rejected": "z"}, 'no "prompt" field, and the responses have no earlier turns'),
    ({"prompt": "", "chosen": "y", "rejected": "z"}, '"prompt" must be a non-empty string or list'),
    ({"prompt": "x", "chosen": "  ", "rejected": "z"}, '"chosen" is an empty response'),
    ({"prompt": "x", "chosen": "y", "rejected": "<think>\nhmm\n</think>\n"},
     '"rejected" is an empty response (nothing after </think>)'),
    ({"prompt": "x", "chosen": 3, "rejected": "z"}, '"chosen" must be a string or a list of chat messages, got int'),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": "z"},
     '"chosen" is a message list whose last message is not the assistant\'s response'),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "z"}]},
     '"chosen" and "rejected" continue different conversations'),
    ({"chosen": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}],
      "rejected": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "z"}]},
     "chosen: message 0 has unknown role 'bot'"),
])
def test_bad_pairs_are_named_by_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, "", line, GOOD])  # the bad one is on line 3
    with pytest.raises(PreferenceDataError) as error:
        read_pairs([path])
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value), str(error.value)


def test_pairs_as_text_or_chat_messages_and_identical_ones_counted(tmp_path):
    user = {"role": "user", "content": "What is 1 + 1?"}
    rows = [GOOD,  # the plain shape
            {"prompt": "What is 1 + 1?", "chosen": [user, {"role": "assistant", "content": "2"}],  # UltraFeedback
             "rejected": [user, {"role": "assistant", "content": "3"}]},
            {"prompt": [user], "chosen": [{"role": "assistant", "content": "2"}],  # TRL's conversational shape
             "rejected": [{"role": "assistant", "content": "3"}]},
            {"prompt": "x", "chosen": "<think>\nA\n</think>\n\nsame", "rejected": "<think>\nB\n</think>\n\nsame"},
            {"prompt": "x", "chosen": "same", "rejected": "same"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    pairs, identical = read_pairs([tmp_path])  # a directory of files
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [([user], "2", "3")] * 3
    assert [p.source for p in pairs] == [f"{path}:{i}" for i in (1, 2, 3)]
    assert identical == [f"{path}:4", f"{path}:5"]  # the same after </think>: skipped, and where is returned
    write_jsonl(tmp_path / "pairs.jsonl", [""])
    with pytest.raises(PreferenceDataError, match="holds no preference pairs"):
        read_pairs([path])


def test_builtin_pairs():
    pairs = builtin_pairs(60, seed=3)
    assert pairs == builtin_pairs(60, seed=3) and pairs != builtin_pairs(60, seed=4)
    assert [p.kind for p in pairs[:4]] == [*REJECTED_KINDS, REJECTED_KINDS[0]]
    for pair in pairs:
        question = pair.prompt[0]["content"]
        assert check_instruction(question, pair.chosen) and pair.chosen != pair.rejected
        if pair.kind == "wrong":
            assert not check_instruction(question, pair.rejected)
        elif pair.kind == "rambling":
            assert pair.rejected.count(pair.chosen) >= 2 and len(pair.rejected) > 3 * len(pair.chosen)
    heldout = builtin_pairs(30, seed=3, split="heldout")
    assert not {p.prompt[0]["content"] for p in heldout} & {p.prompt[0]["content"] for p in pairs}


# ---------------------------------------------------------------------- 3. the command
def easy_pairs(n: int, seed: int) -> list[dict]:
    """Separable pairs: the rejected response adds "please" to the chosen one (the untrained head prefers it)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        answer = str(a + b + rng.choice([0, 0, 1]))
        rows.append({"prompt": f"What is {a} + {b}?", "chosen": answer, "rejected": f"{answer} please"})
    return rows


RUN = ["--seq-len", "64", "--batch-size", "8", "--micro-batch-tokens", "256", "--heldout-fraction", "0.25",
       "--max-steps", "24", "--save-every", "8", "--eval-every", "8", "--lr", "1e-3", "--warmup-steps", "2",
       "--no-tensorboard"]


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "easy.jsonl", easy_pairs(96, seed=0))


@pytest.fixture(scope="module")
def straight(base, easy, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "straight"
    assert main(["rm", "--model", str(base), "--data", str(easy), *RUN, "--out-dir", str(out)]) == 0
    return out


def test_rm_learns_an_easy_preference(straight, base):
    report = json.loads((straight / "report.json").read_text())
    assert report["steps"] == 24 and report["pairs"]["train"] == 72 and report["pairs"]["heldout"] == 24
    heldout = report["heldout"]
    assert heldout["before"]["accuracy"] < 0.5 and heldout["after"]["accuracy"] >= 0.9
    assert heldout["after"]["loss"] < 0.1 < heldout["before"]["loss"]
    assert heldout["after"]["per_kind"] == {}  # a user's pairs have no kinds
    train = [r["loss"] for r in read_metrics(straight / "metrics.jsonl") if r["kind"] == "train"]
    assert sum(train[-5:]) / 5 < 0.5 * sum(train[:5]) / 5
    evals = [r for r in read_metrics(straight / "metrics.jsonl") if r["kind"] == "heldout"]
    assert [r["step"] for r in evals] == [8, 16, 24] and evals[-1]["accuracy"] == heldout["after"]["accuracy"]
    checkpoint = straight / "checkpoints" / "step_000024"
    for name in ("report.md", "plots/loss.png", "plots/accuracy.png", f"{checkpoint}/{HEAD_FILE}",
                 f"{checkpoint}/model/tokenizer.json"):
        assert (straight / name).is_file(), name
    assert load_pretrained(checkpoint / "model").config.hidden_size == 64  # model/ is still a plain checkpoint

    rm = load_reward_model(straight)  # the run directory: its latest checkpoint
    prompts = ["What is 12 + 30?", "What is 7 + 5?"]
    chosen, rejected = rm.score(prompts, ["42", "12"]), rm.score(prompts, ["42 please", "12 please"])
    assert all(c > r for c, r in zip(chosen, rejected))
    for path in (checkpoint, checkpoint / "model"):  # a checkpoint, or its model directory: the same reward model
        assert load_reward_model(path).score(prompts, ["42", "12 please"]) == rm.score(prompts, ["42", "12 please"])
    with pytest.raises(RMError, match=f"is not a reward model: no {base.parent / HEAD_FILE}"):
        load_reward_model(base)


def test_rm_resumes_exactly_after_sigkill(base, easy, straight, tmp_path, capsys):
    crashed = tmp_path / "crashed"  # killed in a child process once step 10 is logged, with no chance to save
    command = ["rm", "--model", str(base), "--data", str(easy), *RUN, "--out-dir", str(crashed)]
    assert sigkill_once_logged(command, crashed / "metrics.jsonl", 10) == -signal.SIGKILL
    assert (crashed / "checkpoints" / "latest").read_text() in ("step_000008", "step_000016")  # before the end
    assert main(["rm", "--resume", "--out-dir", str(crashed)]) == 0  # the run's own settings, from run.json
    assert "held-out pairwise accuracy" in capsys.readouterr().out

    def records(out):
        return [(r["kind"], r["step"], r["loss"], r["accuracy"]) for r in read_metrics(out / "metrics.jsonl")]
    assert records(crashed) == records(straight) and len(records(straight)) == 27  # 24 steps, 3 held-out
    final = [out / "checkpoints" / "step_000024" for out in (straight, crashed)]
    weights = [load_pretrained(path / "model").state_dict() for path in final]
    for name, value in weights[0].items():
        assert torch.equal(weights[1][name], value), name
    heads = [load_file(str(path / HEAD_FILE)) for path in final]
    assert heads[0].keys() == {"weight", "bias"} and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_rm_on_the_builtin_pairs_reports_each_kind(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["rm", "--model", str(base), "--builtin-pairs", "40", "--max-steps", "2", "--batch-size", "4",
                 "--no-tensorboard", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out pairwise accuracy" in printed and "(wrong " in printed and f"report: {out}/report.md" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == "built-in instruction pairs" and report["pairs"]["heldout"] == 4
    assert list(report["heldout"]["after"]["per_kind"]) == list(REJECTED_KINDS)
    assert "| rambling |" in (out / "report.md").read_text()


def test_skipped_pairs_are_counted_and_reported(base, tmp_path, capsys):
    rows = [*easy_pairs(6, seed=1), {"prompt": "x", "chosen": "same", "rejected": "same"},
            {"prompt": "What is 1 + 1? " * 20, "chosen": "2", "rejected": "2 please"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = ["rm", "--model", str(base), "--data", str(path), "--seq-len", "64", "--max-steps", "1",
            "--heldout-fraction", "0", "--no-tensorboard", "--out-dir", str(tmp_path / "run")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"warning: skipped 1 training and 0 held-out pairs whose chosen and rejected responses are the same " \
           f"after </think> (the first: {path}:7)" in err
    assert f"warning: skipped 1 training and 0 held-out pairs longer than seq_len=64 tokens (the first: {path}:8" \
        in err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["pairs"]["train"] == 6 and report["heldout"] is None
    assert report["pairs"]["skipped"] == {"identical": {"train": 1, "heldout": 0},
                                          "longer_than_seq_len": {"train": 1, "heldout": 0}}
    assert main([*args[:-1], str(tmp_path / "run2"), "--seq-len", "8"]) == 2
    assert "all 7 training pairs are longer than seq_len=8 tokens" in capsys.readouterr().err


# ---------------------------------------------------------------------- 4. options
def test_rm_help_lists_its_options_with_defaults(capsys):
    assert main(["rm", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("--builtin-pairs INT built-in pairs to train on when no data is given (default: 2000)",
                  "--model STR the model to start from", "(default: runs/pretrain)", "--heldout-fraction FLOAT",
                  "--out-dir STR", "(default: runs/rm)", "--lr FLOAT peak learning rate (default: 0.0001)",
                  "--resume"):
        assert shown in out, shown
    assert "--aux-alpha" not in out and "--ema-decay" not in out


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "invalid reward-model option 'batch_size' = 0: must be > 0"),
    (["--heldout-fraction", "1"], "invalid reward-model option 'heldout_fraction' = 1.0: must be in [0, 1)"),
    (["--seq-len", "many"], "argument --seq-len: invalid int value: 'many'"),
    (["--epochs", "1", "--max-steps", "5"], "pass --epochs (1.0) or --max-steps (5), not both"),
    (["--seq-len", "4096"], "seq_len 4096 is longer than the model's context (1024 tokens)"),
])
def test_bad_options_exit_2_with_a_message(base, tmp_path, args, message, capsys):
    assert main(["rm", "--model", str(base), *args, "--builtin-pairs", "8", "--out-dir", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_a_missing_model_or_data_file_is_a_message(base, tmp_path, capsys):
    assert main(["rm", "--model", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "no model at" in capsys.readouterr().err
    assert main(["rm", "--model", str(base), "--data", str(tmp_path / "missing.jsonl"),
                 "--out-dir", str(tmp_path / "o")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
