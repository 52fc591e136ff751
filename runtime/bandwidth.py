"""Measure the host's memory read bandwidth, keep it, and hand it (and the compute peaks runtime.peak keeps) to the
cost model on the host's description."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from importlib import resources

import cffi
import numpy as np

from perfmodel.host import Host, detect
from runtime.compiler import atomic_write, cache_dir, compile

PROBE_BYTES = 512 << 20  # read at least, and 8x the L3 up to PROBE_MOST: where sysfs reports a VM host's 480 MiB L3,
PROBE_MOST = 1 << 30  # 8x was 3.75 GiB a probe, written then read 5 times at each thread count on every bench run


def _path(host: Host):
    return cache_dir() / f"bandwidth-{host.name}-{host.cores}c.json"


def probe(threads: list[int], reps: int = 5) -> dict[int, float]:
    """Bytes/s read from DRAM now with each thread count, the best of `reps` passes; nothing is kept."""
    host = detect()
    source = resources.files("templates").joinpath("bandwidth.c").read_text()
    built = compile(source, host)
    ffi = cffi.FFI()
    ffi.cdef("double qigen_read_bandwidth(const float *a, size_t n, int threads, int reps);")
    lib = ffi.dlopen(str(built.path))
    a = np.ones(min(max(PROBE_BYTES, 8 * host.l3), PROBE_MOST) // 4, dtype=np.float32)
    ptr = ffi.cast("float *", ffi.from_buffer(a))
    return {t: lib.qigen_read_bandwidth(ptr, a.size, t, reps) for t in threads}


def measure(threads: list[int] | None = None, reps: int = 5) -> dict[int, float]:
    """probe() with each thread count (default: 1 and all cores), kept for the cost model and later runs."""
    host = detect()
    result = probe(threads or sorted({1, host.cores}), reps)
    atomic_write(_path(host), json.dumps({"read_bytes_per_s": result, "measured_at": time.time()}, indent=1).encode())
    return result


def stored(host: Host) -> dict[int, float] | None:
    """The last measurement for this host, or None if `qigen info --measure` has not run."""
    try:
        data = json.loads(_path(host).read_text())["read_bytes_per_s"]
        return {int(t): float(v) for t, v in data.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measured(host: Host, bandwidth: dict[int, float] | None = None) -> Host:
    """The host carrying `bandwidth` (default: its stored measurement, if any) and its stored compute peaks, if
    any, for the cost model."""
    from runtime import peak

    bandwidth = stored(host) if bandwidth is None else bandwidth
    peaks = peak.stored(host) or {}
    return replace(host, bandwidth=tuple(sorted((bandwidth or {}).items())),
                   peaks=tuple((t, p["fp32"], p["int8"]) for t, p in sorted(peaks.items())))
