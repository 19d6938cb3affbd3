"""Chinese narration of the built-in tasks' worked steps: DeepSeek-R1-Zero's language mixing, made on purpose.

R1-Zero mixed Chinese into its English reasoning, and R1 added a language-consistency reward against it
(`rewards.language_consistency`: Latin words count as English, each CJK character as one Chinese word). The
built-in corpus is English only, so that reward had nothing to remove; `tasks.corpus(chinese_rate=...)` narrates
a share of the worked documents in Chinese through `narrate_in_chinese`.

Only the narration changes. Each line of a worked solution either matches one entry of `NARRATION` (English
pattern -> Chinese template) as a whole, and is rewritten with every captured piece (numbers, equations,
lists, the letters being counted) copied exactly; or it matches none (a bare equation such as "10 * 7 = 70.")
and is left as it is. The arithmetic of a narrated solution is therefore the same, symbol for symbol; its
narration punctuation becomes the full-width "，" and "。", while a list keeps its ", ".

Two tasks keep Latin letters that are data, not narration: counting (the counted letter and the word spelled
out letter by letter) and linear equations (the variable x). They are single letters, which the language reward
(`rewards.language_consistency`) does not count as words, so a wholly Chinese narration of any task is Chinese to
it.
"""

from __future__ import annotations

import random
import re

# What a placeholder of a NARRATION pattern may capture: math and data only, never a word of narration.
KINDS = {
    "n": r"-?\d+",  # a number
    "eq": r"[-+*/()\d ]+ = -?\d+",  # an equation ending with its value: "6 + 9 + 1 = 16"
    "expr": r"[-+*/()=\dx ]+",  # arithmetic, possibly with the variable x: "(9 + 7) * 3 = 48", "x = 5"
    "list": r"-?\d+(?:, -?\d+)*",  # "1, 4, 9"
    "letter": r"[a-z]",  # the letter being counted
    "letters": r"\d+ [a-z](?:, \d+ [a-z])*",  # the spelled-out word: "1 q, 2 r, 3 q"
}

# English line -> Chinese line. A line is rewritten by the first entry whose pattern matches all of it;
# `{name:kind}` captures a piece of kind KINDS[kind], which the Chinese template copies as `{name}`.
NARRATION: tuple[tuple[str, str], ...] = (
    # column arithmetic: addition, subtraction, multiplication (tasks._add/_subtract/_multiply_columns)
    ("{eq:eq}, write {digit:n} carry {carry:n}.", "{eq}，写 {digit} 进 {carry}。"),
    ("{eq:eq}, write {digit:n} borrow {borrow:n}.", "{eq}，写 {digit} 借 {borrow}。"),
    ("{eq:eq}, write {digit:n}.", "{eq}，写 {digit}。"),
    ("Write the carry {carry:n}.", "写下进位 {carry}。"),
    # multiplication by a number of several digits: one partial product per digit, then their sum
    ("Multiply {a:n} by {digit:n}.", "计算 {a} 乘以 {digit}。"),
    ("{product:eq}, so {shifted:eq}.", "{product}，所以 {shifted}。"),
    ("Add {sum:expr}.", "相加 {sum}。"),
    # Countdown's search over a + b + c, a + b - c, ...
    ("{first:eq}, {second:eq}, yes.", "{first}，{second}，对。"),
    ("{first:eq}, {second:eq}, no.", "{first}，{second}，不对。"),
    # sorting, by selection
    ("Smallest of {rest:list} is {smallest:n}.", "{rest} 中最小的是 {smallest}。"),
    ("Last is {last:n}.", "最后剩下 {last}。"),
    ("So the sorted list is {sorted:list}.", "所以排好的顺序是 {sorted}。"),
    # counting letters
    ("Letters: {letters:letters}.", "字母：{letters}。"),
    ("The letter {letter:letter} is at {positions:list}.", "字母 {letter} 在第 {positions} 位。"),
    ("The letter {letter:letter} is at no position.", "字母 {letter} 没有出现。"),
    ("So the count is {count:n}.", "所以个数是 {count}。"),
    # every task's last line: "So 4 + 49 = 53.", "So x = 12.", "So (9 + 7) * 3 = 48."
    ("So {result:expr}.", "所以 {result}。"),
)

_PLACEHOLDER = re.compile(r"\{(\w+):(\w+)\}")


def _compile(english: str) -> re.Pattern[str]:
    parts, end = [], 0
    for match in _PLACEHOLDER.finditer(english):
        name, kind = match.groups()
        parts += [re.escape(english[end:match.start()]), f"(?P<{name}>{KINDS[kind]})"]
        end = match.end()
    return re.compile("".join(parts) + re.escape(english[end:]))


_RULES = tuple((_compile(english), chinese) for english, chinese in NARRATION)


def narrate_line(line: str) -> str:
    """One line of worked steps with its narration in Chinese; a line that no NARRATION entry matches (a bare
    equation, or one already in Chinese) comes back unchanged."""
    for pattern, chinese in _RULES:
        match = pattern.fullmatch(line)
        if match:
            return chinese.format(**match.groupdict())
    return line


def narratable(line: str) -> bool:
    """Whether narrate_line changes the line."""
    return narrate_line(line) != line


def narrate_in_chinese(steps: str, share: float, rng: random.Random | None = None,
                       at_least_one: bool = False) -> str:
    """Worked steps (one per line) with each line's narration rewritten in Chinese with probability `share`
    (0: the steps as they are; 1: every line, and rng is not needed). Numbers, symbols, lists and counted letters
    are kept exactly. at_least_one: when the draw picked no line that has narration, narrate one of those at
    random, so that a document chosen for Chinese always shows some."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be between 0 and 1, not {share!r}")
    lines = steps.split("\n")
    if share == 0.0:
        return steps
    if share == 1.0:
        return "\n".join(map(narrate_line, lines))
    if rng is None:
        raise ValueError("a share between 0 and 1 needs an rng to draw the narrated lines")
    chosen = [rng.random() < share for _ in lines]
    candidates = [i for i, line in enumerate(lines) if narratable(line)]
    if at_least_one and candidates and not any(chosen[i] for i in candidates):
        chosen[rng.choice(candidates)] = True
    return "\n".join(narrate_line(line) if pick else line for line, pick in zip(lines, chosen, strict=True))
