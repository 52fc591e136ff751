"""Weight-quantized kernels with fp32 activations: matrix-vector (decode) and matrix-matrix (prefill).

Codes are AND-read from their words (qigen.layout) and converted to float. The matrix-vector kernel multiplies
them with x pre-scaled by the power of two each AND leaves, in `accumulators` partial sums per row vector; the
matrix-matrix kernel dequantizes a k-block of a tile into an fp32 buffer, then runs a register micro-kernel of
row vectors × col_tile columns over it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

from qigen.family import Family, KernelParams
from qigen.layout import layout
from qigen.spec import KernelSpec, Schedule, SpecError

ROW_VECTORS = (1, 2, 3, 4)
ACCUMULATORS = (1, 2, 3, 4)
COL_TILES = (2, 4, 6, 8)  # 1 is the matrix-vector kernel's job; wider spills on AVX2
K_BLOCKS = (64, 128, 256)
GEMM_CHAINS = 12  # fewer accumulators than this leave the FMA units waiting (measured on Zen 3: 8 run at a third
GEMM_STALL = 2.5  # of the speed of 12)


class Derived(NamedTuple):
    """Derived word |= (word src >> shift) & mask, the mask in hex."""
    src: int
    shift: int
    mask: str


class Read(NamedTuple):
    """Code `code` is view `view` AND mask (hex), worth code·2^shift; matrix-vector kernels add it to partial sum
    `sum`."""
    code: int
    view: int
    shift: int
    mask: str
    sum: int


@dataclass(frozen=True, kw_only=True)
class Params(KernelParams):
    col_tile: int
    k_block: int
    k_block_chunks: int
    derives: tuple[Derived, ...]
    views: tuple
    reads: tuple[Read, ...]
    shifts: tuple[tuple[int, float], ...]  # each shift a read leaves, with the factor 2^-shift that undoes it
    prescale: tuple[str, ...]


class WeightsF32(Family):
    name = "wq_f32"
    suffix = ""
    activations = "fp32"
    summary = "x multiplies the codes in fp32 (every format)"
    kinds = ("gemv", "gemm")
    parts = "gemv_f32.c.j2"

    def space(self, spec: KernelSpec, threads: int):
        if spec.kind == "gemv":
            return (Schedule(r, a, 1, 0, threads) for r, a in itertools.product(ROW_VECTORS, ACCUMULATORS))
        return (Schedule(r, 1, n, kb, threads) for r, n, kb in itertools.product(ROW_VECTORS, COL_TILES, K_BLOCKS)
                if kb < 2 * spec.cols)  # a block past twice the row only adds padding

    def check_schedule(self, spec: KernelSpec, schedule: Schedule) -> None:
        lay, regs = layout(spec, schedule), spec.target.registers
        if spec.kind == "gemv":
            if schedule.col_tile != 1 or schedule.k_block != 0:
                raise SpecError("a matrix-vector schedule has col_tile 1 and k_block 0")
            masks = len({e.mask for e in lay.extracts})
            words = lay.words + bool(lay.derives)  # live per row vector while its chunk is read
            r, a = schedule.row_vectors, schedule.accumulators
            if r * (a + words) + masks + 2 > regs:
                raise SpecError(f"schedule {schedule.tag()}: {r}x{a} partial sums, {r}x{words} words, {masks} masks, "
                                f"a view and x need more than the {regs} vector registers of {spec.isa}")
            return
        if schedule.accumulators != 1:
            raise SpecError("a matrix-matrix schedule accumulates in its col_tile × row_vectors registers: accumulators is 1")
        if schedule.k_block < 1 or schedule.k_block % lay.chunk:
            raise SpecError(f"k_block={schedule.k_block} is not a positive multiple of the {lay.chunk}-code packing chunk")
        if schedule.row_vectors * (schedule.col_tile + 1) + 2 > regs:
            raise SpecError(f"schedule {schedule.tag()}: {schedule.row_vectors}x{schedule.col_tile} accumulators, "
                            f"the weights, x and a spare need more than the {regs} vector registers of {spec.isa}")

    def cycles(self, spec: KernelSpec, schedule: Schedule, host, n: int) -> float:
        lay, isa = layout(spec, schedule), spec.target
        r = schedule.row_vectors
        if spec.kind == "gemv":  # per chunk: load, derive, shift, then AND, convert and FMA per code; x broadcasts
            a = schedule.accumulators
            per_row = lay.words + 3 * len(lay.derives) + sum(v.base > 0 for v in lay.views) + 3 * lay.chunk
            issue = (r * per_row + lay.chunk) / isa.issue
            latency = isa.fma_latency * lay.chunk / a if r * a < isa.fma_ports * isa.fma_latency else 0.0
            group_end = r * (a + 5) / isa.issue  # sum, scale, offset
            return lay.tiles * (lay.chunks * max(issue, latency) + lay.groups * group_end) * n
        nr, kb = schedule.col_tile, schedule.k_block
        codes = lay.chunks * lay.chunk
        dequant = lay.tiles * r * codes * 4 / isa.issue  # and, convert, fma, store per code
        # loads and broadcasts go to the load ports; too few accumulators leave the FMA units waiting
        per_k = max(r * nr / isa.fma_ports, (r + nr) / isa.load_ports) * (GEMM_STALL if r * nr < GEMM_CHAINS else 1.0)
        micro = lay.tiles * codes * per_k * n / nr
        penalty = 1.0
        if 4 * kb * (lay.tile_rows + nr) > host.l1d:  # weight block + x panel spill out of L1
            penalty += 0.25
        if 4 * kb * n > host.l2:  # x block for all columns spills out of L2
            penalty += 0.5
        return (dequant + micro) * penalty

    def params(self, spec: KernelSpec, schedule: Schedule) -> Params:
        lay = layout(spec, schedule)
        gemv = spec.kind == "gemv"
        return Params(
            **self.common(spec, schedule, f"{spec.kind}.c.j2", lay.chunks * lay.chunk + lay.groups if gemv else 0,
                          -float(spec.zero_point) if spec.symmetric else 0.0),
            col_tile=schedule.col_tile,
            k_block=schedule.k_block, k_block_chunks=schedule.k_block // lay.chunk,
            derives=tuple(Derived(d.src, d.shift, f"{d.mask:x}") for d in lay.derives), views=lay.views,
            reads=tuple(Read(e.code, e.view, e.shift, f"{e.mask:x}", e.code % schedule.accumulators)
                        for e in lay.extracts),
            shifts=tuple((s, 2.0 ** -s) for s in sorted({e.shift for e in lay.extracts})),
            prescale=tuple(f"{float(v)!r}f" for v in lay.prescale()))


FAMILY = WeightsF32()
