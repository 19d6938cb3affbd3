"""A Hugging Face checkpoint's own chat template (Jinja), rendered as transformers' `apply_chat_template` renders it.

Where the template comes from, as transformers 5 reads a checkpoint directory: `chat_template.jinja` (the default
template) and `additional_chat_templates/*.jinja` (named ones) first, then the `chat_template` of
`tokenizer_config.json` (a string, or a list of {"name", "template"} objects); a processor's legacy
`chat_template.json` ({"chat_template": ...}) only when neither has one. The special tokens the template sees
(`bos_token`, `eos_token`, ...) are the tokenizer config's, strings or AddedToken objects ({"content": ...}).

The environment is transformers': a sandbox that cannot change the inputs (ImmutableSandboxedEnvironment; templates
from the Hub are untrusted code), trim_blocks and lstrip_blocks, `{% break %}`/`{% continue %}`, a
`raise_exception(message)` and a `strftime_now(format)` global, a `tojson` filter that does not escape HTML (with
json.dumps's ensure_ascii, indent, separators and sort_keys), a `namespace` that refuses underscore names, and the
`{% generation %}` tag (rendered as its body). The messages are prepared as transformers prepares them: keys whose
value is None are dropped, and an assistant's reasoning (`reasoning_content`, `thinking` or `reasoning`) is passed
as both `reasoning_content` and `thinking`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils

from nanoseek.errors import NanoseekError

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
JINJA_FILE = "chat_template.jinja"
TEMPLATES_DIR = "additional_chat_templates"
PROCESSOR_FILE = "chat_template.json"
# The files a checkpoint's template and its special tokens are read from (copy them along to keep the template).
TEMPLATE_FILES = (CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, JINJA_FILE, PROCESSOR_FILE)
# The special tokens transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the first is the name templates read


class ChatTemplateError(NanoseekError, ValueError):
    """A checkpoint's chat template that cannot be read or rendered; the message names the file and the cause."""


# ---------------------------------------------------------------------- the Jinja environment
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which marks the assistant's text for transformers' assistant
    masks: rendered as its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _check_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template cannot set the underscore attribute {name!r} on a "
                                              "namespace")


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing underscore names (a way to reach Python's internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # no `self` parameter, as Jinja's: `namespace(self=1)` works
        attrs = dict(*args[1:], **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(args[0], attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _DictBuilder:
    """The `dict` global: builds dicts, without exposing the dict type itself to the template."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


def _raise_exception(message: object) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictBuilder(),
                       namespace=_Namespace)
    return env


_ENV = _environment()


# ---------------------------------------------------------------------- the template's inputs
def _plain(value: Any) -> Any:
    """A copy of `value` made of JSON's types only (dict, list, tuple, str, int, float, bool, None); anything else
    becomes the placeholder "<TypeName>", so a template never holds an object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # a subclass (an enum, say) back to the base type, its own str() aside
        return str.__str__(value)
    for kind in (int, float):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    item = getattr(value, "item", None)  # numpy and torch scalars
    if callable(item) and getattr(value, "shape", None) == ():
        return _plain(item())
    return f"<{type(value).__name__}>"


def prepare_messages(messages: Sequence[Mapping]) -> list[dict]:
    """The messages as transformers hands them to a template: plain copies without the keys whose value is None,
    and a reasoning given under any of its names (`reasoning_content`, `thinking`, `reasoning`) under both
    `reasoning_content` and `thinking` (a message's own `thinking` is kept)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("cannot render an empty conversation: give at least one message")
    prepared = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {i}: expected an object with a role and a content, got "
                                    f"{type(message).__name__}")
        message = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def _token_text(value: Any, file: Path, name: str) -> str | None:
    """A special token of a tokenizer config: a string, or an AddedToken object {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ChatTemplateError(f"{file}: {name} must be a string or an object with a \"content\" string, got "
                            f"{json.dumps(value)[:200]}")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{file} is not a JSON object")
    return data


def _config_templates(value: Any, file: Path) -> dict[str, str]:
    """tokenizer_config.json's `chat_template`: a string, or a list of {"name", "template"} (or a name -> template
    object) -> templates by name."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, Mapping):
        value = [{"name": k, "template": v} for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ChatTemplateError(f"{file}: chat_template must be a string or a list of {{\"name\", \"template\"}} "
                            f"objects, got {type(value).__name__}")


def read_special_tokens(directory: str | Path) -> dict[str, str]:
    """The named special tokens a template sees (bos_token, eos_token, ...) -> their strings, from the directory's
    tokenizer_config.json (its model-specific `extra_special_tokens` object too) and, as transformers reads a
    config without `added_tokens_decoder` (an older format), special_tokens_map.json over it."""
    directory = Path(directory)
    config_file, map_file = directory / CONFIG_FILE, directory / SPECIAL_TOKENS_MAP_FILE
    config = _read_json(config_file) if config_file.is_file() else {}
    entries: dict[str, Any] = {name: config[name] for name in SPECIAL_TOKEN_NAMES if name in config}
    if isinstance(config.get("extra_special_tokens"), Mapping):
        entries.update(config["extra_special_tokens"])
    sources = dict.fromkeys(entries, config_file)
    if map_file.is_file() and "added_tokens_decoder" not in config:
        legacy = _read_json(map_file)
        for name in SPECIAL_TOKEN_NAMES:
            if legacy.get(name):
                entries[name], sources[name] = legacy[name], map_file
        if isinstance(legacy.get("extra_special_tokens"), Mapping):
            for name, value in legacy["extra_special_tokens"].items():
                entries[name], sources[name] = value, map_file
    tokens = {name: _token_text(value, sources[name], name) for name, value in entries.items()}
    return {name: text for name, text in tokens.items() if text is not None}


# ---------------------------------------------------------------------- the template
class ChatTemplate:
    """A chat template (Jinja source, by name: "default", "tool_use", ...) with the special tokens it is rendered
    with. `origin` names where it came from, for error messages."""

    def __init__(self, templates: str | Mapping[str, str], special_tokens: Mapping[str, str] | None = None,
                 origin: str | Mapping[str, str] = "chat template"):
        """origin: where the templates came from (a file name), or where each came from, by name."""
        self.templates = {"default": templates} if isinstance(templates, str) else dict(templates)
        self.origins = {name: str(origin if isinstance(origin, str) else origin.get(name, "chat template"))
                        for name in self.templates}
        if not self.templates:
            raise ChatTemplateError(f"{', '.join(self.origins.values()) or origin}: no template given")
        for name, source in self.templates.items():
            if not isinstance(source, str):
                raise ChatTemplateError(f"{self._where(name)} is a {type(source).__name__}, not Jinja text")
        self.special_tokens = dict(special_tokens or {})
        self._compiled: dict[str, jinja2.Template] = {}
        for name, source in self.templates.items():
            try:
                self._compiled[name] = _ENV.from_string(source)
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(f"{self._where(name)} is not valid Jinja (line {e.lineno}: "
                                        f"{e.message})") from None

    @property
    def origin(self) -> str:
        """Where the templates came from: their files, comma-separated."""
        return ", ".join(dict.fromkeys(self.origins.values()))

    def _where(self, name: str) -> str:
        return f"{self.origins[name]}: the chat template" + ("" if name == "default" else f" {name!r}")

    @property
    def source(self) -> str:
        """The default template's text (the one `render` uses unless told otherwise)."""
        return self.templates["default"] if "default" in self.templates else next(iter(self.templates.values()))

    @classmethod
    def find(cls, directory: str | Path) -> ChatTemplate | None:
        """The chat template of a checkpoint (or tokenizer) directory, or None when it has none. A file that is
        there but cannot be read is a ChatTemplateError naming it."""
        directory = Path(directory)
        templates: dict[str, str] = {}
        origins: dict[str, Path] = {}
        config_file = directory / CONFIG_FILE
        if config_file.is_file():
            templates.update(_config_templates(_read_json(config_file).get("chat_template"), config_file))
            origins.update(dict.fromkeys(templates, config_file))
        files = [("default", directory / JINJA_FILE)] if (directory / JINJA_FILE).is_file() else []
        if (directory / TEMPLATES_DIR).is_dir():
            files += [(f.name.removesuffix(".jinja"), f) for f in sorted((directory / TEMPLATES_DIR).glob("*.jinja"))]
        for name, file in files:  # the template files take priority over the config's, as in transformers
            try:
                templates[name] = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ChatTemplateError(f"{file} is not UTF-8 text ({e.reason})") from None
            origins[name] = file
        processor_file = directory / PROCESSOR_FILE
        if not templates and processor_file.is_file():
            templates.update(_config_templates(_read_json(processor_file).get("chat_template"), processor_file))
            origins.update(dict.fromkeys(templates, processor_file))
        if not templates:
            return None
        return cls(templates, read_special_tokens(directory), {name: str(file) for name, file in origins.items()})

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> ChatTemplate:
        """The chat template of a checkpoint directory; a ChatTemplateError naming the files looked at when it has
        none."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ChatTemplateError(f"no checkpoint directory at {directory}")
        template = cls.find(directory)
        if template is None:
            raise ChatTemplateError(
                f"{directory} has no chat template: {directory / CONFIG_FILE} has no \"chat_template\" (or is not "
                f"there), and there is no {JINJA_FILE}, {TEMPLATES_DIR}/*.jinja or {PROCESSOR_FILE}")
        return template

    def _pick(self, name: str | None, tools: object) -> tuple[str, jinja2.Template]:
        """The template to render, as transformers picks it: the one named, else "tool_use" when there are tools
        and it exists, else "default"."""
        if name is None:
            name = "tool_use" if tools is not None and "tool_use" in self.templates else "default"
        if name not in self._compiled:
            raise ChatTemplateError(f"{self.origin}: no chat template named {name!r} (there are "
                                    f"{', '.join(map(repr, sorted(self.templates)))}); pass template= one of them")
        return name, self._compiled[name]

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, *,
               tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
               template: str | None = None, **extra: Any) -> str:
        """The conversation as the template writes it, equal to transformers'
        `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`. tools: JSON schemas
        of functions; documents: {"title", "text"} objects; template: a named template (default: "tool_use" with
        tools when there is one, else "default"); extra: more template variables (e.g. Qwen3's
        enable_thinking=False), which override the special tokens of the same name."""
        name, compiled = self._pick(template, tools)
        chat = prepare_messages(messages)
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise ChatTemplateError("tools must be JSON schemas (objects), one per function")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise ChatTemplateError("documents must be objects with a \"title\" and a \"text\"")
        variables = {**self.special_tokens, **_plain(extra)}
        try:
            return compiled.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:  # raise_exception(...), an undefined name, a sandbox refusal
            cause = e.message if e.message is not None else type(e).__name__
        except Exception as e:  # noqa: BLE001 - a Python error inside the template, e.g. a string plus a list
            cause = f"{type(e).__name__}: {e}"
        raise ChatTemplateError(f"{self._where(name)} raised an error: {cause}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.origin!r}, templates={sorted(self.templates)})"
