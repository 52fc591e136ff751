"""Predict a kernel's time from the bytes it moves and the instructions it issues.

    time = max(bytes / read bandwidth, vector cycles / (clock · threads)) + call overhead

and, for matrix-matrix kernels on a host whose compute peaks were measured (`qigen info --measure`), the compute
term at least the operations over the peak of the family's arithmetic (fp32 multiply-adds or int8 dot products)
at that thread count.

Bytes are the packed weights, scales, offsets, activations and outputs; a decode step also reads its KV cache
(kv_bytes), which at long contexts outweighs the weights. Cycles come from the
instructions the templates issue per chunk of codes, against an issue rate per ISA, or against
the FMA latency when too few independent partial sums are in flight: each family's record
counts its own (qigen.families). The bandwidth is the host's measured one (Host.bandwidth).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perfmodel.host import Host
from qigen.arch import LlamaConfig
from qigen.kvcache import KvFormat
from qigen.layout import layout
from qigen.spec import KernelSpec, Schedule

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


def _between(points: list[tuple[int, float]], threads: int) -> float:
    """A measurement at `threads` from (threads, value) points: linear between them, flat beyond."""
    points = sorted(points)
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if t0 <= threads <= t1:
            return b0 + (b1 - b0) * (threads - t0) / (t1 - t0)
    return points[0][1] if threads < points[0][0] else points[-1][1]


def bandwidth(host: Host, threads: int) -> float:
    """Read bandwidth for `threads` threads: the host's measured points, linear between them, flat beyond."""
    if not host.bandwidth:
        return min(ASSUMED_BANDWIDTH * min(threads, host.cores), ASSUMED_BANDWIDTH_MAX)
    return _between(list(host.bandwidth), threads)


def peak(host: Host, threads: int, activations: str) -> float | None:
    """Operations/s of the measured peak ("fp32" or "int8") at `threads`; None when never measured."""
    if not host.peaks:
        return None
    return _between([(t, fp32 if activations == "fp32" else int8) for t, fp32, int8 in host.peaks], threads)


def weight_bytes(spec: KernelSpec, schedule: Schedule) -> int:
    """Bytes of the packed matrix: every array of its family's bundle that the format has (outlier channels are
    data some matrices have: not counted)."""
    return sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape))
               for a in spec.traits.bundle(spec, schedule) if a.present and not a.optional)


def predict(spec: KernelSpec, schedule: Schedule, host: Host, threads: int | None = None) -> Prediction:
    threads = threads or schedule.threads
    lay = layout(spec, schedule)
    n = spec.batch
    nbytes = weight_bytes(spec, schedule) + 4 * n * (spec.cols + spec.rows)
    bw = bandwidth(host, threads)
    busy = -(-lay.tiles // threads) / lay.tiles  # share of the tiles on the busiest thread
    compute = spec.traits.cycles(spec, schedule, host, n) * busy / (host.freq_hz or ASSUMED_CLOCK)
    if spec.kind == "gemm" and (top := peak(host, threads, spec.traits.activations)):
        compute = max(compute, 2.0 * spec.rows * spec.cols * n / top)
    memory = nbytes / bw
    return Prediction(max(memory, compute) + CALL_OVERHEAD, memory, compute, nbytes, bw, bool(host.bandwidth))


def kv_bytes(config: LlamaConfig, kv: KvFormat, first: int, tokens: int) -> float:
    """Bytes of the key and value caches in format kv that a decoded token reads (every layer and key/value head), on
    average over `tokens` tokens decoded at positions first.. (the token at pos attends to positions 0..pos)."""
    c = config
    per_head = np.mean([kv.bytes_read(pos + 1, c.head_dim) for pos in range(first, first + tokens)])
    return float(c.layers * c.kv_heads * per_head)
