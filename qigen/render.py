"""Render C for a list of (spec, schedule) pairs: one source, one library, one ISA."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

import jinja2

from qigen.layout import Derive, Extract, View, layout
from qigen.spec import A8_BLOCK, STEP_LINEARS, KernelSpec, Schedule, SpecError, StepSpec, check


PREFETCH = 1024  # bytes ahead: measured on Zen 3, one thread streams ~15% more weights with it (2 KiB is worse), and
# decode attention at 1000 positions gains ~5% from prefetching the key rows as far ahead
LINE = 64  # bytes per cache line: a chunk's words are prefetched line by line (one prefetch per chunk left every
# other line of a 128-byte chunk to the hardware: the 8-bit head's 4-row-vector tiles streamed at 62% of the bandwidth, 97% with all)


@dataclass(frozen=True)
class KernelParams:
    """Every constant a template needs, computed here so templates only substitute and loop."""
    name: str
    template: str
    prototype: str
    tag: str
    bits: int
    rows: int
    cols: int
    padded_cols: int
    symmetric: bool
    zero_point: float
    stype: str
    load_scale: str
    vector_width: int
    row_vectors: int
    tile_rows: int
    tiles: int
    accumulators: int
    col_tile: int
    k_block: int
    k_block_chunks: int
    chunk: int
    chunks: int
    words: int
    groups: int
    group_size: int
    group_chunks: int
    shifts: tuple[int, ...]
    derives: tuple[Derive, ...]
    views: tuple[View, ...]
    extracts: tuple[Extract, ...]
    prescale: tuple[str, ...]
    scratch: int  # floats of prepared x a matrix-vector kernel reads (its prep writes them)
    # int8 activations (0 otherwise): shifts per word, the byte mask, chunks per block of A8_BLOCK inputs, blocks
    subs: int
    byte_mask: int
    dot8: bool  # 8-bit codes, read as signed bytes (code - 128) and summed in int32 per chunk
    code_shift: float  # Σx's multiple added to each group's Σ code·x: minus a symmetric zero point, plus dot8's 128
    block_chunks: int
    blocks: int
    group_blocks: int
    prefetch: tuple[int, ...]  # bytes ahead of a chunk's words that matrix-vector kernels prefetch, one per line
    glu: bool = False  # also a second tile loop for a step's gate_up, whose rows interleave gate's and up's: silu(gate)·up


@dataclass(frozen=True)
class StepParams:
    """A decode step's constants: model sizes, the kernels of its products, and its scratch layout in floats."""
    name: str
    prototype: str
    greedy_prototype: str
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
    linears: dict[str, KernelParams]  # qkv, o, gate_up, down, head
    per_layer: int  # weight pointers per layer
    slot: dict[str, int]  # where a layer's norms and products (words, scales, offsets) start among its pointers
    glu: bool  # gate_up's tiles give silu(gate)·up (an even number of rows per tile), else every thread computes it
    at: dict[str, int]  # shared scratch offsets: x, qkv, ffn (gate_up's output), then the scores (heads × context), then the attention
    # parts (threads × heads × part_stride), then each thread's own scratch
    own: dict[str, int]  # offsets in each thread's own scratch: h (normed x), hb (silu(gate)·up unless glu), q (a group's rotated
    # query heads), k (its rotated key), att (the merged attention output), xs (prepared x)
    own_floats: int
    part_stride: int  # floats per (part, head) of attention: head_dim outputs, then its max score and sum of exps
    key_rows: int  # cache rows a group's query heads score at once: four independent sums at least
    key_prefetch: tuple[int, ...]  # bytes ahead of those rows that attention prefetches, one per line


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


def kernel_name(spec: KernelSpec, schedule: Schedule) -> str:
    return f"{spec.name}_{schedule.tag()}"


def prototype(name: str) -> str:
    return (f"int {name}(const uint32_t *w, const void *scales_, const void *offsets_, const float *bias, "
            f"const float *x, float *y, int n, int threads);")


def step_prototypes(name: str) -> tuple[str, str, str]:
    """The step; greedy decoding by steps in a loop; the scratch size (floats) they need for a context of `context`
    tokens and `threads` threads."""
    state = ("float *k_cache, float *v_cache, const float *rope_cos, const float *rope_sin, int pos, int context, "
             "float *logits, float *scratch, int threads")
    return (f"int {name}(const void *const *weights, const float *embedding, {state});",
            f"int {name}_greedy(const void *const *weights, const float *embeddings, int token, int n, const int *stop, "
            f"int stops, int *tokens, {state});",
            f"size_t {name}_scratch(int context, int threads);")


def offsets(floats: dict[str, int]) -> tuple[dict[str, int], int]:
    """Consecutive parts of a scratch buffer, each starting on its own 64-byte line: name → offset in floats, and
    the floats they take together."""
    at, end = {}, 0
    for part, n in floats.items():
        at[part], end = end, end + -(-n // 16) * 16
    return at, end


def step_params(step: StepSpec, kernels: dict[KernelSpec, KernelParams]) -> StepParams:
    linears = {}
    for role, spec in step.linears().items():
        if spec not in kernels:
            raise SpecError(f"step {step.name} needs a matrix-vector kernel for {role} ({spec.name}) in its library")
        linears[role] = kernels[spec]
    group_heads = step.heads // step.kv_heads
    key_rows = -(-4 // group_heads)
    at, end = offsets({"x": step.hidden, "qkv": linears["qkv"].rows, "ffn": 2 * step.intermediate})
    at["scores"] = end
    glu = linears["gate_up"].tile_rows % 2 == 0  # (scalar tiles may hold an odd number of rows)
    own, own_floats = offsets({"h": step.hidden, "hb": 0 if glu else step.intermediate, "q": group_heads * step.head_dim,
                               "k": step.head_dim, "att": step.heads * step.head_dim,
                               "xs": max(k.scratch for k in linears.values())})
    run, greedy, scratch = step_prototypes(step.name)
    return StepParams(
        name=step.name, prototype=run.rstrip(";"), greedy_prototype=greedy.rstrip(";"),
        scratch_prototype=scratch.rstrip(";"), layers=step.layers,
        hidden=step.hidden, heads=step.heads, kv_heads=step.kv_heads, group_heads=group_heads,
        head_dim=step.head_dim, intermediate=step.intermediate, vocab=step.vocab, rms_eps=f"{float(step.rms_eps)!r}f",
        attn_scale=f"{step.head_dim ** -0.5!r}f", linears=linears, glu=glu, at=at,
        own=own, own_floats=own_floats,
        part_stride=offsets({"part": step.head_dim + 2})[1], key_rows=key_rows,
        key_prefetch=tuple(range(PREFETCH, PREFETCH + key_rows * step.head_dim * 4, LINE)),
        per_layer=2 + 3 * len(STEP_LINEARS),
        slot={"attn_norm": 0, "ffn_norm": 1} | {role: 2 + 3 * i for i, role in enumerate(STEP_LINEARS)})


def params(spec: KernelSpec, schedule: Schedule) -> KernelParams:
    check(spec, schedule)
    lay = layout(spec, schedule)
    name = kernel_name(spec, schedule)
    a8 = spec.family == "wq_a8"
    subs = 8 // spec.bits if a8 else 0
    dot8 = a8 and spec.bits == 8
    zero_point = float(1 << (spec.bits - 1))
    block_chunks = A8_BLOCK // lay.chunk if a8 else 0
    blocks = -(-lay.chunks // block_chunks) if a8 else 0
    # fp32: x pre-scaled (padded) and group sums; int8: x's bytes as words per (chunk, shift), block scales, group sums
    scratch = lay.chunks * subs + blocks + lay.groups if a8 else lay.chunks * lay.chunk + lay.groups
    return KernelParams(
        name=name, template=f"{spec.kind}.c.j2", prototype=prototype(name).rstrip(";"),
        tag=schedule.tag(), scratch=scratch, subs=subs, byte_mask=0x01010101 * ((1 << spec.bits) - 1) if a8 else 0,
        block_chunks=block_chunks, blocks=blocks, group_blocks=spec.group_size // A8_BLOCK if a8 else 0,
        prefetch=tuple(range(PREFETCH, PREFETCH + lay.words * lay.tile_rows * 4, LINE)),
        bits=spec.bits, rows=spec.rows, cols=spec.cols, padded_cols=lay.chunks * lay.chunk,
        symmetric=spec.symmetric, zero_point=zero_point, dot8=dot8,
        code_shift=128.0 * dot8 - (zero_point if spec.symmetric else 0.0),
        stype="uint16_t" if spec.scale_dtype == "fp16" else "float",
        load_scale="vf_load_h" if spec.scale_dtype == "fp16" else "vf_load",
        vector_width=spec.vector_width, row_vectors=schedule.row_vectors, tile_rows=lay.tile_rows,
        tiles=lay.tiles, accumulators=schedule.accumulators, col_tile=schedule.col_tile,
        k_block=schedule.k_block, k_block_chunks=schedule.k_block // lay.chunk,
        chunk=lay.chunk, chunks=lay.chunks, words=lay.words, groups=lay.groups,
        group_size=spec.group_size, group_chunks=lay.group_chunks, shifts=tuple(sorted({e.shift for e in lay.extracts})),
        derives=lay.derives, views=lay.views, extracts=lay.extracts,
        prescale=tuple(f"{float(v)!r}f" for v in lay.prescale()),
    )


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
    glu = {sp.linears["gate_up"].name for sp in sps if sp.glu}
    ps = [replace(p, glu=True) if p.name in glu else p for p in ps]
    isa = isas.pop()
    text = _environment().get_template("library.c.j2").render(kernels=ps, steps=sps, isa=isa, target=target)
    prototypes = {p.name: p.prototype + ";" for p in ps}
    for step in steps:
        (prototypes[step.name], prototypes[step.name + "_greedy"],
         prototypes[step.name + "_scratch"]) = step_prototypes(step.name)
    return Source(text=text, isa=isa, target=target, prototypes=prototypes)
