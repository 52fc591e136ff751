"""Weight-quantized kernels with int8 activations: integer dot products, matrix-vector (decode) and matrix-matrix
(prefill).

x is quantized per block of BLOCK inputs (llama.cpp's Q8 block) to int8 with one scale; the codes are packed
byte-major, so one shift and one AND leave them whole in bytes, which meet x's bytes in an integer dot product:
`vpdpbusd` (u8 x s8, four bytes into each int32 lane) with VNNI, else `maddubs`/`madd` (int16 pair sums within a
block, then int32); one float conversion per block. Without VNNI, 8-bit codes are read as signed bytes (code − 128)
and x's signs moved onto them, as llama.cpp does for Q8_0. The matrix-matrix kernel quantizes every row of X the
same way, then runs a register micro-kernel of row vectors × col_tile rows of X over the tile's words.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from qigen.family import Family, KernelParams
from qigen.layout import layout
from qigen.spec import KernelSpec, Schedule, SpecError

BITS = (2, 3, 4, 8)  # codes that sit whole in bytes after a shift and an AND (3-bit: two, and an OR)
BLOCK = 32  # inputs per int8 activation scale
ROW_VECTORS = (1, 2, 3, 4)
COL_TILES = (2, 3, 4, 6, 8)  # rows of X per matrix-matrix micro-kernel; 1 is the matrix-vector kernel's job


class ByteRead(NamedTuple):
    """The four codes of a chunk's x word s, one per byte: (word >> shift) & mask, OR'd (3-bit) with their third bits,
    (hi_word >> hi_shift) & hi_mask, shifting left for a negative hi_shift."""
    word: int
    shift: int
    mask: str
    hi_word: int = 0
    hi_shift: int = 0
    hi_mask: str = ""


def byte_reads(bits: int) -> tuple[ByteRead, ...]:
    """How each x word of a chunk finds its codes (qigen.layout packs them byte-major)."""
    if bits == 3:
        return tuple(ByteRead(s // 4, 2 * (s % 4), "03030303", 2, s - 2, "04040404") for s in range(8))
    return tuple(ByteRead(0, s * bits, f"{0x01010101 * ((1 << bits) - 1):x}") for s in range(8 // bits))


@dataclass(frozen=True, kw_only=True)
class Params(KernelParams):
    subs: int  # x words per chunk (four codes each)
    reads: tuple[ByteRead, ...]  # per x word
    top_code: int
    dot: str  # how codes meet x's bytes: "dpbusd" (VNNI), "maddubs" (int16 pairs), "dot8" (8-bit codes as signed
    # bytes, code - 128, summed in int32 per word)
    block_chunks: int  # chunks per block of BLOCK inputs
    blocks: int
    group_blocks: int
    col_tile: int  # rows of X per micro-kernel (matrix-matrix)
    pass_vectors: int  # row vectors of a tile per micro-kernel pass (matrix-matrix)


class WeightsA8(Family):
    name = "wq_a8"
    suffix = "_a8"
    activations = "int8"
    summary = (f"x quantized to int8 per block of {BLOCK}, integer dot products (bits "
               f"{', '.join(map(str, BITS))}, groups of multiples of {BLOCK})")
    kinds = ("gemv", "gemm")
    dot_products = True
    parts = "gemv_a8.c.j2"
    byte_major = True  # code 4s + j in byte j at bit s·bits: a word shifted by s·bits meets x's bytes 4s..4s+3

    def check(self, spec: KernelSpec) -> None:
        if spec.bits not in BITS:
            raise SpecError(f"int8 activations need bits {' or '.join(map(str, BITS))}, not {spec.bits}")
        if spec.group is None or spec.group % BLOCK:
            raise SpecError(f"int8 activations need a group that is a multiple of {BLOCK}, not "
                            f"{spec.group or 'a whole row'}")

    def space(self, spec: KernelSpec, threads: int):
        tiles = COL_TILES if spec.kind == "gemm" else (1,)
        return (Schedule(r, 1, c, 0, threads) for r in ROW_VECTORS for c in tiles)

    def check_schedule(self, spec: KernelSpec, schedule: Schedule) -> None:
        regs, r, c = spec.target.registers, schedule.row_vectors, schedule.col_tile
        if schedule.k_block != 0 or schedule.accumulators != 1 or (c == 1) != (spec.kind == "gemv"):
            raise SpecError("an int8-activation schedule has k_block 0, accumulators 1 (one integer sum per row vector "
                            "and row of X) and col_tile 1 exactly when it is matrix-vector")
        lay = layout(spec, schedule)
        masks = len({m for e in byte_reads(spec.bits) for m in (e.mask, e.hi_mask) if m})
        if spec.kind == "gemv":
            subs = lay.chunk // 4 if r > 1 else 1  # x broadcasts live across the row vectors (one row: used at once)
            if (2 + lay.words) * r + subs + masks + 2 > regs:
                raise SpecError(f"schedule {schedule.tag()}: {r}x3 sums, {r}x{lay.words - 1} more words, {subs} x "
                                f"broadcasts, {masks} mask(s) and two temporaries need more than the {regs} vector "
                                f"registers of {spec.isa}")
        elif not self.pass_vectors(spec, schedule):
            raise SpecError(f"schedule {schedule.tag()}: {c} integer and float sums, {lay.words} words, a code, "
                            f"{masks} mask(s), x and a scale per row vector need more than the {regs} vector "
                            f"registers of {spec.isa}")

    @staticmethod
    def pass_vectors(spec: KernelSpec, schedule: Schedule) -> int:
        """Matrix-matrix: the row vectors of a tile its micro-kernel takes in one pass, the most dividing the tile
        whose integer and float sums (col_tile each), words, codes, masks, x and a scale fit in the registers; 0 if
        not even one's do. A tile of more rows keeps the matrix-vector kernel's packing (one copy serves both)."""
        words, c = layout(spec, schedule).words, schedule.col_tile
        masks = len({m for e in byte_reads(spec.bits) for m in (e.mask, e.hi_mask) if m})
        fits = [p for p in range(1, schedule.row_vectors + 1) if schedule.row_vectors % p == 0
                and 2 * p * c + (words + 1) * p + masks + 2 <= spec.target.registers]
        return max(fits, default=0)

    @staticmethod
    def dot(spec: KernelSpec) -> str:
        return "dpbusd" if spec.target.vnni else "dot8" if spec.bits == 8 else "maddubs"

    def cycles(self, spec: KernelSpec, schedule: Schedule, host, n: int) -> float:
        lay, issue, r = layout(spec, schedule), spec.target.issue, schedule.row_vectors
        subs, dot = lay.chunk // 4, self.dot(spec)
        per_word = {"dpbusd": 1, "maddubs": 2, "dot8": 6}[dot]  # per row vector and row of x: multiply-adds, sums
        # shifts, ANDs (and ORs) per chunk and row vector
        unpack = sum((e.shift > 0) + 1 + bool(e.hi_mask) * (2 + (e.hi_shift != 0)) for e in byte_reads(spec.bits))
        unpack = 0 if spec.bits == 8 else unpack
        finish = 3 + (dot == "maddubs")  # per block: (int16 pairs to int32,) convert, scale, multiply-add
        if spec.kind == "gemv":
            chunk = (r * (1 + unpack + per_word * subs) + subs) / issue
            group_end = r * 6 / issue + (finish * r + 1) / issue * spec.group_size / BLOCK
            return lay.tiles * (lay.chunks * chunk + lay.groups * group_end) * n
        c, p = schedule.col_tile, self.pass_vectors(spec, schedule)
        chunk = r // p * (p * (1 + unpack) + c * subs * (1 + p * per_word)) / issue  # x broadcasts per pass
        block = c * (r * finish + 1) / issue
        group_end = c * r * (1 + (not spec.symmetric)) / issue
        panels = -(-n // c)
        return lay.tiles * panels * (lay.chunks * chunk + lay.chunks / lay.group_chunks * spec.group_size / BLOCK
                                     * block + lay.groups * group_end)

    def params(self, spec: KernelSpec, schedule: Schedule) -> Params:
        lay = layout(spec, schedule)
        subs, dot = lay.chunk // 4, self.dot(spec)
        block_chunks = BLOCK // lay.chunk
        blocks = -(-lay.chunks // block_chunks)
        # scratch (per row of X): x's bytes as words per (chunk, shift), the blocks' scales, the group sums
        code_shift = 128.0 * (dot == "dot8") - (float(spec.zero_point) if spec.symmetric else 0.0)
        return Params(
            **self.common(spec, schedule, "gemv.c.j2" if spec.kind == "gemv" else "gemm_a8.c.j2",
                          lay.chunks * subs + blocks + lay.groups, code_shift),
            subs=subs, reads=byte_reads(spec.bits), top_code=(1 << spec.bits) - 1, dot=dot,
            block_chunks=block_chunks, blocks=blocks, group_blocks=spec.group_size // BLOCK,
            col_tile=schedule.col_tile, pass_vectors=self.pass_vectors(spec, schedule) if spec.kind == "gemm" else 1)

    def seen(self, x: np.ndarray, outliers: np.ndarray | None = None) -> np.ndarray:
        """Per block of BLOCK inputs, rint(x·127/absmax)·absmax/127 in float32 (the kernels' own arithmetic), the
        outlier channels taken as zero for that and kept as they are."""
        x = np.asarray(x, dtype=np.float32)
        cols = x.shape[-1]
        blocks = np.zeros(x.shape[:-1] + (-(-cols // BLOCK) * BLOCK,), np.float32)
        blocks[..., :cols] = x
        if outliers is not None:
            blocks[..., outliers] = 0.0
        blocks = blocks.reshape(x.shape[:-1] + (-1, BLOCK))
        amax = np.abs(blocks).max(-1, keepdims=True)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        q = np.rint(blocks * inv)
        seen = (q * (amax / np.float32(127))).astype(np.float32).reshape(x.shape[:-1] + (-1,))[..., :cols]
        if outliers is not None:
            seen[..., outliers] = x[..., outliers]
        return seen


FAMILY = WeightsA8()
