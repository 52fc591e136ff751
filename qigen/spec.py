"""What to compute (KernelSpec) and how to tile it (Schedule), and the tables both are made of: the ISAs, the scale
dtypes and the kernel families.

A kernel computes y = W·x (+ bias) for a weight matrix W of `rows` × `cols` stored as
`bits`-bit codes with one scale (and, when asymmetric, one float offset) per group of `group`
consecutive inputs of a row: w = scale·code + offset.  An integer zero point z is the offset
-scale·z, and GGUF's Q4_1 "minimum" is the offset itself, so one format holds both.
Symmetric kernels store no offset: w = scale·(code - zero_point), zero_point = 2^(bits-1).

How a family multiplies (its activations, layout, schedules, cost and templates) is its record in qigen.families,
which registers every family here: this module only names them.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace

import numpy as np

from qigen.arch import HEAD, ROLE_NAMES, ROLES, LlamaConfig
from qigen.kvcache import FORMATS as KV_FORMATS

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, 256, None)  # None: one group per row
DEFAULT_GROUP = 128  # a kernel's (a model's is QuantSpec's)
MAX_BATCH = 512
MAX_OUTLIERS = 64  # input channels a matrix may keep in floating point (QUIK's outlier channels), at most


class SpecError(ValueError):
    """A spec or schedule that qigen cannot generate; the message names the broken rule."""


@dataclass(frozen=True)
class Isa:
    """What kernels of one instruction set are made of; the cost model's issue and FMA rates are Zen 3's, measured."""
    name: str
    vector_width: int  # fp32 lanes
    registers: int  # vector registers
    features: tuple[str, ...]  # CPU features a library of this ISA executes
    issue: float  # vector instructions per cycle
    emulated: bool = False  # SIMD Everywhere implements it in portable C (to test it on CPUs without it)
    fma_ports: int = 2
    fma_latency: int = 4
    load_ports: int = 3
    base: str = ""  # the ISA whose vector code this one shares, all but the integer dot product (VNNI's)
    vnni: bool = False  # u8 x s8 dot products of four bytes into int32 lanes (vpdpbusd), no int16 sums

    @property
    def header(self) -> str:
        return f"simd_{self.base or self.name}.h"


_AVX512 = ("avx512f", "avx512bw", "avx512vl", "f16c")
_AVX2 = ("avx2", "fma", "f16c")
ISAS = {isa.name: isa for isa in (  # best first
    Isa("avx512vnni", 16, 32, (*_AVX512, "avx512vnni"), 2.0, emulated=True, base="avx512", vnni=True),
    Isa("avx512", 16, 32, _AVX512, 2.0, emulated=True),
    Isa("avxvnni", 8, 16, (*_AVX2, "avxvnni"), 3.0, base="avx2", vnni=True),  # client CPUs: VNNI without AVX-512
    Isa("avx2", 8, 16, _AVX2, 3.0),
    Isa("scalar", 1, 16, (), 3.0),
)}


def best_isa(host) -> str:
    """The first ISA (best first) whose features a perfmodel Host has."""
    return next(isa.name for isa in ISAS.values() if host.has(*isa.features))


@dataclass(frozen=True)
class ScaleDtype:
    name: str
    numpy: type
    ctype: str
    load: str  # the SIMD helper that loads a vector of them as fp32
    scalar: str  # the helper (or cast) that reads one as fp32

    @property
    def bytes(self) -> int:
        return np.dtype(self.numpy).itemsize


SCALE_DTYPES = {d.name: d for d in (ScaleDtype("fp16", np.float16, "uint16_t", "vf_load_h", "f_half"),
                                    ScaleDtype("fp32", np.float32, "float", "vf_load", "(float)"))}

FAMILIES: dict[str, "Family"] = {}  # name → record, best first for activations="auto"; filled by qigen.families


def family(name: str) -> "Family":
    if name not in FAMILIES:
        raise SpecError(f"kernel family '{name}' is unknown: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def activations() -> tuple[str, ...]:
    """What --activations takes: auto, then every family's activation type."""
    return ("auto", *dict.fromkeys(f.activations for f in FAMILIES.values()))


def choose_family(kind: str, make) -> KernelSpec:
    """make(family name) → a KernelSpec, for the family of activation type `kind`, or with "auto" the first (best
    first) whose rules the format meets; SpecError names the broken rule when none does."""
    if kind != "auto":
        if kind not in activations():
            raise SpecError(f"activations '{kind}' are unknown: choose {', '.join(activations())}")
        return make(next(f.name for f in FAMILIES.values() if f.activations == kind))
    for f in FAMILIES.values():
        try:
            return make(f.name)
        except SpecError:
            continue
    return make(next(iter(FAMILIES)))  # raises: no family takes the format


def activations_help() -> str:
    return "; ".join(f"{f.activations}: {f.summary}" for f in FAMILIES.values()) + \
        "; auto: the first of these the format allows"


@dataclass(frozen=True)
class KernelSpec:
    rows: int  # M: outputs
    cols: int  # K: inputs
    bits: int
    group: int | None = DEFAULT_GROUP
    symmetric: bool = False
    scale_dtype: str = "fp16"
    batch: int = 1  # 1: matrix-vector (decode); > 1: matrix-matrix (prefill), batch is the design point
    isa: str = "avx2"
    family: str = "wq_f32"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise SpecError(f"bits={self.bits} is not supported: choose one of {', '.join(map(str, BITS))}")
        if self.group not in GROUPS:
            raise SpecError(f"group size {self.group} is not supported: choose 32, 64, 128, 256 or None (one group per row)")
        if self.rows < 1 or self.cols < 1:
            raise SpecError(f"shape {self.rows}x{self.cols} is empty: rows and cols must be at least 1")
        if not 1 <= self.batch <= MAX_BATCH:
            raise SpecError(f"batch={self.batch} is out of range: 1 (decode) to {MAX_BATCH} (prefill)")
        if self.isa not in ISAS:
            raise SpecError(f"isa '{self.isa}' is unknown: choose one of {', '.join(ISAS)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SpecError(f"scale dtype '{self.scale_dtype}' is unknown: choose fp16 or fp32")
        self.traits.check(self)

    @property
    def traits(self) -> "Family":
        return family(self.family)

    @property
    def kind(self) -> str:
        return "gemv" if self.batch == 1 else "gemm"

    @property
    def group_size(self) -> int:
        return self.group or self.cols

    @property
    def groups(self) -> int:
        return -(-self.cols // self.group_size)

    @property
    def target(self) -> Isa:
        return ISAS[self.isa]

    @property
    def vector_width(self) -> int:
        return self.target.vector_width

    @property
    def scales(self) -> ScaleDtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def zero_point(self) -> int:
        """The code of 0.0 in a symmetric format."""
        return 1 << (self.bits - 1)

    @property
    def format(self) -> str:
        """Bits, group, symmetry and the family's suffix, e.g. q4g32asym_a8: what a step's name says of a product."""
        return (f"q{self.bits}{f'g{self.group}' if self.group else 'grow'}{'sym' if self.symmetric else 'asym'}"
                f"{self.traits.suffix.lstrip('_')}")

    @property
    def name(self) -> str:
        g = f"g{self.group}" if self.group else "grow"
        mode = "sym" if self.symmetric else "asym"
        return (f"{self.kind}{self.traits.suffix}_q{self.bits}_{g}_{mode}_{self.scale_dtype}_{self.isa}"
                f"_m{self.rows}k{self.cols}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Schedule:
    row_vectors: int = 1  # SIMD vectors of rows per tile: a tile holds row_vectors × vector_width rows
    accumulators: int = 2  # independent partial sums per row vector (matrix-vector), to hide FMA latency
    col_tile: int = 1  # batch columns per register micro-kernel (matrix-matrix)
    k_block: int = 0  # inputs dequantized per block (matrix-matrix); 0 for matrix-vector
    threads: int = 1  # the thread count the schedule was chosen for; kernels take threads at call time

    def tag(self) -> str:
        return f"r{self.row_vectors}a{self.accumulators}n{self.col_tile}kb{self.k_block}"

    def to_dict(self) -> dict:
        return asdict(self)


def kernel_name(spec: KernelSpec, schedule: Schedule) -> str:
    """The C symbol, the library's key and the manifest's name of a kernel."""
    return f"{spec.name}_{schedule.tag()}"


def check(spec: KernelSpec, schedule: Schedule) -> None:
    """Raise SpecError naming the rule that spec + schedule break."""
    if schedule.row_vectors < 1 or schedule.accumulators < 1 or schedule.col_tile < 1 or schedule.threads < 1:
        raise SpecError(f"schedule {schedule.tag()}: tile sizes and threads must be at least 1")
    spec.traits.check_schedule(spec, schedule)


def prefill_spec(spec: KernelSpec, batch: int) -> KernelSpec:
    """The matrix-matrix twin of a decode spec: its family's, at the design batch `batch`."""
    return replace(spec, batch=batch)


METHODS = ("rtn", "gptq")


def _exactly(value, kind: type) -> bool:
    """isinstance, where a bool is no int."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def kind_name(kind: type) -> str:
    return {int: "an integer", bool: "true or false", str: "text"}[kind]


@dataclass(frozen=True)
class QuantSpec:
    """How a model's linear layers are stored; the tied embedding / output head keep head_bits."""
    bits: int = 4
    group: int | None = 32  # llama.cpp's Q4_1 group: its weights (the default model's) are kept exactly
    symmetric: bool = False
    scale_dtype: str = "fp16"
    method: str = "rtn"  # or "gptq"
    head_bits: int = 8
    head_group: int | None = 32
    activations: str = "auto"  # a family's activation type (e.g. int8: integer dot products), or "auto":
    # the first family, best first, whose rules the format meets; the head likewise
    outliers: int | str = 0  # input channels per linear layer kept in floating point (see qigen.outliers), or
    # "auto": per layer, by measurement on calibration text

    def __post_init__(self) -> None:
        kinds = {"bits": int, "head_bits": int, "symmetric": bool, "scale_dtype": str, "method": str,
                 "activations": str}
        if bad := next((n for n, kind in kinds.items() if not _exactly(getattr(self, n), kind)), None):
            raise SpecError(f"quant: {bad}={getattr(self, bad)!r} is not {kind_name(kinds[bad])}")
        if bad := next((n for n in ("group", "head_group") if not (getattr(self, n) is None
                                                                   or _exactly(getattr(self, n), int))), None):
            raise SpecError(f"quant: {bad}={getattr(self, bad)!r} is not a group size or none (one group per row)")
        if self.method not in METHODS:
            raise SpecError(f"quant: method '{self.method}' is unknown: choose {', '.join(METHODS)}")
        if not (self.outliers == "auto" or (_exactly(self.outliers, int) and 0 <= self.outliers <= MAX_OUTLIERS)):
            raise SpecError(f"quant: outliers={self.outliers!r}: choose auto or a count of input channels 0 to "
                            f"{MAX_OUTLIERS}")
        if self.activations not in activations():
            raise SpecError(f"activations '{self.activations}' are unknown: choose {', '.join(activations())}")
        self.kernel_spec(1, 1)  # names the rule the format breaks, e.g. for int8 activations
        self.kernel_spec(1, 1, head=True)

    @property
    def resolved_activations(self) -> str:
        """The activation type the linear layers multiply with, auto resolved."""
        return self.kernel_spec(1, 1).traits.activations

    def kernel_spec(self, rows: int, cols: int, head: bool = False, isa: str = "scalar") -> KernelSpec:
        """The decode (matrix-vector) spec of a layer; prefill takes its prefill_spec."""
        bits, group, symmetric = (self.head_bits, self.head_group, True) if head else (self.bits, self.group,
                                                                                      self.symmetric)
        return choose_family(self.activations, lambda name: KernelSpec(rows, cols, bits, group, symmetric,
                                                                       self.scale_dtype, isa=isa, family=name))


@dataclass(frozen=True)
class StepSpec:
    """One decode step of a LLaMA-style model as one kernel. For one token and every layer: RMSNorm, the stacked
    q/k/v product, RoPE, grouped-query attention over the KV cache, the o product and residual, RMSNorm, the stacked
    gate/up product, SwiGLU, the down product and residual; then the final norm and the head. Its matrix products
    are the library's matrix-vector kernels, one spec per (layer, role) in `linears` (the roles of qigen.arch.ROLES
    in order), run inside one parallel region."""
    config: LlamaConfig
    linears: tuple[tuple[KernelSpec, ...], ...]  # per layer, per role
    head: KernelSpec
    isa: str = "avx2"
    kv_cache: str = "fp32"

    def __post_init__(self) -> None:
        c = self.config
        if len(self.linears) != c.layers:
            raise SpecError(f"step: {len(self.linears)} layers of kernel specs for a model of {c.layers} layers")
        for i, layer in enumerate(self.linears):
            for role, spec in zip(ROLES, layer, strict=True):
                if (spec.rows, spec.cols) != role.shape(c) or spec.batch != 1:
                    raise SpecError(f"step: layer {i} {role.name} is {spec.rows}x{spec.cols} batch {spec.batch}, the "
                                    f"model's is {'x'.join(map(str, role.shape(c)))} batch 1")
        if (self.head.rows, self.head.cols) != HEAD.shape(c):
            raise SpecError(f"step: the head is {self.head.rows}x{self.head.cols}, the model's is "
                            f"{'x'.join(map(str, HEAD.shape(c)))}")
        if not self.head.symmetric:
            raise SpecError("step: the head's format is also the embedding table's, which is symmetric")
        if self.kv_cache not in KV_FORMATS:
            raise SpecError(f"step: KV cache '{self.kv_cache}' is unknown: choose {', '.join(KV_FORMATS)}")
        if unfit := KV_FORMATS[self.kv_cache].unfit(c.head_dim):
            raise SpecError(f"step: {unfit}")

    @classmethod
    def uniform(cls, config: LlamaConfig, quant: QuantSpec, isa: str = "avx2", kv_cache: str = "fp32") -> StepSpec:
        """Every layer's products in `quant`'s format, the head in its head format."""
        layer = tuple(quant.kernel_spec(*role.shape(config), isa=isa) for role in ROLES)
        return cls(config, (layer,) * config.layers, quant.kernel_spec(*HEAD.shape(config), head=True, isa=isa), isa,
                   kv_cache)

    def linear(self, layer: int, role: str) -> KernelSpec:
        return self.linears[layer][ROLE_NAMES.index(role)]

    def slots(self) -> tuple[dict[str, int], int]:
        """The step's weight pointers: where a layer's norms and each product's bundle of arrays start among the
        layer's, and how many a layer takes. Every layer alike, each role as wide as its widest bundle (an array a
        format lacks is a NULL pointer); the final norm and the head's bundle follow the last layer's."""
        slot, at = {"attn_norm": 0, "ffn_norm": 1}, 2
        for i, role in enumerate(ROLE_NAMES):
            slot[role] = at
            at += max(layer[i].traits.width(layer[i]) for layer in self.linears)
        return slot, at

    def kernel_specs(self) -> tuple[KernelSpec, ...]:
        """Every distinct matrix-vector spec the step calls, in the order it first calls them."""
        return tuple(dict.fromkeys([s for layer in self.linears for s in layer] + [self.head]))

    @property
    def name(self) -> str:
        c = self.config
        formats = {f"{s.format}_{s.scale_dtype}" for layer in self.linears for s in layer}
        body = formats.pop() if len(formats) == 1 else \
            "mixed" + hashlib.sha256(repr(self.linears).encode()).hexdigest()[:10]  # a digest of every layer's formats
        return (f"step_l{c.layers}_d{c.hidden}_h{c.heads}kv{c.kv_heads}x{c.head_dim}_f{c.intermediate}"
                f"_v{c.vocab_size}_{body}_head_{self.head.format}_{self.isa}"
                + ("" if self.kv_cache == "fp32" else f"_kv{self.kv_cache}"))
