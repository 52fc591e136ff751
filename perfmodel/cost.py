"""Predict a kernel's time from the bytes it moves and the instructions it issues.

    time = max(bytes / read bandwidth, vector cycles / (clock · threads)) + call overhead

Bytes are the packed weights, scales, offsets, activations and outputs. Cycles come from the
instructions the templates issue per chunk of codes, against an issue rate per ISA, or against
the FMA latency when too few independent partial sums are in flight. Matrix-matrix kernels add
the register micro-kernel's FMAs and pay when their buffers overflow L1 or L2.
"""
from __future__ import annotations

from dataclasses import dataclass

from perfmodel.host import Host
from qigen.layout import layout
from qigen.spec import A8_BLOCK, KernelSpec, Schedule

ISSUE = {"avx512": 2.0, "avx2": 3.0, "scalar": 3.0}  # vector instructions per cycle (3: Zen 3 measured)
FMA_PORTS = 2
FMA_LATENCY = 4
LOAD_PORTS = 3
GEMM_CHAINS = 12
GEMM_STALL = 2.5
ASSUMED_BANDWIDTH = 10e9  # bytes/s per core when the host's bandwidth was never measured ...
ASSUMED_BANDWIDTH_MAX = 100e9  # ... up to what a server's memory channels deliver
ASSUMED_CLOCK = 3e9
CALL_OVERHEAD = 15e-6  # Python wrapper, thread fork/join, scratch buffers


@dataclass(frozen=True)
class Prediction:
    seconds: float
    memory_s: float
    compute_s: float
    bytes: int
    bandwidth: float  # bytes/s assumed for the thread count
    measured_bandwidth: bool

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "memory_s": self.memory_s, "compute_s": self.compute_s,
                "bytes": self.bytes, "bandwidth": self.bandwidth, "measured_bandwidth": self.measured_bandwidth}


def bandwidth(host: Host, threads: int, measured: dict[int, float] | None) -> float:
    """Read bandwidth for `threads` threads: measured points, linear between them, flat beyond."""
    if not measured:
        return min(ASSUMED_BANDWIDTH * min(threads, host.cores), ASSUMED_BANDWIDTH_MAX)
    points = sorted(measured.items())
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if t0 <= threads <= t1:
            return b0 + (b1 - b0) * (threads - t0) / (t1 - t0)
    return points[0][1] if threads < points[0][0] else points[-1][1]


def weight_bytes(spec: KernelSpec, schedule: Schedule) -> int:
    lay = layout(spec, schedule)
    per_group = (2 if spec.scale_dtype == "fp16" else 4) * (1 if spec.symmetric else 2)
    return lay.packed_words * 4 + lay.tiles * lay.tile_rows * lay.groups * per_group


def _chunk_cycles_gemv(spec: KernelSpec, schedule: Schedule) -> float:
    """Cycles for one chunk of codes across one tile's row vectors."""
    lay = layout(spec, schedule)
    r, a = schedule.row_vectors, schedule.accumulators
    if spec.family == "wq_a8" and spec.bits == 8:  # load, xor, abs, sign, multiply-adds of bytes and of int16, add
        return (7 * r + 1) / ISSUE[spec.isa]
    if spec.family == "wq_a8":  # per shift: (shift,) and, multiply-add of bytes, int16 add; one x broadcast each
        subs = 8 // spec.bits
        return (r * (1 + 4 * subs - 1) + subs) / ISSUE[spec.isa]
    per_row = lay.words + 3 * len(lay.derives) + sum(v.base > 0 for v in lay.views) + 3 * lay.chunk
    issue = (r * per_row + lay.chunk) / ISSUE[spec.isa]  # + one x broadcast per code
    latency = FMA_LATENCY * lay.chunk / a if r * a < FMA_PORTS * FMA_LATENCY else 0.0
    return max(issue, latency)


def _gemm_cycles(spec: KernelSpec, schedule: Schedule, host: Host, n: int) -> float:
    lay = layout(spec, schedule)
    r, nr, kb = schedule.row_vectors, schedule.col_tile, schedule.k_block
    codes = lay.chunks * lay.chunk
    dequant = lay.tiles * r * codes * 4 / ISSUE[spec.isa]  # and, convert, fma, store per code
    # loads and broadcasts go to the load ports; fewer than GEMM_CHAINS accumulators leave the
    # FMA units waiting (measured on Zen 3: 8 run at a third of the speed of 12)
    per_k = max(r * nr / FMA_PORTS, (r + nr) / LOAD_PORTS) * (GEMM_STALL if r * nr < GEMM_CHAINS else 1.0)
    micro = lay.tiles * codes * per_k * n / nr
    penalty = 1.0
    if 4 * kb * (lay.tile_rows + nr) > host.l1d:  # weight block + x panel spill out of L1
        penalty += 0.25
    if 4 * kb * n > host.l2:  # x block for all columns spills out of L2
        penalty += 0.5
    return (dequant + micro) * penalty


def predict(spec: KernelSpec, schedule: Schedule, host: Host, measured: dict[int, float] | None,
            threads: int | None = None) -> Prediction:
    threads = threads or schedule.threads
    lay = layout(spec, schedule)
    n = spec.batch
    nbytes = weight_bytes(spec, schedule) + 4 * n * (spec.cols + spec.rows)
    bw = bandwidth(host, threads, measured)
    busy = -(-lay.tiles // threads) / lay.tiles  # share of the tiles on the busiest thread
    if spec.kind == "gemv":
        group_end = schedule.row_vectors * (schedule.accumulators + 5) / ISSUE[spec.isa]  # sum, scale, offset
        if spec.family == "wq_a8":  # per block of A8_BLOCK inputs: int16 pairs to int32, convert, scale
            group_end += (3 * schedule.row_vectors + 1) / ISSUE[spec.isa] * spec.group_size / A8_BLOCK
        cycles = lay.tiles * (lay.chunks * _chunk_cycles_gemv(spec, schedule) + lay.groups * group_end) * n
    else:
        cycles = _gemm_cycles(spec, schedule, host, n)
    compute = cycles * busy / (host.freq_hz or ASSUMED_CLOCK)
    memory = nbytes / bw
    return Prediction(max(memory, compute) + CALL_OVERHEAD, memory, compute, nbytes, bw, measured is not None)
