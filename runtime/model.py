"""A LLaMA-style model on generated kernels, read like llama2.c's run.c: config, weights, run
state, one forward() with a comment per step; prefill (matrix-matrix kernels) and decode
(matrix-vector kernels) differ only in how many tokens go through at once.
"""
from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from threadpoolctl import ThreadpoolController

from perfmodel.host import detect
from qigen.arch import HEAD, NORMS, ROLE_NAMES, ROLES, LlamaConfig, layer_prefix
from qigen.kvcache import FORMATS as KV_FORMATS, KvFormat
from qigen.layout import PackedWeights, contiguous, huge_pages
from qigen.quant import QuantizedWeights, dequantize, quantize
from qigen.spec import KernelSpec, QuantSpec, StepSpec
from runtime.checkpoint import Checkpoint
from runtime.loader import Kernel, Sampling, Step
from runtime.tokenizer import Tokenizer

PREFILL_BATCH = 64  # the design batch of prefill kernels (they take any n at run time)
PREFILL_CHUNK = 512  # prompt tokens per forward pass, to bound activation memory
STREAM_SECONDS = 0.05  # greedy decoding streams its text in pieces this far apart, or a token's if slower
MAX_CHUNK = 64  # tokens at most per piece


Matrix = np.ndarray | QuantizedWeights  # fp32 (rows, cols), or quantized


@dataclass
class Layer:
    attn_norm: np.ndarray  # (hidden,)
    qkv: Matrix  # ((heads + 2·kv_heads)·head_dim, hidden): q, k, v projections stacked
    o: Matrix  # (hidden, heads·head_dim)
    ffn_norm: np.ndarray  # (hidden,)
    gate_up: Matrix  # (2·intermediate, hidden): gate and up projections, rows interleaved (gate i at 2i, up i at 2i + 1)
    down: Matrix  # (hidden, intermediate)


@dataclass
class Weights:
    config: LlamaConfig
    embed: Matrix  # (vocab, hidden), for the token lookup: fp32, or (a quantized model's) in the head's format
    layers: Sequence[Layer]  # a list, or (a checkpoint's) Layers
    norm: np.ndarray  # (hidden,)
    head: Matrix  # (vocab, hidden)
    quant: QuantSpec | None  # None: fp32


def take_rows(m: Matrix, rows: np.ndarray) -> Matrix:
    return m[rows] if isinstance(m, np.ndarray) else m.take_rows(rows)


class Layers(Sequence):
    """A checkpoint's layers, each made when asked from its tensors (Checkpoint.tensors makes those when asked too):
    quantizing holds one layer's fp32 matrices at a time."""

    def __init__(self, ckpt: Checkpoint):
        self._ckpt = ckpt

    def __len__(self) -> int:
        return self._ckpt.config.layers

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"layer {i} of {len(self)}")
        c, t, p = self._ckpt.config, self._ckpt.tensors, layer_prefix(i % len(self))
        return Layer(**{n: t[f"{p}{name}.weight"] for n, name in NORMS.items()},
                     **{r.name: r.stack(c, [t[f"{p}{part.name}.weight"] for part in r.parts]) for r in ROLES})


def split_linears(ckpt: Checkpoint) -> Weights:
    """A checkpoint's fp32 tensors, each layer's products stacked as qigen.arch.ROLES says: one kernel call each. Its
    layers are made when asked (a Model keeps them made)."""
    c, t = ckpt.config, ckpt.tensors
    embed = t["model.embed_tokens.weight"]
    head = embed if c.tied_embeddings else t[f"{HEAD.parts[0].name}.weight"]
    return Weights(c, embed, Layers(ckpt), t["model.norm.weight"], head, None)


def quantize_weights(w: Weights, quant: QuantSpec,
                     quantizer: Callable[[np.ndarray, KernelSpec, str], QuantizedWeights] | None = None) -> Weights:
    """Every linear to `quant` (RTN, or `quantizer(matrix, spec, name)` e.g. GPTQ); the head to head_bits RTN.
    A tied embedding is then looked up in the quantized head, so both agree."""
    quantizer = quantizer or (lambda m, spec, name: quantize(m, spec))
    layers = []
    for i, layer in enumerate(w.layers):
        q = {n: quantizer(getattr(layer, n), quant.kernel_spec(*getattr(layer, n).shape), f"layers.{i}.{n}")
             for n in ROLE_NAMES}
        layers.append(replace(layer, **q))
    head_spec = quant.kernel_spec(*w.head.shape, head=True)
    head = quantize_rows(w.head, head_spec)
    embed = head if w.config.tied_embeddings else quantize_rows(w.embed, head_spec)
    return Weights(w.config, embed, layers, w.norm, head, quant)


QUANTIZE_ROWS = 4096  # rows quantized at a time by quantize_rows: its fp32 temporaries stay small


def quantize_rows(w: np.ndarray, spec: KernelSpec) -> QuantizedWeights:
    """Round to nearest, as quantize does, QUANTIZE_ROWS rows at a time: quantizing SmolLM2's 49,152 x 576 head at
    once took 430 MB of temporaries. Quantized models look their tokens up in the head's format, so an untied
    embedding is quantized so too (a quarter of fp32's memory: 113 MB for SmolLM2 in fp32)."""
    parts = [quantize(w[i:i + QUANTIZE_ROWS].astype(np.float32), replace(spec, rows=len(w[i:i + QUANTIZE_ROWS])))
             for i in range(0, len(w), QUANTIZE_ROWS)]
    return QuantizedWeights(np.concatenate([q.codes for q in parts]), np.concatenate([q.scales for q in parts]),
                            None if spec.symmetric else np.concatenate([q.offsets for q in parts]))


@dataclass(frozen=True)
class Kernels:
    """What a quantized model runs on (built by qigen.llm): its step spec (every product's decode spec), the decode
    and the prefill kernel of each, by decode spec, and the generated decode step (None: decode by products)."""
    spec: StepSpec
    decode: dict[KernelSpec, Kernel]
    prefill: dict[KernelSpec, Kernel]
    step: Step | None = None


class Linear:
    """y = x·Wᵀ: numpy for fp32 weights, else a matrix-vector kernel for one token, matrix-matrix for more."""

    def __init__(self, m: Matrix, kernels: Kernels | None, spec: KernelSpec | None, region: np.ndarray | None = None):
        """region: where decode's packing goes (layout.contiguous), else where packing leaves it."""
        self.seconds = 0.0  # spent in this layer's matrix products
        if isinstance(m, np.ndarray):
            self.packed, self.shared = None, False
            self.decode = self.prefill = lambda x, threads: x @ m.T
        else:
            q = m.load()
            self._gemv, self._gemm = kernels.decode[spec], kernels.prefill[spec]
            packed = self._gemv.pack(q)
            self.shared = self._gemm.layout == packed.layout  # prefill reads decode's packing: one copy
            if not self.shared:
                self.prefill = self._gemm.bind(self._gemm.pack(q))
            self.place(packed if region is None else packed.into(region))

    def place(self, packed: PackedWeights) -> None:
        """Decode from `packed`: the matrix-vector kernel's format, which the decode step reads too (and prefill,
        when its kernel reads the same packing)."""
        self.packed, self.decode = packed, self._gemv.bind(packed)
        if self.shared:
            self.prefill = self._gemm.bind(packed)

    def __call__(self, x: np.ndarray, threads: int) -> np.ndarray:
        t0 = time.perf_counter()
        y = self.decode(x, threads) if x.shape[0] == 1 else self.prefill(x, threads)
        self.seconds += time.perf_counter() - t0
        return y


def cpu_seconds() -> tuple[float, float] | None:
    """CPU seconds since boot on the cores this process may use, busy (neither idle nor waiting for I/O, time a
    hypervisor took included), and this process's CPU seconds: Linux's accounting (/proc/stat); None elsewhere."""
    cores = os.sched_getaffinity(0)
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = 0
    for name, *ticks in (line.split() or [""] for line in lines):
        if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in cores:
            t = [int(v) for v in ticks[:8]]  # user nice system idle iowait irq softirq steal (guests are in user)
            busy += sum(t) - t[3] - t[4]
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time()


class ThreadChoice:
    """The thread count decode steps and prefill chunks run with: the cores this process may use, less those other
    programs kept busy over the last WINDOW seconds or more, as the kernel accounts them (busy time on our cores less
    our own). OpenMP threads wait for each other at every barrier: when another program takes a core, the thread
    that lost it stalls the rest. On 2 cores with one busy process, 2-thread decode fell to 29-45% of its idle speed
    (one token took 0.6 s) and 2-thread prefill to a third of 1 thread's under the same load; choosing by timing
    each count (every other one tried now and then) cost a short run a fifth of its speed in those tries. The
    accounting costs a read of /proc/stat a call and tries nothing."""
    WINDOW = 0.2  # seconds: at 100 ticks a second per core, a window's busy time is known to a few percent of a core

    def __init__(self, most: int, sample: Callable[[], tuple[float, float] | None] = cpu_seconds,
                 clock: Callable[[], float] = time.perf_counter):
        self.most, self._sample, self._clock = most, sample, clock
        self.threads = most
        self.taken = 0.0  # cores other programs kept busy over the last window
        self._since = (clock(), sample())

    def pick(self) -> int:
        now = self._clock()
        then, before = self._since
        if now - then >= self.WINDOW and before is not None and (after := self._sample()) is not None:
            busy, ours = after[0] - before[0], after[1] - before[1]
            self.taken = max(0.0, (busy - ours) / (now - then))
            self.threads = max(1, self.most - int(self.taken + 0.5))
            self._since = now, after
        return self.threads


@dataclass
class RunState:
    k: np.ndarray  # (layers, kv_heads, …) key cache in the model's KV format (qigen.kvcache: KvFormat.cache_shape)
    v: np.ndarray  # (layers, kv_heads, context, row) value cache
    cos: np.ndarray  # (context, head_dim/2) rotary angles' cosines per position
    sin: np.ndarray  # (context, head_dim/2)
    pos: int = 0  # tokens in the cache

    @property
    def context(self) -> int:
        return self.v.shape[2]


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    stop: str = ""
    decode_matmul_s: float = 0.0  # of decode_s, in the linear layers (generated kernels)

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "prompt_tokens_per_s": self.prompt_tokens / max(self.prompt_s, 1e-9),
                "generated_tokens": self.generated_tokens,
                "decode_tokens_per_s": self.generated_tokens / max(self.decode_s, 1e-9),
                "ms_per_token": 1e3 * self.decode_s / max(self.generated_tokens, 1), "stop": self.stop,
                "decode_share_in_kernels": self.decode_matmul_s / max(self.decode_s, 1e-9)}


def _integer(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_threads(threads: int | None) -> int:
    """The thread count to run with: None is every core this process may use; more than that is refused (a thread
    waiting for a core stalls the others at every barrier)."""
    cores = detect().cores
    if threads is None:
        return cores
    if not (_integer(threads) and 1 <= threads <= cores):
        raise ValueError(f"threads={threads!r}: from 1 to the {cores} cores this process may use")
    return int(threads)


def check_generation(max_tokens: int, temperature: float, top_k: int, top_p: float, context: int | None) -> None:
    """The rules of generate()'s settings, one ValueError naming the first broken one (the CLI checks the same)."""
    if not (_integer(max_tokens) and max_tokens >= 1):
        raise ValueError(f"max_tokens={max_tokens!r}: at least 1")
    Sampling(temperature, top_k, top_p)
    if not (context is None or (_integer(context) and context >= 2)):
        raise ValueError(f"context={context!r}: at least 2 tokens")


def kv_cache_format(name: str, config: LlamaConfig) -> KvFormat:
    """The KV-cache format `name`, checked against the model's head size."""
    if name not in KV_FORMATS:
        raise ValueError(f"KV cache '{name}' is unknown: choose {', '.join(KV_FORMATS)}")
    if unfit := KV_FORMATS[name].unfit(config.head_dim):
        raise ValueError(unfit)
    return KV_FORMATS[name]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


class Model:
    def __init__(self, weights: Weights, tokenizer: Tokenizer, threads: int | None = None,
                 kernels: Kernels | None = None, kv_cache: str | None = None):
        """kernels: what a quantized model runs on (qigen.llm.build_model makes them); with a decode step in them,
        decode runs it (every layer and the head in C, one parallel region per token), else the Python loop over
        per-product kernels. kv_cache: the KV cache's format (qigen.kvcache), the kernels' when they have one."""
        weights = replace(weights, layers=list(weights.layers))  # (each made once: a checkpoint's are made when asked)
        self.w, self.tokenizer, self.config = weights, tokenizer, weights.config
        self.threads = check_threads(threads)
        self.kv = kv_cache_format(kv_cache or (kernels.spec.kv_cache if kernels else "fp32"), weights.config)
        if kernels and self.kv.name != kernels.spec.kv_cache:
            raise ValueError(f"KV cache {self.kv.name}: the kernels were generated for {kernels.spec.kv_cache}")
        self.cores = ThreadChoice(self.threads)  # the threads to run on now: those other programs leave cores for
        if (weights.quant is None) != (kernels is None):
            raise ValueError("a quantized model runs on its kernels (qigen.llm.build_model), an fp32 one on numpy")
        self.step, self.step_seconds = None, 0.0
        spec = (lambda i, n: kernels.spec.linear(i, n)) if kernels else (lambda i, n: None)
        # decode's weights end to end, in the order a token reads them, on huge pages. Each matrix is read, packed and
        # placed in turn, the largest first, so that one at a time is unpacked: the default model's run peaked at
        # 660 MB with every matrix unpacked first, then packed, then copied into place
        matrices = [getattr(l, n) for l in weights.layers for n in ROLE_NAMES] + [weights.head]
        specs = [spec(i, n) for i in range(len(weights.layers)) for n in ROLE_NAMES] + [kernels and kernels.spec.head]
        sizes = [kernels.decode[s].packed_bytes(m.outlier_count) if kernels else 0 for m, s in zip(matrices, specs)]
        regions = contiguous(sizes) if kernels else [None] * len(matrices)
        linears = [None] * len(matrices)
        for j in sorted(range(len(matrices)), key=lambda j: -sizes[j]):
            linears[j] = Linear(matrices[j], kernels, specs[j], regions[j])
        roles = len(ROLE_NAMES)
        self.linears = [dict(zip(ROLE_NAMES, linears[i:i + roles])) for i in range(0, len(linears) - 1, roles)]
        self.head = linears[-1]
        if kernels and kernels.step:
            layers = [{"attn_norm": l.attn_norm, "ffn_norm": l.ffn_norm} | {n: lin[n].packed for n in ROLE_NAMES}
                      for l, lin in zip(weights.layers, self.linears)]
            self.step = kernels.step.bind(layers, weights.norm, self.head.packed, self.threads)
        c = self.config
        self.head_spec = weights.quant and weights.quant.kernel_spec(*HEAD.shape(c), head=True)
        self.rope_freqs = c.rope_theta ** (-np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim)
        self._blas = ThreadpoolController()

    def embed(self, tokens) -> np.ndarray:
        """The tokens' embeddings, (T, hidden) fp32."""
        e = self.w.embed
        return e[tokens] if isinstance(e, np.ndarray) else dequantize(e.take_rows(np.asarray(tokens)), self.head_spec)

    def matmul_seconds(self) -> float:
        """Time spent in generated kernels so far: the linear layers (when quantized) and the decode step."""
        return self.step_seconds + self.head.seconds + sum(lin.seconds for layer in self.linears for lin in layer.values())

    def new_state(self, context: int) -> RunState:
        c = self.config
        angles = np.outer(np.arange(context), self.rope_freqs)

        def cache(keys: bool) -> np.ndarray:  # (read every token)
            dtype, rest = self.kv.cache_shape(context, c.head_dim, keys)
            shape = (c.layers, c.kv_heads, *rest)
            return huge_pages(dtype.itemsize * int(np.prod(shape))).view(dtype).reshape(shape)

        return RunState(cache(True), cache(False), np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32))

    @staticmethod
    def _rope(x: np.ndarray, state: RunState) -> np.ndarray:
        """Rotary embedding, Hugging Face layout (halves rotate): x (heads, T, head_dim) at state.pos."""
        cos, sin = state.cos[state.pos:state.pos + x.shape[1]], state.sin[state.pos:state.pos + x.shape[1]]
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def forward(self, tokens: list[int] | np.ndarray, state: RunState, all_logits: bool = False) -> np.ndarray:
        """Run tokens at state.pos..; returns logits (T, vocab) if all_logits, else of the last token (vocab,)."""
        tokens = np.asarray(tokens)
        if state.pos + len(tokens) > state.context:
            raise ValueError(f"{state.pos + len(tokens)} tokens exceed the context of {state.context}")
        if self.step is not None and len(tokens) == 1 and not all_logits:  # decode: the whole model in one kernel
            return self._step(tokens[0], state)
        if self.w.quant is None:  # numpy's BLAS does the matrix products: let it use its threads
            return self._forward(tokens, state, all_logits)
        # the kernels' OpenMP threads own the cores: BLAS threads spinning beside them (attention's small
        # products) made prefill on 2 threads 2.5x slower than on 1
        with self._blas.limit(limits=1, user_api="blas"):
            return self._forward(tokens, state, all_logits)

    def _step(self, token: int, state: RunState) -> np.ndarray:
        """One token through the generated decode step: its logits."""
        threads, t0 = self.cores.pick(), time.perf_counter()
        logits = self.step(self.embed([token])[0], state.k, state.v, state.cos, state.sin, state.pos, threads)[0]
        self.step_seconds += time.perf_counter() - t0
        state.pos += 1
        return logits

    def _decode(self, token: int, state: RunState, n: int, stop: np.ndarray, sampling: Sampling) -> list[int]:
        """Up to n tokens after `token`, each picked by `sampling`, through the generated step in one call (a loop in
        C), ending after one in stop."""
        threads, t0 = self.cores.pick(), time.perf_counter()
        tokens = self.step.decode(self.w.embed, token, n, stop, state.k, state.v, state.cos, state.sin, state.pos,
                                  threads, sampling)
        self.step_seconds += time.perf_counter() - t0
        state.pos += len(tokens)
        return tokens.tolist()

    def _forward(self, tokens: list[int] | np.ndarray, state: RunState, all_logits: bool) -> np.ndarray:
        c, th, step = self.config, self.cores.pick(), self.step
        n, pos = len(tokens), state.pos
        # the generated step's norms, attention and SwiGLU run on every core (numpy's on one), the attention over
        # the causal blocks only, in one pass
        norm = (lambda x, w: step.rmsnorm(x, w, th)) if step else (lambda x, w: rms_norm(x, w, c.rms_eps))
        x = self.embed(tokens)  # (T, hidden) token embeddings
        for i, (layer, lin) in enumerate(zip(self.w.layers, self.linears)):
            # attention: q, k, v of the normed input, rotated, k and v appended to the cache
            qkv = lin["qkv"](norm(x, layer.attn_norm), th)
            if step is not None:
                x = x + lin["o"](step.attention(qkv, i, state.k, state.v, state.cos, state.sin, pos, th), th)
            else:
                x = x + lin["o"](self._attention(qkv, i, state), th)
            # feed-forward: SwiGLU of the normed input
            gate_up = lin["gate_up"](norm(x, layer.ffn_norm), th)
            if step is not None:
                x = x + lin["down"](step.swiglu(gate_up, th), th)
            else:
                gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
                x = x + lin["down"](gate / (1.0 + np.exp(-gate)) * up, th)
        state.pos += n
        logits = self.head(norm(x if all_logits else x[-1:], self.w.norm), th)  # (T or 1, vocab)
        return logits if all_logits else logits[0]

    def _attention(self, qkv: np.ndarray, i: int, state: RunState) -> np.ndarray:
        """Layer i's attention of a chunk at state.pos in numpy: q, k, v rotated, k and v appended to the cache."""
        c, n, pos = self.config, qkv.shape[0], state.pos
        hd, heads, kvh = c.head_dim, c.heads, c.kv_heads
        k_at, v_at = list(ROLES[ROLE_NAMES.index("qkv")].offsets(c).values())[1:]  # where qkv's k and v rows start
        causal = np.arange(pos + n)[None, :] > np.arange(pos, pos + n)[:, None]  # (T, S) future positions
        q = qkv[:, :k_at].reshape(n, heads, hd).transpose(1, 0, 2)
        k = qkv[:, k_at:v_at].reshape(n, kvh, hd).transpose(1, 0, 2)
        v = qkv[:, v_at:].reshape(n, kvh, hd).transpose(1, 0, 2)
        self.kv.write(state.k[i], pos, self.kv.rotate(self._rope(k, state)), keys=True)
        self.kv.write(state.v[i], pos, v, keys=False)
        keys, values = (self.kv.read(cache[i], pos + n, hd, keys) for cache, keys in ((state.k, True), (state.v, False)))
        q = self.kv.rotate(self._rope(q, state)).reshape(kvh, heads // kvh * n, hd)  # grouped by their kv head
        scores = q @ keys.transpose(0, 2, 1) * hd ** -0.5  # (kvh, group·T, S)
        scores = scores.reshape(kvh, heads // kvh, n, pos + n)
        scores[..., causal] = -np.inf
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        att = scores.reshape(kvh, -1, pos + n) @ values  # (kvh, group·T, hd)
        return att.reshape(heads, n, hd).transpose(1, 0, 2).reshape(n, heads * hd)

    def prefill(self, tokens: list[int], state: RunState) -> np.ndarray:
        """Logits after the last prompt token; the prompt goes through in chunks."""
        for start in range(0, len(tokens), PREFILL_CHUNK):
            logits = self.forward(tokens[start:start + PREFILL_CHUNK], state)
        return logits

    def generate(self, prompt: str | list[int], max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, context: int | None = None,
                 stats: Stats | None = None) -> Iterator[str]:
        """Text pieces as they are produced; stops at end of sequence, max_tokens or the context length."""
        check_generation(max_tokens, temperature, top_k, top_p, context)
        if context is not None and context > self.config.context:
            raise ValueError(f"context={context}: above the model's own {self.config.context} tokens")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        context = context or self.config.context
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= context:
            raise ValueError(f"the prompt has {len(ids)} tokens, the context holds {context}: shorten it")
        stats = stats if stats is not None else Stats()
        state = self.new_state(min(context, len(ids) + max_tokens))
        stream = self.tokenizer.stream()
        t0 = time.perf_counter()
        logits = self.prefill(ids, state)
        stats.prompt_tokens, stats.prompt_s = len(ids), time.perf_counter() - t0
        t0, m0 = time.perf_counter(), self.matmul_seconds()
        # decoding with the generated step runs ahead, greedy or sampled in C: one call picks a chunk of tokens,
        # sized to take about STREAM_SECONDS, and the loop streams them. After a 96 MB token, Python runs cache-cold:
        # per token it cost 0.2-0.3 ms, 4-5% of a token of the default model at 2 threads
        if self.step is not None:
            sampling = Sampling.seeded(temperature, top_k, top_p, seed)
            token = self.step.pick(logits, sampling)
        else:
            rng = np.random.default_rng(seed)
            token = sample(logits, temperature, top_k, top_p, rng)
        stop = np.array(sorted(self.tokenizer.eos_ids), np.int32)
        ahead, chunk = deque(), 1
        while True:
            if token in self.tokenizer.eos_ids:
                stats.stop = "end of sequence"
                break
            stats.generated_tokens += 1
            piece = stream.push(token)
            if piece:
                yield piece
            if stats.generated_tokens >= max_tokens:
                stats.stop = "max tokens"
                break
            if not ahead and state.pos >= state.context:
                stats.stop = f"context length ({context} tokens)"
                break
            if self.step is None:
                token = sample(self.forward([token], state), temperature, top_k, top_p, rng)
                continue
            if not ahead:
                t1 = time.perf_counter()
                n = min(chunk, max_tokens - stats.generated_tokens, state.context - state.pos)
                ahead.extend(self._decode(token, state, n, stop, sampling))
                chunk = max(1, min(MAX_CHUNK, int(STREAM_SECONDS * len(ahead) / (time.perf_counter() - t1))))
            token = ahead.popleft()
        stats.decode_s, stats.decode_matmul_s = time.perf_counter() - t0, self.matmul_seconds() - m0
        rest = stream.flush()
        if rest:
            yield rest

    def perplexity(self, text: str, ctx: int = 512, all_tokens: bool = False, decode: bool = False) -> tuple[float, int]:
        """exp(mean negative log-likelihood) over non-overlapping windows of ctx tokens, scoring the second
        half of each window as llama.cpp does (all_tokens: every token after the first). decode: feed the windows
        one token at a time, through the decode path that generation uses (which may quantize activations to
        int8), instead of in prefill chunks. Returns (ppl, scored)."""
        if not (_integer(ctx) and ctx >= 2):
            raise ValueError(f"ctx={ctx!r}: a window holds at least 2 tokens")
        if ctx > self.config.context:
            raise ValueError(f"ctx={ctx}: above the model's own context of {self.config.context} tokens")
        ids = self.tokenizer.encode(text)
        if len(ids) < ctx:
            raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}")
        nll, scored = 0.0, 0
        for start in range(0, len(ids) - ctx + 1, ctx):
            window = ids[start:start + ctx]
            state = self.new_state(ctx)
            if decode:
                logits = np.stack([self.forward([token], state) for token in window])
            else:
                logits = np.concatenate([self.forward(window[i:i + PREFILL_CHUNK], state, all_logits=True)
                                         for i in range(0, ctx, PREFILL_CHUNK)])
            first = 0 if all_tokens else ctx // 2
            z = logits[first:-1].astype(np.float64)
            logp = z - z.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            nll -= logp[np.arange(len(z)), window[first + 1:]].sum()
            scored += len(z)
        return float(np.exp(nll / scored)), scored


def distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The tokens sampling may pick at temperature > 0 and their probabilities: softmax(logits / T) restricted to the
    top k, then to the fewest most likely whose probability reaches top_p."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z)
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
    return order[:keep], p[:keep] / p[:keep].sum()


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else a draw from distribution()."""
    if temperature <= 0:
        return int(np.argmax(logits))
    tokens, p = distribution(logits, temperature, top_k, top_p)
    return int(tokens[rng.choice(len(tokens), p=p)])
