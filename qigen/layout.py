"""The packed weight layout a schedule reads, described once as data.

Rows are interleaved in tiles of `tile_rows` (one SIMD lane per row), inputs are packed in
32-bit words per chunk of `chunk` consecutive codes.  Both the C template (how to extract each
code) and the numpy packer (where to put each bit) are driven by the same `Layout`, so they
cannot disagree. It reads a spec's bits, shape, vector width and group size, and its family's byte_major flag.

Codes are read with a shift shared by a window of codes and one AND: `(word >> base) & (mask << shift)`
converted to float is `code · 2^shift`, and the kernel pre-multiplies x by 2^-shift once per call.
Windows are at most 16 bits wide, so a read value never reaches the sign bit, and a window's few
masks stay in registers.  3-bit packs 32 codes in three words: ten codes each, plus codes 30 and
31 split over the three spare bit pairs and gathered into a fourth, derived word.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from functools import cache

import numpy as np


@dataclass(frozen=True)
class Field:
    """Bits [lo, lo+width) of code `code` live at bits [bit, bit+width) of word `word`."""
    code: int
    word: int
    bit: int
    lo: int
    width: int


@dataclass(frozen=True)
class Derive:
    """Derived word |= (word `src` >> shift) & mask."""
    src: int
    shift: int
    mask: int


@dataclass(frozen=True)
class View:
    """Word `src` (stored words first, then derived ones) shifted right by `base` bits."""
    src: int
    base: int


@dataclass(frozen=True)
class Extract:
    """Code `code` is (view `view` & mask) / 2^shift, with mask = (2^bits - 1) << shift."""
    code: int
    view: int
    shift: int
    mask: int

    @property
    def prescale(self) -> float:
        return 2.0 ** -self.shift


@dataclass(frozen=True)
class Layout:
    bits: int
    rows: int
    cols: int
    tile_rows: int
    group_chunks: int  # chunks per weight group
    fields: tuple[Field, ...]
    derives: tuple[Derive, ...]
    views: tuple[View, ...]
    extracts: tuple[Extract, ...]

    @property
    def chunk(self) -> int:
        return 1 + max(f.code for f in self.fields)

    @property
    def words(self) -> int:
        return 1 + max(f.word for f in self.fields)

    @property
    def tiles(self) -> int:
        return -(-self.rows // self.tile_rows)

    @property
    def chunks(self) -> int:
        return -(-self.cols // self.chunk)

    @property
    def groups(self) -> int:
        return -(-self.chunks // self.group_chunks)

    @property
    def packed_words(self) -> int:
        return self.tiles * self.chunks * self.words * self.tile_rows

    def prescale(self) -> np.ndarray:
        """Per code of a chunk, the factor x is multiplied by before the AND-read codes meet it."""
        return np.array([e.prescale for e in self.extracts], dtype=np.float32)


WINDOW = {2: 8, 3: 12, 4: 16, 8: 16}  # bits read per shifted view: 4, 4, 4 and 2 masks


def _reads(positions: list[tuple[int, int]], bits: int) -> tuple[tuple[View, ...], tuple[Extract, ...]]:
    """(word, bit position) per code → the shifted views and the AND that reads each code."""
    window = WINDOW[bits]
    views = sorted({View(w, p // window * window) for w, p in positions}, key=lambda v: (v.src, v.base))
    index = {v: i for i, v in enumerate(views)}
    extracts = []
    for code, (w, p) in enumerate(positions):
        base = p // window * window
        extracts.append(Extract(code, index[View(w, base)], p - base, ((1 << bits) - 1) << (p - base)))
    return tuple(views), tuple(extracts)


@cache
def _codebook(bits: int, byte_major: bool) -> tuple[tuple[Field, ...], tuple[Derive, ...], tuple[View, ...],
                                                    tuple[Extract, ...]]:
    if bits == 3 and byte_major:
        # two 2-bit planes of 16 codes byte-major (code 4s + j of a plane in byte j at bit 2s), then every code's
        # third bit in a third word (code 4s + j in byte j at bit s): one shift and AND per plane meet x's bytes
        fields = [Field(c, c // 16, 8 * (c % 4) + 2 * (c % 16 // 4), 0, 2) for c in range(32)]
        fields += [Field(c, 2, 8 * (c % 4) + c // 4, 2, 1) for c in range(32)]
        return tuple(fields), (), (), ()  # no AND-read views: the int8-activation kernels read bytes
    if bits != 3:
        n = 32 // bits
        # byte-major (int8 activations): code 4s + j in byte j at bit s·bits, so the bytes of a word shifted by
        # s·bits meet x's int8 bytes 4s..4s+3 of the chunk as they lie in memory
        bit = [8 * (c % 4) + bits * (c // 4) if byte_major else c * bits for c in range(n)]
        return tuple(Field(c, 0, bit[c], 0, bits) for c in range(n)), (), *_reads([(0, b) for b in bit], bits)
    fields = [Field(10 * w + j, w, 3 * j, 0, 3) for w in range(3) for j in range(10)]
    fields += [Field(30, 0, 30, 0, 2), Field(30, 2, 30, 2, 1), Field(31, 1, 30, 0, 2), Field(31, 2, 31, 2, 1)]
    # derived word 3 holds code 30 at bits 0-2 and code 31 at bits 3-5
    derives = (Derive(0, 30, 0x3), Derive(2, 28, 0x4), Derive(1, 27, 0x18), Derive(2, 26, 0x20))
    positions = [(w, 3 * j) for w in range(3) for j in range(10)] + [(3, 0), (3, 3)]
    return tuple(fields), derives, *_reads(positions, 3)


@cache
def _layout(bits: int, rows: int, cols: int, tile_rows: int, group_size: int, byte_major: bool) -> Layout:
    fields, derives, views, extracts = _codebook(bits, byte_major)
    chunk = 1 + max(f.code for f in fields)
    return Layout(bits=bits, rows=rows, cols=cols, tile_rows=tile_rows, group_chunks=-(-group_size // chunk),
                  fields=fields, derives=derives, views=views, extracts=extracts)


def layout(spec, schedule) -> Layout:
    """The layout a KernelSpec's kernel with a Schedule reads."""
    return _layout(spec.bits, spec.rows, spec.cols, schedule.row_vectors * spec.vector_width, spec.group_size,
                   spec.traits.byte_major)


def stored_layout(bits: int, rows: int, cols: int) -> Layout:
    """One row per tile, codes in order from each word's low bits: the packing a .qigen file stores, whatever the
    kernels and their schedules read."""
    return _layout(bits, rows, cols, 1, cols, False)


def _tiled(a: np.ndarray, lay: Layout, cols: int) -> np.ndarray:
    """(rows, cols) → zero-padded (tiles, tile_rows, cols)."""
    out = np.zeros((lay.tiles * lay.tile_rows, cols), dtype=a.dtype)
    out[: a.shape[0], : a.shape[1]] = a
    return out.reshape(lay.tiles, lay.tile_rows, cols)


def pack_codes(codes: np.ndarray, lay: Layout) -> np.ndarray:
    """Integer codes (rows, cols) → packed uint32 words (tiles, chunks, words, tile_rows)."""
    if codes.shape != (lay.rows, lay.cols):
        raise ValueError(f"codes have shape {codes.shape}, the layout expects {(lay.rows, lay.cols)}")
    if codes.size and int(codes.max()) >= 1 << lay.bits:
        raise ValueError(f"a code exceeds {lay.bits} bits")
    c = _tiled(codes.astype(np.uint8, copy=False), lay, lay.chunks * lay.chunk)  # (in bytes: the 8-bit head's codes
    # widened to uint32 took 4x its 28 MB twice over)
    c = c.reshape(lay.tiles, lay.tile_rows, lay.chunks, lay.chunk).transpose(0, 2, 3, 1)
    words = np.zeros((lay.tiles, lay.chunks, lay.words, lay.tile_rows), dtype=np.uint32)
    for f in lay.fields:
        words[:, :, f.word] |= ((c[:, :, f.code].astype(np.uint32) >> f.lo) & ((1 << f.width) - 1)) << f.bit
    return words


def unpack_codes(words: np.ndarray, lay: Layout) -> np.ndarray:
    """Inverse of pack_codes."""
    c = np.zeros((lay.tiles, lay.chunks, lay.chunk, lay.tile_rows), dtype=np.uint8)  # (codes have at most 8 bits)
    for f in lay.fields:
        c[:, :, f.code] |= (((words[:, :, f.word] >> f.bit) & ((1 << f.width) - 1)) << f.lo).astype(np.uint8)
    c = c.transpose(0, 3, 1, 2).reshape(lay.tiles * lay.tile_rows, lay.chunks * lay.chunk)
    return np.ascontiguousarray(c[: lay.rows, : lay.cols])


def pack_groups(values: np.ndarray, lay: Layout) -> np.ndarray:
    """Per-group values (rows, groups) → (tiles, groups, tile_rows), the order kernels read them."""
    return np.ascontiguousarray(_tiled(values, lay, values.shape[1]).transpose(0, 2, 1))


@dataclass(frozen=True)
class PackedWeights:
    """Weights in the layout one schedule reads, ready to hand to its kernel: its family's bundle of named arrays
    (e.g. words, scales, offsets), those the format has."""
    layout: Layout
    arrays: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def into(self, region: np.ndarray) -> PackedWeights:
        """A copy in `region` (uint8, at least placed_bytes of these arrays), each array from a cache line."""
        at = np.cumsum([0] + [placed_bytes(a.nbytes) for a in self.arrays.values()])
        if at[-1] > region.nbytes:
            raise ValueError(f"{at[-1]} bytes of packed weights do not fit in a region of {region.nbytes}")
        views = {name: region[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
                 for (name, a), start in zip(self.arrays.items(), at)}
        for name, a in self.arrays.items():
            views[name][...] = a
        return PackedWeights(self.layout, views)


def placed_bytes(nbytes: int) -> int:
    """What an array of nbytes takes among others end to end: each starts on a cache line."""
    return -(-nbytes // 64) * 64


HUGE_PAGE = 2 << 20


def huge_pages(nbytes: int) -> np.ndarray:
    """nbytes of zeros (uint8) from a 2 MiB boundary, advised onto transparent huge pages: arrays that decode streams
    every token (numpy advises only those of 4 MiB and more). The mapping is private: a shared anonymous one is shmem,
    whose huge pages follow /sys/kernel/mm/transparent_hugepage/shmem_enabled (never on the development host), not
    the advice."""
    buffer = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    memory = np.frombuffer(buffer, np.uint8)
    start = -memory.ctypes.data % HUGE_PAGE
    return memory[start:start + nbytes]


def contiguous(sizes: list[int]) -> list[np.ndarray]:
    """Regions of these sizes (bytes), end to end on huge pages in that order, each from a cache line: decode reads
    its weights so, every token (PackedWeights.into fills a region). Measured on SmolLM2: copies in reading order
    gave +6% tokens/s at 2 threads, +11% at 1 (while still on 4 KiB pages); huge pages then +2% at 2 threads and
    +6.6% at 1."""
    at = np.cumsum([0] + [placed_bytes(n) for n in sizes])
    memory = huge_pages(int(at[-1]))
    return [memory[start:start + n] for start, n in zip(at, sizes)]


def pack(q, spec, schedule) -> PackedWeights:
    """QuantizedWeights → the bundle of arrays, in the layout `schedule` reads, that spec's family packs."""
    return PackedWeights(layout(spec, schedule), spec.traits.pack(q, spec, schedule))
