import argparse
import io
import json
import subprocess
import sys

import pytest
import torch

import nanoseek
from nanoseek.cli import build_parser, main
from nanoseek.config import PRESETS, get_preset
from nanoseek.data.tokenizer import END_THINK, EOS, Tokenizer
from nanoseek.infer.chat import chat, generate_file, split_reasoning, stream_lines
from nanoseek.infer.engine import Completion, Engine, SamplingParams
from nanoseek.model import DeepSeekV3


@pytest.mark.parametrize("preset", list(PRESETS))
def test_info_prints_counts_for_every_preset(preset, capsys):
    assert main(["info", "--preset", preset]) == 0
    out = capsys.readouterr().out
    for field in ("total params", "activated/token", "MTP params"):
        assert field in out


def test_info_v3_is_671b_with_37b_activated(capsys):
    main(["info", "--preset", "v3-671b"])
    out = capsys.readouterr().out
    assert "total params     671.0B (671,026,404,352)" in out
    assert "activated/token  37.6B" in out
    assert "latent cache 576 values/token/layer" in out


def test_info_bench_1b_matches_the_anchor(capsys):
    main(["info", "--preset", "bench-1b"])
    out = capsys.readouterr().out
    assert "total params     1.2B (1,235,321,344)" in out  # anchor: 1235.3M total
    assert "activated/token  231.8M" in out  # anchor: 231.8M activated


def test_info_reads_a_config_json(tmp_path, capsys):
    from nanoseek.config import get_preset
    get_preset("tiny").save(tmp_path / "config.json")
    assert main(["info", "--config", str(tmp_path)]) == 0
    assert "0.2M (249,984)" in capsys.readouterr().out


def test_info_error_is_a_message_not_a_traceback(tmp_path, capsys):
    from nanoseek.config import get_preset
    (tmp_path / "config.json").write_text(json.dumps({**get_preset("tiny").to_hf_dict(), "n_group": 3}))
    assert main(["info", "--config", str(tmp_path)]) == 2
    assert "invalid config field 'n_group' = 3" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "nanoseek.cli", "info", "--preset", "tiny"],
                            capture_output=True, text=True, check=True)
    assert "activated/token" in result.stdout


# ---------------------------------------------------------------------- the CLI keeps its word (issue 15)
CORPUS = [f"Question: What is {a} + {b}?\n<think>\n{a} + {b} = {a + b}\n</think>\n<answer>{a + b}</answer>"
          for a in range(30) for b in range(30)]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS, 300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny random model with its tokenizer, saved as a checkpoint directory."""
    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    nanoseek.save_pretrained(DeepSeekV3(get_preset("tiny").replace(vocab_size=tokenizer.vocab_size)), path)
    tokenizer.save(path)
    return path


def error_line(capsys) -> str:
    """What a failed command wrote on stderr: one `nanoseek: error:` line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("nanoseek: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_generate_prompt_longer_than_the_cache_names_the_limit(checkpoint, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("What is 12 + 34? " * 10 + "\n")
    assert main(["generate", str(tmp_path / "p.txt"), "--model", str(checkpoint), "--out", str(tmp_path / "o.jsonl"),
                 "--max-len", "32", "--max-new-tokens", "4"]) == 2
    line = error_line(capsys)
    assert "the cache's 32 tokens per sequence" in line and "--max-len" in line
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
@pytest.mark.parametrize("option,value,message", [
    ("--max-new-tokens", "0", "must be a positive integer, got '0'"),
    ("--max-new-tokens", "-5", "must be a positive integer, got '-5'"),
    ("--temperature", "-1", "must be a number >= 0, got '-1'"),
    ("--top-p", "2", "must be a number in (0, 1], got '2'"),
    ("--top-p", "0", "must be a number in (0, 1], got '0'"),
    ("--max-new-tokens", "many", "must be a positive integer, got 'many'"),
])
def test_sampling_options_are_checked_where_given(command, option, value, message, tmp_path, capsys):
    args = [command, *([str(tmp_path / "p.txt")] if command == "generate" else []), option, value]
    assert main(args) == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,message", [
    ("--top-k", "-3", "must be an integer >= 0, got '-3'"),
    ("--max-len", "0", "must be a positive integer, got '0'"),
])
def test_prompt_options_are_checked_where_given(option, value, message, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "p.txt"), option, value]) == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "1.5", "one"])
def test_pipeline_seed_is_checked_as_an_integer_from_0(value, tmp_path, capsys):
    assert main(["pipeline", "--out-dir", str(tmp_path / "runs"), "--seed", value]) == 2
    assert f"argument --seed: must be an integer >= 0, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_pipeline_seed_reaches_the_pipeline(monkeypatch, tmp_path, capsys):
    import nanoseek.pipeline

    given = {}
    result = {"pass@1": 0.5, "format": 1.0}

    def fake_pipeline(out_dir, **options):
        given.update(options)
        return {"seed": options["seed"], "base": {"overall": result}, "r1_zero": {"overall": result},
                "minutes": {"total": 1.0}}

    monkeypatch.setattr(nanoseek.pipeline, "run_pipeline", fake_pipeline)
    assert main(["pipeline", "--out-dir", str(tmp_path), "--seed", "7"]) == 0
    assert given["seed"] == 7 and "(seed 7)" in capsys.readouterr().out


@pytest.mark.parametrize("command", [
    lambda d: ["tokenizer", "train", d["corpus"], "--vocab-size", "300", "--out", d["out"] + "/tokenizer.json"],
    lambda d: ["data", "prepare", d["corpus"], "--tokenizer", d["tokenizer"], "--out", d["out"]],
    lambda d: ["generate", d["prompts"], "--model", d["model"], "--out", d["out"] + "/o.jsonl", "--max-new-tokens",
               "2", "--max-len", "64"],
    lambda d: ["pretrain", "--out-dir", d["out"], "--builtin-docs", "50", "--max-steps", "1"],
], ids=["tokenizer-train", "data-prepare", "generate", "pretrain"])
def test_an_output_path_through_a_file_names_the_file(command, checkpoint, tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS[:50]))
    (tmp_path / "prompts.txt").write_text("What is 1 + 2?\n")
    (tmp_path / "file").write_text("in the way")
    paths = {"corpus": tmp_path / "corpus.txt", "tokenizer": checkpoint / "tokenizer.json", "model": checkpoint,
             "prompts": tmp_path / "prompts.txt", "out": tmp_path / "file" / "out"}
    assert main(command({k: str(v) for k, v in paths.items()})) == 2
    assert f"{tmp_path / 'file'} is a file, not a directory" in error_line(capsys)
    assert (tmp_path / "file").read_text() == "in the way"


def test_os_errors_name_the_path(tmp_path, capsys):
    assert main(["tokenizer", "train", str(tmp_path / "missing.txt")]) == 2
    assert f"{tmp_path / 'missing.txt'}: no such file" in error_line(capsys)
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS[:50]))
    (tmp_path / "out.json").mkdir()  # a directory where the file should go
    assert main(["tokenizer", "train", str(tmp_path / "corpus.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "out.json")]) == 2
    assert f"{tmp_path / 'out.json'}: Is a directory" in error_line(capsys)


@pytest.mark.parametrize("missing", [("num_hidden_layers",), ("n_routed_experts",),
                                     ("num_hidden_layers", "n_routed_experts")])
def test_config_json_without_a_shape_field_is_refused(missing, tmp_path, capsys):
    config = {k: v for k, v in get_preset("tiny").to_hf_dict().items() if k not in missing}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["info", "--config", str(tmp_path)]) == 2
    assert f"config.json lacks {', '.join(missing)}: the model's shape" in error_line(capsys)


def test_data_prepare_holds_out_a_document_of_a_few_files(checkpoint, tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(CORPUS[i])
    files = [str(tmp_path / f"doc{i}.txt") for i in range(3)]
    tokenizer = str(checkpoint / "tokenizer.json")
    assert main(["data", "prepare", *files, "--tokenizer", tokenizer, "--out", str(tmp_path / "ds")]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["documents"] == {"train": 2, "heldout": 1}  # 1% of 3 documents drew none: one is moved
    assert main(["data", "prepare", files[0], "--tokenizer", tokenizer, "--out", str(tmp_path / "one")]) == 2
    line = error_line(capsys)
    assert "only 1 document" in line and "--heldout-fraction 0" in line
    assert main(["data", "prepare", files[0], "--tokenizer", tokenizer, "--out", str(tmp_path / "one"),
                 "--heldout-fraction", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == {"train": 1, "heldout": 0}
    assert main(["data", "prepare", *files, "--tokenizer", tokenizer, "--out", str(tmp_path / "x"),
                 "--heldout-fraction", "1.5"]) == 2
    assert "argument --heldout-fraction: must be a number in [0, 1], got '1.5'" in capsys.readouterr().err


def test_tokenizer_train_says_when_the_corpus_supports_fewer_tokens(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS[:20]))
    out = tmp_path / "tokenizer.json"
    assert main(["tokenizer", "train", str(tmp_path / "corpus.txt"), "--vocab-size", "1000", "--out", str(out)]) == 0
    made = Tokenizer.load(out).vocab_size
    captured = capsys.readouterr()
    assert made < 1000
    assert f"warning: the corpus supports only {made} tokens; asked for 1000" in captured.err
    assert f"wrote {out} ({made} tokens)" in captured.out


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_of_every_command_has_help_with_its_default_and_choices():
    checked = 0
    for path, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"nanoseek {' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{name} has no help"
            line = " ".join(formatter._format_action(action).split())  # as --help shows it, unwrapped
            if action.option_strings:
                shown = "(required)" if action.required else f"(default: {action.default})"
                assert shown in line, f"{name} does not show its default: {line}"
            for choice in action.choices or ():
                assert str(choice) in line, f"{name} does not list its choice {choice}: {line}"
            checked += 1
    assert checked > 100


def test_dataclass_options_take_their_help_from_the_field_comments(capsys):
    assert main(["plan", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--pp INT pipeline ranks (DeepSeek-V3: 16) (default: 16)" in out
    assert "--recompute {auto,none,selective,full}" in out and "auto: the least that fits (default: auto)" in out


def test_eval_says_what_it_loaded_and_shows_progress(checkpoint, capsys):
    assert main(["eval", "--model", str(checkpoint), "--k", "2", "--problems-per-task", "1",
                 "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert f"loaded {checkpoint} (0." in captured.err and "parameters" in captured.err
    assert "evaluating" in captured.err and "21/21" in captured.err  # 7 tasks x (2 samples + 1 greedy)
    assert "| overall |" in captured.out


def test_eval_progress_keeps_the_results(checkpoint, tokenizer):
    from nanoseek.data import tasks
    from nanoseek.eval import EvalConfig, heldout_problems, sample_completions

    model = nanoseek.from_pretrained(checkpoint)
    problems = heldout_problems(1)
    cfg = EvalConfig(k=2, max_new_tokens=6)
    sampled, greedy = sample_completions(model, tokenizer, problems, cfg, max_batch=4, progress=True)
    prompts = [tokenizer.encode(tasks.format_prompt(p), bos=True) for p in problems]
    engine = Engine(model, max_batch=4, max_len=max(map(len, prompts)) + 6, tokenizer=tokenizer)
    stop = dict(stop_ids=(tokenizer.eos_id,), stop_strings=("</answer>",))
    expected = engine.generate([p for p in prompts for _ in range(2)], SamplingParams(
        max_new_tokens=6, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, **stop))
    assert [c.tokens for c in sampled] == [c.tokens for c in expected]
    assert [c.tokens for c in greedy] == [c.tokens for c in engine.generate(prompts, SamplingParams(
        max_new_tokens=6, **stop))]


class CtrlC:
    """A terminal where the user presses Ctrl-C at the prompt."""

    def readline(self) -> str:
        raise KeyboardInterrupt


def test_chat_ctrl_c_at_the_prompt_exits_cleanly(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", CtrlC())
    assert main(["chat", "--model", str(checkpoint), "--max-len", "64"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("bye\n") and "Traceback" not in captured.err


class InterruptingOutput(io.StringIO):
    """Raises KeyboardInterrupt (as Ctrl-C does) at its n-th write."""

    def __init__(self, at: int):
        super().__init__()
        self.writes, self.at = 0, at

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes == self.at:
            raise KeyboardInterrupt
        return super().write(text)


def test_chat_ctrl_c_during_a_reply_stops_it_and_returns_to_the_prompt(checkpoint, tokenizer):
    engine = Engine(nanoseek.from_pretrained(checkpoint), max_batch=2, max_len=96, tokenizer=tokenizer)
    params = SamplingParams(max_new_tokens=12, temperature=0.6, stop_ids=(tokenizer.eos_id,))
    out = InterruptingOutput(at=5)  # the banner, the prompt, "Thinking: ", then a reply token or two
    chat(engine, tokenizer, "question", params, read=stream_lines(["What is 1 + 2?", "What is 3 + 4?"]), out=out)
    text = out.getvalue()
    assert "(stopped)" in text
    assert text.count("Thinking: ") == 2  # the second message got its reply
    assert not engine.has_unfinished()  # the stopped request gave its cache slot back


class NoModel:
    """An engine that must not be asked for anything."""

    def stream(self, prompt, params):
        raise AssertionError("a command went to the model")


def test_chat_commands_never_go_to_the_model(tokenizer):
    out = io.StringIO()
    chat(NoModel(), tokenizer, "question", SamplingParams(),
         read=stream_lines(["/unknown", "/help", "/reset", "/exit"]), out=out)
    text = out.getvalue()
    assert "unknown command /unknown; commands:" in text
    assert text.count("/reset  start a new conversation") == 2  # listed after /unknown and after /help


def test_generate_rows_hold_reasoning_and_answer_apart(tokenizer, tmp_path):
    answer = tokenizer.encode("</think>\n<answer>3</answer>")
    reasoning = tokenizer.encode("1 + 2 = 3\n")

    class Scripted:
        def generate(self, prompts, params):
            return [Completion(p, reasoning + answer + [tokenizer.eos_id], "stop",
                               tokenizer.decode(reasoning + answer + [tokenizer.eos_id])) for p in prompts]

    params = SamplingParams(stop_ids=(tokenizer.eos_id,))
    generate_file(Scripted(), tokenizer, ["What is 1 + 2?"], tmp_path / "o.jsonl", "question", params)
    row = json.loads((tmp_path / "o.jsonl").read_text())
    assert row == {"prompt": "What is 1 + 2?", "reasoning_content": "1 + 2 = 3", "content": "<answer>3</answer>",
                   "finish_reason": "stop", "tokens": len(reasoning + answer) + 1}
    assert EOS not in json.dumps(row) and END_THINK not in json.dumps(row)


def test_split_reasoning():
    assert split_reasoning("a\n</think>\nb", thinking=True) == ("a", "b")
    assert split_reasoning("still thinking", thinking=True) == ("still thinking", "")
    assert split_reasoning("an answer", thinking=False) == ("", "an answer")
    assert split_reasoning("<think> r </think> <answer>1</answer>", thinking=False) == ("r", "<answer>1</answer>")


def test_generate_does_not_overwrite_without_being_asked(checkpoint, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("What is 1 + 2?\n")
    out = tmp_path / "completions.jsonl"
    out.write_text("the user's earlier results\n")
    args = ["generate", str(tmp_path / "p.txt"), "--model", str(checkpoint), "--out", str(out), "--max-new-tokens",
            "3", "--max-len", "64"]
    assert main(args) == 2
    line = error_line(capsys)
    assert str(out) in line and "--overwrite" in line
    assert out.read_text() == "the user's earlier results\n"
    assert main([*args, "--overwrite"]) == 0
    row = json.loads(out.read_text())
    assert set(row) == {"prompt", "reasoning_content", "content", "finish_reason", "tokens"}


def test_plan_by_default_prints_a_layout_that_fits(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "PP16 (dualpipe) x EP64 x DP2" in out and "(fits)" in out and "DOES NOT FIT" not in out
    assert "full recompute, chosen by auto" in out
    assert main(["plan", "--recompute", "selective"]) == 0  # V3's own recipe, by this estimate too large
    assert "DOES NOT FIT" in capsys.readouterr().out
