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
        if self.outliers is None and self.outlier_weights is None:
            return
        rows, cols = self.codes.shape
        check_channels(self.outliers, cols)
        ow = self.outlier_weights
        if not (isinstance(ow, np.ndarray) and ow.dtype == np.float16 and ow.shape == (rows, self.outliers.size)
                and np.isfinite(ow).all()):
            raise ValueError(f"outlier weights should be finite fp16 of shape {(rows, self.outliers.size)}, not "
                             f"{getattr(ow, 'dtype', type(ow).__name__)} {getattr(ow, 'shape', '')}")

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


def _grouped(w: np.ndarray, spec: KernelSpec) -> np.ndarray:
    """(rows, cols) → (rows, groups, group_size), the partial last group padded with NaN."""
    g = spec.group_size
    padded = np.full((w.shape[0], spec.groups * g), np.nan, dtype=np.float32)
    padded[:, : w.shape[1]] = w
    return padded.reshape(w.shape[0], spec.groups, g)


def quantize(w: np.ndarray, spec: KernelSpec) -> QuantizedWeights:
    """RTN per group: asymmetric maps [min, max] onto the codes, symmetric maps ±absmax (GPTQ's convention)."""
    if w.shape != (spec.rows, spec.cols):
        raise ValueError(f"weights have shape {w.shape}, the spec is {spec.rows}x{spec.cols}")
    if not np.isfinite(w).all():
        raise ValueError("weights contain NaN or infinity")
    top = (1 << spec.bits) - 1
    g = _grouped(w.astype(np.float32), spec)
    lo, hi = np.nanmin(g, axis=2), np.nanmax(g, axis=2)
    if spec.symmetric:
        hi = np.maximum(np.abs(lo), np.abs(hi))
        lo = -hi
    with np.errstate(over="ignore"):  # an overflow to inf is refused below
        scale = np.where(hi > lo, (hi - lo) / top, 1.0).astype(spec.scales.numpy)
        offsets = None if spec.symmetric else lo.astype(spec.scales.numpy)
    if not (np.isfinite(scale).all() and (offsets is None or np.isfinite(offsets).all())):
        raise ValueError(f"weights exceed the range of {spec.scale_dtype} scales: use fp32 scales")
    s = scale.astype(np.float32)[:, :, None]
    if spec.symmetric:
        codes = np.rint(g / s) + spec.zero_point
    else:
        codes = np.rint((g - offsets.astype(np.float32)[:, :, None]) / s)
    codes = np.clip(np.nan_to_num(codes), 0, top).astype(np.uint8)
    return QuantizedWeights(codes.reshape(spec.rows, -1)[:, : spec.cols], scale, offsets)


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
