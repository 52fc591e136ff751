"""The tokenizer against SmolLM2's own vocabulary: ids, round trips, special tokens, chat, streaming."""
import json
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers, processors

from runtime.tokenizer import Tokenizer, TokenizerError

# The SmolLM2 GGUF, fetched by conftest.py (or named by QIGEN_TEST_GGUF)
SMOL = Path(os.environ["QIGEN_TEST_GGUF"])
TEXTS = [
    "Hello world",
    "",
    " leading space, trailing space ",
    "line one\nline two\r\n\ttabbed\n\n\n",
    "multiple   spaces    here",
    "héllo wörld, ça va? Straße",
    "日本語のテキストと한국어",
    "emoji 🦙🚀 and a family 👩‍👩‍👧 and a flag 🇫🇷",
    "def f(x):\n    return x ** 2  # 42, 3.14159, 1e-5",
    "I'm sure they'll say it's fine, we've done it",
    "<|im_start|>user\nHi there<|im_end|>\n",
]


def _byte_level(text: str) -> str:
    """How GPT-2 byte-level BPE spells `text` in its vocabulary (" world" → "Ġworld")."""
    (piece, _), = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    return piece


@pytest.fixture(scope="module")
def gguf_fields():
    gguf = pytest.importorskip("gguf")
    if not SMOL.is_file():
        pytest.skip(f"the SmolLM2 GGUF is not at {SMOL}: set QIGEN_TEST_GGUF to its path")
    reader = gguf.GGUFReader(SMOL)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tok(gguf_fields) -> Tokenizer:
    f = gguf_fields
    return Tokenizer.from_gguf_fields(f["tokenizer.ggml.tokens"], f["tokenizer.ggml.merges"], f["tokenizer.ggml.token_type"],
                                      f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
                                      f["tokenizer.chat_template"], f["tokenizer.ggml.add_bos_token"], f["tokenizer.ggml.pre"])


@pytest.fixture(scope="module")
def tokens(gguf_fields) -> list[str]:
    return gguf_fields["tokenizer.ggml.tokens"]


def test_fields(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (49152, 1, (2,), False)
    assert tok.chat_template.startswith("{% for message in messages %}")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("word", ["Hello", " world", "the", " the", " Face", " model", "\n", " assistant", ","])
def test_known_words_are_one_token(tok, tokens, word):
    assert tok.encode(word) == [tokens.index(_byte_level(word))]


def test_hello_world(tok, tokens):
    assert tok.encode("Hello world") == [tokens.index("Hello"), tokens.index("Ġworld")] == [19556, 905]


def test_gpt2_regex(tok, tokens):
    """Pieces follow GPT-2's regex: contractions split off, a space joins the word after it."""
    ids = tok.encode("I'm here")
    assert [tokens[i] for i in ids] == ["I", "'m", "Ġhere"]
    assert [tokens[i] for i in tok.encode("a  b")] == ["a", "Ġ", "Ġb"]  # the run of spaces leaves its last one to "b"


def test_digits_are_single_tokens(tok, tokens):
    """llama.cpp's "smollm" pre-tokenizer (and HF SmolLM2's Digits(individual_digits=True)) splits every digit,
    and the vocabulary was trained that way: no token holds an ASCII digit beside anything else, not even "Ġ2"."""
    assert [tokens[i] for i in tok.encode("year 2024")] == ["year", "Ġ", "2", "0", "2", "4"]
    assert not [t for t in tokens if len(t) > 1 and any(c in "0123456789" for c in t)]


def test_special_tokens(tok, tokens):
    assert tok.encode("<|im_start|>") == [1] == [tokens.index("<|im_start|>")]
    assert tok.encode("<|im_end|>") == [2]
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1
    assert tok.decode([1, 2]) == "<|im_start|><|im_end|>"  # special tokens are kept on decode


def test_bos(tok):
    assert tok.encode("Hi")[0] != tok.bos_id  # SmolLM2's add_bos_token is False
    assert tok.encode("Hi", bos=True) == [tok.bos_id, *tok.encode("Hi")]
    assert tok.encode("Hi", bos=False) == tok.encode("Hi")


def test_chat(tok):
    prompt = tok.chat([{"role": "user", "content": "What is 2+2?"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode(prompt).count(1) == 3
    own = tok.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert own == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_chat_errors(tok):
    plain = Tokenizer.from_json(json.dumps({**json.loads(tok.to_json()), "chat_template": None}))
    with pytest.raises(TokenizerError, match="no chat template"):
        plain.chat([{"role": "user", "content": "Hi"}])
    with pytest.raises(TokenizerError, match="'role'"):
        tok.chat([("user", "Hi")])
    for template, error in [("{{ raise_exception('only user and assistant roles') }}", "only user and assistant"),
                            ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),  # the sandbox refuses
                            ("{% for m in messages %}", "chat template failed")]:
        bad = Tokenizer.from_json(json.dumps({**json.loads(tok.to_json()), "chat_template": template}))
        with pytest.raises(TokenizerError, match=error):
            bad.chat([{"role": "user", "content": "Hi"}])


def test_stream(tok):
    text = "Zürich → 東京 🦙🦙 ok"
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == text
    assert "" in pieces  # some characters span several byte tokens and were held back
    assert not any("\ufffd" in p for p in pieces)
    for text in TEXTS:
        stream = tok.stream()
        assert "".join(stream.push(i) for i in tok.encode(text)) + stream.flush() == text


def test_stream_flushes_an_incomplete_character(tok):
    ids = tok.encode("🦙")
    assert len(ids) > 1  # a four-byte character the vocabulary lacks comes out as byte tokens
    stream = tok.stream()
    assert stream.push(ids[0]) == ""
    assert stream.flush() == "\ufffd"
    assert "".join(stream.push(i) for i in ids) == "🦙"  # flush started the stream afresh


def test_json_round_trip(tok):
    again = Tokenizer.from_json(tok.to_json())
    assert (again.bos_id, again.eos_ids, again.chat_template, again.vocab_size, again.add_bos) == \
           (tok.bos_id, tok.eos_ids, tok.chat_template, tok.vocab_size, tok.add_bos)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    for bad in ["", "{}", '{"format": "qigen-tokenizer/1"}', json.dumps({**json.loads(tok.to_json()), "tokenizer": "{"})]:
        with pytest.raises(TokenizerError):
            Tokenizer.from_json(bad)


def test_hf_files(tok, tmp_path):
    """save_hf writes what from_file reads; a post-processor that prepends BOS means add_bos when the config is silent."""
    tok.save_hf(tmp_path)
    again = Tokenizer.from_file(tmp_path / "tokenizer.json", json.loads((tmp_path / "tokenizer_config.json").read_text()))
    assert (again.bos_id, again.eos_ids, again.add_bos, again.chat_template) == (1, (2,), False, tok.chat_template)
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]

    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    hf.enable_truncation(4)  # a stray training setting must not cut our prompts
    hf.save(str(tmp_path / "tokenizer.json"))
    bos = Tokenizer.from_file(tmp_path / "tokenizer.json", {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"})
    assert bos.add_bos and bos.encode(TEXTS[3]) == [1, *tok.encode(TEXTS[3])]
    assert Tokenizer.from_file(tmp_path / "tokenizer.json", {"eos_token_id": [2, 0]}).eos_ids == (2, 0)

    with pytest.raises(TokenizerError, match="not in"):
        Tokenizer.from_file(tmp_path / "tokenizer.json", {"bos_token": "<s>"})
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        Tokenizer.from_file(tmp_path / "broken.json", {})


def test_decode_rejects_unknown_ids(tok):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([5, 49152])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.stream().push(-1)


# A tiny vocabulary: the 256 byte characters plus "12", "123" and "34", to tell pre-tokenizers apart.
ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
TINY_TOKENS = ["<|endoftext|>", *ALPHABET, "34", "12", "123"]
TINY_MERGES = ["3 4", "1 2", "12 3"]


@pytest.mark.parametrize("pre, pieces", [("gpt2", ["12", "34"]),  # "1234" is one piece: merges by rank
                                         ("smollm", ["1", "2", "3", "4"]),  # every digit alone
                                         ("llama-bpe", ["123", "4"])])  # digits in threes
def test_pre_tokenizers(pre, pieces):
    t = Tokenizer.from_gguf_fields(TINY_TOKENS, TINY_MERGES, [3] + [1] * (len(TINY_TOKENS) - 1), None, 0, None, False, pre)
    assert [TINY_TOKENS[i] for i in t.encode("1234")] == pieces
    assert t.decode(t.encode("1234 <|endoftext|>")) == "1234 <|endoftext|>"


def test_user_defined_tokens_match_whole():
    """A user-defined token (GGUF type 4) is matched in text before pre-tokenization, and is no special token."""
    types = [3] + [1] * (len(TINY_TOKENS) - 2) + [4]  # "123" user-defined
    t = Tokenizer.from_gguf_fields(TINY_TOKENS, TINY_MERGES, types, None, 0, None, False, "smollm")
    assert [TINY_TOKENS[i] for i in t.encode("01234")] == ["0", "123", "4"]
    assert t.decode(t.encode("01234")) == "01234"


def test_bad_gguf_fields():
    types = [1] * len(TINY_TOKENS)
    with pytest.raises(TokenizerError, match="pre-tokenizer 'qwen2' is not supported"):
        Tokenizer.from_gguf_fields(TINY_TOKENS, TINY_MERGES, types, None, None, None, False, "qwen2")
    with pytest.raises(TokenizerError, match="token types"):
        Tokenizer.from_gguf_fields(TINY_TOKENS, TINY_MERGES, types[1:], None, None, None, False, "gpt2")
    with pytest.raises(TokenizerError, match="merge '1 5'"):
        Tokenizer.from_gguf_fields(TINY_TOKENS, ["1 5"], types, None, None, None, False, "gpt2")
    with pytest.raises(TokenizerError, match="merge '1 23'"):  # its join is a token, "23" is none (found by the fuzzer)
        Tokenizer.from_gguf_fields(TINY_TOKENS, ["1 23"], types, None, None, None, False, "gpt2")
    with pytest.raises(TokenizerError, match="repeats"):
        Tokenizer.from_gguf_fields(TINY_TOKENS + ["12"], TINY_MERGES, types + [1], None, None, None, False, "gpt2")
    with pytest.raises(TokenizerError, match="EOS id 999"):
        Tokenizer.from_gguf_fields(TINY_TOKENS, TINY_MERGES, types, None, 999, None, False, "gpt2")
    with pytest.raises(TokenizerError, match="names none"):
        Tokenizer.from_gguf_fields(TINY_TOKENS, TINY_MERGES, types, None, None, None, True, "gpt2")
