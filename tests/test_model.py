"""The model runtime on the real default model, SmolLM2-135M-Instruct (fetched once into the cache)."""
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from qigen.llm import build_model, load_file, save
from runtime.checkpoint import CheckpointError, load as load_checkpoint
from qigen.spec import QuantSpec
from runtime.model import Model, Stats, quantize_weights, split_linears

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The GNU General Public License is"]


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(os.environ["QIGEN_TEST_GGUF"])  # fetched by conftest.py


@pytest.fixture(scope="module")
def fp32(ckpt):
    return Model(split_linears(ckpt), ckpt.tokenizer, threads=2)


def torch_forward(ckpt, ids: list[int]) -> np.ndarray:
    """An independent plain-torch LLaMA forward (Hugging Face conventions), logits of every position."""
    c, t = ckpt.config, {k: torch.from_numpy(v).double() for k, v in ckpt.tensors.items()}
    n, hd = len(ids), c.head_dim

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_eps) * w

    inv = 1.0 / c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # (heads, n, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = t["model.embed_tokens.weight"][torch.tensor(ids)]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(c.layers):
        p = f"model.layers.{i}."
        h = norm(x, t[p + "input_layernorm.weight"])
        q = (h @ t[p + "self_attn.q_proj.weight"].T).view(n, c.heads, hd).transpose(0, 1)
        k = (h @ t[p + "self_attn.k_proj.weight"].T).view(n, c.kv_heads, hd).transpose(0, 1)
        v = (h @ t[p + "self_attn.v_proj.weight"].T).view(n, c.kv_heads, hd).transpose(0, 1)
        rep = c.heads // c.kv_heads
        k, v = rope(k).repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        att = torch.softmax(rope(q) @ k.transpose(1, 2) / hd ** 0.5 + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(n, -1) @ t[p + "self_attn.o_proj.weight"].T
        h = norm(x, t[p + "post_attention_layernorm.weight"])
        g, u = h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ t[p + "mlp.down_proj.weight"].T
    head = t["model.embed_tokens.weight"] if c.tied_embeddings else t["lm_head.weight"]
    return (norm(x, t["model.norm.weight"]) @ head.T).numpy()


def test_fp32_path_matches_plain_torch(ckpt, fp32):
    ids = ckpt.tokenizer.encode(PROMPTS[0])
    want = torch_forward(ckpt, ids)
    got = fp32.forward(ids, fp32.new_state(len(ids)), all_logits=True)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
    # decode token by token through the KV cache gives the same last logits as one prefill
    state = fp32.new_state(len(ids))
    for tok in ids:
        last = fp32.forward([tok], state)
    np.testing.assert_allclose(last, want[-1], atol=1e-4 * np.abs(want).max(), rtol=0)


@pytest.fixture(scope="module")
def q8(ckpt):
    return build_model(quantize_weights(split_linears(ckpt), QuantSpec(bits=8, group=None)), ckpt.tokenizer, threads=2)


@pytest.fixture(scope="module")
def q8_fp32_cache(q8):
    return build_model(q8.w, q8.tokenizer, threads=2, kv_cache="fp32")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_8bit_per_row_greedy_tokens_match_fp32(fp32, q8_fp32_cache, prompt):
    """(Per-row 8-bit is not lossless here: "Once upon a time" parts at token 4 on a near-tie. An fp32 cache: the
    weights' cost alone; with the default q8 cache this prompt parts at token 24.)"""
    def greedy(model):
        ids = model.tokenizer.encode(prompt)
        state = model.new_state(len(ids) + 32)
        logits, out = model.prefill(ids, state), []
        for _ in range(32):
            out.append(int(np.argmax(logits)))
            logits = model.forward([out[-1]], state)
        return out

    assert greedy(q8_fp32_cache) == greedy(fp32)


def test_decode_step_matches_python_loop(q8):
    """The generated decode step (the whole model in C) and the Python loop over kernels agree on the real model.
    With fp32 activations: int8 ones would turn last-bit differences into a step of the head's activations."""

    w = replace(q8.w, quant=replace(q8.w.quant, activations="fp32"))
    # an fp32 cache: in q8 a k that differs in its last bit may round to another code (the caches' own tests)
    step, loop = (build_model(w, q8.tokenizer, threads=2, fused=f, kv_cache="fp32") for f in (True, False))
    assert step.step is not None and loop.step is None
    ids = q8.tokenizer.encode(PROMPTS[2])
    a, b = step.new_state(len(ids) + 8), loop.new_state(len(ids) + 8)
    fused, python = step.prefill(ids, a), loop.prefill(ids, b)
    for _ in range(8):
        token = int(np.argmax(python))
        fused, python = step.forward([token], a), loop.forward([token], b)
        np.testing.assert_allclose(fused, python, rtol=0, atol=1e-4 * np.abs(python).max())
    np.testing.assert_allclose(a.k, b.k, rtol=0, atol=1e-4 * np.abs(b.k).max())


def test_quantized_kv_caches_on_the_real_model(q8, q8_fp32_cache):
    """A q4 KV cache: prefill (C, in chunks) and decode (the step, token by token) write the same rows in the first
    layer (but where a k differs in its last bit and rounds the other way), and rows within a code later but for a
    few in 10^4 (where such a flip has moved the later layers' inputs a little). Perplexity on the same weights, 250 scored tokens: the default
    q8 cache within 2% of the fp32 cache's (here +1.3%: on so few tokens any change of the last bits moves it by
    about as much; whole texts at ctx 2048 and 4096 are in README's "KV cache"), q4 (+0.6 to +2.7% there) within 6%."""
    q4 = build_model(q8.w, q8.tokenizer, threads=2, kv_cache="q4")
    assert q4.kv.name == "q4" and q4.kv.cache_shape(40, 64, keys=False) == (np.uint8, (40, 40))
    assert q4.kv.cache_shape(40, 64, keys=True) == (np.uint8, (2 * 32 * 40 + 32 * 64 * 4,))  # two blocks, the tail
    text = (Path(__file__).parent.parent / "qigen" / "bench" / "gpl-3.txt").read_text()[:3000]
    ids = q8.tokenizer.encode(text)[:70]  # (two blocks of 32 keys by channel filled, six keys in the tail)
    a, b = q4.new_state(len(ids)), q4.new_state(len(ids))
    q4.prefill(ids, a)
    for token in ids:
        q4.forward([token], b)
    hd = q4.config.head_dim
    for x, y, keys in ((a.k, b.k, True), (a.v, b.v, False)):
        x, y = (np.stack([q4.kv.read(layer, len(ids), hd, keys) for layer in c]) for c in (x, y))
        assert (np.abs(x[0] - y[0]) > 1e-5 * np.abs(y[0]).max()).mean() < 0.01
        assert (np.abs(x - y) > np.abs(y).max() / 7).mean() < 1e-4
    fp32 = q8_fp32_cache
    assert q8.kv.name == "q8"
    p32 = fp32.perplexity(text, ctx=128)[0]
    assert abs(q8.perplexity(text, ctx=128)[0] - p32) / p32 < 0.02
    assert abs(q4.perplexity(text, ctx=128)[0] - p32) / p32 < 0.06
    with pytest.raises(ValueError, match="KV cache 'q9' is unknown"):
        build_model(q8.w, q8.tokenizer, kv_cache="q9")
    with pytest.raises(ValueError, match="context=9000: above the model's own 8192"):
        next(q4.generate("hi", context=9000))


def test_int8_activations_keep_perplexity(ckpt):
    """4-bit g64 runs with int8 activations by default ("auto"); through the decode path and through prefill,
    perplexity stays within 3% of fp32 activations on the same weights. Prefill reads decode's packing."""

    w = quantize_weights(split_linears(ckpt), QuantSpec(4, 64))
    # (an fp32 cache: the activations' cost alone; the caches' is measured in test_quantized_kv_caches_on_the_real_model)
    int8, fp32 = (build_model(v, ckpt.tokenizer, 2, kv_cache="fp32")
                  for v in (w, replace(w, quant=replace(w.quant, activations="fp32"))))
    assert "a8" in int8.w.quant.kernel_spec(576, 576).name and "a8" not in fp32.w.quant.kernel_spec(576, 576).name
    text = (Path(__file__).parent.parent / "qigen" / "bench" / "gpl-3.txt").read_text()[:3000]
    p8, scored = int8.perplexity(text, ctx=128, decode=True)
    p32, _ = fp32.perplexity(text, ctx=128, decode=True)
    assert scored > 100 and abs(p8 - p32) / p32 < 0.03
    assert abs(int8.perplexity(text, ctx=128)[0] - p32) / p32 < 0.03
    assert all(linear.shared for layer in int8.linears for linear in layer.values()) and int8.head.shared


def test_outlier_channels_on_the_real_model(ckpt, tmp_path):
    """4-bit g128 with outlier channels chosen per layer by measurement (a short calibration): the .qigen file keeps
    them, the decode step and the Python loop agree on them, and int8 prefill perplexity stays within 3% of fp32
    activations on the same weights."""
    from qigen.llm import calibrate
    from qigen.outliers import choose
    from qigen.quant import quantize

    calib = calibrate(ckpt, (Path(__file__).parent.parent / "qigen" / "calibration.txt").read_text()[:4000], ctx=128,
                      windows=2)
    counts = {}

    def quantizer(m, spec, name):
        q = choose(m, spec, "auto", calib.hessians[name], calib.inputs[name], lambda w, ch: quantize(w, spec))
        counts[name] = 0 if q.outliers is None else q.outliers.size
        return q

    w = quantize_weights(split_linears(ckpt), QuantSpec(4, 128), quantizer)
    assert 0 < sum(counts.values()) and min(counts.values()) < max(counts.values())  # chosen per layer
    save(tmp_path / "o.qigen", w, ckpt.tokenizer, ckpt.sha256)
    back = load_file(tmp_path / "o.qigen")[0]
    for a, b in zip(w.layers, back.layers):
        for n in ("qkv", "gate_up", "down"):
            x, y = getattr(a, n), getattr(b, n).load()
            assert (x.outliers is None) == (y.outliers is None)
            if x.outliers is not None:
                np.testing.assert_array_equal(x.outliers, y.outliers)
                np.testing.assert_array_equal(x.outlier_weights, y.outlier_weights)
    f32 = replace(back, quant=replace(back.quant, activations="fp32"))
    step, loop = (build_model(f32, ckpt.tokenizer, threads=2, fused=f, kv_cache="fp32") for f in (True, False))
    ids = ckpt.tokenizer.encode(PROMPTS[0])
    a, b = step.new_state(len(ids) + 4), loop.new_state(len(ids) + 4)
    step.prefill(ids, a), loop.prefill(ids, b)
    for token in (5, 99, 1000, 7):
        fused, python = step.forward([token], a), loop.forward([token], b)
        np.testing.assert_allclose(fused, python, rtol=0, atol=1e-4 * np.abs(python).max())
    text = (Path(__file__).parent.parent / "qigen" / "bench" / "gpl-3.txt").read_text()[:3000]
    p8 = build_model(back, ckpt.tokenizer, 2).perplexity(text, ctx=128)[0]
    p32 = step.perplexity(text, ctx=128)[0]
    assert abs(p8 - p32) / p32 < 0.03


def test_generate_streams_and_stops(q8):
    stats = Stats()
    pieces = list(q8.generate(PROMPTS[1], max_tokens=12, stats=stats))
    assert stats.generated_tokens == 12 and stats.stop == "max tokens"
    assert "".join(pieces).strip()
    sampled = "".join(q8.generate(PROMPTS[1], max_tokens=8, temperature=0.8, top_p=0.9, top_k=40, seed=1))
    assert sampled == "".join(q8.generate(PROMPTS[1], max_tokens=8, temperature=0.8, top_p=0.9, top_k=40, seed=1))


def test_greedy_generate_runs_ahead_in_c(q8):
    """Greedy generate picks its tokens in chunks, in the step's loop in C: the same tokens as forward and argmax one
    by one, and the same stop at the context length."""
    ids = q8.tokenizer.encode(PROMPTS[0])
    state = q8.new_state(len(ids) + 20)
    logits, want = q8.prefill(ids, state), []
    for _ in range(20):
        want.append(int(np.argmax(logits)))
        logits = q8.forward([want[-1]], state)
    assert "".join(q8.generate(ids, max_tokens=20)) == q8.tokenizer.decode(want)
    stats = Stats()
    list(q8.generate(ids, max_tokens=100, context=len(ids) + 5, stats=stats))
    assert stats.generated_tokens == 6 and stats.stop == f"context length ({len(ids) + 5} tokens)"


def test_prompt_longer_than_context(q8):
    with pytest.raises(ValueError, match="context holds 8"):
        list(q8.generate("one two three four five six seven eight nine ten eleven", context=8))


def test_run_peaks_within_two_and_a_half_times_the_file(ckpt, tmp_path):
    """`qigen run` of the default model's .qigen file peaks at most 2.5x the file (212 MiB for 96 here; it was 660):
    matrices are read, unpacked, packed and placed one at a time, tokens are looked up in the head's 8-bit table, and
    LLVM is asked about the CPU in a child process."""
    path = tmp_path / "q4g32.qigen"
    save(path, quantize_weights(split_linears(ckpt), QuantSpec()), ckpt.tokenizer, ckpt.sha256)
    run = subprocess.run([sys.executable, "-m", "qigen.cli", "run", str(path), "--prompt", "hi", "--max-tokens", "8",
                          "--json"], capture_output=True, text=True, check=True)
    assert json.loads(run.stdout)["peak_memory_mb"] <= 2.5 * path.stat().st_size / 2 ** 20


def test_qigen_file_round_trip_and_bad_files(ckpt, tmp_path):
    weights = quantize_weights(split_linears(ckpt), QuantSpec(bits=4, group=32))  # int8 activations
    path = tmp_path / "m.qigen"
    save(path, weights, ckpt.tokenizer, ckpt.sha256)
    back, tok, meta = load_file(path)
    assert meta["source_sha256"] == ckpt.sha256 and tok.encode("hello") == ckpt.tokenizer.encode("hello")
    for a, b in zip(weights.layers, back.layers):
        np.testing.assert_array_equal(a.qkv.codes, b.qkv.load().codes)
        np.testing.assert_array_equal(a.down.scales, b.down.load().scales)
    # the file keeps each row's codes in order, eight to a word from its low bits, whatever layout kernels read
    from safetensors.numpy import load_file as tensors

    codes = weights.layers[0].o.codes.astype(np.uint32)
    words = tensors(str(path))["layers.0.o.words"].reshape(codes.shape[0], -1)
    np.testing.assert_array_equal(words, sum(codes[:, j::8] << 4 * j for j in range(8)))
    (tmp_path / "cut.qigen").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable qigen model"):
        load_file(tmp_path / "cut.qigen")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "other.qigen"), metadata={"qigen": '{"format": "qigen-model", "version": 99}'})
    with pytest.raises(CheckpointError, match="version 99"):
        load_file(tmp_path / "other.qigen")


def test_perplexity_on_the_shipped_text(q8, fp32):
    text = (Path(__file__).parent.parent / "qigen" / "bench" / "gpl-3.txt").read_text()[:6000]
    ppl8, scored = q8.perplexity(text, ctx=256)
    ppl32, _ = fp32.perplexity(text, ctx=256)
    assert scored > 0 and 1 < ppl32 < 100
    assert abs(ppl8 - ppl32) / ppl32 < 0.02


def _edited(path: Path, out: Path, meta=None, tensors=None) -> Path:
    """A copy of the .qigen file at path with its metadata and tensors passed through the given edits."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), "numpy") as f:
        m, t = json.loads(f.metadata()["qigen"]), {k: f.get_tensor(k) for k in f.keys()}
    (meta or (lambda m: None))(m)
    (tensors or (lambda t: None))(t)
    save_file(t, str(out), metadata={"qigen": json.dumps(m)})
    return out


@pytest.fixture(scope="module")
def q8_file(ckpt, tmp_path_factory) -> Path:
    """A one-layer cut of the real model in 8 bits, as a .qigen file."""
    w = quantize_weights(split_linears(ckpt), QuantSpec(bits=8, group=32))
    w = replace(w, config=replace(w.config, layers=1), layers=w.layers[:1])
    path = tmp_path_factory.mktemp("q8") / "one-layer.qigen"
    save(path, w, ckpt.tokenizer, ckpt.sha256)
    return path


@pytest.mark.parametrize("meta, tensors, error", [
    (lambda m: m.pop("tokenizer"), None, "holds no tokenizer"),
    (lambda m: m["quant"].update(head_group={}), None, "head_group={} is not a group size"),
    (lambda m: m["quant"].update(symmetric="llama"), None, "symmetric='llama' is not true or false"),
    (lambda m: m["quant"].update(method=3), None, "method=3 is not text"),
    (lambda m: m["quant"].update(colour="red"), None, "unexpected keyword argument 'colour'"),
    (lambda m: m["config"].update(rms_eps=925353400), None, "rms_eps=925353400 must be a finite positive number"),
    (lambda m: m.update(quant=[]), None, "lacks the config or the quantization spec"),
    (lambda m: m.update(tokenizer=m["tokenizer"].replace('"add_bos": false', '"add_bos": -1000000000000')), None,
     "add_bos -1000000000000 is not true or false"),
    (lambda m: m.update(tokenizer=m["tokenizer"].replace('"eos_ids": [', '"eos_ids": [NaN, ')), None,
     "token id nan is not an integer"),
    (None, lambda t: t.update({"layers.0.o.words": t["layers.0.o.words"].astype(np.int32)}),
     "'layers.0.o.words' is int32"),
    (None, lambda t: t.update({"layers.0.attn_norm": t["layers.0.attn_norm"][:-1]}), "'layers.0.attn_norm' is float32 (575,)"),
    (None, lambda t: t.pop("head.scales"), "'head.scales' is missing"),
    (None, lambda t: t.update({"layers.0.o.outliers": np.array([5, 3], np.int32),
                               "layers.0.o.outlier_weights": np.zeros((576, 2), np.float16)}), "ascending order"),
    (None, lambda t: t.update({"layers.0.o.outliers": np.array([5, 900], np.int32),
                               "layers.0.o.outlier_weights": np.zeros((576, 2), np.float16)}), "inputs 0..575"),
    (None, lambda t: t.update({"layers.0.o.outliers": np.array([5], np.int32)}), "'layers.0.o.outlier_weights' is missing"),
    (None, lambda t: t.update({"layers.0.o.outlier_weights": np.zeros((576, 1), np.float16)}), "without its channels"),
])
def test_qigen_file_nonsense_is_refused(q8_file, tmp_path, meta, tensors, error):
    with pytest.raises(CheckpointError, match=re.escape(error)):
        load_file(_edited(q8_file, tmp_path / "bad.qigen", meta, tensors))


def test_thread_choice_leaves_the_cores_others_keep_busy():
    """Decode runs on the cores that other programs left free over the last window, by the kernel's accounting (busy
    CPU seconds on our cores less our own): a busy neighbour takes a core, and gives it back when it stops."""
    from runtime.model import ThreadChoice, cpu_seconds

    now, busy, ours = [0.0], [0.0], [0.0]

    def run(seconds: float, others: float, mine: float) -> None:  # cores kept busy by others and by us
        now[0] += seconds
        busy[0] += seconds * (others + mine)
        ours[0] += seconds * mine

    choice = ThreadChoice(2, lambda: (busy[0], ours[0]), lambda: now[0])
    assert choice.pick() == 2  # no window measured yet: every core
    run(0.3, others=0.1, mine=1.9)
    assert choice.pick() == 2
    run(0.3, others=0.7, mine=1.3)  # a busy process shares the cores with 2 threads
    assert choice.pick() == 1 and abs(choice.taken - 0.7) < 1e-9
    run(0.1, others=0.0, mine=1.0)
    assert choice.pick() == 1  # (under a window: the choice stands)
    run(0.2, others=1.0, mine=1.0)
    assert choice.pick() == 1
    run(0.3, others=0.2, mine=1.0)  # it stopped
    assert choice.pick() == 2
    assert ThreadChoice(2, lambda: None).pick() == 2  # no accounting: every core
    assert ThreadChoice(1, lambda: (busy[0], ours[0]), lambda: now[0]).pick() == 1
    total, mine = cpu_seconds()
    assert total > 0 and 0 < mine <= total
