"""The tokenizer: exact round trips, one token per digit, DeepSeek's special tokens and ids, training
determinism, save/load, loading a DeepSeek-layout tokenizer.json, and the chat template."""

import json
import random
import re

import pytest
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.data.tokenizer import (R1_ZERO_TEMPLATE, SPECIAL_TOKENS, Tokenizer, TokenizerError,
                                     apply_chat_template)

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
WORDS = ["the", "cat", "sat", "on", "a", "mat", "über", "naïve", "日本語", "テスト", "π", "def", "return", "(x)",
         "==", "{", "}", ";", "\n", "\n\n", "    "]


def corpus(n_docs: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randrange(10 ** rng.randrange(1, 6)))
                     for _ in range(rng.randrange(5, 60))) for _ in range(n_docs)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus(), vocab_size=400)


ROUND_TRIP = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "line one\nline two\r\nline\tthree\n\n",
    "über naïve café — ½ ≠ ∞",
    "日本語のテキスト、中文，한국어",
    "emoji 😀👍🏽 and a rare script 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "digits 0123456789, 3.14159, -42, 1e10, 007",
    "inline <think>so x = 12</think> then <｜User｜>hi<｜Assistant｜>ok" + EOS,
    BOS + "a" + EOS + "<｜fim▁begin｜>p<｜fim▁hole｜>s<｜fim▁end｜>m<｜▁pad▁｜>",
    "\x00\x01 control \x7f chars and a lone < or ｜",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == BOS + text + EOS


def test_every_digit_is_its_own_token(tok):
    ids = tok.encode("0123456789")
    assert [tok.decode([i]) for i in ids] == list("0123456789")
    # in context too: the tokens that hold a digit are exactly the text's digits, one each
    text = "in 2024, x=31415 and y =  99.5% 日本語7"
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == [c for c in text if c.isdigit()]


def test_special_tokens_are_single_tokens_with_deepseek_ids(tok):
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    ids = [tok.bos_id, tok.eos_id, tok.pad_id, tok.user_id, tok.assistant_id, tok.think_id, tok.end_think_id,
           tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id]
    assert len(set(ids)) == len(SPECIAL_TOKENS) == 10
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tok.encode(token) == [token_id]
        assert tok.decode([token_id]) == token
    text = "a<think>b</think>c"
    assert tok.decode(tok.encode(text, bos=True, eos=True), skip_special=True) == "abc"


def test_encode_flags_and_batch(tok):
    texts = ["one", "two 22", "", "ü"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode("x", bos=True, eos=True) == [0] + tok.encode("x") + [1]


def test_training_is_deterministic(tmp_path):
    a = Tokenizer.train(corpus(seed=1), vocab_size=350).save(tmp_path / "a")
    b = Tokenizer.train(corpus(seed=1), vocab_size=350).save(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    assert Tokenizer.load(a).vocab_size == 350


def test_vocab_too_small_for_bytes_and_specials():
    with pytest.raises(ValueError, match="266"):
        Tokenizer.train(["abc"], vocab_size=265)


def test_save_load_round_trip(tok, tmp_path):
    file = tok.save(tmp_path / "dir")
    assert file == tmp_path / "dir" / "tokenizer.json"
    other = tok.save(tmp_path / "named.json")
    text = ROUND_TRIP[8]
    for loaded in (Tokenizer.load(tmp_path / "dir"), Tokenizer.load(file), Tokenizer.load(other)):
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.fim_end_id == tok.fim_end_id


def test_load_errors(tmp_path):
    no_bos = HFTokenizer(models.WordLevel({"a": 0, EOS: 1}, unk_token="a"))
    no_bos.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="begin▁of▁sentence") as e:
        Tokenizer.load(tmp_path)
    assert "end▁of▁sentence" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        Tokenizer.load(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        Tokenizer.load(empty)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")


def test_deepseek_layout_tokenizer(tmp_path):
    """The layout of the released DeepSeek-V3/R1 tokenizer.json: bos/eos/pad at 0-2, the chat, think and FIM
    tokens appended later as non-special added tokens, digit groups and CJK runs split before byte level."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BOS: 0, EOS: 1, "<｜▁pad▁｜>": 2} | {c: 3 + i for i, c in enumerate(alphabet)}
    raw = HFTokenizer(models.BPE(vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex("[一-龥\u3040-ゟ゠-ヿ]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([BOS, EOS, "<｜▁pad▁｜>"])
    later = ["<think>", "</think>", "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜User｜>",
             "<｜Assistant｜>"]
    raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in later])
    raw.save(str(tmp_path / "tokenizer.json"))

    tok = Tokenizer.load(tmp_path)
    first = len(vocab)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert (tok.think_id, tok.end_think_id, tok.fim_hole_id, tok.fim_begin_id, tok.fim_end_id, tok.user_id,
            tok.assistant_id) == tuple(range(first, first + 7))
    prompt = apply_chat_template([{"role": "user", "content": "2+2=?"}])
    assert tok.encode(prompt) == [0, tok.user_id, *tok.encode("2+2=?"), tok.assistant_id, tok.think_id,
                                  *tok.encode("\n")]
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text


def test_chat_template_exact_string():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": "<think>\n2+3=5\n</think>\n5"},
                {"role": "user", "content": "And 2*3?"}]
    # As DeepSeek-R1's template: a reply before the last user message shows only its answer.
    assert apply_chat_template(messages) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is 2+3?<｜Assistant｜>5"
        "<｜end▁of▁sentence｜><｜User｜>And 2*3?<｜Assistant｜><think>\n")
    assert apply_chat_template(messages[1:2], thinking=False) == (
        "<｜begin▁of▁sentence｜><｜User｜>What is 2+3?<｜Assistant｜>")
    # The reply after the last user message keeps its reasoning, in R1's layout (a blank line before the answer),
    # whether it comes inline or as reasoning_content.
    last_turn = ("<｜begin▁of▁sentence｜><｜User｜>What is 2+3?<｜Assistant｜><think>\n2+3=5\n</think>\n\n5"
                 "<｜end▁of▁sentence｜>")
    assert apply_chat_template(messages[1:3], add_generation_prompt=False) == last_turn
    separate = [messages[1], {"role": "assistant", "content": "5", "reasoning_content": "2+3=5"}]
    assert apply_chat_template(separate, add_generation_prompt=False) == last_turn
    two_systems = [{"role": "system", "content": "A."}, {"role": "system", "content": "B."}]
    assert apply_chat_template(two_systems, add_generation_prompt=False) == "<｜begin▁of▁sentence｜>A.\n\nB."


def test_chat_template_encodes_to_special_ids(tok):
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert ids == [tok.bos_id, tok.user_id, *tok.encode("hi"), tok.assistant_id, tok.think_id, *tok.encode("\n")]


def test_chat_template_rejects_bad_messages():
    with pytest.raises(ValueError, match="'tool'"):
        apply_chat_template([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    with pytest.raises(ValueError, match="message 0: content"):
        apply_chat_template([{"role": "user"}])
    with pytest.raises(ValueError, match="message 1: the content opens <think> but never closes it"):
        apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "<think>y"}])
    with pytest.raises(ValueError, match="message 1: has both a reasoning_content and a <think> block"):
        apply_chat_template([{"role": "user", "content": "x"},
                             {"role": "assistant", "content": "<think>y</think>z", "reasoning_content": "y"}])


def test_r1_zero_template():
    prompt = R1_ZERO_TEMPLATE.format(prompt="What is 2+2?")
    assert prompt.startswith("A conversation between User and Assistant. The user asks a question, and the "
                             "Assistant solves it.")
    assert "<think> reasoning process here </think> <answer> answer here </answer>." in prompt
    assert prompt.endswith("User: What is 2+2?. Assistant:")


@pytest.mark.parametrize("files, error", [
    ({"generation_config.json": '{"eos_token_id": [1, 100000]}'}, "eos_token_id 100000 is not a token id"),
    ({"generation_config.json": '{"eos_token_id": "1"}'}, "eos_token_id '1' is not a token id"),
    ({"generation_config.json": "[1, 2"}, "generation_config.json is not a valid JSON object"),
    ({"tokenizer_config.json": '{"eos_token": "<|eot_id|>"}'}, "eos_token '<|eot_id|>' is not a token of"),
])
def test_declared_end_ids_that_are_not_tokens_name_their_file(tmp_path, files, error):
    Tokenizer.train(["What is 2+3?"] * 4, vocab_size=300).save(tmp_path)
    assert Tokenizer.load(tmp_path).stop_ids == (1,)  # a nanoseek tokenizer alone: DeepSeek's eos
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(TokenizerError, match=re.escape(error)):
        Tokenizer.load(tmp_path)


def test_declared_end_ids_are_read_from_both_files(tmp_path):
    tok = Tokenizer.train(["What is 2+3?"] * 4, vocab_size=300)
    tok.save(tmp_path)
    think = tok.think_id
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<think>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer.load(tmp_path).stop_ids == (1, think, 7)
