"""KV-cache formats: how one cached key or value row (head_dim values of one position and key/value head) is
stored, as one record each, and the numpy rule that writes and reads it. The generated steps (templates/kvcache.c.j2)
follow the same rule bit for bit, so the numpy forward pass is their reference.

A quantized row holds its blocks' fp16 parameters first, then the codes:
- q8: per block of 32 values a scale s (s = amax / 127) and int8 codes c: value = s·c.
- q4: per block a scale and a minimum m (s = (max - m) / 15) and 4-bit codes, two a byte (byte j of a block holds
  value j in its low nibble and value j + 16 in its high one): value = m + s·c.
Parameters are rounded to fp16 before the codes are chosen against them."""
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
        """Bytes per cached row of head_dim values."""
        return self.param_bytes(head_dim) + head_dim * self.code_bits // 8

    def bits_per_value(self, head_dim: int) -> float:
        return 8 * self.row_bytes(head_dim) / head_dim

    def row_shape(self, head_dim: int) -> tuple[np.dtype, int]:
        """The dtype and last dimension of a cache array: fp32 caches stay float32 (…, head_dim), the others are
        bytes (…, row_bytes)."""
        return (np.dtype(np.float32), head_dim) if self.code_bits == 32 else (np.dtype(np.uint8),
                                                                               self.row_bytes(head_dim))

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Rows x (…, head_dim) float32 as cache rows (row_shape)."""
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
            m = xb.min(-1).astype(np.float16)
            s = np.minimum((xb.max(-1) - m.astype(np.float32)) / np.float32(15), np.float32(HALF_MAX)).astype(np.float16)
            c = np.clip(np.rint((xb - m.astype(np.float32)[..., None]) * _inverse(s)[..., None]), 0, 15).astype(np.uint8)
            codes = c[..., :BLOCK // 2] | (c[..., BLOCK // 2:] << 4)
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
            c = np.concatenate([codes & 15, codes >> 4], -1).astype(np.float32)
            x = params[..., 1:] + params[..., :1] * c
        return x.reshape(*lead, head_dim)


def _inverse(s: np.ndarray) -> np.ndarray:
    sf = s.astype(np.float32)
    with np.errstate(divide="ignore"):
        return np.where(sf > 0, np.float32(1) / sf, np.float32(0))


FORMATS = {f.name: f for f in (
    KvFormat("fp32", 32, 0, "fp32, as computed"),
    KvFormat("fp16", 16, 0, "IEEE half"),
    KvFormat("q8", 8, 1, "int8, an fp16 scale per 32 values (8.5 bits)"),
    KvFormat("q4", 4, 2, "4-bit, an fp16 scale and minimum per 32 values (5 bits)"),
)}


DEFAULT = "q8"  # the smallest format within 0.3% of the fp32 cache's perplexity (README, "KV cache")


def formats_help() -> str:
    return "; ".join(f"{f.name}: {f.about}" for f in FORMATS.values())
