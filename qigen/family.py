"""What every kernel family is made of: the record a family module fills in, the weight bundle a packed matrix is,
and the template parameters all kernels share.

A family (one module under qigen/families, one line in its registry) owns its legality rules, its packing (the
layout's codebook), its schedule space and register check, its cost-model terms, its templates and their
parameters, its name suffix and its weight bundle. Code outside the family asks the record, never the name.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from qigen.layout import layout, pack_codes, pack_groups
from qigen.spec import MAX_OUTLIERS, KernelSpec, Schedule, SpecError, kernel_name

PREFETCH = 1024  # bytes ahead: measured on Zen 3, one thread streams ~15% more weights with it (2 KiB is worse), and
# decode attention at 1000 positions gains ~5% from prefetching the key rows as far ahead
LINE = 64  # bytes per cache line: a chunk's words are prefetched line by line (one prefetch per chunk left every
# other line of a 128-byte chunk to the hardware: the 8-bit head's 4-row-vector tiles streamed at 62% of the bandwidth, 97% with all)


@dataclass(frozen=True)
class Array:
    """One named array of a packed matrix: its key (in PackedWeights, .qigen files and the step's pointers), dtype
    and shape (a dimension -1 - j: the matrix's outlier count k plus j, data not format), its C parameter, the cast
    a pointer to it takes in a call, and whether the format has it: always, never, or (optional) as the weights
    have it. An absent array is passed as NULL."""
    name: str
    dtype: type
    shape: tuple[int, ...]
    param: str
    cast: str = ""
    present: bool = True
    optional: bool = False

    def dims(self, k: int) -> tuple[int, ...]:
        """The shape in a matrix with k outliers."""
        return tuple(k - d - 1 if d < 0 else d for d in self.shape)

    def fits(self, a: np.ndarray | None, k: int) -> bool:
        """Whether `a` (None: absent) is this array of a matrix with k outliers."""
        if a is None:
            return self.optional or not self.present
        return self.present and a.dtype == self.dtype and a.shape == self.dims(k)


def check_channels(channels, cols: int) -> None:
    """ValueError unless `channels` are 1 to MAX_OUTLIERS distinct int32 inputs of `cols`, ascending."""
    most = min(MAX_OUTLIERS, cols)
    if not (isinstance(channels, np.ndarray) and channels.dtype == np.int32 and channels.ndim == 1
            and 1 <= channels.size <= most):
        raise ValueError(f"outliers should be 1 to {most} int32 input channels, not "
                         f"{getattr(channels, 'dtype', type(channels).__name__)} {getattr(channels, 'shape', '')}")
    if channels[0] < 0 or channels[-1] >= cols or (np.diff(channels) <= 0).any():
        raise ValueError(f"outlier channels must be distinct inputs 0..{cols - 1} in ascending order")


def outlier_count(arrays: dict[str, np.ndarray], cols: int) -> int:
    """The outliers a packed matrix keeps: its `outliers` array is the count k, then k input channels ascending.
    ValueError unless that holds (the kernels read k channels and k columns of weights on its word)."""
    o = arrays.get("outliers")
    if o is None:
        return 0
    if not (isinstance(o, np.ndarray) and o.dtype == np.int32 and o.ndim == 1 and o.size >= 2 and o[0] == o.size - 1):
        raise ValueError("outliers should be an int32 array: the count k, then k channels")
    check_channels(o[1:], cols)
    return int(o[0])


@dataclass(frozen=True, kw_only=True)
class KernelParams:
    """Every constant a template needs, computed in Python so templates only substitute and loop. A family's own
    parameters extend these."""
    name: str
    template: str
    prototype: str
    tag: str
    bundle: tuple[Array, ...]
    bits: int
    rows: int
    cols: int
    padded_cols: int
    symmetric: bool
    stype: str
    load_scale: str
    vector_width: int
    row_vectors: int
    accumulators: int  # independent partial sums per row vector
    tile_rows: int
    tiles: int
    chunk: int
    chunks: int
    words: int
    groups: int
    group_size: int
    group_chunks: int
    code_shift: float  # Σx's multiple added to each group's Σ code·x: minus a symmetric zero point (and a family's bias)
    scratch: int  # floats of prepared x (per row of X) a kernel's prep writes; 0 when it prepares none
    prefetch: tuple[int, ...]  # bytes ahead of a chunk's words that matrix-vector kernels prefetch, one per line
    parts: str  # the family's pieces of the matrix-vector scaffold gemv.c.j2
    outlier_at: int  # where prep keeps the outlier channels' x in scratch
    outlier_rows: int  # outlier weights per channel: every tile's rows
    glu: bool = False  # also a second tile loop for a step's gate_up, whose rows interleave gate's and up's: silu(gate)·up


class Family:
    """The record of a kernel family; a family module subclasses it and registers one instance."""
    name: ClassVar[str]
    suffix: ClassVar[str]  # in kernel names, after the kind
    activations: ClassVar[str]  # how x meets the codes: "fp32" or "int8"
    summary: ClassVar[str]  # its rules in words, for help texts
    kinds: ClassVar[tuple[str, ...]]  # "gemv" (matrix-vector, batch 1) and/or "gemm" (matrix-matrix)
    byte_major: ClassVar[bool] = False  # codes packed byte by byte (see qigen.layout)
    dot_products: ClassVar[bool] = False  # its code takes an ISA's integer dot product (VNNI's differs)

    def check(self, spec: KernelSpec) -> None:
        """Raise SpecError naming the family rule that spec breaks."""
        if spec.kind not in self.kinds:
            raise SpecError(f"{self.name} kernels are {' or '.join(self.kinds)}, not {spec.kind} (batch {spec.batch})")

    def space(self, spec: KernelSpec, threads: int) -> Iterable[Schedule]:
        """The schedules the search enumerates; check_schedule drops the illegal ones."""
        raise NotImplementedError

    def check_schedule(self, spec: KernelSpec, schedule: Schedule) -> None:
        """Raise SpecError naming the register or divisibility rule spec + schedule break."""
        raise NotImplementedError

    def cycles(self, spec: KernelSpec, schedule: Schedule, host, n: int) -> float:
        """Vector cycles of one call on n columns, all tiles: the cost model's compute term."""
        raise NotImplementedError

    def params(self, spec: KernelSpec, schedule: Schedule) -> KernelParams:
        """The template and its parameters."""
        raise NotImplementedError

    def seen(self, x: np.ndarray, outliers: np.ndarray | None = None) -> np.ndarray:
        """x as the kernels multiply it (the outlier channels, if any, as they are): the oracle multiplies this."""
        return x

    def bundle(self, spec: KernelSpec, schedule: Schedule) -> tuple[Array, ...]:
        """The arrays a packed matrix holds: codes in words, then the scales and offsets per group, by tile; then, if
        it keeps outlier channels (QUIK), their count and channels and their weight columns in fp16, by channel."""
        lay = layout(spec, schedule)
        groups = (lay.tiles, lay.groups, lay.tile_rows)
        stype = spec.scales.numpy
        return (Array("words", np.uint32, (lay.tiles, lay.chunks, lay.words, lay.tile_rows), "const uint32_t *w",
                      "(const uint32_t *)"),
                Array("scales", stype, groups, "const void *scales_"),
                Array("offsets", stype, groups, "const void *offsets_", present=not spec.symmetric),
                Array("outliers", np.int32, (-2,), "const int32_t *outliers", "(const int32_t *)", optional=True),
                Array("outlier_weights", np.float16, (-1, lay.tiles * lay.tile_rows), "const void *outlier_w",
                      "(const uint16_t *)", optional=True))

    def check_packed(self, spec: KernelSpec, schedule: Schedule, arrays: dict[str, np.ndarray]) -> None:
        """Raise ValueError unless `arrays` are a matrix packed in this format: the bundle, array by array."""
        k = outlier_count(arrays, spec.cols)
        for a in self.bundle(spec, schedule):
            got = arrays.get(a.name)
            if not a.fits(got, k):
                want = "none" if not a.present else \
                    f"{np.dtype(a.dtype).name} {a.dims(k)}" + " or none" * a.optional
                have = "none" if got is None else f"{got.dtype} {got.shape}"
                raise ValueError(f"weights are not in {kernel_name(spec, schedule)}'s format: {a.name} should be "
                                 f"{want}, not {have}; pack them with kernel.pack()")
        if k and "outlier_weights" not in arrays:
            raise ValueError("outliers without their weights")

    def width(self, spec: KernelSpec) -> int:
        """How many arrays (pointers) the bundle has, whatever the schedule."""
        return len(self.bundle(spec, Schedule(row_vectors=1, accumulators=1)))

    def pack(self, q, spec: KernelSpec, schedule: Schedule) -> dict[str, np.ndarray]:
        """QuantizedWeights → the bundle's arrays in the layout `schedule` reads."""
        lay = layout(spec, schedule)
        if (q.offsets is None) != spec.symmetric:
            raise ValueError("symmetric kernels take weights without offsets, asymmetric ones need them")
        if q.scales.shape != (spec.rows, spec.groups):
            raise ValueError(f"scales have shape {q.scales.shape}, the spec needs {(spec.rows, spec.groups)}")
        dtype = spec.scales.numpy
        arrays = {"words": pack_codes(q.codes, lay), "scales": pack_groups(q.scales.astype(dtype), lay)}
        if q.offsets is not None:
            arrays["offsets"] = pack_groups(q.offsets.astype(dtype), lay)
        if q.outliers is not None:  # count-prefixed channels (QuantizedWeights checked them); each channel's weights
            # for every tile row, zero-padded
            k = len(q.outliers)
            arrays["outliers"] = np.concatenate([[k], q.outliers]).astype(np.int32)
            weights = np.zeros((k, lay.tiles * lay.tile_rows), np.float16)
            weights[:, :spec.rows] = q.outlier_weights.T
            arrays["outlier_weights"] = weights
        return arrays

    def prototype(self, spec: KernelSpec, schedule: Schedule, name: str) -> str:
        """The C prototype, also the cffi declaration: the bundle's arrays, then bias, x, y, n and threads."""
        arrays = ", ".join(a.param for a in self.bundle(spec, schedule))
        return f"int {name}({arrays}, const float *bias, const float *x, float *y, int n, int threads);"

    parts: ClassVar[str] = ""  # the template of its pieces of the matrix-vector scaffold, if it fills that in

    def common(self, spec: KernelSpec, schedule: Schedule, template: str, scratch: int, code_shift: float) -> dict:
        """The KernelParams fields every family computes alike, as keywords for its own params class."""
        lay = layout(spec, schedule)
        name = kernel_name(spec, schedule)
        return dict(
            name=name, template=template, prototype=self.prototype(spec, schedule, name).rstrip(";"),
            tag=schedule.tag(), bundle=self.bundle(spec, schedule), bits=spec.bits, rows=spec.rows, cols=spec.cols,
            padded_cols=lay.chunks * lay.chunk, symmetric=spec.symmetric, stype=spec.scales.ctype,
            load_scale=spec.scales.load, vector_width=spec.vector_width, row_vectors=schedule.row_vectors,
            accumulators=schedule.accumulators, parts=self.parts,
            tile_rows=lay.tile_rows, tiles=lay.tiles, chunk=lay.chunk, chunks=lay.chunks, words=lay.words,
            groups=lay.groups, group_size=spec.group_size, group_chunks=lay.group_chunks, code_shift=code_shift,
            scratch=scratch + min(MAX_OUTLIERS, spec.cols), outlier_at=scratch, outlier_rows=lay.tiles * lay.tile_rows,
            prefetch=tuple(range(PREFETCH, PREFETCH + lay.words * lay.tile_rows * 4, LINE)))

