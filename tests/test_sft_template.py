"""`nanoseek sft` in a checkpoint's own chat template (data/chat.template_samples): the ids are transformers'
`apply_chat_template(..., tokenize=True)` of the conversation (reasoning inline), the mask is exactly the assistant's
replies with their end of turn (transformers' own assistant mask where the template marks it, and hand-written
text), R1-Distill's template (no reasoning in any rendered turn, a prompt that opens <think>) trains each assistant
turn as its own sample after the prompt it is asked in, the --template choice and its errors, and the command end
to end on a tiny Hugging Face Qwen2 checkpoint with a Llama-3-style template and no DeepSeek chat tokens."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import save_tiny_checkpoint, train_tokenizer, write_jsonl
from test_chat_template import LLAMA3_TEMPLATE, LLAMA_SPECIALS, R1_TEMPLATE, checkpoint, tiny_bpe, transformers

from nanoseek.checkpoint import resolve_checkpoint
from nanoseek.cli import main
from nanoseek.data.chat import (ChatDataError, Conversation, chat_template_for, encode_conversations,
                                inline_reasoning, template_samples)
from nanoseek.data.template import ChatTemplate
from nanoseek.data.tokenizer import ASSISTANT, BOS, EOS, PAD, THINK, USER, Tokenizer
from nanoseek.train.sft import encode

SYSTEM = {"role": "system", "content": "Be brief."}
Q1, Q2 = {"role": "user", "content": "What is 2+3?"}, {"role": "user", "content": "And 2*3?"}
A1 = {"role": "assistant", "content": "5", "reasoning_content": "2+3=5"}  # reasoning as a field
A2 = {"role": "assistant", "content": "<think>\n2*3=6\n</think>\n\n6"}  # reasoning inline
MULTI_TURN = [SYSTEM, Q1, A1, Q2, A2]
DATE = "26 Jul 2024"  # the Llama template's date, fixed so that its renderings do not depend on the day
LLAMA_DATED = LLAMA3_TEMPLATE.replace('strftime_now("%d %b %Y")', f'"{DATE}"')
# The same with transformers' {% generation %} marks around the assistant's text and end of turn, so that
# transformers computes the assistant mask itself (return_assistant_tokens_mask).
TURN = "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
LLAMA_MARKED = LLAMA_DATED.replace(TURN, (
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"))
assert LLAMA_MARKED != LLAMA_DATED


def hf_ids(hf, messages, add_generation_prompt: bool = False) -> list[int]:
    return hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                  return_dict=False)


def masked_text(tok: Tokenizer, ids: list[int], mask: list[bool]) -> str:
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


@pytest.fixture
def llama(tmp_path):
    """nanoseek's tokenizer (DeepSeek's tokens, so nanoseek loads it) with a Llama-3-style template."""
    directory = checkpoint(tmp_path, LLAMA_MARKED, kind="r1")
    return Tokenizer.load(directory), transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture
def r1(tmp_path):
    directory = checkpoint(tmp_path, R1_TEMPLATE, "config", kind="r1")
    return Tokenizer.load(directory), transformers.AutoTokenizer.from_pretrained(directory)


# ---------------------------------------------------------------------- the ids and the mask
def test_llama_style_ids_and_mask_are_transformers(llama):
    """A template with the prefix property: the conversation is one sample, transformers' ids, and the mask is
    transformers' assistant mask (from the template's generation marks): both replies with their <|eot_id|>."""
    tok, hf = llama
    (ids, mask), = template_samples(tok, tok.chat_template, MULTI_TURN)
    inline = [inline_reasoning(m) for m in MULTI_TURN]
    assert inline[2]["content"] == "<think>\n2+3=5\n</think>\n\n5" and "reasoning_content" not in inline[2]
    out = hf.apply_chat_template(inline, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == out["input_ids"]
    assert mask == [bool(m) for m in out["assistant_masks"]]
    assert masked_text(tok, ids, mask) == "<think>\n2+3=5\n</think>\n\n5<|eot_id|><think>\n2*3=6\n</think>\n\n6<|eot_id|>"


def test_llama_style_mask_by_hand(llama):
    tok, hf = llama
    messages = [Q1, {"role": "assistant", "content": "It is 5."}]
    (ids, mask), = template_samples(tok, tok.chat_template, messages)
    assert ids == hf_ids(hf, messages)
    assert masked_text(tok, ids, mask) == "It is 5.<|eot_id|>"  # the reply and its end of turn
    prompt = hf_ids(hf, [Q1], add_generation_prompt=True)  # what the model is asked in: nothing of it is learnt
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)]) and all(mask[len(prompt):])


def test_r1_distill_style_trains_each_turn_after_its_prompt(r1):
    """R1-Distill's template renders no turn's reasoning and its prompt opens <think>: no prefix property, so each
    assistant turn is a sample: transformers' prompt for it, then the reply after <think>\\n and the end of
    sentence, all of which (and only which) is learnt."""
    tok, hf = r1
    with pytest.raises(AssertionError):  # the property that fails: the prompt is no prefix of the turn's rendering
        assert hf.apply_chat_template([Q1, A2], tokenize=False).startswith(
            hf.apply_chat_template([Q1], tokenize=False, add_generation_prompt=True))
    samples = template_samples(tok, tok.chat_template, MULTI_TURN)
    inline = [inline_reasoning(m) for m in MULTI_TURN]
    assert len(samples) == 2
    for (ids, mask), (turn, reply) in zip(samples, [(2, "2+3=5\n</think>\n\n5"), (4, "2*3=6\n</think>\n\n6")]):
        prompt = hf_ids(hf, inline[:turn], add_generation_prompt=True)
        assert tok.decode(prompt).endswith(f"{ASSISTANT}{THINK}\n")
        assert ids == prompt + hf.encode(reply + EOS, add_special_tokens=False)
        assert mask == [False] * len(prompt) + [True] * (len(ids) - len(prompt))
        assert masked_text(tok, ids, mask) == reply + EOS
    # the history of the second sample is as the template shows it (the first reply without its reasoning)
    assert tok.decode(samples[1][0]).startswith(f"{BOS}Be brief.{USER}What is 2+3?{ASSISTANT}\n\n5{EOS}{USER}")


def test_a_template_that_drops_earlier_reasoning_trains_each_turn_as_transformers_renders_it(tmp_path):
    """A ChatML template that shows earlier replies without their reasoning (as Qwen3's): each turn has the prefix
    property, the whole conversation does not, so each assistant turn is a sample: transformers' rendering of the
    conversation up to it, the reply with its reasoning and <|im_end|>\n learnt."""
    chatml = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}"
              "{{ m.content.split('</think>')[-1] | trim }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    directory = checkpoint(tmp_path, chatml, kind="r1")
    tok, hf = Tokenizer.load(directory), transformers.AutoTokenizer.from_pretrained(directory)
    inline = [inline_reasoning(m) for m in MULTI_TURN]
    samples = template_samples(tok, tok.chat_template, MULTI_TURN)
    assert [ids for ids, _ in samples] == [hf_ids(hf, inline[:3]), hf_ids(hf, inline)]
    assert [masked_text(tok, *sample) for sample in samples] == [
        "<think>\n2+3=5\n</think>\n\n5<|im_end|>\n", "<think>\n2*3=6\n</think>\n\n6<|im_end|>\n"]


def test_a_template_that_drops_the_reasoning_behind_a_plain_prompt_trains_the_reply_as_written(tmp_path):
    """R1-Distill's first released template: its prompt is `<｜Assistant｜>` alone, so each turn's rendering does
    extend its prompt, but without the reasoning; what is learnt is the reply as written (the model opens <think>
    itself) and the end of sentence, each turn after its own prompt."""
    first_release = R1_TEMPLATE.replace("{{'<｜Assistant｜><think>\\n'}}", "{{'<｜Assistant｜>'}}")
    assert first_release != R1_TEMPLATE
    directory = checkpoint(tmp_path, first_release, kind="r1")
    tok, hf = Tokenizer.load(directory), transformers.AutoTokenizer.from_pretrained(directory)
    inline = [inline_reasoning(m) for m in MULTI_TURN]
    samples = template_samples(tok, tok.chat_template, MULTI_TURN)
    assert len(samples) == 2
    for (ids, mask), turn in zip(samples, (2, 4), strict=True):
        prompt = hf_ids(hf, inline[:turn], add_generation_prompt=True)
        assert tok.decode(prompt).endswith(ASSISTANT)
        assert ids == prompt + hf.encode(inline[turn]["content"] + EOS, add_special_tokens=False)
        assert masked_text(tok, ids, mask) == inline[turn]["content"] + EOS and not any(mask[:len(prompt)])


def test_r1_distill_style_single_turn_is_deepseeks_own_format(r1):
    """On one turn R1-Distill's template trains the tokens of DeepSeek's format (R1's own training format), but for
    the <think>\n that opens the reply: R1-Distill's prompt writes it, so it is asked, not learnt."""
    tok, _ = r1
    opened = len(tok.encode(THINK + "\n"))
    for reply in (A1, A2, {"role": "assistant", "content": "5", "reasoning_content": ""}):
        (ids, mask), = template_samples(tok, tok.chat_template, [Q1, reply])
        (deepseek_ids, deepseek_mask), = encode_conversations(tok, [[Q1, reply]])
        start = deepseek_mask.index(True)
        assert ids == deepseek_ids and tok.decode(ids[start:start + opened]) == THINK + "\n"
        assert mask == deepseek_mask[:start] + [False] * opened + deepseek_mask[start + opened:]


def test_r1_distill_style_reply_without_a_think_block_is_an_error(r1):
    tok, _ = r1
    expected = ("generation prompt starts the reply with '<think>\\n', and this reply starts with 'It is 5.'; give a "
                "reply without reasoning an empty \"reasoning_content\": \"\"")
    with pytest.raises(ChatDataError, match=re.escape(expected)):
        template_samples(tok, tok.chat_template, [Q1, {"role": "assistant", "content": "It is 5."}])


def test_a_template_that_never_renders_the_reply_is_an_error():
    tok = train_tokenizer()
    template = ChatTemplate("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
                            "<|end|>", origin="chat_template.jinja")
    with pytest.raises(ChatDataError, match="chat_template.jinja: the chat template never renders the assistant's "
                                            "content.*--template deepseek"):
        template_samples(tok, template, [Q1, A1])
    with pytest.raises(ChatDataError, match="^data.jsonl:3: chat_template.jinja: the chat template never"):
        encode(tok, [Conversation([Q1, A1], "data.jsonl:3")], 512, template)


def test_the_template_choice(r1, tmp_path):
    tok, _ = r1
    own = train_tokenizer()  # nanoseek's own: no template
    assert chat_template_for(tok, "auto") is tok.chat_template is chat_template_for(tok, "checkpoint")
    assert chat_template_for(tok, "deepseek") is None and chat_template_for(own, "auto") is None
    with pytest.raises(ChatDataError, match="--template checkpoint, but the model has no chat template of its own"):
        chat_template_for(own, "checkpoint")
    conversations = [Conversation(MULTI_TURN, "a"), Conversation([Q1, A1], "b")]
    rows, _ = encode(tok, conversations, 512)  # no template: DeepSeek's format, one row a conversation, as before
    assert [(r.ids, r.mask) for r in rows] == encode_conversations(tok, [c.messages for c in conversations])
    rows, _ = encode(tok, conversations, 512, tok.chat_template)  # R1-Distill's: a row per assistant turn
    assert [r.source for r in rows] == ["a", "a", "b"]


# ---------------------------------------------------------------------- the command end to end
def hf_student(directory, template: str):
    """A tiny random Qwen2ForCausalLM saved by transformers, with a tokenizer that has DeepSeek's bos/eos (which
    nanoseek's Tokenizer needs) and Llama 3's tags, but none of DeepSeek's chat tags, and `template`."""
    backend = tiny_bpe((BOS, EOS, PAD, *LLAMA_SPECIALS))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token="<|eot_id|>",
                                              pad_token=PAD, chat_template=template)
    hf.save_pretrained(directory)
    config = transformers.Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


def test_sft_on_a_hugging_face_student_in_its_own_template(tmp_path, capsys):
    start = hf_student(tmp_path / "student", LLAMA_DATED)
    rows = [{"messages": [Q1, A1]}, {"messages": MULTI_TURN}, {"messages": [Q2, A2]}]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    args = ["sft", "--model", str(start), "--data", str(data), "--seq-len", "256", "--batch-size", "2",
            "--max-steps", "2", "--heldout-fraction", "0", "--eval-problems", "0", "--no-tensorboard"]
    out = tmp_path / "run"
    assert main([*args, "--out-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["conversations"]["train"] == 3
    saved = resolve_checkpoint(out)
    assert Tokenizer.load(saved).chat_template.source == LLAMA_DATED  # the checkpoint keeps its template
    assert (saved / "chat_template.jinja").read_text() == (start / "chat_template.jinja").read_text()
    # DeepSeek's format needs its chat tags, which this tokenizer lacks: an error naming them and the way out
    assert main([*args, "--template", "deepseek", "--out-dir", str(tmp_path / "deepseek")]) == 2
    err = capsys.readouterr().err
    assert (f"nanoseek: error: {start}: its tokenizer has no '{USER}', '{ASSISTANT}', '{THINK}', '</think>' token, "
            "which DeepSeek's chat format needs") in err and "`nanoseek sft --template auto` trains in" in err


def test_template_checkpoint_without_one_is_an_error(tmp_path, capsys):
    base = save_tiny_checkpoint(tmp_path / "base", train_tokenizer())
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [Q1, A1]}])
    assert main(["sft", "--model", str(base), "--data", str(data), "--template", "checkpoint", "--out-dir",
                 str(tmp_path / "run")]) == 2
    assert (f"nanoseek: error: {base}: --template checkpoint, but the model has no chat template of its own"
            in capsys.readouterr().err)
