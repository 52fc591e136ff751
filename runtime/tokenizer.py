"""Text ↔ token ids for LLaMA-style models: byte-level BPE through the `tokenizers` library.

A Tokenizer is built from a GGUF file's tokenizer.ggml.* fields or from a Hugging Face
tokenizer.json, and serialises to one JSON string so a converted model file can carry it.
Text that spells a special token ("<|im_start|>") encodes to that token, as in Hugging Face and
llama.cpp; ids decode with special tokens kept, so decode(encode(s)) == s.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

FORMAT = "qigen-tokenizer/1"

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) → the equivalent `tokenizers` pre-tokenizer.
# GPT-2's regex is ByteLevel(use_regex=True); the StarCoder family, SmolLM included, first splits
# every digit on its own (llama.cpp: "\p{N}" before the GPT-2 regex; HF: Digits(individual_digits)).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2 = ("gpt2", "mpt", "olmo", "jais")
_DIGITS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")
_LLAMA3 = ("llama-bpe", "llama3")
CONTROL, USER_DEFINED = 3, 4  # GGUF token types (llama.cpp's llama_token_type)


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or a request it cannot serve; the message says which."""


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2:
        return byte_level
    if pre in _DIGITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _LLAMA3:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise TokenizerError(f"pre-tokenizer '{pre}' is not supported: choose one of {', '.join(_GPT2 + _DIGITS + _LLAMA3)}")


def _release_freed() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing). Parsing a tokenizer
    leaves them resident: SmolLM2's 49,152-token BPE took 43 MB to parse and keeps 14."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ids(value: int | Sequence[int] | None) -> tuple[int, ...]:
    """A token id or a list of them (None: none), each an integer: anything else is a TokenizerError."""
    if value is None:
        return ()
    ids = (value,) if _is_id(value) else tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if bad := next((v for v in ids if not _is_id(v)), None):
        raise TokenizerError(f"token id {bad!r} is not an integer")
    return ids


def _content(token: str | dict | None) -> str | None:
    """tokenizer_config.json spells a token as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """Byte-level BPE plus what generation needs: BOS/EOS ids and the chat template."""

    def __init__(self, tokenizer: _HFTokenizer, bos_id: int | None, eos_ids: tuple[int, ...],
                 chat_template: str | None, add_bos: bool):
        self._tk = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if not (bos_id is None or _is_id(bos_id)):
            raise TokenizerError(f"BOS id {bos_id!r} is not an integer")
        if not isinstance(add_bos, bool):
            raise TokenizerError(f"add_bos {add_bos!r} is not true or false")
        if not (chat_template is None or isinstance(chat_template, str)):
            raise TokenizerError(f"the chat template is {type(chat_template).__name__}, not text")
        for name, i in (("BOS", bos_id), *(("EOS", e) for e in eos_ids)):
            if i is not None and not 0 <= i < self.vocab_size:
                raise TokenizerError(f"{name} id {i} is outside the vocabulary of {self.vocab_size} tokens")
        if add_bos and bos_id is None:
            raise TokenizerError("the tokenizer adds a BOS token but names none")
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.chat_template = chat_template
        self.add_bos = add_bos
        _release_freed()

    @classmethod
    def from_gguf_fields(cls, tokens: list[str], merges: list[str], token_types: list[int],
                         bos: int | None, eos: int | Sequence[int] | None, chat_template: str | None,
                         add_bos: bool, pre: str) -> Tokenizer:
        """GPT-2 style byte-level BPE from tokenizer.ggml.{tokens,merges,token_type,pre,...}."""
        if len(token_types) != len(tokens):
            raise TokenizerError(f"{len(token_types)} token types for {len(tokens)} tokens")
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise TokenizerError(f"the vocabulary repeats {len(tokens) - len(vocab)} token strings")
        pairs = [tuple(m.split(" ")) for m in merges]
        if bad := next((m for m, p in zip(merges, pairs) if len(p) != 2 or not {*p, p[0] + p[1]} <= vocab.keys()),
                       None):  # (tokenizers' BPE raises a bare Exception for a part outside the vocabulary)
            raise TokenizerError(f"merge '{bad}' is not two tokens of the vocabulary whose join is in it too")
        tk = _HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False,
                                     ignore_merges=pre in _LLAMA3))
        tk.pre_tokenizer = _pre_tokenizer(pre)
        tk.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>) are special; user-defined ones are matched in text but kept on decode.
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, k in zip(tokens, token_types) if k == CONTROL])
        tk.add_tokens([AddedToken(t, special=False, normalized=False)
                       for t, k in zip(tokens, token_types) if k == USER_DEFINED])
        if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise TokenizerError("special tokens do not map onto the vocabulary's own ids")
        return cls(tk, bos, _ids(eos), chat_template or None, bool(add_bos))

    @classmethod
    def from_file(cls, tokenizer_json: Path, config: dict) -> Tokenizer:
        """A Hugging Face tokenizer.json; `config` is tokenizer_config.json's content ({} when absent),
        optionally with bos_token_id / eos_token_id (int or list) from config.json, which take precedence."""
        try:
            tk = _HFTokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise TokenizerError(f"{tokenizer_json} is not a readable tokenizer.json: {e}") from e

        def token_id(name: str) -> int | None:
            text = _content(config.get(name))
            if text is None:
                return None
            if (i := tk.token_to_id(text)) is None:
                raise TokenizerError(f"{name} '{text}' of tokenizer_config.json is not in {tokenizer_json}")
            return i

        bos = config["bos_token_id"] if "bos_token_id" in config else token_id("bos_token")
        eos = _ids(config["eos_token_id"] if "eos_token_id" in config else token_id("eos_token"))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # the fast tokenizer's post-processor decides, as in transformers
            add_bos = bos is not None and tk.encode("a", add_special_tokens=True).ids[:1] == [bos]
        tk.post_processor = None  # BOS is ours to add (encode's `bos`); EOS is never appended
        tk.no_truncation()  # some tokenizer.json files carry a training-time max_length or padding
        tk.no_padding()
        return cls(tk, bos, eos, template, bool(add_bos))

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "tokenizer": self._tk.to_str(), "bos_id": self.bos_id,
                           "eos_ids": list(self.eos_ids), "chat_template": self.chat_template, "add_bos": self.add_bos})

    @classmethod
    def from_json(cls, s: str) -> Tokenizer:
        try:
            d = json.loads(s)
            if d.get("format") != FORMAT:
                raise TokenizerError(f"tokenizer format '{d.get('format')}' is not {FORMAT}")
            tk = _HFTokenizer.from_str(d["tokenizer"])
            return cls(tk, d["bos_id"], _ids(d["eos_ids"]), d["chat_template"], d["add_bos"])
        except TokenizerError:
            raise
        except Exception as e:  # JSON, a missing key, or tokenizers' own parse error
            raise TokenizerError(f"not a serialised qigen tokenizer: {e}") from e

    def save_hf(self, directory: Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, which from_file reads back."""
        config = {"bos_token": self._text(self.bos_id), "eos_token": self._text(self.eos_ids[0] if self.eos_ids else None),
                  "add_bos_token": self.add_bos, "chat_template": self.chat_template}
        if len(self.eos_ids) > 1:  # transformers keeps these in generation_config.json; from_file reads them here too
            config["eos_token_id"] = list(self.eos_ids)
        (directory / "tokenizer.json").write_text(self._tk.to_str())
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of `text`; `bos` None adds BOS when the model does (add_bos)."""
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise TokenizerError("BOS requested but the tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tk.decode(self._checked(ids), skip_special_tokens=False)

    def stream(self) -> TextStream:
        return TextStream(self)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` ([{"role": ..., "content": ...}]) rendered with the model's chat template,
        in a sandbox with the names and settings transformers' apply_chat_template provides (lenient
        Undefined, not StrictUndefined: model templates test optional names such as `tools`)."""
        if not self.chat_template:
            raise TokenizerError("the model has no chat template: prompt it with plain text")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise TokenizerError("messages must be dicts with a 'role' and a 'content'")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._text(self.bos_id), eos_token=self._text(self.eos_ids[0] if self.eos_ids else None))
        except jinja2.TemplateError as e:
            raise TokenizerError(f"the chat template failed: {e}") from e

    def _text(self, i: int | None) -> str | None:
        return None if i is None else self._tk.id_to_token(i)

    def _checked(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if bad := next((i for i in ids if not 0 <= i < self.vocab_size), None):
            raise TokenizerError(f"token id {bad} is outside the vocabulary of {self.vocab_size} tokens")
        return ids


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


class TextStream:
    """Incremental detokenization: push() returns only text that is complete.

    The tokenizers library's DecodeStream does the work, one call per token: it holds back a character split
    across byte tokens until its last byte arrives, and decodes each piece with the tokens before it as context
    (so decoders that strip a leading space see the same prefix).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._stream = decoders.DecodeStream(skip_special_tokens=False)
        self._held: list[int] = []  # pushed since text last came out

    def push(self, token_id: int) -> str:
        self._held += self._tokenizer._checked([token_id])
        text = self._stream.step(self._tokenizer._tk, self._held[-1])
        if text is None:
            return ""
        self._held = []
        return text

    def flush(self) -> str:
        """Whatever is held back (an incomplete character comes out as U+FFFD), and start afresh."""
        rest = self._tokenizer.decode(self._held) if self._held else ""
        self._stream, self._held = decoders.DecodeStream(skip_special_tokens=False), []
        return rest
