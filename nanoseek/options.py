"""Command-line options shared by every `nanoseek` command (and `nanoseek.parallel.train`).

- `add_dataclass_options` makes one --option per field of a config dataclass: its type, default and help all
  come from the field itself, the help from the field's own comment in the source (one source of truth).
- `from_args` builds the dataclass back from the parsed arguments; `given_options` lists the options typed on
  the command line (what a resumed run applies to its saved settings).
- `positive_int`, `non_negative_int`, `non_negative_float`, `probability`, `fraction`: argparse `type=`
  validators, so that argparse names a bad option and exits with status 2.
- `HelpFormatter`: every option's help line ends with its default (or "required"); choices show in its metavar.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import math
import shlex
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter that also marks required options."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required and action.option_strings:
            return (action.help or "") + " (required)"
        return super()._get_help_string(action)


# ---------------------------------------------------------------------- validators for argparse `type=`
def _checked(kind: Callable[[str], T], ok: Callable[[T], bool], what: str) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type by it in some messages
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
non_negative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
probability = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
fraction = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


# ---------------------------------------------------------------------- config dataclasses as options
def child_options(parser: argparse.ArgumentParser, option: str, text: str, reserved: tuple[str, ...]) -> list[str]:
    """A script's `option` string of more options for the command it runs (shell-split); one that sets an option of
    `reserved` (the script sets those itself) is a usage error naming it."""
    options = shlex.split(text)
    if taken := [a for a in options if a.split("=", 1)[0] in reserved]:
        parser.error(f"{option} may not set {', '.join(taken)}: this script sets them for each run")
    return options


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                          defaults: Any = None) -> None:
    """One --option per field of the config dataclass `cls` (but those in `skip`), typed and defaulted from
    the field, or from the instance `defaults` where a stage's defaults differ; its help is the field's comment.
    A `Literal[...]` field gets those choices; a bool one --x/--no-x; a tuple one a list of values."""
    hints = typing.get_type_hints(cls)
    docs = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        flag = "--" + f.name.replace("_", "-")
        kind = _without_none(hints[f.name])
        help_text = (docs.get(f.name) or _describe(f.name, kind)).replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            parser.add_argument(flag, type=type(choices[0]), choices=choices, default=default, help=help_text)
        elif typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            parser.add_argument(flag, nargs="+", type=item, default=default, metavar=item.__name__.upper(),
                                help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, metavar=kind.__name__.upper(), help=help_text)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass `cls` from parsed arguments (its fields' names; lists become tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items() if k in names})


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the source of `cls` (and of its dataclass bases): the comment that ends the
    field's line, with the comment-only lines indented under it; else the comment lines just above the field."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            docs.update(_own_field_comments(base))
    return docs


def _own_field_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (an interactive session, a frozen build): names describe the fields
        return {}
    comments: dict[int, tuple[int, str, bool]] = {}  # line -> (column, text, alone on its line)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            comments[row] = (column, token.string.lstrip("#").strip(), not token.line[:column].strip())
    body = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)).body
    docs = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        lines = []
        trailing = comments.get(node.end_lineno)
        if trailing and not trailing[2]:
            lines.append(trailing[1])
            row = node.end_lineno + 1
            while (c := comments.get(row)) and c[2] and c[0] > node.col_offset:  # continuation lines
                lines.append(c[1])
                row += 1
        else:
            row = node.lineno - 1
            while (c := comments.get(row)) and c[2] and c[0] == node.col_offset:  # the block just above
                lines.insert(0, c[1])
                row -= 1
        if lines:
            docs[node.target.id] = " ".join(lines)
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _without_none(kind: Any) -> Any:
    """`X | None` -> X."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _describe(name: str, kind: Any) -> str:
    """The help of a field with no comment: its name and type."""
    what = getattr(kind, "__name__", None) or str(kind)
    return f"{name.replace('_', ' ')} ({what})"


def given_options(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """The options of `parser` typed in argv, with their parsed values (lists as tuples): a resumed run applies
    only these to its saved settings."""
    typed = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    given = {}
    for action in parser._actions:
        if typed & set(action.option_strings) and action.dest in vars(args):
            value = getattr(args, action.dest)
            given[action.dest] = tuple(value) if isinstance(value, list) else value
    return given
