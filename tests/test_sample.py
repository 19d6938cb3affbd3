"""`nanoseek sample` (DeepSeek-R1's rejection sampling): the rejection filter on a table of samples, the command end
to end (its JSONL read back by `nanoseek sft`'s reader, its counts adding up), a user's problems JSONL, and the
built-in non-reasoning instructions with their checker."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny_checkpoint, train_tokenizer, write_jsonl

from nanoseek import sample as sampling
from nanoseek.cli import main
from nanoseek.data import tasks
from nanoseek.data.chat import (
    INSTRUCTIONS,
    check_instruction,
    cold_start_conversations,
    cold_start_problems,
    encode_conversations,
    instruction_conversations,
    instruction_kind,
    number_words,
    read_conversations,
)
from nanoseek.data.problems import USER_TASK, ProblemFileError, read_problems, reference_answer
from nanoseek.data.tokenizer import ASSISTANT, EOS, apply_chat_template
from nanoseek.sample import REASONS, Drawn, Rules, judge, repeated_ngram_share, select
from nanoseek.train.sft import SFTConfig, load_data


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("Say hello to Ada. Repeat after me: apple river")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base"), tok)



# ---------------------------------------------------------------------- 1. the rejection filter
PROBLEM = tasks.Problem("addition", "What is 47 + 38?", "85", "", 1)
STEPS = "7 + 8 = 15, write 5 carry 1.\n4 + 3 + 1 = 8, write 8.\nSo 47 + 38 = 85."
RIGHT = f"{STEPS}\n</think>\n\n<answer>85</answer>"
# (completion, token count, the verdict's reason: None when kept), judged in this order for one prompt with at most
# 2 kept samples: judge's reasons, then duplicates of a kept sample and samples past the limit.
TABLE = [
    (RIGHT, 30, None),  # right and clean
    (RIGHT.replace("<answer>85", "<answer>84"), 30, "wrong"),
    (RIGHT, 257, "too_long"),  # over the 256-token cap
    (STEPS, 257, "too_long"),  # unfinished (drawn to max_tokens + 1): too long rather than malformed
    (STEPS, 30, "no_format"),  # no </think>
    (f"{STEPS}\n</think>\n\n85", 30, "no_format"),  # no final answer: no <answer> block, no \boxed{}
    (f"{STEPS}\n</think>\n\n<answer>85</answer> and more", 30, "no_format"),  # text after the answer block
    (f"{STEPS}\n</think>\n<think>\nagain\n</think>\n\n<answer>85</answer>", 30, "no_format"),  # two think blocks
    ("<answer>85</answer>\n</think>\n\n<answer>85</answer>", 30, "no_format"),  # answer tags in the reasoning
    ("\n</think>\n\n<answer>85</answer>", 30, "no_format"),  # empty reasoning
    ("我们先算个位, 7 加 8 等于 15, 再算十位 4 + 3 + 1 = 8, so 85.\n</think>\n\n<answer>85</answer>", 30, "language"),
    (STEPS.replace("So", "所以 So"), 30, "no_format"),
    (f"{STEPS.replace('So', '所以 So')}\n</think>\n\n<answer>85</answer>", 30, "language"),  # 2 of 6 words CJK
    ("So 47 + 38 = 85.\n" * 8 + "</think>\n\n<answer>85</answer>", 60, "repetitive"),  # a loop
    (f"  {STEPS.upper()}  \n</think>\n<answer>85</answer>\n", 30, "duplicate"),  # RIGHT up to case and spacing
    (f"<think>\n{STEPS}\n</think>\n\nThe sum is \\boxed{{85}}.", 31, None),  # an opening <think>, a \boxed answer
    ("47 + 38 = 85.\n</think>\n\n<answer>85</answer>", 12, "over_limit"),  # right and new, but the third
]


def test_the_filter_gives_each_sample_its_reason():
    rules = Rules(max_tokens=256)
    verdicts = select([PROBLEM], [Drawn(0, text, n) for text, n, _ in TABLE], rules, max_per_prompt=2)
    assert [reason for _, reason in verdicts] == [reason for _, _, reason in TABLE]
    assert [kept for kept, _ in verdicts] == [reason is None for _, _, reason in TABLE]
    for text, n, reason in TABLE:  # judge alone: the same reason, but for those that need the other samples
        assert judge(PROBLEM, text, n, rules) == ((True, None) if reason in (None, "duplicate", "over_limit")
                                                  else (False, reason))
    assert select([PROBLEM], [Drawn(0, RIGHT, 30)] * 3) == [(True, None), (False, "duplicate"),
                                                           (False, "duplicate")]
    assert select([PROBLEM, PROBLEM], [Drawn(0, RIGHT, 30), Drawn(1, RIGHT, 30)]) == [(True, None)] * 2  # per prompt


def test_the_filters_thresholds_and_languages():
    mixed = f"{STEPS.replace('So', '所以 So')}\n</think>\n\n<answer>85</answer>"  # 4 of 6 words English
    assert judge(PROBLEM, mixed, 30, Rules(min_language_share=0.6)) == (True, None)
    chinese = "七加八等于十五, 写五进一. 四加三加一等于八. 所以是 85.\n</think>\n\n<answer>85</answer>"
    assert judge(PROBLEM, chinese, 30, Rules(language="zh")) == (True, None)
    assert judge(PROBLEM, chinese, 30) == (False, "language")
    loop = "So 47 + 38 = 85.\n" * 8 + "</think>\n\n<answer>85</answer>"
    assert repeated_ngram_share(loop) > 0.8 and repeated_ngram_share("one two three") == 0.0
    assert judge(PROBLEM, loop, 60, Rules(max_repeat_share=1.0)) == (True, None)
    assert judge(PROBLEM, RIGHT, 30, Rules(max_tokens=30)) == (True, None)
    assert judge(PROBLEM, RIGHT, 31, Rules(max_tokens=30)) == (False, "too_long")


def test_a_users_math_problem_is_checked_by_math_verify():
    problem = tasks.Problem(USER_TASK, "What is half of one?", "\\frac{1}{2}", "", 0)
    assert judge(problem, "Half of one is 0.5.\n</think>\n\nSo it is \\boxed{0.5}.", 20) == (True, None)
    assert judge(problem, "Half of one is 0.4.\n</think>\n\nSo it is \\boxed{0.4}.", 20) == (False, "wrong")


def test_the_builtin_worked_steps_pass_the_filter():
    """The cold-start conversations' replies, and the worked steps of every task and level (multiplications by a
    repeated digit, the most repetitive of them, included), are clean by the default rules."""
    conversations = cold_start_conversations(70, seed=2, difficulty=None)
    for conversation, problem in zip(conversations, cold_start_problems(70, seed=2, difficulty=None)):
        reply = conversation.messages[1]
        assert judge(problem, f"{reply['reasoning_content']}\n</think>\n\n{reply['content']}", 100) == (True, None)
    for name in tasks.TASKS:
        for level in tasks.DIFFICULTIES:
            for problem in tasks.generate(name, 60, seed=2, difficulty=level):
                completion = (f"Let me think this through carefully.\n{problem.steps}\nSo the answer is "
                              f"{problem.answer}.\n</think>\n\n<answer>{problem.answer}</answer>")
                assert judge(problem, completion, 100) == (True, None), completion


# ---------------------------------------------------------------------- 2. the command end to end
USER_CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def check_counts(summary, samples):
    """Every sample drawn is kept or rejected for one reason, overall and per task."""
    assert summary["samples"] == samples
    for block in [summary, *summary["per_task"].values()]:
        assert set(block["rejected"]) == set(REASONS)
        assert block["kept"] + sum(block["rejected"].values()) == block["samples"]
    assert sum(b["samples"] for b in summary["per_task"].values()) == samples
    assert sum(b["kept"] for b in summary["per_task"].values()) == summary["kept"]


def test_sample_command_on_a_tiny_model(base, tmp_path, capsys):
    """A random tiny model samples garbage: the counts still add up, and the instructions and the copied chat
    file make a JSONL that `nanoseek sft` reads."""
    chat = write_jsonl(tmp_path / "mine.jsonl", [USER_CHAT])
    out = tmp_path / "out"
    args = ["sample", "--model", str(base), "--problems-per-task", "1", "--k", "2", "--max-tokens", "8",
            "--instructions", "5", "--data", str(chat), "--out-dir", str(out), "--max-batch", "8"]
    assert main(args) == 0, capsys.readouterr().err
    assert "conversations (0 sampled, 5 instructions, 1 copied)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    check_counts(summary, 2 * len(tasks.TASKS))
    assert set(summary["per_task"]) == set(tasks.TASKS) and summary["prompts"] == len(tasks.TASKS)
    assert summary["instructions"] == 5 and summary["copied"]["conversations"] == 1
    conversations = read_conversations([out / "data.jsonl"])
    assert len(conversations) == summary["rows_written"] == summary["kept"] + 5 + 1
    assert conversations[-1].messages == USER_CHAT["messages"]
    assert "| total |" in (out / "summary.md").read_text()
    assert main(args) == 2  # an existing output is kept unless --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize("template", ["chat", "question"])
def test_draw_counts_tokens_and_is_seeded(base, template):
    """k samples per prompt, in prompt order, drawn to max_tokens + 1 at most (an unfinished one is too long), the
    same for the same seed."""
    model, tokenizer, _ = sampling.load_model(sampling.SampleConfig(model=str(base), template=template))
    problems = sampling.builtin_problems(1, 1, 0, ["addition", "sorting"])
    cfg = sampling.SampleConfig(model=str(base), k=3, max_tokens=6, template=template, max_batch=4)
    drawn = sampling.draw(model, tokenizer, problems, cfg)
    assert [d.prompt for d in drawn] == [0, 0, 0, 1, 1, 1]
    assert all(0 <= d.tokens <= 7 for d in drawn) and any(d.tokens == 7 for d in drawn)
    assert drawn == sampling.draw(model, tokenizer, problems, cfg)
    assert all(judge(problems[d.prompt], d.text, d.tokens, cfg.rules)[1] == "too_long" for d in drawn if d.tokens == 7)


def fake_draw(model, tokenizer, problems, cfg, progress=False):
    """Per problem: right (its worked steps), the same again, wrong, unfinished; then k - 4 more wrong ones."""
    samples = []
    for i, p in enumerate(problems):
        right = f"{p.steps}\nSo the answer is {p.answer}.\n</think>\n\n<answer>{p.answer}</answer>"
        texts = [right, right, right.replace(f"<answer>{p.answer}", "<answer>x"), p.steps]
        texts += [texts[2]] * (cfg.k - len(texts))
        samples += [Drawn(i, text, cfg.max_tokens + 1 if text == p.steps else 20) for text in texts[:cfg.k]]
    return samples


def test_kept_samples_are_written_as_sft_conversations(base, tok, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sampling, "draw", fake_draw)
    out = tmp_path / "out"
    assert main(["sample", "--model", str(base), "--problems-per-task", "3", "--k", "5", "--instructions", "4",
                 "--out-dir", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    n = 3 * len(tasks.TASKS)
    check_counts(summary, 5 * n)
    assert summary["kept"] == n and summary["prompts_with_a_kept_sample"] == n
    assert summary["rejected"] == {"too_long": n, "no_format": 0, "wrong": 2 * n, "language": 0, "repetitive": 0,
                                   "duplicate": n, "over_limit": 0}
    assert summary["kept_rate"] == pytest.approx(0.2) and summary["examples"]["wrong"]["completion"]
    problems = sampling.builtin_problems(3, 1, 0)
    assert all(tasks.split_of(p.question) == "train" for p in problems)  # never the questions eval holds out
    assert len({p.question for p in problems}) == n
    conversations = read_conversations([out / "data.jsonl"])  # nanoseek sft's reader
    assert len(conversations) == n + 4
    for conversation, problem in zip(conversations, problems):
        user, reply = conversation.messages
        assert user == {"role": "user", "content": problem.question}
        assert reply == {"role": "assistant", "content": f"<answer>{problem.answer}</answer>",
                         "reasoning_content": f"{problem.steps}\nSo the answer is {problem.answer}."}
    data = load_data(SFTConfig(data=(str(out / "data.jsonl"),), heldout_fraction=0.0), tok, seed=0)
    assert len(data.train) == n + 4 and not data.skipped["train"]  # and trains: every row encodes


@pytest.mark.parametrize("option,value,message", [
    ("--k", "0", "invalid sample option 'k' = 0: must be > 0"),
    ("--max-tokens", "-1", "invalid sample option 'max_tokens' = -1: must be > 0"),
    ("--min-language-share", "1.5", "'min_language_share' = 1.5: must be in [0, 1]"),
    ("--difficulty", "4", "'difficulty' = 4: must be 0 (mixed) or one of 1, 2, 3"),
    ("--tasks", "poetry", "unknown task 'poetry'"),
    ("--k", "many", "argument --k: invalid int value: 'many'"),
])
def test_bad_options_exit_2_with_a_message(option, value, message, tmp_path, capsys):
    assert main(["sample", option, value, "--out-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_model_is_a_message(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "none"), "--out-dir", str(tmp_path / "out")]) == 2
    assert f"no model at {tmp_path / 'none'}" in capsys.readouterr().err


# ---------------------------------------------------------------------- 3. a user's problems
def test_user_problems_read_gsm8k_and_math_answers(tmp_path):
    path = write_jsonl(tmp_path / "problems.jsonl", [
        {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
         "answer": "In May she sold 48/2 = <<48/2=24>>24.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"},
        {"question": "What is $6 \\times 7$?", "answer": "We have $6 \\times 7 = \\boxed{42}$."},
        "",
        {"question": "What is 40 + 2?", "answer": 42, "task": "addition"},
        {"question": "How many grams in a kilogram?", "answer": "#### 1,000"},
    ])
    problems = read_problems([path])
    assert [(p.task, p.answer) for p in problems] == [("user", "72"), ("user", "42"), ("addition", "42"),
                                                      ("user", "1000")]
    assert reference_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}" and reference_answer(" 7 ") == "7"


@pytest.mark.parametrize("line,message", [
    ({"answer": "#### 42"}, "no \"question\""),
    ({"question": "What?", "answer": ""}, "no \"answer\""),
    ("{not json", "not valid JSON"),
    ({"question": "What is 1 + 1?", "answer": "2", "task": "poetry"}, "unknown task 'poetry'"),
    ({"question": "What is 1 + 1?", "answer": "two", "task": "addition"},
     "the addition checker does not take the answer 'two' as a right answer"),
    ({"question": "Make 10 from 2, 5 using + - * / (each number at most once).", "answer": "2 + 5",
      "task": "countdown"}, "the countdown checker does not take the answer '2 + 5'"),
    ({"question": "What is 1 + 1?", "answer": "2", "task": "countdown"},
     "the countdown checker cannot read this problem"),
])
def test_a_bad_problem_line_is_named_by_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "problems.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}, line])
    with pytest.raises(ProblemFileError) as error:
        read_problems([path])
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)


def test_a_bad_problem_line_is_a_message_from_the_command(tmp_path, capsys):
    path = write_jsonl(tmp_path / "problems.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}, {"answer": 2}])
    assert main(["sample", "--problems", str(path), "--model", str(tmp_path), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"nanoseek: error: {path}:2: no \"question\"" in err and "Traceback" not in err
    assert main(["sample", "--problems", str(path), "--tasks", "addition", "--out-dir", str(tmp_path)]) == 2
    assert "invalid sample option 'tasks'" in capsys.readouterr().err


# ---------------------------------------------------------------------- 4. the built-in instructions
def test_instructions_pass_their_own_checker(tok):
    conversations = instruction_conversations(100, seed=3)
    assert conversations == instruction_conversations(100, seed=3)  # deterministic
    questions = [c.messages[0]["content"] for c in conversations]
    assert {instruction_kind(q) for q in questions} == set(INSTRUCTIONS)
    for conversation in conversations:
        user, reply = conversation.messages
        assert reply["reasoning_content"] == "" and check_instruction(user["content"], reply["content"])
    heldout = instruction_conversations(50, seed=3, split="heldout")
    assert {instruction_kind(c.messages[0]["content"]) for c in heldout} == set(INSTRUCTIONS)
    assert not {c.messages[0]["content"] for c in heldout} & set(questions)


@pytest.mark.parametrize("question,right,wrong", [
    ("Say hello to Ada.", ["Hello, Ada!", "hello Ada", "Well, hello there, Ada."], ["Hi, Ada!", "Hello, Alan!",
                                                                                   "Hello, Adam!"]),
    ("Repeat after me: apple river stone", ["apple river stone", "Apple, river, stone."],
     ["apple stone river", "apple river", "apple river stone stone"]),
    ("What is the last word of: green quiet window", ["window", "\"Window\"."], ["green", "window quiet", ""]),
    ("Write the number 42 in words.", ["forty-two", "Forty two."], ["42", "forty", "twenty-four"]),
    ("Write the number 305 in words.", ["three hundred five", "three hundred and five"], ["three hundred fifty"]),
    ("Write apple in capital letters.", ["APPLE", "APPLE."], ["Apple", "apple", "APPLES"]),
])
def test_the_instruction_checker(question, right, wrong):
    assert all(check_instruction(question, reply) for reply in right)
    assert not any(check_instruction(question, reply) for reply in wrong)


def test_the_instruction_checker_refuses_other_questions():
    with pytest.raises(ValueError, match="not a built-in instruction"):
        check_instruction("What is 2 + 2?", "4")
    assert [number_words(n) for n in (0, 13, 20, 99, 100, 110, 999)] == [
        "zero", "thirteen", "twenty", "ninety-nine", "one hundred", "one hundred ten", "nine hundred ninety-nine"]


def test_an_instruction_reply_is_rendered_with_an_empty_think_block(tok):
    """As DeepSeek-R1 answers a simple prompt: `<think>\\n\\n</think>\\n\\n` then the answer, learnt whole, after
    the generation prompt that opens `<think>\\n`; a reply with no reasoning_content at all is the answer alone."""
    messages = instruction_conversations(1, seed=0)[0].messages
    text = apply_chat_template(messages, add_generation_prompt=False)
    prompt = apply_chat_template(messages[:1])
    reply = messages[1]["content"]
    assert text == prompt + f"\n</think>\n\n{reply}{EOS}" and prompt.endswith(ASSISTANT + "<think>\n")
    (ids, mask), = encode_conversations(tok, [messages])
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == f"<think>\n\n</think>\n\n{reply}{EOS}"
    inline = [messages[0], {"role": "assistant", "content": f"<think>\n\n</think>\n\n{reply}"}]
    assert apply_chat_template(inline, add_generation_prompt=False) == text
    plain = [messages[0], {"role": "assistant", "content": reply}]
    assert apply_chat_template(plain, add_generation_prompt=False).endswith(ASSISTANT + reply + EOS)
    history = [*messages, {"role": "user", "content": "Again."}]  # an earlier reply shows its answer only
    assert ASSISTANT + reply + EOS in apply_chat_template(history)
