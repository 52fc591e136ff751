"""The generated decode step (every layer and the head for one token, in C) matches the Python forward pass, and
so do the parts of a prefill chunk it generates beside the products (attention, SwiGLU, RMSNorm).

Tiny random models with ragged sizes (hidden 72 is no multiple of 64; 3 query heads share 1 key/value
head) in several formats, on every ISA (AVX-512 through SIMD Everywhere where the CPU lacks it). The
reference is runtime.model's numpy forward over the dequantized weights, token by token.
"""
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from perfmodel.host import detect
from qigen.arch import ROLE_NAMES, LlamaConfig
from qigen.quant import dequantize, quantize
from qigen.render import render
from qigen.spec import ISAS, QuantSpec, Schedule, SpecError, StepSpec
from runtime.compiler import compile
from runtime.loader import Sampling, load
from runtime.model import Layer, Model, Weights, distribution, rms_norm
from test_kernels import native, runnable, skip_reason

GOLDEN = Path(__file__).parent / "golden"
# (layers, hidden, heads, kv_heads, head_dim, intermediate, vocab)
SIZES = {"gqa": (2, 72, 3, 1, 24, 100, 300), "mha": (1, 40, 2, 2, 16, 56, 70)}
KV_SIZE = (2, 72, 6, 2, 32, 100, 300)  # quantized KV caches need head_dim in blocks of 32; 3 query heads per kv head
FORMATS = {
    "q4g32-fp32": QuantSpec(4, 32, activations="fp32"),
    "q3row-sym-fp32": QuantSpec(3, None, symmetric=True, scale_dtype="fp32"),
    "q2g64-head4g128-auto": QuantSpec(2, 64, head_bits=4, head_group=128),
    "q8g128-sym-head8row": QuantSpec(8, 128, symmetric=True, head_group=None),
    "q4g32-int8": QuantSpec(4, 32, activations="int8"),
    "q2g64-sym-int8": QuantSpec(2, 64, symmetric=True, activations="int8"),
}
TOKENS = 10


def config(layers, hidden, heads, kv_heads, head_dim, intermediate, vocab) -> LlamaConfig:
    return LlamaConfig(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, 10000.0, 1e-5, 32, False)


def step_spec(size: str, quant: QuantSpec, isa: str, kv_cache: str = "fp32") -> StepSpec:
    return StepSpec.uniform(config(*(KV_SIZE if size == "kv" else SIZES[size])), quant, isa, kv_cache)


def build(step: StepSpec, schedule: Schedule | None = None):
    """The step and its matrix-vector kernels in one library (emulated AVX-512 where the CPU lacks it)."""
    from perfmodel.search import rank

    pairs = [(s, schedule or rank(s, detect(), 2)[0].schedule) for s in step.kernel_specs()]
    source = render(pairs, "native", (step,))
    emulate = not native(step.isa)
    built = compile(source.text, detect(), emulate=emulate)
    return load(built.path, source.cdef, pairs, (step,))[step.name]


def outlier_channels(layer: int, role: int, cols: int) -> np.ndarray:
    """Outlier channels that differ by layer and product: the first, the last, adjacent ones, none."""
    return np.array([[0], [cols - 1], [1, 2, 3, cols // 2], []][(layer + role) % 4], np.int32)


def random_model(step: StepSpec, seed: int = 0, outliers: bool = False):
    """Random weights: quantized (what the step reads) and dequantized (what the reference multiplies); with
    outliers, the products keep outlier_channels."""
    rng = np.random.default_rng(seed)
    c = step.config
    norm = lambda: (1 + 0.1 * rng.standard_normal(c.hidden)).astype(np.float32)
    quantized, layers = [], []
    for i in range(c.layers):
        specs = {n: step.linear(i, n) for n in ROLE_NAMES}
        w = {n: (rng.standard_normal((s.rows, s.cols)) / np.sqrt(s.cols)).astype(np.float32) for n, s in specs.items()}
        q = {n: quantize(w[n], s) for n, s in specs.items()}
        if outliers:
            q = {n: q[n].with_outliers(w[n], outlier_channels(i, r, specs[n].cols)) for r, n in enumerate(ROLE_NAMES)}
        d = {n: dequantize(q[n], specs[n]) for n in q}
        quantized.append(q | {"attn_norm": norm(), "ffn_norm": norm()})
        layers.append(Layer(quantized[-1]["attn_norm"], d["qkv"], d["o"], quantized[-1]["ffn_norm"], d["gate_up"],
                            d["down"]))
    head = quantize(rng.standard_normal((c.vocab_size, c.hidden)).astype(np.float32), step.head)
    final = norm()  # the embedding is the head's (tied): the step's decoding loop looks tokens up in it
    return quantized, final, head, Weights(c, dequantize(head, step.head), layers, final, dequantize(head, step.head),
                                           None)


def packed(kernel, quantized):
    return [{n: kernel.kernel(i, n).pack(v) if n in ROLE_NAMES else v for n, v in q.items()}
            for i, q in enumerate(quantized)]


def bound(kernel, quantized, final, head):
    return kernel.bind(packed(kernel, quantized), final, kernel.kernel(None, "head").pack(head), threads=2)


def _params():
    for isa in ISAS:
        marks = [] if runnable(isa) else [pytest.mark.skip(reason=skip_reason(isa))]
        for i, fmt in enumerate(FORMATS):
            yield pytest.param(isa, fmt, list(SIZES)[i % len(SIZES)], id=f"{isa}-{fmt}-{list(SIZES)[i % len(SIZES)]}",
                               marks=marks)


KV_ISAS = ("scalar", "avx2", "avx512")  # (attention takes no VNNI instruction)


def _kv_params():
    """Every KV-cache format but fp32 (the formats above run on it) on every ISA of attention, at a head size of 32,
    and fp16 at 24 on AVX-512 too (which reads its last 8 dims one by one)."""
    for isa in KV_ISAS:
        marks = [] if runnable(isa) else [pytest.mark.skip(reason=skip_reason(isa))]
        for kv, size in (("fp16", "gqa"), ("fp16", "kv"), ("q8", "kv"), ("q4", "kv")):
            if size == "kv" or isa == "avx512":
                yield pytest.param(isa, kv, size, id=f"{isa}-{kv}-{size}", marks=marks)


@pytest.mark.parametrize("isa,fmt,size", list(_params()))
def test_step_matches_python_forward(isa, fmt, size):
    check_step(step_spec(size, FORMATS[fmt], isa))


@pytest.mark.parametrize("isa,kv,size", list(_kv_params()))
def test_step_matches_python_forward_on_kv_caches(isa, kv, size):
    """The step's attention over a cache of each format against numpy's over the same format (qigen.kvcache's
    rule). fp32 activations: where threads split attention differently its output differs in the last bits, which
    may move an int8 activation across a rounding tie. fp16 rows may round a tie the other way where the step's and
    numpy's k differ in the last bit, so the logits are held to 1e-3 there (a wrong scale, minimum or nibble order
    is off by far more)."""
    check_step(step_spec(size, FORMATS["q4g32-fp32"], isa, kv), tolerance=2e-5 if kv != "fp16" else 1e-3, tokens=70)


def check_step(step: StepSpec, tolerance: float = 2e-5, tokens: int = TOKENS):
    """tokens: positions 0..tokens - 1 of a context of as many (70: blocks of 32 keys filled, and a part of attention
    per thread). Each step runs on the caches numpy holds, so that a code one side rounds the other way at a tie (a k
    or v differing in its last bit) does not carry on to the later positions; what it writes is held within a code,
    and its logits to `tolerance` where it wrote the same bytes (a step whose own row took another code is off by
    that code's share of attention: at most one position in ten)."""
    # seed 1: with seed 0 one format's head input at position 8 lies 4e-6 of an int8 step from a rounding tie, which
    # numpy's and the kernels' float arithmetic break apart
    quantized, final, head, reference = random_model(step, seed=1, outliers=True)
    run = bound(build(step), quantized, final, head)
    ref = Model(reference, None, threads=2, kv_cache=step.kv_cache)
    for i, (layer, lin) in enumerate(zip(reference.layers, ref.linears)):  # x as each product's kernel sees it
        for n, product in lin.items():
            product.decode = lambda x, threads, m=getattr(layer, n), s=step.linear(i, n), o=quantized[i][n].outliers: \
                s.traits.seen(x, o) @ m.T
    ref.head.decode = lambda x, threads: step.head.traits.seen(x) @ reference.head.T
    ref_state = ref.new_state(tokens)
    k, v = np.zeros_like(ref_state.k), np.zeros_like(ref_state.v)
    tokens = np.random.default_rng(1).integers(0, step.config.vocab_size, tokens)
    embed, hd = reference.embed.copy(), step.config.head_dim
    step_size = {"fp32": 1e-4, "fp16": 1e-3}.get(step.kv_cache, 1 / 7)  # (q4: 1/15 of a block's range)
    ties = 0
    for pos, token in enumerate(tokens):
        k[:], v[:] = ref_state.k, ref_state.v
        want = ref.forward([token], ref_state)
        got, greedy = run(reference.embed[token], k, v, ref_state.cos, ref_state.sin, pos, threads=1 + pos % 3)
        assert greedy == np.argmax(got)
        tie = False
        for mine, theirs, keys in ((k, ref_state.k, True), (v, ref_state.v, False)):
            mine, theirs = (np.stack([ref.kv.read(layer, pos + 1, hd, keys) for layer in c]) for c in (mine, theirs))
            np.testing.assert_allclose(mine, theirs, rtol=0, atol=step_size * np.abs(theirs).max(),
                                       err_msg=f"position {pos}")
            tie |= ref.kv.blocked and bool((np.abs(mine - theirs) > 1e-5 * np.abs(theirs).max()).any())
        ties += tie
        if not tie:  # (fp16: a last-bit difference moves a value by less than the tolerance)
            np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * np.abs(want).max(), err_msg=f"position {pos}")
    assert ties <= len(tokens) // 10
    np.testing.assert_array_equal(reference.embed, embed)  # the step reads the embedding, keeps its own x
    # the decoding loop looks its tokens up in the head's format (fp16 or fp32 scales, by group or row) as numpy does
    a, b = ref.new_state(1), ref.new_state(1)
    want = run(reference.embed[tokens[0]], a.k, a.v, a.cos, a.sin, 0)[1]
    assert run.decode(head, int(tokens[0]), 1, np.array([], np.int32), b.k, b.v, b.cos, b.sin, 0).tolist() == [want]
    np.testing.assert_array_equal(a.k, b.k)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("isa", ISAS)
def test_prefill_attention_swiglu_and_norm_match_numpy(isa, size):
    """Chunks of 1 to 37 tokens (across vector widths of tokens and key blocks) at positions 0 to 99 of a cache
    already holding other positions: q and k rotated, k and v appended, causal softmax; SwiGLU of interleaved
    columns; RMSNorm row by row."""
    if not runnable(isa):
        pytest.skip(skip_reason(isa))
    step = step_spec(size, FORMATS["q4g32-int8"], isa)
    run, ref, final = check_prefill_attention(step)
    c, rng = step.config, np.random.default_rng(3)
    gate_up = rng.standard_normal((7, 2 * c.intermediate)).astype(np.float32) * 4
    gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    np.testing.assert_allclose(run.swiglu(gate_up, threads=2), gate / (1 + np.exp(-gate)) * up, rtol=1e-5, atol=1e-6)
    x = rng.standard_normal((5, c.hidden)).astype(np.float32)
    np.testing.assert_allclose(run.rmsnorm(x, final, threads=2), rms_norm(x, final, c.rms_eps), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv", ["fp16", "q8", "q4"])
@pytest.mark.parametrize("isa", KV_ISAS)
def test_prefill_attention_matches_numpy_on_kv_caches(isa, kv):
    """The same over caches of each format: rows written in the format, attention over what they hold."""
    if not runnable(isa):
        pytest.skip(skip_reason(isa))
    check_prefill_attention(step_spec("kv", FORMATS["q4g32-fp32"], isa, kv))  # (the library of the test above)


def check_prefill_attention(step: StepSpec):
    quantized, final, head, reference = random_model(step)
    run, c = bound(build(step), quantized, final, head), step.config
    ref = Model(reference, None, kv_cache=step.kv_cache)
    rng, hd = np.random.default_rng(2), c.head_dim
    exact = step.kv_cache == "fp32"
    for pos, n in ((0, 1), (0, 19), (50, 37), (99, 1), (3, 70)):
        state = ref.new_state(100 if pos + n <= 100 else 128)
        for cache, keys in ((state.k, True), (state.v, False)):
            for layer in cache:
                ref.kv.write(layer, 0, rng.standard_normal((c.kv_heads, state.context, hd)).astype(np.float32), keys)
        k, v = state.k.copy(), state.v.copy()
        qkv = rng.standard_normal((n, (c.heads + 2 * c.kv_heads) * hd)).astype(np.float32)
        state.pos = pos
        layer = n % c.layers
        want = ref._attention(qkv, layer, state)
        got = run.attention(qkv, layer, k, v, state.cos, state.sin, pos, threads=1 + n % 2)
        # (a k row rounded the other way at a tie moves the output by about 1e-5)
        np.testing.assert_allclose(got, want, rtol=0, atol=(2e-6 if exact else 1e-4) * np.abs(want).max(),
                                   err_msg=f"pos {pos} n {n}")
        if exact:
            np.testing.assert_allclose(k, state.k, rtol=0, atol=1e-6 * np.abs(state.k).max())
        else:  # k rotated here and in numpy may differ in its last bit: a tie may round the other way (a key by
            # channel waiting in the tail keeps that bit)
            got, want = (ref.kv.read(cache[layer], state.context, hd, True) for cache in (k, state.k))
            assert (np.abs(got - want) > 1e-5 * np.abs(want).max()).mean() < 1e-3
        np.testing.assert_array_equal(v, state.v)
    return run, ref, final


@pytest.fixture(scope="module")
def tiny():
    step = step_spec("gqa", QuantSpec(), "scalar")
    quantized, final, head, reference = random_model(step)
    return step, build(step), quantized, final, head, reference


def test_step_refuses_bad_weights_and_positions(tiny):
    step, kernel, quantized, final, head, _ = tiny
    with pytest.raises(ValueError, match="runs 2 layers"):
        bound(kernel, quantized[:1], final, head)
    with pytest.raises(ValueError, match="final norm"):
        bound(kernel, quantized, final[:-1], head)
    wrong = packed(kernel, quantized)
    wrong[1]["o"] = wrong[1]["down"]  # the down product's weights where o's belong
    with pytest.raises(ValueError, match="packed for another layout"):
        kernel.bind(wrong, final, kernel.kernel(None, "head").pack(head))
    run = bound(kernel, quantized, final, head)
    k = v = np.zeros((step.config.layers, step.config.kv_heads, 4, step.config.head_dim), np.float32)
    rope = np.ones((4, step.config.head_dim // 2), np.float32)
    x = np.zeros(step.config.hidden, np.float32)
    with pytest.raises(ValueError, match="outside the context of 4"):
        run(x, k, v, rope, rope, 4)
    with pytest.raises(ValueError, match="k_cache"):
        run(x, k[:, :, :, :-1], v, rope, rope, 0)
    with pytest.raises(ValueError, match="rope_sin"):
        run(x, k, v, rope, rope[:3], 0)
    with pytest.raises(ValueError, match="embedding"):
        run(x[:-1], k, v, rope, rope, 0)
    with pytest.raises(ValueError, match="threads=0"):
        run(x, k, v, rope, rope, 0, threads=0)
    qkv = np.zeros((3, (step.config.heads + 2 * step.config.kv_heads) * step.config.head_dim), np.float32)
    with pytest.raises(ValueError, match="position 4 is outside the context of 4"):
        run.attention(qkv, 0, k, v, rope, rope, 2)
    with pytest.raises(ValueError, match="layer 2 is outside the 2 layers"):
        run.attention(qkv, 2, k, v, rope, rope, 0)
    with pytest.raises(ValueError, match="qkv: a C-contiguous float32 array"):
        run.attention(qkv[:, :-1], 0, k, v, rope, rope, 0)
    with pytest.raises(ValueError, match="gate_up: a C-contiguous float32 array"):
        run.swiglu(qkv)
    with pytest.raises(ValueError, match="norm weight: a C-contiguous float32 array"):
        run.rmsnorm(np.zeros((2, step.config.hidden), np.float32), final[:-1])


def test_greedy_loop_matches_single_steps(tiny):
    """The loop in C feeds each greedy token back as the steps would one by one, and ends after a stop token."""
    step, kernel, quantized, final, head, reference = tiny
    run = bound(kernel, quantized, final, head)
    ref = Model(reference, None)
    state, loop = ref.new_state(12), ref.new_state(12)
    token, want = 7, []
    for pos in range(3, 11):  # positions 0..2 are a prompt's, already in both caches
        token = run(reference.embed[token], state.k, state.v, state.cos, state.sin, pos)[1]
        want.append(token)
    none = np.array([], np.int32)
    got = run.decode(head, 7, 8, none, loop.k, loop.v, loop.cos, loop.sin, 3, threads=2)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(loop.k, state.k)
    np.testing.assert_array_equal(loop.v, state.v)
    stop = np.array([want[4], 10 ** 6], np.int32)  # the fifth token ends it (if it came no earlier)
    np.testing.assert_array_equal(run.decode(head, 7, 8, stop, loop.k, loop.v, loop.cos, loop.sin, 3),
                                  want[:want.index(want[4]) + 1])
    with pytest.raises(ValueError, match="position 12 is outside the context of 12"):
        run.decode(head, 7, 10, none, loop.k, loop.v, loop.cos, loop.sin, 3)
    with pytest.raises(ValueError, match="token 300 is outside the vocabulary"):
        run.decode(head, step.config.vocab_size, 1, none, loop.k, loop.v, loop.cos, loop.sin, 3)
    with pytest.raises(ValueError, match="embedding codes"):
        run.decode(head.take_rows(np.arange(step.config.vocab_size - 1)), 7, 1, none, loop.k, loop.v, loop.cos,
                   loop.sin, 3)
    with pytest.raises(ValueError, match="embeddings: a table in the head's format"):
        run.decode(reference.embed, 7, 1, none, loop.k, loop.v, loop.cos, loop.sin, 3)
    with pytest.raises(ValueError, match="stop"):
        run.decode(head, 7, 1, none.astype(np.int64), loop.k, loop.v, loop.cos, loop.sin, 3)
    with pytest.raises(ValueError, match="n=0"):
        run.decode(head, 7, 0, none, loop.k, loop.v, loop.cos, loop.sin, 3)


SAMPLINGS = [(0.8, 0, 1.0), (1.0, 20, 1.0), (0.7, 0, 0.9), (1.3, 50, 0.8), (0.5, 5, 0.999)]  # temperature, k, p


@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLINGS)
def test_sampling_in_c_matches_numpy(tiny, temperature, top_k, top_p):
    """The step's sampler draws each token as often as numpy's distribution says (within 5 standard deviations per
    token, over 20,000 draws) and never one outside it; a seed repeats its draws."""
    step, kernel, quantized, final, head, _ = tiny
    run = bound(kernel, quantized, final, head)
    logits = (2 * np.random.default_rng(1).standard_normal(step.config.vocab_size)).astype(np.float32)
    tokens, p = distribution(logits, temperature, top_k, top_p)
    sampling, draws = Sampling.seeded(temperature, top_k, top_p, seed=3), 20000
    counts = np.bincount([run.pick(logits, sampling) for _ in range(draws)], minlength=step.config.vocab_size)
    assert counts.sum() == counts[tokens].sum(), "a token outside the distribution was drawn"
    sigma = np.sqrt(draws * p * (1 - p)) + 1
    assert np.all(np.abs(counts[tokens] - draws * p) < 5 * sigma)
    a, b = (Sampling.seeded(temperature, top_k, top_p, seed=4) for _ in range(2))
    assert [run.pick(logits, a) for _ in range(50)] == [run.pick(logits, b) for _ in range(50)]
    assert run.pick(logits, Sampling()) == int(np.argmax(logits))
    odd = logits.copy()
    odd[:5], odd[5:10] = np.nan, -np.inf  # never drawn; no finite logit: the first token
    assert min(run.pick(odd, sampling) for _ in range(200)) >= 10
    assert run.pick(np.full_like(logits, -np.inf), sampling) == 0


def test_sampled_loop_matches_single_steps(tiny):
    """Sampled decoding in C picks from each step's logits with the generator's state carried across calls: one call
    of 8 tokens gives what the steps and picks do one by one, and what calls of 3 and 5 do."""
    step, kernel, quantized, final, head, reference = tiny
    run = bound(kernel, quantized, final, head)
    ref = Model(reference, None)
    states = [ref.new_state(12) for _ in range(3)]
    none = np.array([], np.int32)
    one = Sampling.seeded(0.9, 30, 0.95, seed=5)
    token, want = 7, []
    for pos in range(3, 11):
        token = run.pick(run(reference.embed[token], states[0].k, states[0].v, states[0].cos, states[0].sin, pos)[0],
                         one)
        want.append(token)
    s = states[1]
    got = run.decode(head, 7, 8, none, s.k, s.v, s.cos, s.sin, 3, sampling=Sampling.seeded(0.9, 30, 0.95, 5))
    np.testing.assert_array_equal(got, want)
    s, chunks = states[2], Sampling.seeded(0.9, 30, 0.95, seed=5)
    head3 = run.decode(head, 7, 3, none, s.k, s.v, s.cos, s.sin, 3, sampling=chunks)
    rest = run.decode(head, int(head3[-1]), 5, none, s.k, s.v, s.cos, s.sin, 6, sampling=chunks)
    np.testing.assert_array_equal(np.concatenate([head3, rest]), want)
    with pytest.raises(ValueError, match="top_p=0"):
        Sampling(0.9, 30, 0.0)
    with pytest.raises(ValueError, match="rng"):
        Sampling(0.9, 30, 0.5, np.zeros(1, np.int64))


def test_step_spec_names_the_broken_rule():
    step = step_spec("mha", QuantSpec(), "avx2")
    with pytest.raises(SpecError, match="1 layers of kernel specs for a model of 2 layers"):
        replace(step, config=replace(step.config, layers=2))
    with pytest.raises(SpecError, match="layer 0 qkv is 96x40 batch 1, the model's is 128x40"):
        replace(step, config=replace(step.config, heads=4))
    with pytest.raises(SpecError, match="the head is 70x40, the model's is 71x40"):
        replace(step, config=replace(step.config, vocab_size=71))
    with pytest.raises(SpecError, match="KV cache 'q9' is unknown"):
        replace(step, kv_cache="q9")
    pairs = [(s, Schedule(1, 1)) for s in step.kernel_specs() if s != step.head]
    with pytest.raises(SpecError, match="needs a matrix-vector kernel for head"):
        render(pairs, "native", (step,))
    with pytest.raises(SpecError, match="one ISA"):
        render(pairs, "native", (replace(step, isa="scalar"),))


def test_rendered_step_matches_golden():
    """A refactor that changes the generated step shows up here; QIGEN_UPDATE_GOLDEN=1 rewrites the file."""
    step = step_spec("gqa", QuantSpec(), "avx2")
    text = render([(s, Schedule(1, 1)) for s in step.kernel_specs()], "golden", (step,)).text
    path = GOLDEN / "step_gqa_q4g32_avx2.c"
    if os.environ.get("QIGEN_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()
