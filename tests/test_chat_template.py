"""A checkpoint's own chat template (data/template.py) rendered as transformers renders it: an R1-Distill-style
template, a Llama-3-style one and one that exercises the rest of the environment (tojson, loop controls, the
generation tag, dict, tools, documents, extra variables, reasoning aliases, None-valued keys), each saved in a tiny
transformers tokenizer directory (the template in chat_template.jinja, or in tokenizer_config.json with AddedToken
special tokens, or as a list of named templates) and compared with `apply_chat_template`. Then the errors, the
Tokenizer hook, and nanoseek's own DeepSeek rendering, which a checkpoint without a template keeps."""

import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanoseek.data.template import ChatTemplate, ChatTemplateError
from nanoseek.data.tokenizer import BOS, EOS, PAD, Tokenizer, apply_chat_template

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

# Written after DeepSeek-R1-Distill-Qwen's tokenizer_config.json (the tool-call branches left out): the last system
# prompt, bos, user turns, assistant turns cut to what follows their last </think>, the generation prompt opening
# <think>. A namespace set in loops, conditionals, split.
R1_TEMPLATE = (
    r"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    r"{%- for message in messages %}{%- if message['role'] == 'system' %}"
    r"{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    r"{{bos_token}}{{ns.system_prompt}}"
    r"{%- for message in messages %}"
    r"{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}"
    r"{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    r"{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    r"{%- set ns.is_tool = false -%}"
    r"{%- else %}{% set content = message['content'] %}"
    r"{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    r"{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    r"{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    r"{%- if ns.is_output_first %}"
    r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- set ns.is_output_first = false %}"
    r"{%- else %}{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}"
    r"{%- endif %}"
    r"{%- endfor -%}"
    r"{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    r"{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\n'}}{% endif %}"
)

# Written after Llama-3.1-Instruct's: bos, a system header with today's date (strftime_now) and the system message
# taken off the list, tools as indented JSON, each turn trimmed between headers and <|eot_id|>, the generation
# prompt an assistant header. Written across lines, so trim_blocks and lstrip_blocks matter.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception("Only user and assistant roles are supported after the system message!") }}
    {% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{% if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# The rest of transformers' environment: tojson's own signature (no HTML escaping, non-ASCII kept, indent,
# sort_keys), break/continue, {% generation %}, dict(), a namespace counter, tools, documents, an extra variable,
# reasoning under its three names, a None content dropped from the message.
FEATURES_TEMPLATE = """{%- set ns = namespace(count=0) -%}
{%- if tools is not none -%}
TOOLS {{ tools | tojson(indent=2, sort_keys=true) }}
{% endif -%}
{%- if documents is not none -%}
{% for d in documents %}[{{ d.title }}] {{ d.text }}
{% endfor %}
{%- endif -%}
{%- for message in messages -%}
    {%- if message.role == 'skip' %}{% continue %}{% endif -%}
    {%- if message.role == 'stop' %}{% break %}{% endif -%}
    {%- set ns.count = ns.count + 1 -%}
    <{{ message.role }} {{ ns.count }}/{{ loop.index }}>
    {%- if message.reasoning_content is defined %}(r:{{ message.reasoning_content }}|t:{{ message.thinking }}){% endif -%}
    {%- if message.content is defined %}{{ message.content }}{% else %}[no content]{% endif -%}
    {%- if message.tool_calls is defined %}{{ message.tool_calls | tojson }}{% endif -%}
    {%- if message.role == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}

{% endfor -%}
{{ dict(a=1, b='<é>') | tojson }}{{ dict.fromkeys(['x'], 0) | tojson }}
{%- if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif -%}
"""

LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")

USER = {"role": "user", "content": "What is 2+3?"}
SYSTEM = {"role": "system", "content": "Be brief. "}
REASONED = {"role": "assistant", "content": "<think>\n2+3=5\n</think>\n\n5"}
CONVERSATIONS = {
    "user": [USER],
    "system": [SYSTEM, USER],
    "multi-turn": [SYSTEM, USER, REASONED, {"role": "user", "content": "And 2*3? (é, 日本)"}],
    "reasoning last": [USER, REASONED],
    "reasoning field": [USER, {"role": "assistant", "content": "5", "reasoning_content": "2+3=5"},
                        {"role": "user", "content": "And 2*3?"}],
}


def tiny_bpe(specials: tuple[str, ...]) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is 2+3? Be brief. And 2*3? think"] * 4, trainer)
    return tok


def checkpoint(directory: Path, template: str | list, layout: str = "jinja", kind: str = "r1") -> Path:
    """A transformers tokenizer directory with `template`. kind r1: nanoseek's own trained tokenizer (DeepSeek's
    tokens, so nanoseek's Tokenizer loads it too); llama: a tiny BPE with Llama 3's tokens. layout jinja: as
    save_pretrained writes it (chat_template.jinja); config: the template in tokenizer_config.json with bos/eos as
    AddedToken objects, as older checkpoints (DeepSeek-R1's) have them."""
    if kind == "r1":
        backend, bos, eos, pad = Tokenizer.train(["What is 2+3? Be brief."] * 4, vocab_size=300)._tok, BOS, EOS, PAD
    else:
        backend, bos, eos, pad = tiny_bpe(LLAMA_SPECIALS), "<|begin_of_text|>", "<|eot_id|>", None
    if isinstance(template, list):
        layout = "config"
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                              pad_token=pad, chat_template=None if layout == "config" else template)
    hf.save_pretrained(directory)
    if layout == "config":
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        for name in ("bos_token", "eos_token"):
            config[name] = {"__type": "AddedToken", "content": config[name], "lstrip": False, "normalized": True,
                            "rstrip": False, "single_word": False}
        config["chat_template"] = template
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return directory


def transformers_render(directory: Path, messages, add_generation_prompt: bool, **kwargs) -> str:
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


CASES = [("r1", R1_TEMPLATE, "jinja"), ("r1", R1_TEMPLATE, "config"), ("llama", LLAMA3_TEMPLATE, "jinja"),
         ("llama", LLAMA3_TEMPLATE, "config")]


@pytest.mark.parametrize("kind,template,layout", CASES, ids=[f"{k}-{layout}" for k, _, layout in CASES])
def test_render_equals_transformers(tmp_path, kind, template, layout):
    directory = checkpoint(tmp_path, template, layout, kind)
    ours = ChatTemplate.from_checkpoint(directory)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    for name, messages in CONVERSATIONS.items():
        for generation_prompt in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert ours.render(messages, add_generation_prompt=generation_prompt) == expected, (name, generation_prompt)


def test_r1_template_renders_as_r1_does(tmp_path):
    """What the R1 fixture writes, spelled out: the check above compares two renderings, this one says they are
    R1's (the reasoning of every assistant turn cut, the generation prompt opening <think>)."""
    ours = ChatTemplate.from_checkpoint(checkpoint(tmp_path, R1_TEMPLATE, "config"))
    assert ours.special_tokens == {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    assert ours.render(CONVERSATIONS["multi-turn"]) == (
        f"{BOS}Be brief. <｜User｜>What is 2+3?<｜Assistant｜>\n\n5{EOS}<｜User｜>And 2*3? (é, 日本)"
        "<｜Assistant｜><think>\n")
    assert ours.render(CONVERSATIONS["reasoning last"], add_generation_prompt=False) == (
        f"{BOS}<｜User｜>What is 2+3?<｜Assistant｜>\n\n5{EOS}")


def test_llama3_template_renders_as_llama3_does(tmp_path):
    ours = ChatTemplate.from_checkpoint(checkpoint(tmp_path, LLAMA3_TEMPLATE, kind="llama"))
    text = ours.render(CONVERSATIONS["system"], date_string="26 Jul 2024")
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                    "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user"
                    "<|end_header_id|>\n\nWhat is 2+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama3_tools_and_date(tmp_path):
    directory = checkpoint(tmp_path, LLAMA3_TEMPLATE, kind="llama")
    tools = [{"type": "function", "function": {"name": "add", "description": "Adds <a> & b: «é»",
                                               "parameters": {"type": "object", "properties": {}}}}]
    ours = ChatTemplate.from_checkpoint(directory).render(CONVERSATIONS["system"], tools=tools)
    assert ours == transformers_render(directory, CONVERSATIONS["system"], True, tools=tools)
    assert '"description": "Adds <a> & b: «é»"' in ours  # tojson: no HTML escaping, non-ASCII kept, indent 4


def test_features_equal_transformers(tmp_path):
    directory = checkpoint(tmp_path, FEATURES_TEMPLATE, kind="llama")
    messages = [{"role": "system", "content": "sys", "tool_calls": None},
                {"role": "user", "content": "hi <b>"},
                {"role": "skip", "content": "not shown"},
                {"role": "assistant", "content": "5", "reasoning": "2+3=5"},
                {"role": "assistant", "content": "6", "thinking": "own", "reasoning_content": "2*3=6"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]},
                {"role": "stop", "content": "the end"},
                {"role": "user", "content": "after the break"}]
    tools = [{"name": "add", "parameters": {"b": 2, "a": "é"}}]
    documents = [{"title": "Doc", "text": "Some text."}]
    ours = ChatTemplate.from_checkpoint(directory)
    for extra in ({}, {"tools": tools, "documents": documents, "enable_thinking": False}):
        for generation_prompt in (True, False):
            expected = transformers_render(directory, messages, generation_prompt, **extra)
            assert ours.render(messages, generation_prompt, **extra) == expected, (extra, generation_prompt)
    text = ours.render(messages, tools=tools, enable_thinking=False)
    assert "<assistant 3/4>(r:2+3=5|t:2+3=5)5<|eot_id|>" in text  # `reasoning` passed under both names
    assert "(r:2*3=6|t:own)6" in text and "[no content][{" in text  # own thinking kept; None content dropped
    assert "not shown" not in text and "after the break" not in text  # continue, break
    assert '{"a": 1, "b": "<é>"}{"x": 0}' in text and text.endswith("<assistant><think></think>")


def test_named_templates_pick_default_or_tool_use(tmp_path):
    named = [{"name": "default", "template": "D{{ messages[0].content }}"},
             {"name": "tool_use", "template": "T{{ tools | length }}{{ messages[0].content }}"}]
    directory = checkpoint(tmp_path, named, kind="llama")
    ours = ChatTemplate.from_checkpoint(directory)
    assert sorted(ours.templates) == ["default", "tool_use"]
    tools = [{"name": "f"}]
    assert ours.render([USER]) == transformers_render(directory, [USER], True) == "DWhat is 2+3?"
    assert ours.render([USER], tools=tools) == transformers_render(directory, [USER], True, tools=tools)
    assert ours.render([USER], tools=tools) == "T1What is 2+3?"
    assert ours.render([USER], template="tool_use", tools=[]) == "T0What is 2+3?"


def test_template_files_take_priority(tmp_path):
    """chat_template.jinja over the config's template, as transformers reads them; a processor's
    chat_template.json when there is nothing else."""
    directory = checkpoint(tmp_path, "config {{ bos_token }}", "config", kind="llama")
    (directory / "chat_template.jinja").write_text("file {{ eos_token }}")
    assert ChatTemplate.from_checkpoint(directory).render([USER]) == transformers_render(directory, [USER], True)
    assert ChatTemplate.from_checkpoint(directory).render([USER]) == "file <|eot_id|>"
    (directory / "chat_template.jinja").unlink()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": "processor {{ bos_token }}"}))
    ours = ChatTemplate.from_checkpoint(directory)
    assert ours.render([USER]) == "processor <|begin_of_text|>" and ours.origin.endswith("chat_template.json")


# ---------------------------------------------------------------------- errors
def test_no_template_names_the_files_checked(tmp_path):
    Tokenizer.train(["a b c"] * 4, vocab_size=300).save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "x"}')
    with pytest.raises(ChatTemplateError, match=re.escape(f"{tmp_path / 'tokenizer_config.json'} has no "
                                                          "\"chat_template\"") + ".*chat_template.jinja"):
        ChatTemplate.from_checkpoint(tmp_path)
    assert ChatTemplate.find(tmp_path) is None
    with pytest.raises(ChatTemplateError, match="no checkpoint directory"):
        ChatTemplate.from_checkpoint(tmp_path / "missing")


def test_template_that_raises(tmp_path):
    directory = checkpoint(tmp_path, LLAMA3_TEMPLATE, kind="llama")
    messages = [USER, {"role": "tool", "content": "42"}]
    with pytest.raises(jinja2.TemplateError, match="Only user and assistant roles"):  # transformers raises it too
        transformers_render(directory, messages, True)
    with pytest.raises(ChatTemplateError, match=re.escape(str(directory / "chat_template.jinja")) +
                       ": the chat template raised an error: Only user and assistant roles are supported"):
        ChatTemplate.from_checkpoint(directory).render(messages)
    broken = ChatTemplate("{{ messages[0].content + 1 }}", origin="t.jinja")
    with pytest.raises(ChatTemplateError, match="t.jinja: the chat template raised an error: TypeError"):
        broken.render([USER])
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        broken.render([])
    with pytest.raises(ChatTemplateError, match="message 1: expected an object"):
        broken.render([USER, "hi"])


def test_malformed_config_names_the_file(tmp_path):
    Tokenizer.train(["a b c"] * 4, vocab_size=300).save(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text('{"chat_template": "{{ x }}",')
    for load in (ChatTemplate.from_checkpoint, Tokenizer.load):
        with pytest.raises(ChatTemplateError, match=re.escape(str(config)) + " is not valid JSON"):
            load(tmp_path)
    config.write_text('{"chat_template": 3}')
    with pytest.raises(ChatTemplateError, match="chat_template must be a string or a list"):
        ChatTemplate.from_checkpoint(tmp_path)
    config.write_text('{"chat_template": "{{ bos_token }}", "bos_token": {"id": 0}}')
    with pytest.raises(ChatTemplateError, match=re.escape(str(config)) + ": bos_token must be a string or an "
                                                                          "object with a \"content\""):
        ChatTemplate.from_checkpoint(tmp_path)
    config.write_text('{"chat_template": "{% for m in messages %}{{ m }}"}')
    with pytest.raises(ChatTemplateError, match=re.escape(str(config)) + ": the chat template is not valid Jinja "
                                                                          r"\(line 1"):
        ChatTemplate.from_checkpoint(tmp_path)
    config.write_text('{"chat_template": [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]}')
    with pytest.raises(ChatTemplateError, match="no chat template named 'default' \\(there are 'a', 'b'\\)"):
        ChatTemplate.from_checkpoint(tmp_path).render([USER])
    assert ChatTemplate.from_checkpoint(tmp_path).render([USER], template="b") == "B"


@pytest.mark.parametrize("source", ["{{ messages.append(1) }}", "{{ ''.__class__.__mro__ }}",
                                    "{% set ns = namespace() %}{% set ns._x = 1 %}", "{{ namespace(_y=1) }}",
                                    "{{ raise_exception('no ' + messages[0].role) }}"])
def test_sandbox_refuses_what_transformers_refuses(tmp_path, source):
    directory = checkpoint(tmp_path, source, kind="llama")
    with pytest.raises(jinja2.TemplateError):
        transformers_render(directory, [USER], True)
    with pytest.raises(ChatTemplateError, match="raised an error"):
        ChatTemplate.from_checkpoint(directory).render([USER])


# ---------------------------------------------------------------------- the Tokenizer hook
def test_tokenizer_keeps_the_checkpoint_template(tmp_path):
    directory = checkpoint(tmp_path, R1_TEMPLATE, "config")
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    for tok in (Tokenizer.load(directory), Tokenizer.load(directory / "tokenizer.json")):
        assert tok.chat_template is not None and tok.chat_template.source == R1_TEMPLATE
        for messages in CONVERSATIONS.values():
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert tok.render_chat(messages) == text
            assert tok.encode_chat(messages) == hf(text, add_special_tokens=False)["input_ids"]
            assert tok.encode_chat(messages) == tok.encode(text)
    # DeepSeek's built-in format is still there by name, whatever the checkpoint's template.
    assert tok.apply_chat_template(CONVERSATIONS["multi-turn"]) != tok.render_chat(CONVERSATIONS["multi-turn"])
    # On single-turn prompts (what eval and grpo --template chat ask) the R1 template and DeepSeek's agree.
    for messages in (CONVERSATIONS["user"], [{"role": "system", "content": "Be brief."}, USER]):
        assert tok.render_chat(messages) == apply_chat_template(messages)


def test_nanoseek_checkpoint_keeps_deepseek_rendering(tmp_path):
    """nanoseek's own checkpoints hold tokenizer.json alone: no template, so the rendering is DeepSeek's, as
    before."""
    Tokenizer.train(["What is 2+3? Be brief."] * 4, vocab_size=300).save(tmp_path)
    tok = Tokenizer.load(tmp_path)
    assert tok.chat_template is None
    for messages in CONVERSATIONS.values():
        for generation_prompt in (True, False):
            assert tok.render_chat(messages, generation_prompt) == apply_chat_template(messages, generation_prompt)
            assert tok.encode_chat(messages, generation_prompt) == tok.encode(
                apply_chat_template(messages, generation_prompt))
    assert tok.render_chat([USER], thinking=False) == f"{BOS}<｜User｜>What is 2+3?<｜Assistant｜>"
    with pytest.raises(TypeError, match="takes no variables \\(enable_thinking\\)"):
        tok.render_chat([USER], enable_thinking=False)


def test_chat_prompts_use_the_checkpoint_template(tmp_path):
    """`--template chat` (nanoseek chat, generate, eval, grpo: infer/chat.encode_prompt) asks a checkpoint with its
    own template in that template, and one without it in DeepSeek's."""
    from nanoseek.infer.chat import encode_prompt, opens_thinking

    directory = checkpoint(tmp_path / "llama-style", LLAMA3_TEMPLATE, kind="r1")  # DeepSeek's tokens, Llama's template
    tok = Tokenizer.load(directory)
    messages = CONVERSATIONS["user"]
    text = transformers_render(directory, messages, add_generation_prompt=True)
    assert "<|start_header_id|>" in text and encode_prompt(tok, messages, "chat") == tok.encode(text)
    assert not opens_thinking(messages, "chat", tok)  # Llama's generation prompt opens no <think>
    Tokenizer.train(["What is 2+3? Be brief."] * 4, vocab_size=300).save(tmp_path / "own")
    own = Tokenizer.load(tmp_path / "own")
    assert encode_prompt(own, messages, "chat") == own.encode(apply_chat_template(messages))
    assert opens_thinking(messages, "chat", own)
