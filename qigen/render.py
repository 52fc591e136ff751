"""Render C for a list of (spec, schedule) pairs: one source, one library, one ISA."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

import jinja2

from qigen.arch import ROLE_NAMES, ROLES
from qigen.family import LINE, PREFETCH, KernelParams
from qigen.kvcache import FORMATS as KV_FORMATS, KvFormat, hadamard_size
from qigen.spec import ISAS, KernelSpec, Schedule, SpecError, StepSpec, check


@dataclass(frozen=True)
class Segment:
    """Consecutive layers first..end - 1 whose products run the same kernels: one loop of the step."""
    first: int
    end: int
    linears: dict[str, KernelParams]  # by role
    glu: bool  # gate_up's tiles give silu(gate)·up (an even number of rows per tile), else every thread computes it


@dataclass(frozen=True)
class PrefillAttention:
    """The constants of a step's prefill attention (prefill.c.j2): tiles of `lanes` lanes (a key/value
    head's query heads × a vector of tokens), register passes over `pass_vectors` of its vectors, scores of
    `key_unroll` keys and outputs of `dim_unroll` dimensions at a time, keys in blocks of `key_block`."""
    prototype: str
    swiglu_prototype: str
    rmsnorm_prototype: str
    lanes: int
    pass_vectors: int
    key_unroll: int
    dim_unroll: int
    key_block: int
    own_floats: int  # each thread's: the tile's q (transposed), scores, outputs; running max, sum, new max, rescale


KEY_BLOCK = 64  # keys per online-softmax block: its scores stay in L1 beside the tile's q and outputs


def prefill_attention(step: StepSpec) -> PrefillAttention:
    c, isa = step.config, ISAS[step.isa]
    vectors, regs = c.heads // c.kv_heads, isa.registers
    # the most vectors per pass that leave room for two keys' sums, each pass's loads and a broadcast
    passes = max(v for v in range(1, vectors + 1) if vectors % v == 0 and 3 * v + 1 <= regs or v == 1)
    free = (regs - passes - 1) // passes
    lanes = vectors * isa.vector_width
    *_, attention, swiglu, rmsnorm = (p.rstrip(";") for p in step_prototypes(step.name))
    return PrefillAttention(
        prototype=attention, swiglu_prototype=swiglu, rmsnorm_prototype=rmsnorm,
        lanes=lanes, pass_vectors=passes,
        key_unroll=max(1, min(8, free)), dim_unroll=max(u for u in (1, 2, 4, 8) if c.head_dim % u == 0 and u <= max(1, free)),
        key_block=KEY_BLOCK, own_floats=offsets({"qt": c.head_dim * lanes, "sc": KEY_BLOCK * lanes,
                                                 "ot": c.head_dim * lanes, "m": 4 * lanes})[1])


@dataclass(frozen=True)
class StepParams:
    """A decode step's constants: model sizes, the kernels of its products by segment of layers, its weight pointers
    and its scratch layout in floats."""
    name: str
    prototype: str
    decode_prototype: str
    pick_prototype: str
    scratch_prototype: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    group_heads: int  # query heads per key/value head
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: str
    attn_scale: str
    segments: tuple[Segment, ...]
    head: KernelParams
    per_layer: int  # weight pointers per layer
    slot: dict[str, int]  # where a layer's norms and products (their bundles' arrays) start among its pointers
    glu: bool  # every segment's gate_up gives silu(gate)·up
    k_at: int  # where k and v start among the rows of qkv's output
    v_at: int
    at: dict[str, int]  # shared scratch offsets: x, qkv, ffn (gate_up's output), then the scores (heads × context), then the attention
    # parts (threads × heads × part_stride), then each thread's own scratch
    own: dict[str, int]  # offsets in each thread's own scratch: h (normed x), hb (silu(gate)·up unless glu), q (a group's rotated
    # query heads), k (its rotated key), att (the merged attention output), xs (prepared x)
    own_floats: int
    part_stride: int  # floats per (part, head) of attention: head_dim outputs, then its max score and sum of exps
    key_rows: int  # cache rows a group's query heads score at once: four independent sums at least
    key_prefetch: tuple[int, ...]  # bytes ahead of those rows that attention prefetches, one per line
    qkv_rows: int  # floats per token of qkv's output
    prefill: PrefillAttention
    kv: KvFormat  # the caches' format
    kv_row: int  # bytes per cached row (a position of a key/value head)
    kv_codes_at: int  # where a row's codes start (after its blocks' parameters)
    kv_vector_dims: int  # dims of a row that whole vectors cover; a floating-point format's rest are read one by one
    kv_hadamard: int  # the blocks of a head that keys and queries are rotated in (keys by channel)
    vw: int  # fp32 lanes of a vector
    embed: KernelSpec  # the embedding table's format: the head's (symmetric: scale · (code - zero point) per group)


@dataclass(frozen=True)
class Source:
    text: str
    isa: str
    target: str
    prototypes: dict[str, str]  # kernel name → C prototype, also the cffi declaration

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def cdef(self) -> str:
        return "\n".join(self.prototypes.values())


def step_prototypes(name: str) -> tuple[str, ...]:
    """The step; decoding by steps in a loop (token embeddings looked up in a table in the head's format: codes,
    scales); picking a token from logits; the scratch size (floats) the first two need
    for a context of `context` tokens and `threads` threads; a prefill chunk's attention, its SwiGLU and its RMSNorm."""
    state = ("void *k_cache, void *v_cache, const float *rope_cos, const float *rope_sin, int pos, int context, "
             "float *logits, float *scratch, int threads")
    return (f"int {name}(const void *const *weights, const float *embedding, {state});",
            f"int {name}_decode(const void *const *weights, const uint8_t *embed_codes, const void *embed_scales, "
            f"int token, int n, const int *stop, "
            f"int stops, float temperature, int top_k, float top_p, uint64_t *rng, int *tokens, {state});",
            f"int {name}_pick(const float *logits, float temperature, int top_k, float top_p, uint64_t *rng, "
            f"float *work);",
            f"size_t {name}_scratch(int context, int threads);",
            f"int {name}_prefill_attention(const float *qkv, int n, int layer, void *k_cache, void *v_cache, "
            f"const float *rope_cos, const float *rope_sin, int pos, int context, float *att, int threads);",
            f"void {name}_prefill_swiglu(const float *gate_up, int n, float *out, int threads);",
            f"void {name}_prefill_rmsnorm(const float *x, const float *w, int n, float *out, int threads);")


def offsets(floats: dict[str, int]) -> tuple[dict[str, int], int]:
    """Consecutive parts of a scratch buffer, each starting on its own 64-byte line: name → offset in floats, and
    the floats they take together."""
    at, end = {}, 0
    for part, n in floats.items():
        at[part], end = end, end + -(-n // 16) * 16
    return at, end


def step_params(step: StepSpec, kernels: dict[KernelSpec, KernelParams]) -> StepParams:
    for i, spec in [(i, s) for i, layer in enumerate(step.linears) for s in layer] + [(None, step.head)]:
        if spec not in kernels:
            role = "head" if i is None else f"layer {i} {ROLE_NAMES[step.linears[i].index(spec)]}"
            raise SpecError(f"step {step.name} needs a matrix-vector kernel for {role} ({spec.name}) in its library")
    c = step.config
    segments, first = [], 0
    for end in range(1, c.layers + 1):
        if end == c.layers or step.linears[end] != step.linears[first]:
            linears = {role: kernels[spec] for role, spec in zip(ROLE_NAMES, step.linears[first])}
            glu = linears["gate_up"].tile_rows % 2 == 0  # (scalar tiles may hold an odd number of rows)
            segments.append(Segment(first, end, linears, glu))
            first = end
    glu = all(g.glu for g in segments)
    group_heads = c.heads // c.kv_heads
    key_rows = -(-4 // group_heads)
    qkv = ROLES[ROLE_NAMES.index("qkv")]
    at, end = offsets({"x": c.hidden, "qkv": qkv.shape(c)[0], "ffn": 2 * c.intermediate})
    at["scores"] = end
    own, own_floats = offsets({"h": c.hidden, "hb": 0 if glu else c.intermediate, "q": group_heads * c.head_dim,
                               "k": c.head_dim, "att": c.heads * c.head_dim,
                               "xs": max(kernels[s].scratch for s in step.kernel_specs())})
    k_at, v_at = list(qkv.offsets(c).values())[1:]
    slot, per_layer = step.slots()
    run, decode, pick, scratch, *_ = step_prototypes(step.name)
    kv, vw = KV_FORMATS[step.kv_cache], ISAS[step.isa].vector_width
    return StepParams(
        name=step.name, prototype=run.rstrip(";"), decode_prototype=decode.rstrip(";"),
        pick_prototype=pick.rstrip(";"),
        scratch_prototype=scratch.rstrip(";"), layers=c.layers,
        hidden=c.hidden, heads=c.heads, kv_heads=c.kv_heads, group_heads=group_heads,
        head_dim=c.head_dim, intermediate=c.intermediate, vocab=c.vocab_size, rms_eps=f"{float(c.rms_eps)!r}f",
        attn_scale=f"{c.head_dim ** -0.5!r}f", segments=tuple(segments), head=kernels[step.head], glu=glu,
        k_at=k_at, v_at=v_at, at=at, own=own, own_floats=own_floats,
        part_stride=offsets({"part": c.head_dim + 2})[1], key_rows=key_rows,
        key_prefetch=tuple(range(PREFETCH, PREFETCH + key_rows * kv.row_bytes(c.head_dim), LINE)),
        per_layer=per_layer, slot=slot, qkv_rows=qkv.shape(c)[0], prefill=prefill_attention(step),
        kv=kv, kv_row=kv.row_bytes(c.head_dim), kv_codes_at=kv.param_bytes(c.head_dim),
        kv_vector_dims=c.head_dim // vw * vw, kv_hadamard=hadamard_size(c.head_dim), vw=vw, embed=step.head)


def params(spec: KernelSpec, schedule: Schedule) -> KernelParams:
    check(spec, schedule)
    return spec.traits.params(spec, schedule)


@cache
def _environment() -> jinja2.Environment:
    root = resources.files("templates")
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(root)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True)


def render(kernels: list[tuple[KernelSpec, Schedule]], target: str, steps: tuple[StepSpec, ...] = ()) -> Source:
    """One C source holding every kernel, and decode steps built on its matrix-vector kernels; one ISA for all."""
    if not kernels:
        raise SpecError("nothing to render: give at least one kernel")
    isas = {spec.isa for spec, _ in kernels} | {step.isa for step in steps}
    if len(isas) > 1:
        raise SpecError(f"one library holds one ISA, got {', '.join(sorted(isas))}")
    ps = [params(spec, schedule) for spec, schedule in kernels]
    names = [p.name for p in ps] + [step.name for step in steps]
    if len(set(names)) != len(names):
        raise SpecError("the same kernel is listed twice")
    gemv = {spec: p for (spec, _), p in zip(kernels, ps) if spec.kind == "gemv"}
    sps = [step_params(step, gemv) for step in steps]
    glu = {g.linears["gate_up"].name for sp in sps for g in sp.segments if g.glu}
    ps = [replace(p, glu=True) if p.name in glu else p for p in ps]
    isa = isas.pop()
    text = _environment().get_template("library.c.j2").render(kernels=ps, steps=sps, isa=isa, target=target,
                                                              header=ISAS[isa].header, vnni=ISAS[isa].vnni)
    prototypes = {p.name: p.prototype + ";" for p in ps}
    for step in steps:
        names = ("", "_decode", "_pick", "_scratch", "_prefill_attention", "_prefill_swiglu", "_prefill_rmsnorm")
        prototypes |= {step.name + suffix: p for suffix, p in zip(names, step_prototypes(step.name))}
    return Source(text=text, isa=isa, target=target, prototypes=prototypes)
