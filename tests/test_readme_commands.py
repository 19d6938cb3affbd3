"""The README's commands on a user's own files, run as written on small files: every ```bash block of a section
"... on your own ..." runs in order in one directory, with options appended (argparse keeps the last) only to make
the models and runs tiny. A README command that no longer parses, or a file format it describes that the command
rejects, fails here."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import save_tiny_checkpoint, train_tokenizer, write_jsonl

from nanoseek.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

# Appended to each command: the same command, at the size of a test.
TINY = {
    ("tokenizer", "train"): ["--vocab-size", "300"],
    ("data", "prepare"): [],
    ("pretrain",): ["--preset", "tiny", "--max-steps", "2", "--seq-len", "32", "--batch-size", "2",
                    "--micro-batch-size", "2", "--eval-problems", "0", "--no-tensorboard"],
    ("sft",): ["--batch-size", "2", "--eval-problems", "0", "--no-tensorboard"],
    ("sample",): ["--k", "2", "--max-tokens", "12"],
    ("grpo",): ["--max-steps", "1", "--group-size", "2", "--prompts-per-step", "4", "--max-new-tokens", "8",
                "--no-tensorboard"],
    ("eval",): ["--k", "2", "--max-new-tokens", "8", "--no-greedy"],
    ("rm",): ["--max-steps", "1", "--batch-size", "2", "--no-tensorboard"],
}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(section, argv) of every command in the README's "on your own" sections, in order."""
    commands = []
    for section, body in re.findall(r"^### (.+?)\n(.*?)(?=^#{2,3} )", README.read_text(), re.M | re.S):
        if "your own" not in section:
            continue
        for block in re.findall(r"```bash\n(.*?)```", body, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                argv = shlex.split(line, comments=True)
                if argv and "..." not in argv:  # "..." stands for the options a resumed run may change
                    assert argv[0] == "nanoseek", line
                    commands.append((section, argv[1:]))
    return commands


def tiny_options(argv: list[str]) -> list[str]:
    key = tuple(argv[:2]) if argv[0] in ("tokenizer", "data") else (argv[0],)
    extra = TINY[key]
    if argv[0] == "sft" and "--epochs" not in argv:
        extra = extra + ["--max-steps", "1"]  # --epochs sets the steps itself
    return argv + extra


def user_files(root: Path) -> None:
    """The files the README's commands name, a few lines each, in the formats the README describes."""
    (root / "my_corpus").mkdir()
    for i in range(3):
        (root / "my_corpus" / f"part{i}.txt").write_text(
            " ".join(f"Sentence {j} of part {i} says {j * i} is a number." for j in range(200)))
    write_jsonl(root / "chats.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {a} + 2?"},
                      {"role": "assistant", "content": f"<think>\n{a} + 2 = {a + 2}.\n</think>\n{a + 2}"}]}
        for a in range(6)] + [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Say hi."},
                      {"role": "assistant", "reasoning_content": "A greeting.", "content": "Hi."}]}] * 2)
    problems = [{"question": f"What is {a} + {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"} for a in range(6)]
    problems += [{"question": "What is half of 1?", "answer": "\\boxed{\\frac{1}{2}}"},
                 {"question": "What is 12 + 30?", "answer": "42", "task": "addition"}]
    write_jsonl(root / "train.jsonl", problems)
    write_jsonl(root / "heldout.jsonl", problems[:3])
    write_jsonl(root / "pairs.jsonl", [
        {"prompt": f"What is {a} + 1?", "chosen": f"{a + 1}", "rejected": f"{a + 2} maybe, or not"} for a in range(6)]
        + [{"prompt": "", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}]}])
    write_jsonl(root / "prompts.jsonl", [{"prompt": "Name a colour."},
                                         {"messages": [{"role": "user", "content": "Say hello."}]}])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    user_files(root)
    save_tiny_checkpoint(root / "runs" / "pretrain", train_tokenizer("Be brief. Say hi. Hello. Name a colour."))
    return root


def test_the_readme_has_each_stage_on_user_files():
    commands = {argv[0] for _, argv in readme_commands()}
    assert {"tokenizer", "data", "pretrain", "sft", "sample", "grpo", "eval", "rm"} <= commands


def test_the_readme_commands_run_on_small_files(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    for section, argv in readme_commands():
        code = main(tiny_options(argv))
        output = capsys.readouterr()
        assert code == 0, f"{section}: nanoseek {shlex.join(argv)} -> {code}\n{output.out[-2000:]}\n{output.err[-2000:]}"
    assert (workdir / "runs" / "sample" / "data.jsonl").is_file()
    assert (workdir / "runs" / "rl-all" / "run.json").is_file()
    shutil.rmtree(workdir / "runs" / "mine")
