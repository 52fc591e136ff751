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
from qigen.spec import STEP_LINEARS, KernelSpec, Schedule, StepSpec


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

    def check(self, weights: PackedWeights) -> None:
        """Raise ValueError unless `weights` are packed in this kernel's format."""
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

    def bind(self, weights: PackedWeights, bias: np.ndarray | None = None) -> Callable[..., np.ndarray]:
        """Check the weights once; the returned f(x, threads=None) is the fast path of inference loops."""
        spec = self.spec
        self.check(weights)
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


def _floats(a: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == shape and a.flags.c_contiguous):
        raise ValueError(f"{what}: a C-contiguous float32 array of shape {shape} expected, got "
                         f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    return a


@dataclass(frozen=True)
class Step:
    """A generated decode step: one token through every layer and the head (see StepSpec)."""
    spec: StepSpec
    linears: dict[str, Kernel]  # the matrix-vector kernels it calls, by role
    _fn: object
    _scratch: object
    _ffi: cffi.FFI

    @property
    def name(self) -> str:
        return self.spec.name

    def bind(self, layers: list[dict[str, np.ndarray | PackedWeights]], norm: np.ndarray, head: PackedWeights,
             threads: int = 1) -> Callable[..., tuple[np.ndarray, int]]:
        """Check the weights once: `layers` holds attn_norm, ffn_norm and the packed qkv, o, gate_up, down of each
        layer. Returns step(embedding, k_cache, v_cache, rope_cos, rope_sin, pos, threads=None) → (logits, the greedy
        next token), which writes k and v at pos; rope_cos and rope_sin hold every position's angles, (context,
        head_dim / 2)."""
        s, ffi = self.spec, self._ffi
        if len(layers) != s.layers:
            raise ValueError(f"{self.name} runs {s.layers} layers, got weights for {len(layers)}")
        arrays: list[np.ndarray | None] = []
        for i, layer in enumerate(layers):
            arrays += [_floats(layer[n], (s.hidden,), f"layer {i} {n}") for n in ("attn_norm", "ffn_norm")]
            for role in STEP_LINEARS:
                self.linears[role].check(layer[role])
                arrays += [layer[role].words, layer[role].scales, layer[role].offsets]
        self.linears["head"].check(head)
        arrays += [_floats(norm, (s.hidden,), "final norm"), head.words, head.scales, head.offsets]
        pointers = ffi.new("void *[]", [ffi.NULL if a is None else ffi.from_buffer(a) for a in arrays])
        cast = lambda a: ffi.cast("float *", ffi.from_buffer(a, require_writable=True))
        cache_shape = (s.layers, s.kv_heads)
        default_threads = threads
        # the last caches and rope tables, checked and cast once: a token costs about 0.15 ms less in Python
        state: dict[str, object] = {"arrays": (None,) * 4}

        def bind_state(k_cache, v_cache, rope_cos, rope_sin) -> None:
            context = k_cache.shape[2] if isinstance(k_cache, np.ndarray) and k_cache.ndim == 4 else 0
            for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
                _floats(c, (*cache_shape, context, s.head_dim), name)
            for name, r in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
                _floats(r, (context, s.head_dim // 2), name)
            state.update(arrays=(k_cache, v_cache, rope_cos, rope_sin), context=context, scratch={},
                         pointers=[cast(a) for a in (k_cache, v_cache)] + [ffi.cast("const float *", ffi.from_buffer(a))
                                                                           for a in (rope_cos, rope_sin)])

        def run(embedding, k_cache, v_cache, rope_cos, rope_sin, pos: int,
                threads: int | None = None) -> tuple[np.ndarray, int]:
            assert arrays
            bound = state["arrays"]
            if not (k_cache is bound[0] and v_cache is bound[1] and rope_cos is bound[2] and rope_sin is bound[3]):
                bind_state(k_cache, v_cache, rope_cos, rope_sin)
            _floats(embedding, (s.hidden,), "embedding")
            context, scratch = state["context"], state["scratch"]
            if not 0 <= pos < context:
                raise ValueError(f"position {pos} is outside the context of {context}")
            threads = default_threads if threads is None else threads
            if threads < 1:
                raise ValueError(f"threads={threads}: at least 1")
            if threads not in scratch:  # (the buffer, its pointer)
                scratch.clear()
                buffer = np.empty(self._scratch(context, threads), np.float32)
                scratch[threads] = buffer, cast(buffer)
            logits = np.empty(s.vocab, np.float32)
            k, v, cos, sin = state["pointers"]
            greedy = self._fn(pointers, ffi.from_buffer("float[]", embedding), k, v, cos, sin, pos, context,
                              cast(logits), scratch[threads][1], threads)
            return logits, greedy

        return run


def load(path, cdef: str, kernels: list[tuple[KernelSpec, Schedule]], requires: frozenset[str],
         steps: tuple[StepSpec, ...] = ()) -> dict[str, Kernel | Step]:
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
    loaded: dict[str, Kernel | Step] = {kernel_name(s, sch): Kernel(s, sch, getattr(lib, kernel_name(s, sch)), ffi)
                                        for s, sch in kernels}
    gemv = {k.spec: k for k in loaded.values() if k.spec.kind == "gemv"}
    for step in steps:
        linears = {role: gemv[spec] for role, spec in step.linears().items()}
        loaded[step.name] = Step(step, linears, getattr(lib, step.name), getattr(lib, step.name + "_scratch"), ffi)
    return loaded
