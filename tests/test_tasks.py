import random
import re
import string
from collections import Counter
from fractions import Fraction

import pytest

from nanoseek.data import tasks

from nanoseek.data.tasks import (
    DIFFICULTIES,
    TASKS,
    Problem,
    check_answer,
    corpus,
    extract_answer,
    format_document,
    format_prompt,
    generate,
    normalize_answer,
    split_of,
)


def evaluate(expression: str) -> Fraction:
    """Test oracle: Python evaluates a (regex-validated, self-generated) arithmetic expression exactly."""
    assert re.fullmatch(r"[-+*/() 0-9]+", expression), expression
    return eval(re.sub(r"[0-9]+", r"Fraction(\g<0>)", expression), {"Fraction": Fraction})


def claims_hold(steps: str) -> int:
    """Every "a op b ... = c" written in the steps is true arithmetic; returns how many were checked."""
    claims = re.findall(r"(?<![\w)])(-?\d+(?: [-+*/] -?\d+)+) = (-?\d+)", steps)
    for lhs, rhs in claims:
        assert evaluate(lhs) == int(rhs), (lhs, rhs, steps)
    return len(claims)


def written_digits(steps: str) -> str:
    """The digits a column-by-column solution writes down, most significant first."""
    return "".join(re.findall(r"[Ww]rite (?:the carry )?(\d)", steps))[::-1]


def substitute(side: str, x: int) -> str:
    """One side of an equation with x plugged in: ("3x - 5", -2) -> "3*(-2) - 5"."""
    return re.sub(r"(\d)x", r"\1*x", side).replace("x", f"({x})")


def countdown_problem(numbers: list[int], target: int, answer: str) -> Problem:
    question = f"Make {target} from {', '.join(map(str, numbers))} using + - * / (each number at most once)."
    return Problem("countdown", question, answer, "", 1)


# --- generated problems are right, by independent oracles ---

@pytest.mark.parametrize("difficulty", DIFFICULTIES)
@pytest.mark.parametrize("task", list(TASKS))
def test_generated_problems_pass_their_own_checker(task, difficulty):
    for problem in generate(task, 40, seed=3, difficulty=difficulty):
        assert (problem.task, problem.difficulty) == (task, difficulty)
        assert check_answer(problem, problem.answer) is True
        assert normalize_answer(problem, problem.answer) is not None
        assert problem.steps and "<answer>" not in problem.steps and "</think>" not in problem.steps


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_addition_answers_and_columns(difficulty):
    for problem in generate("addition", 40, seed=1, difficulty=difficulty):
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", problem.question).groups())
        assert problem.answer == str(a + b)
        assert written_digits(problem.steps) == str(a + b)
        assert claims_hold(problem.steps) == len(str(max(a, b))) + 1
        if difficulty == 1:
            assert a < 100 and b < 100


def test_addition_narration_matches_the_hand_written_form():
    # Two 2-digit numbers whose ones carry, e.g. 47 + 38: "7 + 8 = 15, write 5 carry 1. 4 + 3 + 1 = 8, write 8."
    for problem in generate("addition", 500, seed=0, difficulty=1):
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", problem.question).groups())
        ones, tens = a % 10 + b % 10, a // 10 + b // 10 + 1
        if a >= 10 and b >= 10 and ones >= 10 and tens < 10:
            break
    else:
        pytest.fail("no 2-digit addition with a single carry in 500 level-1 problems")
    assert problem.steps == (f"{a % 10} + {b % 10} = {ones}, write {ones - 10} carry 1.\n"
                             f"{a // 10} + {b // 10} + 1 = {tens}, write {tens}.\n"
                             f"So {a} + {b} = {a + b}.")


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_subtraction_answers_and_columns(difficulty):
    for problem in generate("subtraction", 40, seed=1, difficulty=difficulty):
        a, b = map(int, re.fullmatch(r"What is (\d+) - (\d+)\?", problem.question).groups())
        assert a >= b and problem.answer == str(a - b)
        assert (written_digits(problem.steps).lstrip("0") or "0") == str(a - b)
        assert claims_hold(problem.steps) == len(str(a)) + 1


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_multiplication_answers_and_steps(difficulty):
    for problem in generate("multiplication", 40, seed=1, difficulty=difficulty):
        a, b = map(int, re.fullmatch(r"What is (\d+) \* (\d+)\?", problem.question).groups())
        assert problem.answer == str(a * b)
        assert claims_hold(problem.steps) >= len(str(a)) + 1
        if b < 10:
            assert written_digits(problem.steps) == str(a * b)
        if difficulty == 1:
            assert a < 100 and b < 10


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_countdown_answers_reach_the_target_with_the_given_numbers(difficulty):
    for problem in generate("countdown", 40, seed=1, difficulty=difficulty):
        target, given = re.match(r"Make (\d+) from ([\d, ]+) using", problem.question).groups()
        numbers = [int(n) for n in given.split(", ")]
        assert evaluate(problem.answer) == int(target)
        assert not Counter(map(int, re.findall(r"\d+", problem.answer))) - Counter(numbers)
        assert problem.steps.endswith(f"So {problem.answer} = {target}.")
        assert len(numbers) == (3 if difficulty < 3 else 4) and int(target) not in numbers
        if difficulty > 1:
            assert claims_hold(problem.steps) == len(numbers) - 1
            continue
        # Level 1 is solved by a search: tries in a fixed order, the last one hits, every earlier one misses.
        assert max(numbers) <= 9
        tries = problem.steps.splitlines()[:-1]
        assert claims_hold("\n".join(tries)) == 2 * len(tries)
        assert tries[-1].endswith(f" = {target}, yes.") and all(t.endswith("no.") for t in tries[:-1])
        assert not any(t.endswith(f" = {target}, no.") for t in tries)


def test_countdown_search_order_and_its_last_pattern():
    # 5 >= 4 >= 3: 12, 6, 4 and -2 miss; 4 + 3 - 5 = 2 is the fifth try
    steps, expression = tasks._countdown_search([4, 5, 3], 2)
    assert expression == "4 + 3 - 5" and len(steps) == 5
    assert steps[0] == "5 + 4 = 9, 9 + 3 = 12, no." and steps[3] == "5 - 4 = 1, 1 - 3 = -2, no."
    assert steps[4] == "4 + 3 = 7, 7 - 5 = 2, yes."


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_linear_equation_solutions_satisfy_the_equation(difficulty):
    for problem in generate("linear_equation", 40, seed=1, difficulty=difficulty):
        lhs, rhs = re.fullmatch(r"Solve for x: (.+) = (.+)\.", problem.question).groups()
        x = int(problem.answer)
        assert evaluate(substitute(lhs, x)) == evaluate(substitute(rhs, x))
        assert claims_hold(problem.steps) >= 1
        if difficulty == 1:
            assert lhs.count("x") + rhs.count("x") == 1


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_sorting_answers_are_sorted_questions(difficulty):
    for problem in generate("sorting", 40, seed=1, difficulty=difficulty):
        numbers = [int(n) for n in re.fullmatch(r"Sort in ascending order: (.+)\.", problem.question)[1].split(", ")]
        assert problem.answer == ", ".join(map(str, sorted(numbers)))
        assert problem.steps.count("Smallest of") == len(numbers) - 1
        if difficulty == 1:
            assert len(numbers) <= 4 and max(numbers) <= 9


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_counting_answers_count_the_letter(difficulty):
    for problem in generate("counting", 40, seed=1, difficulty=difficulty):
        question = r'How many times does the letter "(\w)" appear in "(\w(?: \w)*)"\?'
        letter, spelled = re.fullmatch(question, problem.question).groups()
        word = spelled.replace(" ", "")
        assert problem.answer == str(word.count(letter))
        positions = [i + 1 for i, c in enumerate(word) if c == letter]
        assert f"is at {', '.join(map(str, positions)) or 'no position'}." in problem.steps
        if difficulty == 1:
            assert len(word) <= 8


# --- determinism, splits, difficulty mix ---

@pytest.mark.parametrize("task", list(TASKS))
def test_generation_is_deterministic_per_seed(task):
    assert generate(task, 20, seed=7) == generate(task, 20, seed=7)
    assert generate(task, 20, seed=7) != generate(task, 20, seed=8)
    assert generate(task, 20, seed=7, difficulty=2) != generate(task, 20, seed=7, difficulty=3)


@pytest.mark.parametrize("task", list(TASKS))
def test_train_and_heldout_never_share_a_question(task):
    train = generate(task, 300, seed=0, split="train")
    heldout = generate(task, 60, seed=0, split="heldout")
    assert {p.question for p in train}.isdisjoint(p.question for p in heldout)
    assert all(split_of(p.question) == "train" for p in train)
    assert all(split_of(p.question) == "heldout" for p in heldout)


def test_heldout_is_about_ten_percent_and_stable():
    questions = [f"What is {i} + {i + 1}?" for i in range(5000)]
    fraction = sum(split_of(q) == "heldout" for q in questions) / len(questions)
    assert 0.08 < fraction < 0.12
    assert split_of("What is 47 + 38?") == split_of("What is 47 + 38?")


def test_mixed_difficulty_is_weighted_toward_easy():
    counts = Counter(p.difficulty for p in generate("addition", 1000, seed=0))
    assert set(counts) == set(DIFFICULTIES)
    assert counts[1] > counts[2] > counts[3]


# --- checkers ---

COUNTDOWN = countdown_problem([25, 4, 3, 7], 97, "(25 * 4) - 3")


@pytest.mark.parametrize("predicted, expected", [
    ("(25 * 4) - 3", True),
    ("25 * 4 - 3", True),  # precedence
    ("4*25-3", True),
    ("  (25 * 4) - 3. ", True),
    ("((25) * (4)) - (3)", True),
    ("(25 - 7) * 4 + 3 * 7", False),  # 7 used twice
    ("(25 * 4) - 7", False),  # 93
    ("(25 + 4) * 3", False),  # 87
    ("25 * 4 - 3 + 7 - 7", False),  # 97, but 7 twice
    ("(25 * 4) - 3 * 1", False),  # 97, but 1 is not given
    ("100 - 3", False),  # 100 is not given
    ("97", False),
    ("-3 + 25 * 4", False),  # no unary minus
    ("25 * 4 - 3)", False),
    ("(25 * 4 - 3", False),
    ("25 ** 4", False),
    ("25 * 4 - 3 = 97", False),
    ("__import__('os').system('true')", False),
    ("(25 * 4) \u2212 3", False),  # a Unicode minus sign
    ("", False),
    ("   ", False),
    ("banana", False),
    ("(" * 5000 + "97" + ")" * 5000, False),
    ("1+" * 5000 + "1", False),
])
def test_countdown_checker_table(predicted, expected):
    assert check_answer(COUNTDOWN, predicted) is expected


def test_countdown_checker_accepts_fraction_intermediates_and_rejects_division_by_zero():
    problem = countdown_problem([1, 3, 4, 6], 24, "6 * 4 * 1")
    assert check_answer(problem, "6 / (1 - 3 / 4)")  # 6 / (1/4) = 24 exactly
    assert not check_answer(problem, "6 / (1 - 3 / 4) + 1")  # 1 used twice
    zero = countdown_problem([3, 3, 6], 2, "6 / 3")
    assert not check_answer(zero, "6 / (3 - 3)")
    assert not check_answer(zero, "6 / 0")
    assert check_answer(zero, "6 / 3")


def test_countdown_check_needs_exact_value_not_rounding():
    problem = countdown_problem([7, 2, 5], 3, "5 - 2")
    assert not check_answer(problem, "7 / 2")  # 3.5
    assert not check_answer(problem, "(7 + 2) / 5 * 2")  # 18/5, and 2 twice


INTEGER_TABLE = [
    ("85", True), (" 85 ", True), ("85.", True), ("85\n", True), ("+85", True), ("085", True),
    ("86", False), ("8 5", False), ("85.0", False), ("eighty-five", False), ("85 apples", False),
    ("-85", False), ("", False), (".", False), ("8,5", False),
]


@pytest.mark.parametrize("predicted, expected", INTEGER_TABLE)
def test_integer_checker_table(predicted, expected):
    problem = Problem("addition", "What is 47 + 38?", "85", "", 1)
    assert check_answer(problem, predicted) is expected


def test_thousands_separators_and_negative_answers():
    problem = Problem("multiplication", "What is 47 * 38?", "1786", "", 2)
    assert check_answer(problem, "1,786") and check_answer(problem, "1786")
    assert not check_answer(problem, "17,86")
    negative = Problem("linear_equation", "Solve for x: 3x + 20 = x + 10.", "-5", "", 3)
    assert check_answer(negative, "-5") and check_answer(negative, "x = -5") and check_answer(negative, "x=-5.")
    assert not check_answer(negative, "5") and not check_answer(negative, "y = -5")


@pytest.mark.parametrize("predicted, expected", [
    ("1, 4, 7, 9", True), ("1,4,7,9", True), (" 1 ,4, 7 , 9. ", True), ("[1, 4, 7, 9]", True), ("1 4 7 9", True),
    ("9, 7, 4, 1", False), ("1, 4, 7", False), ("1, 4, 7, 9, 9", False), ("1, 4, , 7, 9", False),
    ("1, 4, 7, nine", False), ("[]", False), ("", False),
])
def test_sorting_checker_table(predicted, expected):
    problem = Problem("sorting", "Sort in ascending order: 7, 1, 9, 4.", "1, 4, 7, 9", "", 1)
    assert check_answer(problem, predicted) is expected


MALFORMED = [
    "", " ", "\n\t", ".", "..", "-", "+", ",", "()", "(", ")", "x =", "x = ", "=", "[", "]", "[,]", "nan", "inf",
    "1e5", "0x1F", "1_000", "١٢", "½", "\x00", "9" * 5000, "-" + "9" * 5000, "1/0", "0/0", "(1/0)", "((((((((",
    "(" * 10000, "(" * 100 + "1" + ")" * 100, "1" * 10000, "1, " * 3000, "<answer>85</answer>", "None",
    "'; DROP TABLE", "__import__('os')", "lambda: 1", "😀", "85" + "\u200b",
]


@pytest.mark.parametrize("task", list(TASKS))
def test_checkers_never_raise_on_malformed_input(task):
    problems = [generate(task, 1, seed=0, difficulty=d)[0] for d in DIFFICULTIES]
    rng = random.Random(0)
    garbage = ["".join(rng.choice(string.printable) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    for problem in problems:
        for predicted in MALFORMED + garbage:
            assert check_answer(problem, predicted) in (True, False)
            normalize_answer(problem, predicted)
            normalize_answer(task, predicted)
        for predicted in MALFORMED:
            assert check_answer(problem, predicted) is False


def test_huge_numbers_are_just_wrong():
    problem = Problem("addition", "What is 47 + 38?", "85", "", 1)
    assert not check_answer(problem, "9" * 5000)  # beyond Python's int-from-str digit limit
    assert not check_answer(problem, "1" * 150)
    assert not check_answer(COUNTDOWN, "9" * 150 + " * " + "9" * 40)


# --- normalisation for majority voting ---

def test_equivalent_answers_vote_together():
    problem = Problem("addition", "What is 47 + 38?", "85", "", 1)
    votes = Counter(normalize_answer(problem, a) for a in ["85", " 85. ", "85\n", "86", "garbage"])
    assert votes["85"] == 3 and votes["86"] == 1 and votes[None] == 1
    assert normalize_answer("addition", " 85. ") == "85"
    equation = Problem("linear_equation", "Solve for x: x + 2 = 7.", "5", "", 1)
    assert {normalize_answer(equation, a) for a in ["5", "x = 5", "x=5.", " 5 "]} == {"5"}
    assert normalize_answer("sorting", "[1,4, 7 ,9]") == "1, 4, 7, 9"


def test_correct_countdown_expressions_vote_together():
    assert {normalize_answer(COUNTDOWN, a) for a in ["(25 * 4) - 3", "4 * 25 - 3", " ( 4*25 )-3. "]} == {"97"}
    # Wrong answers (a bare "97" included) never vote with the correct ones, nor with each other.
    wrong = ["97", "25 * 4 - 7 + 7 - 3", "(25 * 4) - 7", "(25 + 4) * 3"]
    assert len({normalize_answer(COUNTDOWN, a) for a in wrong} | {"97"}) == len(wrong) + 1
    assert normalize_answer(COUNTDOWN, "(25 * 4) - 7") == normalize_answer(COUNTDOWN, " (25*4)-7 ")
    assert normalize_answer(COUNTDOWN, "6 / (3 - 3)") is None
    assert normalize_answer("countdown", "( 25 * 4 ) - 3") == "(25*4)-3"
    assert normalize_answer("countdown", "(" * 5 + "97" + ")" * 5) == "(((((97)))))"
    assert normalize_answer("countdown", "(" * 50 + "97" + ")" * 50) is None  # nesting beyond any real answer


# --- documents and corpus ---

def test_document_layout_and_answer_extraction():
    problem = Problem("addition", "What is 2 + 3?", "5", "2 + 3 = 5, write 5.\nSo 2 + 3 = 5.", 1)
    document = format_document(problem)
    assert document == ("Question: What is 2 + 3?\n<think>\n2 + 3 = 5, write 5.\nSo 2 + 3 = 5.\n</think>\n"
                        "<answer>5</answer>")
    assert document.startswith(format_prompt(problem))
    assert extract_answer(document) == "5"
    assert extract_answer("<think>x</think>\n<answer> 7 ") == " 7 "  # generation stopped before </answer>
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer("no tags here") is None


QUESTION_STARTS = {
    "addition": "What is \\d+ \\+", "subtraction": "What is \\d+ -", "multiplication": "What is \\d+ \\*",
    "countdown": "Make", "linear_equation": "Solve for x", "sorting": "Sort", "counting": "How many times",
}


def test_corpus_mixes_all_tasks_deterministically():
    docs = list(corpus(300, seed=0))
    assert len(docs) == 300 and docs == list(corpus(300, seed=0)) and docs != list(corpus(300, seed=1))
    for doc in docs:
        assert re.fullmatch(r"Question: .+\n<think>\n(.+\n)+</think>\n<answer>.+</answer>", doc), doc
    assert set(QUESTION_STARTS) == set(TASKS)
    for start in QUESTION_STARTS.values():
        assert any(re.match("Question: " + start, doc) for doc in docs), start


def test_corpus_direct_answers_state_the_answer_without_steps():
    worked, direct = list(corpus(400, seed=0)), list(corpus(400, seed=0, direct_rate=0.6))
    guesses = [doc for doc in direct if "\n<think>\nThe answer is " in doc]
    assert not any("\n<think>\nThe answer is " in doc for doc in worked)
    assert 0.5 < len(guesses) / 400 < 0.7
    for doc in guesses:
        assert re.fullmatch(r"Question: .+\n<think>\nThe answer is (.+)\.\n</think>\n<answer>\1</answer>", doc), doc
    assert all("\n<think>\nThe answer is " in doc for doc in corpus(20, seed=0, direct_rate=1.0))
    with pytest.raises(ValueError, match="direct_rate must be between 0 and 1, not 1.5"):
        corpus(3, direct_rate=1.5)


def test_corpus_respects_tasks_split_and_difficulty():
    docs = list(corpus(50, seed=0, tasks=["sorting"], split="heldout", difficulty=1))
    assert all(doc.startswith("Question: Sort in ascending order:") for doc in docs)
    questions = [doc.split("\n")[0].removeprefix("Question: ") for doc in docs]
    assert all(split_of(q) == "heldout" for q in questions)


# --- errors name the bad value ---

@pytest.mark.parametrize("call, bad", [
    (lambda: generate("divison", 3), "divison"),
    (lambda: generate("addition", 3, split="test"), "test"),
    (lambda: generate("addition", 3, difficulty=9), 9),
    (lambda: corpus(3, tasks=["addition", "chess"]), "chess"),
    (lambda: corpus(3, split="validation"), "validation"),
    (lambda: normalize_answer("chess", "1"), "chess"),
    (lambda: check_answer(Problem("chess", "e4?", "e5", "", 1), "e5"), "chess"),
    (lambda: TASKS["addition"].generate(random.Random(0), 0), 0),
])
def test_bad_names_raise_value_errors_naming_them(call, bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))) as error:
        call()
    assert "choose from" in str(error.value)


@pytest.mark.parametrize("name", list(TASKS))
def test_no_constant_answer_scores_well(name):
    """A policy that always gives one answer must not look like it solves a task (GRPO finds such shortcuts:
    counting once answered "1" 40% right)."""
    problems = generate(name, 600, seed=3, split="heldout", difficulty=1)
    answers = Counter(normalize_answer(p, p.answer) for p in problems)
    assert answers.most_common(1)[0][1] / len(problems) <= 0.2
