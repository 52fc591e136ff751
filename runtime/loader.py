"""Load a compiled library through cffi and call its kernels on numpy arrays."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cffi
import numpy as np

from perfmodel.host import detect
from qigen.layout import PackedWeights, layout, pack
from qigen.quant import QuantizedWeights, quantize
from qigen.render import kernel_name
from qigen.spec import KernelSpec, Schedule


class LoadError(RuntimeError):
    """The library cannot run here, or cannot be opened."""


@dataclass(frozen=True)
class Kernel:
    spec: KernelSpec
    schedule: Schedule
    _fn: object
    _ffi: cffi.FFI

    @property
    def name(self) -> str:
        return kernel_name(self.spec, self.schedule)

    def pack(self, q: QuantizedWeights) -> PackedWeights:
        return pack(q, self.spec, self.schedule)

    def quantize(self, w: np.ndarray) -> PackedWeights:
        """Round-to-nearest quantize a float matrix and pack it for this kernel."""
        return self.pack(quantize(w, self.spec))

    def __call__(self, x: np.ndarray, weights: PackedWeights, bias: np.ndarray | None = None,
                 threads: int | None = None) -> np.ndarray:
        """y = W·x (+ bias) for x of (cols,) or (n, cols); returns (rows,) or (n, rows) float32."""
        return self.bind(weights, bias)(x, threads)

    def bind(self, weights: PackedWeights, bias: np.ndarray | None = None) -> Callable[..., np.ndarray]:
        """Check the weights once; the returned f(x, threads=None) is the fast path of inference loops."""
        spec = self.spec
        lay = layout(spec, self.schedule)
        if weights.layout is not lay and weights.layout != lay:
            raise ValueError(f"weights were packed for another layout than {self.name}'s")
        stype = np.float16 if spec.scale_dtype == "fp16" else np.float32
        groups = (lay.tiles, lay.groups, lay.tile_rows)
        if (weights.words.dtype != np.uint32 or weights.words.shape != (lay.tiles, lay.chunks, lay.words, lay.tile_rows)
                or weights.scales.dtype != stype or weights.scales.shape != groups
                or (weights.offsets is None) != spec.symmetric
                or (weights.offsets is not None and (weights.offsets.dtype != stype or weights.offsets.shape != groups))):
            raise ValueError(f"weights are not in {self.name}'s format: {'no ' if spec.symmetric else ''}offsets and "
                             f"{spec.scale_dtype} scales of shape {groups} expected; pack them with kernel.pack()")
        if bias is not None:
            bias = np.ascontiguousarray(bias, dtype=np.float32)
            if bias.shape != (spec.rows,):
                raise ValueError(f"bias has shape {bias.shape}: expected ({spec.rows},)")
        ffi, fn, default_threads = self._ffi, self._fn, self.schedule.threads
        kept = (weights, bias)  # the pointers below borrow these arrays' memory
        args = (ffi.cast("uint32_t *", ffi.from_buffer(weights.words)), ffi.from_buffer(weights.scales),
                ffi.NULL if weights.offsets is None else ffi.from_buffer(weights.offsets),
                ffi.NULL if bias is None else ffi.cast("float *", ffi.from_buffer(bias)))

        def run(x: np.ndarray, threads: int | None = None) -> np.ndarray:
            assert kept
            x = np.ascontiguousarray(x, dtype=np.float32)
            if x.ndim not in (1, 2) or x.shape[-1] != spec.cols or x.size == 0:
                raise ValueError(f"x has shape {x.shape}: expected ({spec.cols},) or (n, {spec.cols}) with n >= 1")
            threads = default_threads if threads is None else threads
            if threads < 1:
                raise ValueError(f"threads={threads}: at least 1")
            y = np.empty(x.shape[:-1] + (spec.rows,), dtype=np.float32)
            status = fn(*args, ffi.cast("float *", ffi.from_buffer(x)),
                        ffi.cast("float *", ffi.from_buffer(y, require_writable=True)),
                        1 if x.ndim == 1 else x.shape[0], threads)
            if status:
                raise MemoryError(f"{self.name}: out of memory for its work buffers")
            return y

        return run


def load(path, cdef: str, kernels: list[tuple[KernelSpec, Schedule]], requires: frozenset[str]) -> dict[str, Kernel]:
    """Open the library at `path`, refusing before any code runs if this CPU lacks a required feature."""
    missing = requires - detect().features
    if missing:
        raise LoadError(f"{path} was built for a CPU with {', '.join(sorted(missing))}, which this CPU "
                        f"({detect().name}) lacks; refusing to load it (regenerate with --target native)")
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    try:
        # never unloaded: unloading would take OpenMP away from under its still-spinning worker threads
        lib = ffi.dlopen(str(Path(path).resolve()), ffi.RTLD_NOW | ffi.RTLD_NODELETE)
    except OSError as e:
        raise LoadError(f"cannot open {path}: {e}") from e
    return {kernel_name(s, sch): Kernel(s, sch, getattr(lib, kernel_name(s, sch)), ffi) for s, sch in kernels}
