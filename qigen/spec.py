"""What to compute (KernelSpec) and how to tile it (Schedule).

A kernel computes y = W·x (+ bias) for a weight matrix W of `rows` × `cols` stored as
`bits`-bit codes with one scale (and, when asymmetric, one float offset) per group of `group`
consecutive inputs of a row: w = scale·code + offset.  An integer zero point z is the offset
-scale·z, and GGUF's Q4_1 "minimum" is the offset itself, so one format holds both.
Symmetric kernels store no offset: w = scale·(code - 2^(bits-1)).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, 256, None)  # None: one group per row
ISAS = ("avx512", "avx2", "scalar")  # best first
ISA_FEATURES = {"avx512": ("avx512f", "avx512bw", "avx512vl", "f16c"), "avx2": ("avx2", "fma", "f16c"), "scalar": ()}
SCALE_DTYPES = ("fp16", "fp32")
FAMILIES = ("wq_f32", "wq_a8")  # weight-quantized with fp32 activations; or with int8 activations (integer dots)
A8_BITS = (2, 4, 8)  # int8 activations take codes that sit whole in bytes (after one shift and AND below 8 bits)
A8_BLOCK = 32  # inputs per int8 activation scale (llama.cpp's Q8 block)
MAX_BATCH = 512
VECTOR_WIDTH = {"avx512": 16, "avx2": 8, "scalar": 1}  # fp32 lanes
VECTOR_REGISTERS = {"avx512": 32, "avx2": 16, "scalar": 16}


class SpecError(ValueError):
    """A spec or schedule that qigen cannot generate; the message names the broken rule."""


@dataclass(frozen=True)
class KernelSpec:
    rows: int  # M: outputs
    cols: int  # K: inputs
    bits: int
    group: int | None = 128
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
        if self.family not in FAMILIES:
            raise SpecError(f"kernel family '{self.family}' is unknown: choose one of {', '.join(FAMILIES)}")
        if self.family == "wq_a8":
            if self.batch != 1:
                raise SpecError("int8 activations are a matrix-vector (batch 1) kernel: prefill keeps fp32 activations")
            if self.bits not in A8_BITS:
                raise SpecError(f"int8 activations need bits {' or '.join(map(str, A8_BITS))}, not {self.bits}")
            if self.group is None or self.group % A8_BLOCK:
                raise SpecError(f"int8 activations need a group that is a multiple of {A8_BLOCK}, not "
                                f"{self.group or 'a whole row'}")

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
    def vector_width(self) -> int:
        return VECTOR_WIDTH[self.isa]

    @property
    def name(self) -> str:
        g = f"g{self.group}" if self.group else "grow"
        mode = "sym" if self.symmetric else "asym"
        a8 = "_a8" if self.family == "wq_a8" else ""
        return f"{self.kind}{a8}_q{self.bits}_{g}_{mode}_{self.scale_dtype}_{self.isa}_m{self.rows}k{self.cols}"

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


def check(spec: KernelSpec, schedule: Schedule) -> None:
    """Raise SpecError naming the rule that spec + schedule break."""
    from qigen.layout import layout  # the packed layout decides which k-blocks are legal

    lay = layout(spec, schedule)
    regs = VECTOR_REGISTERS[spec.isa]
    if schedule.row_vectors < 1 or schedule.accumulators < 1 or schedule.col_tile < 1 or schedule.threads < 1:
        raise SpecError(f"schedule {schedule.tag()}: tile sizes and threads must be at least 1")
    if spec.family == "wq_a8":
        if schedule.col_tile != 1 or schedule.k_block != 0 or schedule.accumulators != 1:
            raise SpecError("an int8-activation schedule has col_tile 1, k_block 0 and accumulators 1 (one int16 sum "
                            "per row vector)")
        subs = 8 // spec.bits
        if 3 * schedule.row_vectors + subs + 3 > regs:
            raise SpecError(f"schedule {schedule.tag()}: {schedule.row_vectors}x3 sums, {subs} x broadcasts, a mask "
                            f"and two temporaries need more than the {regs} vector registers of {spec.isa}")
    elif spec.kind == "gemv":
        if schedule.col_tile != 1 or schedule.k_block != 0:
            raise SpecError("a matrix-vector schedule has col_tile 1 and k_block 0")
        masks = len({e.mask for e in lay.extracts})
        words = lay.words + bool(lay.derives)  # live per row vector while its chunk is read
        r, a = schedule.row_vectors, schedule.accumulators
        if r * (a + words) + masks + 2 > regs:
            raise SpecError(f"schedule {schedule.tag()}: {r}x{a} partial sums, {r}x{words} words, {masks} masks, "
                            f"a view and x need more than the {regs} vector registers of {spec.isa}")
    else:
        if schedule.accumulators != 1:
            raise SpecError("a matrix-matrix schedule accumulates in its col_tile × row_vectors registers: accumulators is 1")
        if schedule.k_block < 1 or schedule.k_block % lay.chunk:
            raise SpecError(f"k_block={schedule.k_block} is not a positive multiple of the {lay.chunk}-code packing chunk")
        if schedule.row_vectors * (schedule.col_tile + 1) + 2 > regs:
            raise SpecError(f"schedule {schedule.tag()}: {schedule.row_vectors}x{schedule.col_tile} accumulators, "
                            f"the weights, x and a spare need more than the {regs} vector registers of {spec.isa}")


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
    activations: str = "auto"  # decode's: "int8" quantizes x per block of 32 for integer dot products; "auto" takes
    # int8 where the format allows it (bits 2, 4 and 8, groups of multiples of 32), else "fp32"; the head likewise

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise SpecError(f"activations '{self.activations}' are unknown: choose {', '.join(ACTIVATIONS)}")
        if self.activations == "int8":
            KernelSpec(1, 1, self.bits, self.group, family="wq_a8")  # names the rule int8 activations break

    @property
    def int8_activations(self) -> bool:
        """Whether the linear layers decode with int8 activations."""
        return self._int8(self.bits, self.group)

    def _int8(self, bits: int, group: int | None) -> bool:
        allowed = bits in A8_BITS and group is not None and group % A8_BLOCK == 0
        return self.activations == "int8" or (self.activations == "auto" and allowed)

    def kernel_spec(self, rows: int, cols: int, head: bool = False, isa: str = "scalar") -> KernelSpec:
        """The decode (matrix-vector) spec of a layer; prefill takes it with fp32 activations (prefill_spec)."""
        bits, group, symmetric = (self.head_bits, self.head_group, True) if head else (self.bits, self.group,
                                                                                      self.symmetric)
        family = "wq_a8" if self._int8(bits, group) else "wq_f32"
        return KernelSpec(rows, cols, bits, group, symmetric, self.scale_dtype, isa=isa, family=family)


ACTIVATIONS = ("auto", "fp32", "int8")
STEP_LINEARS = ("qkv", "o", "gate_up", "down")  # a layer's matrix products, in the order a step runs them


@dataclass(frozen=True)
class StepSpec:
    """One decode step of a LLaMA-style model as one kernel. For one token and every layer: RMSNorm, the stacked
    q/k/v product, RoPE, grouped-query attention over the KV cache, the o product and residual, RMSNorm, the stacked
    gate/up product, SwiGLU, the down product and residual; then the final norm and the head. Its matrix products
    are the library's matrix-vector kernels for `linears()`, run inside one parallel region."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    quant: QuantSpec
    isa: str = "avx2"

    def __post_init__(self) -> None:
        sizes = ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab")
        if bad := [n for n in sizes if getattr(self, n) < 1]:
            raise SpecError(f"step: {', '.join(f'{n}={getattr(self, n)}' for n in bad)} must be at least 1")
        if self.heads % self.kv_heads:
            raise SpecError(f"step: {self.heads} heads are not a multiple of {self.kv_heads} key/value heads")
        if self.head_dim % 2:
            raise SpecError(f"step: head_dim={self.head_dim} is odd, RoPE rotates pairs")
        if not self.rms_eps > 0:
            raise SpecError(f"step: rms_eps={self.rms_eps} must be positive")

    def linears(self) -> dict[str, KernelSpec]:
        """The matrix-vector kernel spec of each layer product, and of the head."""
        q, hd, d, f = self.quant, self.head_dim, self.hidden, self.intermediate
        shapes = {"qkv": ((self.heads + 2 * self.kv_heads) * hd, d), "o": (d, self.heads * hd),
                  "gate_up": (2 * f, d), "down": (d, f)}
        return {n: q.kernel_spec(*shape, isa=self.isa) for n, shape in shapes.items()} | {
            "head": q.kernel_spec(self.vocab, d, head=True, isa=self.isa)}

    @property
    def name(self) -> str:
        q = self.quant
        body, head = self.linears()["qkv"], self.linears()["head"]
        fmt = lambda k: (f"q{k.bits}{f'g{k.group}' if k.group else 'grow'}{'sym' if k.symmetric else 'asym'}"
                         f"{'a8' if k.family == 'wq_a8' else ''}")
        return (f"step_l{self.layers}_d{self.hidden}_h{self.heads}kv{self.kv_heads}x{self.head_dim}_f{self.intermediate}"
                f"_v{self.vocab}_{fmt(body)}_{q.scale_dtype}_head_{fmt(head)}_{self.isa}")
