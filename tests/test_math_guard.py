"""math_equal against hostile answers: every check ends within its limit, the pool keeps working, and a process
that leaves a hostile check running still exits at once (issue 15: math-verify in a thread could never be stopped)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanoseek import math_check
from nanoseek.math_check import MathVerifyPool, math_equal, math_equal_many

LIMIT_S = 1.0
SLACK_S = 1.5  # pipe round trip, and forking a replacement worker after a kill, on a busy 2-core machine
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def deep_nesting(rng: random.Random) -> str:
    depth = rng.randint(1000, 5000)
    opener, closer = rng.choice([("(", ")"), ("\\frac{1}{", "}"), ("\\sqrt{", "}"), ("{", "}"), ("[", "]"),
                                 ("\\left(", "\\right)"), ("-(", ")"), ("x^{", "}")])
    return opener * depth + str(rng.randint(0, 9)) + closer * depth


def exponent_tower(rng: random.Random) -> str:
    base, height = rng.randint(2, 9), rng.randint(4, 40)
    if rng.random() < 0.5:
        return "^".join([str(base)] * height)
    return "^{".join([str(base)] * height) + "}" * (height - 1)


def huge_integer(rng: random.Random) -> str:
    return rng.choice([
        lambda: "".join(rng.choices("0123456789", k=rng.randint(10_000, 100_000))),
        lambda: f"10^{{{rng.randint(10_000, 100_000)}}}",
        lambda: f"{rng.randint(10_000, 1_000_000)}!",
        lambda: f"({rng.randint(2, 9)}^{{{rng.randint(10, 99)}}})!",
        lambda: f"\\binom{{{10 ** rng.randint(6, 12)}}}{{{10 ** rng.randint(3, 5)}}}",
        lambda: f"(x+1)^{{{rng.randint(10_000, 1_000_000)}}}",
    ])()


LATEX_SCRAPS = ["{", "}", "\\left(", "\\right]", "\\begin{pmatrix}", "\\end{cases}", "\\frac{", "\\sqrt[", "&",
                "\\\\", "^", "_", "$", "\\boxed{", "\\int", "\\sum_{", "\\over", "1", "x", "\\", "%", "#"]


def malformed_latex(rng: random.Random) -> str:
    return "".join(rng.choices(LATEX_SCRAPS, k=rng.randint(50, 3000)))


def binary_noise(rng: random.Random) -> str:
    return rng.randbytes(rng.randint(100, 20_000)).decode("utf-8", errors="replace")


def adversarial_answers(per_kind: int = 40, seed: int = 0) -> list[str]:
    """200 hostile answers (40 of each kind), the same on every run."""
    rng = random.Random(seed)
    kinds = [deep_nesting, exponent_tower, huge_integer, malformed_latex, binary_noise]
    return [kind(rng) for kind in kinds for _ in range(per_kind)]


def timed_check(pair: tuple[str, str]) -> tuple[bool, float]:
    start = time.monotonic()
    verdict = math_equal(*pair, timeout=LIMIT_S)
    return verdict, time.monotonic() - start


def test_hostile_answers_end_within_the_limit():
    math_equal("1", "1")  # start the pool (a few seconds, once): that is no check's time
    answers = adversarial_answers()
    assert len(answers) == 200
    golds = ["\\frac{22}{7}", "-42.5", "\\{7, 8\\}", "\\sqrt{3}"]  # values no hostile answer holds
    pairs = [(golds[i % len(golds)], answer) for i, answer in enumerate(answers)]
    with ThreadPoolExecutor(math_check._math_pool.workers) as threads:  # as many callers as workers: no waiting
        results = list(threads.map(timed_check, pairs))
    slowest = max(elapsed for _, elapsed in results)
    print(f"slowest of {len(results)} hostile checks: {slowest:.2f} s; "
          f"{sum(elapsed >= LIMIT_S for _, elapsed in results)} ran into the {LIMIT_S} s limit")
    assert slowest < LIMIT_S + SLACK_S
    assert not any(verdict for verdict, _ in results)
    # the pool still works: honest answers are scored right, and within the limit
    for gold, predicted, equal in [("1/2", "0.5", True), ("3", "4", False), ("\\frac{1}{2}", "0.5", True),
                                   ("\\{1, 2\\}", "\\{2, 1\\}", True), ("(0, \\frac{1}{2}]", "(0, 0.5]", True),
                                   ("(0, 1]", "[0, 1]", False)]:
        verdict, elapsed = timed_check((gold, predicted))
        assert verdict is equal, (gold, predicted)
        assert elapsed < LIMIT_S + SLACK_S


def test_batch_matches_single_checks():
    pairs = [("1/2", "0.5"), ("3", "4"), ("1", "9^{9^{9^{9}}}"), ("x^2", "x \\cdot x"), ("2", "{" * 3000)]
    assert math_equal_many(pairs, timeout=LIMIT_S) == [True, False, False, True, False]


EXIT_SCRIPT = """
import os, signal, sys, threading, time
from nanoseek.math_check import math_equal

def descendants(pid):
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:  # it ended meanwhile
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found

hostile = "(" * 5000 + "1" + ")" * 5000
assert math_equal("1", hostile, timeout=1.0) is False  # timed out: its worker was killed
threading.Thread(target=math_equal, args=("1", hostile), kwargs={"timeout": 600.0}, daemon=True).start()
time.sleep(0.5)  # the second check is now running in a worker
print(*descendants(os.getpid()), flush=True)
print(time.time(), flush=True)
if sys.argv[1] == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no cleanup of ours runs
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, waiting to be reaped
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="finds the worker processes in /proc")
@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_process_with_a_hostile_check_running_exits_promptly(ending):
    """Ending normally, the process exits at once; killed, it leaves no worker behind either way."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, ending], capture_output=True, text=True, timeout=60,
                          env=env)
    exited = time.time()
    assert done.returncode == (0 if ending == "exit" else -9), done.stderr
    pids_line, end_line = done.stdout.splitlines()[-2:]
    exit_s = exited - float(end_line)
    print(f"{ending}: gone {exit_s:.2f} s after its last line, with a hostile check running")
    assert exit_s < 5.0
    helpers = [int(pid) for pid in pids_line.split()]
    assert len(helpers) >= 2  # the math-verify process and the worker busy with the 600-s check ...
    deadline = time.monotonic() + 5.0
    while any(map(alive, helpers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, helpers))  # ... are gone too, not left burning a core


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="predicted must be a str, not int"):
        math_equal("1", 1)
    with pytest.raises(TypeError, match="gold must be a str, not NoneType"):
        math_equal(None, "1")
    for timeout in (0, -1.0, float("nan"), "5"):
        with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
            math_equal("1", "1", timeout=timeout)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        MathVerifyPool(workers=0)
