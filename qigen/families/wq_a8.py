"""Weight-quantized matrix-vector kernels with int8 activations (decode): integer dot products.

x is quantized per block of BLOCK inputs (llama.cpp's Q8 block) to int8 with one scale; the codes are packed
byte-major, so one shift and one AND leave them whole in bytes, which `maddubs`/`madd` multiply with x's bytes and
sum in integers; one float conversion per block. 8-bit codes are read as signed bytes (code − 128) and x's signs
moved onto them, as llama.cpp does for Q8_0. Prefill keeps fp32 activations (wq_f32).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qigen.family import Family, KernelParams
from qigen.layout import layout
from qigen.spec import KernelSpec, Schedule, SpecError

BITS = (2, 4, 8)  # codes that sit whole in bytes (after one shift and AND below 8 bits)
BLOCK = 32  # inputs per int8 activation scale
ROW_VECTORS = (1, 2, 3, 4)


@dataclass(frozen=True, kw_only=True)
class Params(KernelParams):
    subs: int  # shifts per word: codes per byte
    byte_mask: str  # the AND that leaves one code per byte, in hex
    top_code: int
    dot8: bool  # 8-bit codes, read as signed bytes (code - 128) and summed in int32 per chunk
    block_chunks: int  # chunks per block of BLOCK inputs
    blocks: int
    group_blocks: int


class WeightsA8(Family):
    name = "wq_a8"
    suffix = "_a8"
    activations = "int8"
    summary = (f"x quantized to int8 per block of {BLOCK}, integer dot products (decode; bits "
               f"{', '.join(map(str, BITS))}, groups of multiples of {BLOCK})")
    kinds = ("gemv",)
    prefill = "wq_f32"
    parts = "gemv_a8.c.j2"
    byte_major = True  # code 4s + j in byte j at bit s·bits: a word shifted by s·bits meets x's bytes 4s..4s+3

    def check(self, spec: KernelSpec) -> None:
        if spec.batch != 1:
            raise SpecError("int8 activations are a matrix-vector (batch 1) kernel: prefill keeps fp32 activations")
        if spec.bits not in BITS:
            raise SpecError(f"int8 activations need bits {' or '.join(map(str, BITS))}, not {spec.bits}")
        if spec.group is None or spec.group % BLOCK:
            raise SpecError(f"int8 activations need a group that is a multiple of {BLOCK}, not "
                            f"{spec.group or 'a whole row'}")

    def space(self, spec: KernelSpec, threads: int):
        return (Schedule(r, 1, 1, 0, threads) for r in ROW_VECTORS)

    def check_schedule(self, spec: KernelSpec, schedule: Schedule) -> None:
        regs = spec.target.registers
        if schedule.col_tile != 1 or schedule.k_block != 0 or schedule.accumulators != 1:
            raise SpecError("an int8-activation schedule has col_tile 1, k_block 0 and accumulators 1 (one int16 sum "
                            "per row vector)")
        subs = 8 // spec.bits
        if 3 * schedule.row_vectors + subs + 3 > regs:
            raise SpecError(f"schedule {schedule.tag()}: {schedule.row_vectors}x3 sums, {subs} x broadcasts, a mask "
                            f"and two temporaries need more than the {regs} vector registers of {spec.isa}")

    def cycles(self, spec: KernelSpec, schedule: Schedule, host, n: int) -> float:
        lay, issue, r = layout(spec, schedule), spec.target.issue, schedule.row_vectors
        if spec.bits == 8:  # load, xor, abs, sign, multiply-adds of bytes and of int16, add
            chunk = (7 * r + 1) / issue
        else:  # per shift: (shift,) and, multiply-add of bytes, int16 add; one x broadcast each
            subs = 8 // spec.bits
            chunk = (r * (1 + 4 * subs - 1) + subs) / issue
        group_end = r * (schedule.accumulators + 5) / issue  # sum, scale, offset
        group_end += (3 * r + 1) / issue * spec.group_size / BLOCK  # per block: int16 pairs to int32, convert, scale
        return lay.tiles * (lay.chunks * chunk + lay.groups * group_end) * n

    def params(self, spec: KernelSpec, schedule: Schedule) -> Params:
        lay = layout(spec, schedule)
        subs, dot8 = 8 // spec.bits, spec.bits == 8
        block_chunks = BLOCK // lay.chunk
        blocks = -(-lay.chunks // block_chunks)
        # scratch: x's bytes as words per (chunk, shift), the blocks' scales, the group sums
        code_shift = 128.0 * dot8 - (float(spec.zero_point) if spec.symmetric else 0.0)
        return Params(
            **self.common(spec, schedule, "gemv.c.j2", lay.chunks * subs + blocks + lay.groups, code_shift),
            subs=subs,
            byte_mask=f"{0x01010101 * ((1 << spec.bits) - 1):x}", top_code=(1 << spec.bits) - 1, dot8=dot8,
            block_chunks=block_chunks, blocks=blocks, group_blocks=spec.group_size // BLOCK)

    def seen(self, x: np.ndarray) -> np.ndarray:
        """Per block of BLOCK inputs, rint(x·127/absmax)·absmax/127 in float32 (the kernels' own arithmetic)."""
        x = np.asarray(x, dtype=np.float32)
        cols = x.shape[-1]
        blocks = np.zeros(x.shape[:-1] + (-(-cols // BLOCK) * BLOCK,), np.float32)
        blocks[..., :cols] = x
        blocks = blocks.reshape(x.shape[:-1] + (-1, BLOCK))
        amax = np.abs(blocks).max(-1, keepdims=True)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        q = np.rint(blocks * inv)
        return (q * (amax / np.float32(127))).astype(np.float32).reshape(x.shape[:-1] + (-1,))[..., :cols]


FAMILY = WeightsA8()
