"""Render C for a list of (spec, schedule) pairs: one source, one library, one ISA."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

import jinja2

from qigen.layout import Derive, Extract, View, layout
from qigen.spec import KernelSpec, Schedule, SpecError, check


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


def params(spec: KernelSpec, schedule: Schedule) -> KernelParams:
    check(spec, schedule)
    lay = layout(spec, schedule)
    name = kernel_name(spec, schedule)
    return KernelParams(
        name=name, template=f"{spec.kind}.c.j2", prototype=prototype(name).rstrip(";"), tag=schedule.tag(),
        bits=spec.bits, rows=spec.rows, cols=spec.cols, padded_cols=lay.chunks * lay.chunk,
        symmetric=spec.symmetric, zero_point=float(1 << (spec.bits - 1)),
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


def render(kernels: list[tuple[KernelSpec, Schedule]], target: str) -> Source:
    """One C source holding every kernel; all must share one ISA."""
    if not kernels:
        raise SpecError("nothing to render: give at least one kernel")
    isas = {spec.isa for spec, _ in kernels}
    if len(isas) > 1:
        raise SpecError(f"one library holds one ISA, got {', '.join(sorted(isas))}")
    ps = [params(spec, schedule) for spec, schedule in kernels]
    names = [p.name for p in ps]
    if len(set(names)) != len(names):
        raise SpecError("the same kernel is listed twice")
    isa = isas.pop()
    text = _environment().get_template("library.c.j2").render(kernels=ps, isa=isa, target=target)
    return Source(text=text, isa=isa, target=target, prototypes={p.name: p.prototype + ";" for p in ps})
