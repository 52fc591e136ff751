"""Round-to-nearest quantization into the kernels' format, its inverse and the numpy oracle."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from qigen.family import check_channels
from qigen.spec import KernelSpec


@dataclass(frozen=True)
class QuantizedWeights:
    """A quantized matrix, row by row: the arrays a family's packer turns into its bundle. Outlier channels (QUIK)
    are inputs kept in floating point: the kernels multiply them by their fp16 weight columns, unquantized, and
    take x as zero there for the codes (whose columns there are whatever the quantizer left)."""
    codes: np.ndarray  # (rows, cols) uint8, 0 .. 2^bits - 1
    scales: np.ndarray  # (rows, groups) in the spec's scale dtype
    offsets: np.ndarray | None  # (rows, groups) same dtype; None when symmetric
    outliers: np.ndarray | None = None  # (k,) int32: the outlier channels, ascending; None: none
    outlier_weights: np.ndarray | None = None  # (rows, k) fp16: W's columns at those channels

    def __post_init__(self) -> None:
        check_outliers(self.outliers, self.outlier_weights, *self.codes.shape)

    @property
    def outlier_count(self) -> int:
        return 0 if self.outliers is None else self.outliers.size

    def load(self) -> QuantizedWeights:
        """The weights in memory: these (a matrix still in its file loads then: qigen.llm.StoredWeights)."""
        return self

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by name, those the format has."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def take_rows(self, rows: np.ndarray) -> QuantizedWeights:
        return QuantizedWeights(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                                   for f in fields(self) if f.name != "outliers"}, outliers=self.outliers)

    def with_outliers(self, w: np.ndarray, channels: np.ndarray) -> QuantizedWeights:
        """These codes, keeping W's columns at `channels` (ascending) in fp16; none when channels is empty."""
        if not len(channels):
            return replace(self, outliers=None, outlier_weights=None)
        channels = np.asarray(channels, np.int32)
        check_channels(channels, self.codes.shape[1])
        return replace(self, outliers=channels, outlier_weights=w[:, channels].astype(np.float16))


def check_outliers(outliers: np.ndarray | None, weights: np.ndarray | None, rows: int, cols: int) -> None:
    """ValueError unless a rows x cols matrix's outlier channels and their weight columns are both absent, or are
    channels as check_channels says and finite fp16 of shape (rows, channels)."""
    if outliers is None and weights is None:
        return
    check_channels(outliers, cols)
    if not (isinstance(weights, np.ndarray) and weights.dtype == np.float16 and weights.shape == (rows, outliers.size)
            and np.isfinite(weights).all()):
        raise ValueError(f"outlier weights should be finite fp16 of shape {(rows, outliers.size)}, not "
                         f"{getattr(weights, 'dtype', type(weights).__name__)} {getattr(weights, 'shape', '')}")


def _grouped(w: np.ndarray, spec: KernelSpec) -> np.ndarray:
    """(rows, cols) → (rows, groups, group_size), the partial last group padded with NaN."""
    g = spec.group_size
    padded = np.full((w.shape[0], spec.groups * g), np.nan, dtype=np.float32)
    padded[:, : w.shape[1]] = w
    return padded.reshape(w.shape[0], spec.groups, g)


SEARCHED_BITS = 4  # at most this many bits the group parameters are searched (8-bit rounding error is negligible)
SHRINK = np.linspace(1.0, 0.7, 13)  # the search's scales: these fractions of the group's range over its codes
# Measured on SmolLM2 (q4 g128, GPL-3 perplexity; plain RTN 27.9): the search weighed by a calibration's Σx² 20.5;
# weighed alike (weight RMS) 31.2, worse than none: weight error is the wrong yardstick without the activations.


def quantize(w: np.ndarray, spec: KernelSpec, importance: np.ndarray | None = None) -> QuantizedWeights:
    """Round to nearest per group. Without `importance`, plain RTN: asymmetric maps [min, max] onto the codes (a
    float minimum: llama.cpp's Q4_1, reproduced exactly), symmetric ±absmax (GPTQ's convention). With it (a
    calibration's Σx² per input: the Hessian's diagonal, llama.cpp's importance matrix), up to SEARCHED_BITS bits,
    each group takes the scale and offset of least Σ importance·(w - ŵ)² among plain RTN's and, for each scale of
    SHRINK, a float offset and an integer zero point (0.0 a code, up to the rounding of the stored scale and
    offset), each refit to its codes by weighted least squares: never worse than plain RTN on that objective (as
    stored)."""
    if w.shape != (spec.rows, spec.cols):
        raise ValueError(f"weights have shape {w.shape}, the spec is {spec.rows}x{spec.cols}")
    if not np.isfinite(w).all():
        raise ValueError("weights contain NaN or infinity")
    if importance is not None and (np.shape(importance) != (spec.cols,) or not np.isfinite(importance).all()
                                   or (np.asarray(importance) < 0).any()):
        raise ValueError(f"importance should be {spec.cols} finite non-negative weights, one per input")
    top = (1 << spec.bits) - 1
    g = _grouped(w.astype(np.float32), spec)
    lo, hi = np.nanmin(g, axis=2), np.nanmax(g, axis=2)
    if spec.symmetric:
        hi = np.maximum(np.abs(lo), np.abs(hi))
        lo = -hi
    with np.errstate(over="ignore"):  # an overflow to inf is refused below
        scale = np.where(hi > lo, (hi - lo) / top, 1.0).astype(np.float32)
    offset = None if spec.symmetric else lo.astype(np.float32)
    if importance is not None and spec.bits <= SEARCHED_BITS:
        scale, offset = _search(g, spec, scale, offset, hi - lo, importance)
    with np.errstate(over="ignore"):
        scales = scale.astype(spec.scales.numpy)
        offsets = None if offset is None else offset.astype(spec.scales.numpy)
    if not (np.isfinite(scales).all() and (offsets is None or np.isfinite(offsets).all())):
        raise ValueError(f"weights exceed the range of {spec.scale_dtype} scales: use fp32 scales")
    codes = _codes(g, spec, scales.astype(np.float32), None if offsets is None else offsets.astype(np.float32))
    return QuantizedWeights(codes.reshape(spec.rows, -1)[:, : spec.cols].astype(np.uint8), scales, offsets)


def _codes(g: np.ndarray, spec: KernelSpec, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """Nearest codes (float) of grouped weights for per-group scale and offset (None: symmetric)."""
    s = scale[:, :, None]
    c = np.rint(g / s) + spec.zero_point if offset is None else np.rint((g - offset[:, :, None]) / s)
    return np.clip(np.nan_to_num(c), 0, (1 << spec.bits) - 1)


def _search(g: np.ndarray, spec: KernelSpec, scale: np.ndarray, offset: np.ndarray | None, span: np.ndarray,
            importance: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """quantize()'s candidates, the least weighted error per group: (scale, offset), float32."""
    top = (1 << spec.bits) - 1
    imp = _grouped(np.asarray(importance, np.float32)[None], spec)[0]
    imp = np.where(np.isnan(g[0]), 0.0, np.nan_to_num(imp))[None]  # the partial last group's padding weighs nothing
    x = np.nan_to_num(g)
    sw, swx = imp.sum(2), (imp * x).sum(2)

    def error(s, o):  # with the parameters as stored
        with np.errstate(over="ignore", invalid="ignore"):
            s = s.astype(spec.scales.numpy).astype(np.float32)
            o = None if o is None else o.astype(spec.scales.numpy).astype(np.float32)
            c = _codes(g, spec, s, o)
            d = x - (s[:, :, None] * (c - (spec.zero_point if o is None else 0)) + (0 if o is None else o[:, :, None]))
            return (imp * d * d).sum(2)

    best = error(scale, offset)
    for f in SHRINK:
        s0 = np.where(span > 0, f * span / top, scale).astype(np.float32)
        for integer in ((False, True) if offset is not None else (True,)):
            if offset is None:  # symmetric: codes about the zero point, the scale refit
                o, z = None, spec.zero_point
            elif integer:  # an integer zero point z: offset -s·z, 0.0 a code
                z = np.clip(np.rint(-np.nanmin(g, 2) / s0), 0, top)
                o = (-s0 * z).astype(np.float32)
            else:  # the range centred on the group's, then the offset refit
                o = (np.nanmin(g, 2) + (1 - f) * span / 2).astype(np.float32)
            c = _codes(g, spec, s0, o)
            if o is None or integer:
                q = c - (z if o is None else z[:, :, None])
                den = (imp * q * q).sum(2)
                s1 = np.where(den > 0, (imp * x * q).sum(2) / np.where(den > 0, den, 1), s0).astype(np.float32)
                s1 = np.where(s1 > 0, s1, s0)
                o1 = None if o is None else (-s1 * z).astype(np.float32)
            else:  # weighted least squares of x ≈ s·c + o
                scc, sc, sxc = (imp * c * c).sum(2), (imp * c).sum(2), (imp * x * c).sum(2)
                det = sw * scc - sc * sc
                ok = np.abs(det) > 1e-12 * np.maximum(sw * scc, 1e-30)
                det = np.where(ok, det, 1)
                s1 = np.where(ok, (sw * sxc - sc * swx) / det, s0)
                o1 = np.where(ok, (scc * swx - sc * sxc) / det, o).astype(np.float32)
                s1 = np.where(s1 > 0, s1, s0).astype(np.float32)
            err = error(s1, o1)
            better = err < best
            best = np.where(better, err, best)
            scale = np.where(better, s1, scale)
            if offset is not None:
                offset = np.where(better, o1, offset)
    return scale.astype(np.float32), offset


def dequantize(q: QuantizedWeights, spec: KernelSpec) -> np.ndarray:
    """The matrix the weights stand for: codes dequantized, outlier columns as kept."""
    g = spec.group_size
    s = np.repeat(q.scales.astype(np.float32), g, axis=1)[:, : spec.cols]
    if q.offsets is None:
        w = s * (q.codes.astype(np.float32) - spec.zero_point)
    else:
        w = s * q.codes + np.repeat(q.offsets.astype(np.float32), g, axis=1)[:, : spec.cols]
    if q.outliers is not None:
        w[:, q.outliers] = q.outlier_weights.astype(np.float32)
    return w


def relative_error(w: np.ndarray, spec: KernelSpec) -> float:
    """Relative RMS reconstruction error ||W - Q(W)|| / ||W||."""
    d = dequantize(quantize(w, spec), spec) - w
    return float(np.sqrt((d * d).sum() / max((w.astype(np.float64) ** 2).sum(), 1e-30)))


def reference(x: np.ndarray, q: QuantizedWeights, spec: KernelSpec, bias: np.ndarray | None = None) -> np.ndarray:
    """The oracle: dequantize, then matmul in float64. x is (cols,) or (n, cols)."""
    y = x.astype(np.float64) @ dequantize(q, spec).astype(np.float64).T
    return (y if bias is None else y + bias).astype(np.float32)
