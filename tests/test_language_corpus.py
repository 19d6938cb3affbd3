"""Chinese narration of the built-in corpus (nanoseek/data/language.py, tasks.corpus(chinese_rate=...)): only the
narration's language changes, never the arithmetic or the answer, and chinese_rate=0 is the English corpus."""

import hashlib
import random
import re

import pytest

from nanoseek.cli import main
from nanoseek.data import tasks
from nanoseek.data.language import KINDS, NARRATION, narratable, narrate_in_chinese, narrate_line
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.rewards import language_consistency

CJK = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")
# Latin letters that are data, not narration: the variable x, and the letters counted.


def math_of(text):
    return re.findall(r"\d+|[+\-*/=]", text)


def problems(per_level=60, seed=0):
    rng = random.Random(seed)
    return [task.generate(rng, level) for task in tasks.TASKS.values() for level in tasks.DIFFICULTIES
            for _ in range(per_level)]


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_a_fully_narrated_solution_keeps_its_arithmetic_and_changes_language(name):
    for problem in (p for p in problems() if p.task == name):
        english = problem.steps
        chinese = narrate_in_chinese(english, 1.0)
        assert math_of(chinese) == math_of(english), (english, chinese)
        assert CJK.search(chinese), chinese
        assert len(chinese.split("\n")) == len(english.split("\n"))
        assert not re.search(r"[A-Za-z]{2,}", chinese), chinese  # no English word is left
        latin = re.findall(r"[A-Za-z]+", chinese)
        if name == "counting":  # only the letter counted and the letters of the word, which are data
            letter, word = re.fullmatch(r'How many times does the letter "(.)" appear in "(.*)"\?',
                                        problem.question).groups()
            assert set(latin) <= {letter, *word.split()}, (latin, problem.question)
        elif name == "linear_equation":  # only the variable
            assert set(latin) == {"x"}
        # Single letters are data to the reward: every task's Chinese narration is Chinese to it.
        assert language_consistency(chinese, "zh") >= 0.9 and language_consistency(chinese, "en") <= 0.1
        assert language_consistency(english, "en") == 1.0
        assert narrate_in_chinese(english, 0.0, random.Random(0)) == english
        assert narrate_in_chinese(chinese, 1.0) == chinese  # nothing left to narrate


def test_narration_lines():
    assert narrate_line("4 + 9 = 13, write 3 carry 1.") == "4 + 9 = 13，写 3 进 1。"
    assert narrate_line("17 - 9 = 8, write 8 borrow 1.") == "17 - 9 = 8，写 8 借 1。"
    assert narrate_line("So 4 + 49 = 53.") == "所以 4 + 49 = 53。"
    assert narrate_line("So x = -12.") == "所以 x = -12。"
    assert narrate_line("Smallest of 2, 1, 8 is 1.") == "2, 1, 8 中最小的是 1。"
    assert narrate_line("Letters: 1 q, 2 r, 3 q.") == "字母：1 q, 2 r, 3 q。"
    assert narrate_line("The letter r is at 2, 4.") == "字母 r 在第 2, 4 位。"
    assert narrate_line("5 - 3 = 2, 2 - 4 = -2, no.") == "5 - 3 = 2，2 - 4 = -2，不对。"
    for bare in ("10 * 7 = 70.", "x = 15 / 3 = 5.", "9x - 2x = -62 + 20 = -42.", "Something else.", ""):
        assert narrate_line(bare) == bare and not narratable(bare)


def test_the_table_is_consistent():
    for english, chinese in NARRATION:
        names = re.findall(r"\{(\w+):(\w+)\}", english)
        assert all(kind in KINDS for _, kind in names), english
        assert sorted(re.findall(r"\{(\w+)\}", chinese)) == sorted(name for name, _ in names), chinese
        assert CJK.search(chinese) and not re.search(r"[A-Za-z]", re.sub(r"\{\w+\}", "", chinese)), chinese
    # every line of every built-in task's steps is narrated, or is a bare equation with no word to narrate
    for problem in problems(per_level=40, seed=1):
        for line in problem.steps.split("\n"):
            assert narratable(line) or re.fullmatch(r"[-+*/()=\dx ]+\.", line), (problem.task, line)


def test_a_partial_share_mixes_lines_deterministically():
    steps = tasks.generate("addition", 1, seed=3, difficulty=3)[0].steps
    lines = steps.split("\n")
    mixed = narrate_in_chinese(steps, 0.5, random.Random(7))
    assert mixed == narrate_in_chinese(steps, 0.5, random.Random(7))
    flags = [bool(CJK.search(line)) for line in mixed.split("\n")]
    assert any(flags) and not all(flags) and len(flags) == len(lines)
    assert math_of(mixed) == math_of(steps)
    low = narrate_in_chinese("x = 15 / 3 = 5.\nSo x = 5.", 0.01, random.Random(0), at_least_one=True)
    assert low == "x = 15 / 3 = 5.\n所以 x = 5。"
    with pytest.raises(ValueError, match="share must be between 0 and 1, not 1.5"):
        narrate_in_chinese(steps, 1.5, random.Random(0))
    with pytest.raises(ValueError, match="needs an rng"):
        narrate_in_chinese(steps, 0.5)


# The English corpus before Chinese narration existed (sha256 of the documents joined by NUL bytes).
ENGLISH_CORPUS = {
    (2000, 0, None, "train", None, 0.0): "ba3b3084c600438fde7b3a4734073db0dcbada22bfddab020b8bb015b494af0e",
    (2000, 7, None, "train", 1, 0.5): "4a8112a215f921f7e8f9a01cb278a2216bd10370311de343cb0d67e04f898122",
    (500, 3, ("counting", "addition"), "heldout", 3, 0.2):
        "84723fc08171c0f68cac65daafb2087540f2cad99b1fbddc6df42a7585b10efe",
}


@pytest.mark.parametrize("args", list(ENGLISH_CORPUS))
def test_chinese_rate_zero_is_the_english_corpus_byte_for_byte(args):
    n, seed, names, split, difficulty, direct = args
    docs = tasks.corpus(n, seed=seed, tasks=list(names) if names else None, split=split, difficulty=difficulty,
                        direct_rate=direct, chinese_rate=0.0)
    assert hashlib.sha256("\x00".join(docs).encode()).hexdigest() == ENGLISH_CORPUS[args]


def test_chinese_rate_narrates_that_share_of_worked_documents():
    english = list(tasks.corpus(2000, seed=0, direct_rate=0.2))
    mixed = list(tasks.corpus(2000, seed=0, direct_rate=0.2, chinese_rate=0.3))
    assert mixed == list(tasks.corpus(2000, seed=0, direct_rate=0.2, chinese_rate=0.3))  # deterministic
    worked = [(e, m) for e, m in zip(english, mixed, strict=True) if "<think>\nThe answer is" not in e]
    assert 1500 < len(worked) < 1700
    chinese = [(e, m) for e, m in worked if CJK.search(m)]
    assert 0.26 < len(chinese) / len(worked) < 0.34
    fully = partly = 0
    for e, m in zip(english, mixed, strict=True):
        # the same problem, the same answer, the same arithmetic: only the narration differs
        assert e.split("\n", 1)[0] == m.split("\n", 1)[0]
        assert tasks.extract_answer(e) == tasks.extract_answer(m)
        assert math_of(e) == math_of(m)
        if e != m:
            head, tail = e.index("<think>\n") + len("<think>\n"), e.index("\n</think>")
            assert m[:head] == e[:head] and m[m.index("\n</think>"):] == e[tail:]  # only the steps differ
            narrated = [line for line in e.split("\n") if narratable(line)]
            chinese_lines = [line for line in m.split("\n") if CJK.search(line)]
            fully += len(chinese_lines) == len(narrated)
            partly += 0 < len(chinese_lines) < len(narrated)
    assert fully > 100 and partly > 100  # both wholly and partly mixed reasoning
    assert not any(CJK.search(d) for d in tasks.corpus(200, seed=0, direct_rate=1.0, chinese_rate=1.0))
    assert all(CJK.search(d) for d in tasks.corpus(200, seed=0, chinese_rate=1.0))
    with pytest.raises(ValueError, match="chinese_rate must be between 0 and 1, not 2"):
        tasks.corpus(3, chinese_rate=2)


def test_checkers_accept_the_answers_of_narrated_documents():
    for problem in problems(per_level=20, seed=2):
        document = tasks.format_document(problem, chinese_share=1.0)
        assert CJK.search(document)
        assert document.startswith(tasks.format_prompt(problem))
        assert tasks.check_answer(problem, tasks.extract_answer(document))
        assert tasks.format_document(problem, worked=False, chinese_share=1.0) == \
            tasks.format_document(problem, worked=False)  # a direct answer stays English


def test_the_bpe_round_trips_a_chinese_document():
    docs = list(tasks.corpus(400, seed=0, chinese_rate=0.5))
    tokenizer = Tokenizer.train(docs, 400)
    for problem in problems(per_level=2, seed=4):
        document = tasks.format_document(problem, chinese_share=1.0)
        assert tokenizer.decode(tokenizer.encode(document)) == document
    english_only = Tokenizer.train(list(tasks.corpus(200, seed=0)), 300)  # never saw Chinese: bytes still do
    assert english_only.decode(english_only.encode(document)) == document


def test_pretrain_refuses_a_chinese_rate_outside_0_1(tmp_path, capsys):
    assert main(["pretrain", "--out-dir", str(tmp_path / "run"), "--chinese-rate", "2"]) == 2
    assert "chinese_rate 2.0 must be between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pretrain_passes_chinese_rate_to_the_corpus(tmp_path, monkeypatch):
    from nanoseek.train import pretrain

    seen, original = [], tasks.corpus

    def corpus(*args, **kwargs):
        seen.append(kwargs.get("chinese_rate"))
        docs = list(original(*args, **kwargs))
        seen.append(sum(bool(CJK.search(d)) for d in docs))
        return iter(docs)

    monkeypatch.setattr(pretrain.tasks, "corpus", corpus)
    config = pretrain.PretrainConfig(builtin_docs=100, direct_rate=0.0, chinese_rate=1.0, heldout_fraction=0.1)
    pretrain.prepare_data(config, tmp_path / "data", 300, seed=0)
    assert seen == [1.0, 100]
    assert pretrain.PretrainConfig().chinese_rate == 0.0


def test_chat_documents_are_deepseek_chat_turns():
    """chat_rate: that share of the documents is one DeepSeek chat turn (the rendering `nanoseek sft` trains on,
    without the bos/eos the packing adds); the problems and which are worked do not change."""
    from nanoseek.data.tokenizer import BOS, EOS, apply_chat_template

    plain = list(tasks.corpus(2000, seed=3, difficulty=1, direct_rate=0.5))
    mixed = list(tasks.corpus(2000, seed=3, difficulty=1, direct_rate=0.5, chat_rate=0.3))
    chat = [i for i, doc in enumerate(mixed) if doc.startswith("<｜User｜>")]
    assert 0.26 < len(chat) / len(mixed) < 0.34
    for i, (before, after) in enumerate(zip(plain, mixed, strict=True)):
        if i not in chat:
            assert after == before
            continue
        question = before.removeprefix("Question: ").split("\n<think>\n")[0]
        thought, answer = before.split("\n<think>\n")[1].split("\n</think>\n")
        expected = apply_chat_template([{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer, "reasoning_content": thought}],
                                       add_generation_prompt=False)
        assert BOS + after + EOS == expected
        assert tasks.extract_answer(after) == tasks.extract_answer(before)


def test_chat_rate_out_of_range_is_refused(capsys):
    with pytest.raises(ValueError, match="chat_rate must be between 0 and 1"):
        next(tasks.corpus(1, chat_rate=1.5))
    assert main(["pretrain", "--chat-rate", "2"]) == 2
    assert "chat_rate 2.0 must be between 0 and 1" in capsys.readouterr().err
