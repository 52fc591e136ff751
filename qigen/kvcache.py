"""KV-cache formats: how the cached keys and values of one layer and key/value head are stored, as one record each, and
the numpy rule that writes and reads them. The generated steps (templates/kvcache.c.j2) follow the same rule bit for
bit, so the numpy forward pass is their reference.

Values, and keys unless the format takes them by channel, are rows: one per position of head_dim values. A
quantized row holds its blocks' fp16 parameters first, then the codes:
- q8: per block of 32 values a scale s (s = amax / 127) and int8 codes c: value = s·c.
- q4: per block a scale and a minimum m (s = (max - m) / 15) and 4-bit codes, two a byte (byte j of a block holds
  value j in its low nibble and value j + 16 in its high one): value = m + s·c.
Parameters are rounded to fp16 before the codes are chosen against them.

q4 takes keys by channel, as KIVI does (a few channels of the keys are large at every position, so a row's block
spends its 16 levels on them): per block of 32 positions, each channel has its own scale and minimum over those
positions (head_dim fp16 scales, then head_dim minimums), then the 32 positions' codes, a row each with the nibble
order above. The keys of the block not yet full wait in fp32 in the head's tail (32 rows after its blocks) and are
quantized when its last position is written. Before that, keys and queries alike are rotated (after RoPE) by the
normalized Walsh-Hadamard transform of each head (in blocks of the largest power of two dividing head_dim), which
keeps every q·k and spreads a position's outlying values over its channels. Measured on the default model (ctx 2048,
fp32 weights, numpy): keys by row +7.7% / +10.3% perplexity over the fp32 cache on GPL-3 / GFDL-1.3, by channel
+2.3% / +2.9%, rotated and by channel +1.8% / +2.1%."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32  # values per scale of the quantized formats
HALF_MAX = 65504.0  # the largest finite fp16: a larger scale is clamped to it


@dataclass(frozen=True)
class KvFormat:
    name: str
    code_bits: int  # 32 (fp32), 16 (fp16), 8 or 4 (integer codes in blocks)
    params: int  # fp16 parameters per block: 0 (floating point), 1 (scale), 2 (scale, minimum)
    about: str
    keys_by_channel: bool = False  # keys in blocks of BLOCK positions, a scale and minimum per channel, not in rows,
    # rotated with the queries

    @property
    def blocked(self) -> bool:
        return self.params > 0

    def unfit(self, head_dim: int) -> str | None:
        """Why rows of head_dim values cannot be stored in this format, or None."""
        if self.blocked and head_dim % BLOCK:
            return (f"KV cache {self.name} quantizes rows in blocks of {BLOCK}: head_dim {head_dim} is not a multiple "
                    f"of {BLOCK} (use fp16 or fp32)")
        return None

    def param_bytes(self, head_dim: int) -> int:
        return 2 * self.params * (head_dim // BLOCK)

    def row_bytes(self, head_dim: int) -> int:
        """Bytes per cached row of head_dim values (a key block by channel takes BLOCK rows' worth)."""
        return self.param_bytes(head_dim) + head_dim * self.code_bits // 8

    def bits_per_value(self, head_dim: int) -> float:
        return 8 * self.row_bytes(head_dim) / head_dim

    def tail_bytes(self, head_dim: int) -> int:
        """Bytes after a head's key blocks by channel: the open block's keys in fp32."""
        return 4 * BLOCK * head_dim if self.keys_by_channel else 0

    def cache_shape(self, context: int, head_dim: int, keys: bool) -> tuple[np.dtype, tuple[int, ...]]:
        """The dtype and trailing shape of one layer's and key/value head's cache of `context` positions: fp32 rows
        (context, head_dim); rows of bytes (context, row_bytes); keys by channel as bytes, their blocks then their
        tail."""
        if keys and self.keys_by_channel:
            return np.dtype(np.uint8), (-(-context // BLOCK) * BLOCK * self.row_bytes(head_dim)
                                        + self.tail_bytes(head_dim),)
        if self.code_bits == 32:
            return np.dtype(np.float32), (context, head_dim)
        return np.dtype(np.uint8), (context, self.row_bytes(head_dim))

    def bytes_read(self, positions: int, head_dim: int) -> int:
        """Bytes that attention over `positions` positions reads from one layer's and key/value head's key and value
        caches (keys by channel: the open block's from the tail, in fp32)."""
        keys = positions // BLOCK * BLOCK if self.keys_by_channel else positions
        return (keys + positions) * self.row_bytes(head_dim) + (positions - keys) * 4 * head_dim

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """Keys or queries (…, head_dim) as attention over this format takes them: rotated by the normalized
        Walsh-Hadamard transform in blocks of hadamard_size(head_dim) when keys are by channel (butterflies in the
        order templates/kvcache.c.j2 runs them), else as they are."""
        if not self.keys_by_channel:
            return x
        size, y = hadamard_size(x.shape[-1]), np.array(x, np.float32)
        h = 1
        while h < size:
            y = y.reshape(*x.shape[:-1], -1, 2, h)
            a, b = y[..., 0, :], y[..., 1, :]
            y = np.stack([a + b, a - b], -2)
            h *= 2
        return y.reshape(x.shape) * np.float32(size ** -0.5)

    def write(self, cache: np.ndarray, pos: int, x: np.ndarray, keys: bool) -> None:
        """Positions pos.. of x (kv_heads, n, head_dim) float32 into one layer's cache (kv_heads, *cache_shape)."""
        if x.shape[1] == 0:
            return
        if not (keys and self.keys_by_channel):
            cache[:, pos:pos + x.shape[1]] = self.encode(x)
            return
        hd, rows = x.shape[-1], BLOCK * self.row_bytes(x.shape[-1])
        tail = cache[:, cache.shape[1] - self.tail_bytes(hd):].view(np.float32).reshape(-1, BLOCK, hd)
        for t in range(pos, pos + x.shape[1]):
            tail[:, t % BLOCK] = x[:, t - pos]
            if t % BLOCK == BLOCK - 1:  # the block is full: quantized by channel
                b = t // BLOCK
                cache[:, b * rows:(b + 1) * rows] = _by_channel(tail)

    def read(self, cache: np.ndarray, end: int, head_dim: int, keys: bool) -> np.ndarray:
        """Positions 0..end - 1 of one layer's cache as float32 (kv_heads, end, head_dim)."""
        if not (keys and self.keys_by_channel):
            return self.decode(cache[:, :end], head_dim)
        full, rows = end // BLOCK, BLOCK * self.row_bytes(head_dim)
        blocks = cache[:, :full * rows].reshape(cache.shape[0], full, rows)
        at = 4 * head_dim  # the scales, then the minimums
        params = np.ascontiguousarray(blocks[..., :at]).view(np.float16).astype(np.float32)
        s, m = params[..., None, :head_dim], params[..., None, head_dim:]
        codes = _unnibble(blocks[..., at:].reshape(*blocks.shape[:2], BLOCK, head_dim // BLOCK, BLOCK // 2))
        codes = codes.reshape(*blocks.shape[:2], BLOCK, head_dim)
        tail = cache[:, cache.shape[1] - self.tail_bytes(head_dim):].view(np.float32).reshape(-1, BLOCK, head_dim)
        return np.concatenate([(m + s * codes).reshape(cache.shape[0], -1, head_dim), tail[:, :end % BLOCK]], 1)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Rows x (…, head_dim) float32 as cache rows (the last dimension of cache_shape)."""
        x = np.asarray(x, np.float32)
        if self.code_bits == 32:
            return x
        if self.code_bits == 16:
            return x.astype(np.float16).view(np.uint8)
        xb = x.reshape(*x.shape[:-1], -1, BLOCK)
        if self.params == 1:
            amax = np.abs(xb).max(-1)
            s = np.minimum(amax / np.float32(127), np.float32(HALF_MAX)).astype(np.float16)
            codes = np.clip(np.rint(xb * _inverse(s)[..., None]), -127, 127).astype(np.int8).view(np.uint8)
            params = s
        else:
            s, m, c = _q4(xb, -1)
            codes = _nibbles(c)
            params = np.stack([s, m], -1)
        lead = x.shape[:-1]
        return np.concatenate([params.reshape(*lead, -1).view(np.uint8), codes.reshape(*lead, -1)], -1)

    def decode(self, rows: np.ndarray, head_dim: int) -> np.ndarray:
        """Cache rows (…, row_bytes) as float32 (…, head_dim)."""
        if self.code_bits == 32:
            return rows
        if self.code_bits == 16:
            return np.ascontiguousarray(rows).view(np.float16).astype(np.float32)
        lead, at = rows.shape[:-1], self.param_bytes(head_dim)
        params = np.ascontiguousarray(rows[..., :at]).view(np.float16).astype(np.float32)
        params = params.reshape(*lead, head_dim // BLOCK, self.params)
        codes = rows[..., at:].reshape(*lead, head_dim // BLOCK, -1)
        if self.params == 1:
            x = params[..., :1] * codes.view(np.int8).astype(np.float32)
        else:
            x = params[..., 1:] + params[..., :1] * _unnibble(codes)
        return x.reshape(*lead, head_dim)


def hadamard_size(head_dim: int) -> int:
    """The blocks of a head that the Walsh-Hadamard rotation mixes: the largest power of two dividing head_dim."""
    return head_dim & -head_dim


def _q4(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scales and minimums (fp16) over `axis` of x, and the 4-bit codes against them."""
    m = x.min(axis).astype(np.float16)
    mf = np.expand_dims(m.astype(np.float32), axis)
    s = np.minimum((x.max(axis) - m.astype(np.float32)) / np.float32(15), np.float32(HALF_MAX)).astype(np.float16)
    c = np.clip(np.rint((x - mf) * np.expand_dims(_inverse(s), axis)), 0, 15).astype(np.uint8)
    return s, m, c


def _nibbles(c: np.ndarray) -> np.ndarray:
    """4-bit codes (…, BLOCK) two a byte: value j low, value j + 16 high."""
    return c[..., :BLOCK // 2] | (c[..., BLOCK // 2:] << 4)


def _unnibble(codes: np.ndarray) -> np.ndarray:
    """The inverse of _nibbles, as float32."""
    return np.concatenate([codes & 15, codes >> 4], -1).astype(np.float32)


def _inverse(s: np.ndarray) -> np.ndarray:
    sf = s.astype(np.float32)
    with np.errstate(divide="ignore"):
        return np.where(sf > 0, np.float32(1) / sf, np.float32(0))


def _by_channel(keys: np.ndarray) -> np.ndarray:
    """A full block of keys (kv_heads, BLOCK positions, head_dim) quantized by channel: the scales, the minimums,
    then each position's row of codes: (kv_heads, bytes)."""
    s, m, c = _q4(keys, 1)
    codes = _nibbles(c.reshape(*c.shape[:2], -1, BLOCK)).reshape(keys.shape[0], -1)
    return np.concatenate([s.view(np.uint8), m.view(np.uint8), codes], -1)


FORMATS = {f.name: f for f in (
    KvFormat("fp32", 32, 0, "fp32, as computed"),
    KvFormat("fp16", 16, 0, "IEEE half"),
    KvFormat("q8", 8, 1, "int8, an fp16 scale per 32 values (8.5 bits)"),
    KvFormat("q4", 4, 2, "4-bit, an fp16 scale and minimum per 32 values of a value row and per channel of 32 "
             "key positions (5 bits)", keys_by_channel=True),
)}


DEFAULT = "q8"  # the smallest format within 0.3% of the fp32 cache's perplexity (README, "KV cache")


def formats_help() -> str:
    return "; ".join(f"{f.name}: {f.about}" for f in FORMATS.values())
