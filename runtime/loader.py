"""Load a compiled library through cffi and call its kernels on numpy arrays."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cffi
import numpy as np

from perfmodel.host import detect
from qigen.arch import ROLE_NAMES
from qigen.family import Array
from qigen.kvcache import FORMATS as KV_FORMATS
from qigen.layout import PackedWeights, layout, pack, placed_bytes
from qigen.quant import QuantizedWeights, quantize
from qigen.spec import KernelSpec, Schedule, StepSpec, kernel_name
from runtime.compiler import embedded_requires


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

    @property
    def layout(self):
        """The packing this kernel reads."""
        return layout(self.spec, self.schedule)

    def pack(self, q: QuantizedWeights) -> PackedWeights:
        return pack(q, self.spec, self.schedule)

    def quantize(self, w: np.ndarray) -> PackedWeights:
        """Round-to-nearest quantize a float matrix and pack it for this kernel."""
        return self.pack(quantize(w, self.spec))

    def __call__(self, x: np.ndarray, weights: PackedWeights, bias: np.ndarray | None = None,
                 threads: int | None = None) -> np.ndarray:
        """y = W·x (+ bias) for x of (cols,) or (n, cols); returns (rows,) or (n, rows) float32."""
        return self.bind(weights, bias)(x, threads)

    @property
    def bundle(self) -> tuple[Array, ...]:
        return self.spec.traits.bundle(self.spec, self.schedule)

    def packed_bytes(self, outliers: int) -> int:
        """Bytes a matrix with that many outlier channels takes packed for this kernel, placed as
        PackedWeights.into places its arrays."""
        return sum(placed_bytes(np.dtype(a.dtype).itemsize * math.prod(a.dims(outliers))) for a in self.bundle
                   if a.present and (outliers or not a.optional))

    def check(self, weights: PackedWeights) -> None:
        """Raise ValueError unless `weights` are packed in this kernel's format: its family's bundle, array by array."""
        if weights.layout is not self.layout and weights.layout != self.layout:
            raise ValueError(f"weights were packed for another layout than {self.name}'s")
        self.spec.traits.check_packed(self.spec, self.schedule, weights.arrays)

    def pointers(self, weights: PackedWeights) -> list[np.ndarray | None]:
        """The bundle's arrays in the order the kernels take them, None where the format has none."""
        return [weights.arrays.get(a.name) for a in self.bundle]

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
        args = (*(ffi.NULL if a is None else ffi.cast("void *", ffi.from_buffer(a)) for a in self.pointers(weights)),
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


def _floats(a: np.ndarray, shape: tuple[int, ...], what: str, dtype=np.float32) -> np.ndarray:
    if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == shape and a.flags.c_contiguous):
        raise ValueError(f"{what}: a C-contiguous {np.dtype(dtype)} array of shape {shape} expected, got "
                         f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    return a


def _rows(a: np.ndarray, cols: int, what: str) -> int:
    """The rows of a C-contiguous float32 (rows, cols) array, checked."""
    n = a.shape[0] if isinstance(a, np.ndarray) and a.ndim == 2 else 0
    _floats(a, (n, cols), what)
    return n


@dataclass(frozen=True)
class Step:
    """A generated decode step: one token through every layer and the head (see StepSpec)."""
    spec: StepSpec
    kernels: dict[KernelSpec, Kernel]  # the matrix-vector kernels it calls
    _fn: object
    _decode: object
    _pick: object
    _scratch: object
    _attention: object
    _swiglu: object
    _rmsnorm: object
    _ffi: cffi.FFI

    @property
    def name(self) -> str:
        return self.spec.name

    def kernel(self, layer: int, role: str) -> Kernel:
        """The kernel of a layer's product; layer None: the head's."""
        return self.kernels[self.spec.head if layer is None else self.spec.linear(layer, role)]

    def bind(self, layers: list[dict[str, np.ndarray | PackedWeights]], norm: np.ndarray, head: PackedWeights,
             threads: int = 1) -> BoundStep:
        """Check the weights once: `layers` holds attn_norm, ffn_norm and the packed products (qkv, o, gate_up,
        down) of each layer. The step's pointers: per layer the norms, then each product's bundle from its slot."""
        s, hidden = self.spec, self.spec.config.hidden
        if len(layers) != s.config.layers:
            raise ValueError(f"{self.name} runs {s.config.layers} layers, got weights for {len(layers)}")
        slot, per_layer = s.slots()
        arrays: list[np.ndarray | None] = []
        for i, layer in enumerate(layers):
            row = [_floats(layer[n], (hidden,), f"layer {i} {n}") for n in ("attn_norm", "ffn_norm")]
            for role in ROLE_NAMES:
                kernel = self.kernel(i, role)
                kernel.check(layer[role])
                row += [None] * (slot[role] - len(row)) + kernel.pointers(layer[role])
            arrays += row + [None] * (per_layer - len(row))
        self.kernel(None, "head").check(head)
        arrays += [_floats(norm, (hidden,), "final norm"), *self.kernel(None, "head").pointers(head)]
        return BoundStep(self, arrays, threads)


@dataclass(frozen=True)
class Sampling:
    """How decoding picks each token: the greedy one at temperature 0; else one drawn from softmax(logits /
    temperature) restricted to the top_k most likely (0: every token), then to the fewest most likely whose
    probability reaches top_p, as runtime.model.sample does in numpy. rng: the generator's state (one uint64, which
    each draw advances), from a seed."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    rng: np.ndarray = field(default_factory=lambda: np.zeros(1, np.uint64))

    def __post_init__(self):
        number = lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
        rules = [(number(self.temperature) and 0 <= self.temperature < float("inf"),
                  f"temperature={self.temperature!r}: a finite number, at least 0 (0: greedy)"),
                 (isinstance(self.top_k, (int, np.integer)) and not isinstance(self.top_k, bool) and self.top_k >= 0,
                  f"top_k={self.top_k!r}: at least 0 (0: no limit)"),
                 (number(self.top_p) and 0 < self.top_p <= 1, f"top_p={self.top_p!r}: above 0, at most 1"),
                 (isinstance(self.rng, np.ndarray) and self.rng.dtype == np.uint64 and self.rng.shape == (1,),
                  "rng: the generator's state, a uint64 array of one")]
        if broken := next((why for ok, why in rules if not ok), None):
            raise ValueError(broken)

    @classmethod
    def seeded(cls, temperature: float, top_k: int, top_p: float, seed: int | None) -> Sampling:
        return cls(temperature, top_k, top_p, np.random.default_rng(seed).integers(2 ** 64, size=1, dtype=np.uint64))

    def arguments(self, ffi: cffi.FFI) -> tuple:
        return (self.temperature, self.top_k, self.top_p,
                ffi.cast("uint64_t *", ffi.from_buffer(self.rng, require_writable=True)))


GREEDY = Sampling()


class _State(NamedTuple):
    """The caches and rope tables a BoundStep last ran on, checked and cast: their context, scratch buffers by
    thread count (each with its pointer), the logits buffer `decode` writes, and pointers to k, v, cos, sin, logits."""
    arrays: tuple
    context: int
    scratch: dict
    logits: np.ndarray
    pointers: list


class BoundStep:
    """A decode step on its weights. Calling it runs one token; `decode` runs many, each step's token (greedy or
    sampled) feeding the next. Both write k and v at the positions they run; rope_cos and rope_sin hold every position's
    angles, (context, head_dim / 2). The last caches, rope tables and embedding table are checked and cast once
    (each check costs Python time on every token otherwise, and a token's weight stream leaves Python cache-cold)."""

    def __init__(self, step: Step, arrays: list[np.ndarray | None], threads: int):
        self._step, self.threads = step, threads
        self._arrays = arrays  # the weights, kept alive as long as the pointers into them
        self._pointers = step._ffi.new("void *[]", [step._ffi.NULL if a is None else step._ffi.from_buffer(a)
                                                    for a in arrays])
        self._state = _State((None,) * 4, 0, {}, np.empty(0, np.float32), [])
        self._embeddings: tuple = (None, None, None)
        self._work: np.ndarray | None = None  # pick's

    def _threads(self, threads: int | None) -> int:
        threads = self.threads if threads is None else threads
        if threads < 1:
            raise ValueError(f"threads={threads}: at least 1")
        return threads

    def _cast(self, a: np.ndarray):
        return self._step._ffi.cast("float *", self._step._ffi.from_buffer(a, require_writable=True))

    def _bind(self, k_cache, v_cache, rope_cos, rope_sin, pos: int, threads: int | None, n: int = 1) -> tuple:
        """The pointers to the caches, rope tables, scratch and logits, once positions pos..pos + n - 1 and the
        thread count are checked."""
        s, ffi = self._step.spec, self._step._ffi
        arrays = (k_cache, v_cache, rope_cos, rope_sin)
        if not all(a is b for a, b in zip(arrays, self._state.arrays)):
            context = v_cache.shape[2] if isinstance(v_cache, np.ndarray) and v_cache.ndim == 4 else 0
            for name, c, keys in (("k_cache", k_cache, True), ("v_cache", v_cache, False)):
                dtype, rest = KV_FORMATS[s.kv_cache].cache_shape(context, s.config.head_dim, keys)
                _floats(c, (s.config.layers, s.config.kv_heads, *rest), f"{name} ({s.kv_cache})", dtype)
            for name, r in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
                _floats(r, (context, s.config.head_dim // 2), name)
            logits = np.empty(s.config.vocab_size, np.float32)
            self._state = _State(arrays, context, {}, logits, [ffi.cast("void *", ffi.from_buffer(a, require_writable=True))
                                                               for a in (k_cache, v_cache)]
                                 + [ffi.cast("const float *", ffi.from_buffer(a)) for a in (rope_cos, rope_sin)]
                                 + [self._cast(logits)])
        context, scratch = self._state.context, self._state.scratch
        if not (0 <= pos and pos + n <= context):
            raise ValueError(f"position {pos + n - 1 if pos >= 0 else pos} is outside the context of {context}")
        threads = self._threads(threads)
        if threads not in scratch:  # (the buffer, its pointer), one per thread count a caller alternates between
            buffer = np.empty(self._step._scratch(context, threads), np.float32)
            scratch[threads] = buffer, self._cast(buffer)
        return (*self._state.pointers, context, scratch[threads][1], threads)

    def __call__(self, embedding: np.ndarray, k_cache, v_cache, rope_cos, rope_sin, pos: int,
                 threads: int | None = None) -> tuple[np.ndarray, int]:
        """The token whose embedding is given, at pos: its logits and the greedy next token."""
        k, v, cos, sin, _, context, scratch, threads = self._bind(k_cache, v_cache, rope_cos, rope_sin, pos, threads)
        _floats(embedding, (self._step.spec.config.hidden,), "embedding")
        logits = np.empty(self._step.spec.config.vocab_size, np.float32)
        greedy = self._step._fn(self._pointers, self._step._ffi.from_buffer("float[]", embedding), k, v, cos, sin, pos,
                                context, self._cast(logits), scratch, threads)
        return logits, greedy

    def attention(self, qkv: np.ndarray, layer: int, k_cache, v_cache, rope_cos, rope_sin, pos: int,
                  threads: int | None = None) -> np.ndarray:
        """The attention of a prefill chunk at pos.. in layer `layer`: qkv (n, qkv's rows) is the chunk's qkv product;
        rotates q and k and appends k and v to the caches; returns (n, heads · head_dim)."""
        c, ffi = self._step.spec.config, self._step._ffi
        if not 0 <= layer < c.layers:
            raise ValueError(f"layer {layer} is outside the {c.layers} layers")
        n = _rows(qkv, (c.heads + 2 * c.kv_heads) * c.head_dim, "qkv")
        if n < 1:
            raise ValueError("qkv: at least one token expected")
        k, v, cos, sin, _, context, _, threads = self._bind(k_cache, v_cache, rope_cos, rope_sin, pos, threads, n)
        att = np.empty((n, c.heads * c.head_dim), np.float32)
        if self._step._attention(ffi.from_buffer("float[]", qkv), n, layer, k, v, cos, sin, pos, context,
                                 self._cast(att), threads):
            raise MemoryError(f"prefill attention of {n} tokens: out of memory")
        return att

    def swiglu(self, gate_up: np.ndarray, threads: int | None = None) -> np.ndarray:
        """silu(gate)·up of a prefill chunk's gate_up product (n, 2 · intermediate), whose columns interleave gate's
        and up's: (n, intermediate)."""
        inter, ffi = self._step.spec.config.intermediate, self._step._ffi
        n = _rows(gate_up, 2 * inter, "gate_up")
        threads = self._threads(threads)
        out = np.empty((n, inter), np.float32)
        self._step._swiglu(ffi.from_buffer("float[]", gate_up), n, self._cast(out), threads)
        return out

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, threads: int | None = None) -> np.ndarray:
        """RMSNorm of a prefill chunk's rows (n, hidden) with the model's eps, times weight (hidden,)."""
        hidden, ffi = self._step.spec.config.hidden, self._step._ffi
        n = _rows(x, hidden, "x")
        _floats(weight, (hidden,), "norm weight")
        threads = self._threads(threads)
        out = np.empty((n, hidden), np.float32)
        self._step._rmsnorm(ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", weight), n, self._cast(out),
                            threads)
        return out

    def decode(self, embeddings: QuantizedWeights, token: int, n: int, stop: np.ndarray, k_cache, v_cache, rope_cos,
               rope_sin, pos: int, threads: int | None = None, sampling: Sampling = GREEDY) -> np.ndarray:
        """Up to n tokens after `token` at pos, each picked by `sampling` (embeddings: the table, (vocab, hidden), in
        the head's format), ending early after a token in stop (int32), which is kept: the tokens picked, int32."""
        s, ffi = self._step.spec, self._step._ffi
        if n < 1:
            raise ValueError(f"n={n}: at least one token")
        if not 0 <= token < s.config.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary of {s.config.vocab_size}")
        if not (isinstance(stop, np.ndarray) and stop.dtype == np.int32 and stop.ndim == 1):
            raise ValueError("stop: a 1-D int32 array of token ids expected")
        k, v, cos, sin, logits, context, scratch, threads = self._bind(k_cache, v_cache, rope_cos, rope_sin, pos,
                                                                       threads, n)
        if embeddings is not self._embeddings[0]:
            if not isinstance(embeddings, QuantizedWeights) or embeddings.offsets is not None:
                raise ValueError("embeddings: a table in the head's format (QuantizedWeights, symmetric) expected")
            _floats(embeddings.codes, (s.config.vocab_size, s.config.hidden), "embedding codes", np.uint8)
            _floats(embeddings.scales, (s.config.vocab_size, s.head.groups), "embedding scales", s.head.scales.numpy)
            self._embeddings = embeddings, ffi.from_buffer(embeddings.codes), ffi.from_buffer(embeddings.scales)
        tokens = np.empty(n, np.int32)
        done = self._step._decode(self._pointers, *self._embeddings[1:], token, n, ffi.from_buffer("int[]", stop),
                                  len(stop), *sampling.arguments(ffi), ffi.from_buffer("int[]", tokens, require_writable=True),
                                  k, v, cos, sin, pos, context, logits, scratch, threads)
        return tokens[:done]

    def pick(self, logits: np.ndarray, sampling: Sampling) -> int:
        """The token `sampling` picks from logits (vocab,), as `decode` does after each step."""
        vocab = self._step.spec.config.vocab_size
        _floats(logits, (vocab,), "logits")
        if self._work is None:
            self._work = np.empty(3 * vocab + 1024, np.float32)
        return self._step._pick(self._step._ffi.from_buffer("float[]", logits), *sampling.arguments(self._step._ffi),
                                self._cast(self._work))


def load(path, cdef: str, kernels: list[tuple[KernelSpec, Schedule]],
         steps: tuple[StepSpec, ...] = ()) -> dict[str, Kernel | Step]:
    """Open the library at `path`, refusing before any code runs if this CPU lacks a feature the library says (in
    its own file) that it may execute."""
    try:
        requires = embedded_requires(path)
    except OSError as e:
        raise LoadError(f"cannot open {path}: {e.strerror}") from e
    if requires is None:
        raise LoadError(f"{path} is not a library qigen compiled (it names no CPU features it needs): regenerate it")
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
        loaded[step.name] = Step(step, {spec: gemv[spec] for spec in step.kernel_specs()}, getattr(lib, step.name), getattr(lib, step.name + "_decode"), getattr(lib, step.name + "_pick"),
                                 getattr(lib, step.name + "_scratch"), getattr(lib, step.name + "_prefill_attention"),
                                 getattr(lib, step.name + "_prefill_swiglu"), getattr(lib, step.name + "_prefill_rmsnorm"),
                                 ffi)
    return loaded
