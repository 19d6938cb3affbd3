"""`nanoseek chat` and `nanoseek generate`: streaming, the thinking shown apart, driven through their I/O."""

import io
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.chat import ThinkingPrinter, chat, render_prompt, stream_lines
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import DeepSeekV3

from conftest import tiny_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model with a trained tokenizer, saved as a nanoseek checkpoint directory."""
    path = tmp_path_factory.mktemp("ckpt")
    tokenizer = Tokenizer.train([f"Question: What is {a} + {b}?\n<think>\n{a + b}\n</think>" for a in range(30)
                                 for b in range(30)], 300)
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(vocab_size=tokenizer.vocab_size))
    nanoseek.save_pretrained(model, path)
    tokenizer.save(path)
    return path


def test_thinking_is_printed_apart_even_when_the_tag_is_split_across_tokens():
    out = io.StringIO()
    printer = ThinkingPrinter(out, color=False)
    for piece in ["7 + 8", " = 15.", "\n</th", "ink>", "\n<answer>15</answer>"]:
        printer.write(piece)
    printer.close()
    assert out.getvalue() == "Thinking: 7 + 8 = 15.\n\n\nAnswer: <answer>15</answer>\n"


def test_thinking_is_dimmed_on_a_terminal():
    out = io.StringIO()
    printer = ThinkingPrinter(out, color=True)
    printer.write("hmm</think>yes")
    assert "\x1b[2mhmm\x1b[0m" in out.getvalue() and out.getvalue().endswith("Answer: yes")


def test_templates():
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    assert render_prompt(msgs, "question") == "Question: What is 2 + 2?\n<think>\n"
    assert render_prompt(msgs, "chat").endswith("<｜User｜>What is 2 + 2?<｜Assistant｜><think>\n")
    assert "User: What is 2 + 2?. Assistant:" in render_prompt(msgs, "r1-zero")
    with pytest.raises(ValueError, match="unknown template 'x'"):
        render_prompt(msgs, "x")


def test_chat_loop_streams_what_the_engine_generates(checkpoint):
    import nanoseek
    tokenizer = Tokenizer.load(checkpoint)
    engine = Engine(nanoseek.from_pretrained(checkpoint), max_len=128, tokenizer=tokenizer)
    params = SamplingParams(max_new_tokens=12, temperature=0.6, seed=5, stop_ids=(tokenizer.eos_id,))
    prompt = tokenizer.encode("Question: What is 3 + 4?\n<think>\n", bos=True)
    streamed = list(engine.stream(prompt, params))
    assert streamed == engine.generate([prompt], params)[0].tokens  # streaming is the same sampler
    out = io.StringIO()
    chat(engine, tokenizer, "question", params, read=stream_lines(["What is 3 + 4?", "/exit"]), out=out)
    reply = out.getvalue().split("you> ")[0] if "you> " in out.getvalue() else out.getvalue()
    text = tokenizer.decode([t for t in streamed if t != tokenizer.eos_id])
    assert "Thinking: " + text.split("</think>")[0] in reply


def test_chat_in_a_pseudo_terminal(checkpoint):
    pid, fd = pty.fork()
    if pid == 0:  # the child: nanoseek chat on the terminal
        os.execv(sys.executable, [sys.executable, "-m", "nanoseek.cli", "chat", "--model", str(checkpoint),
                                  "--max-new-tokens", "8", "--max-len", "128"])
    output = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        nonlocal output
        deadline = time.time() + timeout
        while marker not in output and time.time() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    output += os.read(fd, 4096)
                except OSError:
                    break
        assert marker in output, output[-500:]

    read_until(b"you> ")
    os.write(fd, b"What is 1 + 2?\n")
    read_until(b"Thinking: ")
    read_until(b"you> ")  # the reply streamed, the prompt is back
    assert b"\x1b[2m" in output  # a terminal gets the thinking dimmed
    os.write(fd, b"/exit\n")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_generate_command(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 1 + 1?"}) + "\n" + json.dumps({"prompt": "What is 9 + 9?"}))
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(prompts), "--model", str(checkpoint), "--out", str(out), "--max-new-tokens", "6",
                 "--max-len", "64"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["What is 1 + 1?", "What is 9 + 9?"]
    assert all(r["tokens"] <= 6 and isinstance(r["reasoning_content"], str) and isinstance(r["content"], str)
               for r in rows)
    prompts.write_text("{not json}\n")
    assert main(["generate", str(prompts), "--model", str(checkpoint), "--out", str(out), "--overwrite"]) == 2
    assert "prompts.jsonl:1: expected a JSON object" in capsys.readouterr().err
    assert main(["generate", str(prompts), "--model", str(tmp_path)]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err


def test_generate_subprocess_smoke(checkpoint, tmp_path):
    (tmp_path / "p.txt").write_text("What is 2 + 2?\n")
    result = subprocess.run([sys.executable, "-m", "nanoseek.cli", "generate", str(tmp_path / "p.txt"), "--model",
                             str(checkpoint), "--out", str(tmp_path / "o.jsonl"), "--max-new-tokens", "4",
                             "--max-len", "64"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "o.jsonl").read_text())["prompt"] == "What is 2 + 2?"
