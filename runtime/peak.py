"""Measure the host's compute peaks, fp32 multiply-adds and int8 dot products (as the int8-activation kernels issue
them), per core and on all cores; keep them beside the bandwidth for `qigen bench kernels` to set prefill against."""
from __future__ import annotations

import json
import time
from importlib import resources

import cffi
import jinja2

from perfmodel.host import Host, detect
from qigen.spec import ISAS, best_isa
from runtime.compiler import atomic_write, cache_dir, compile

ITERS = 1 << 20  # rounds per run: a few ms on a core (16 chains of 2 instructions a cycle at 4 GHz: 2 ms)


def _path(host: Host):
    return cache_dir() / f"peak-{host.name}-{host.cores}c.json"


def source(isa: str) -> str:
    """The probe for `isa`: as many independent chains as leave its registers a few spare."""
    isa_ = ISAS[isa]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resources.files("templates"))),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("peak.c.j2").render(isa=isa, header=isa_.header, vnni=isa_.vnni,
                                                 chains=min(16, isa_.registers - 4))


def probe(threads: list[int], reps: int = 3) -> dict[int, dict[str, float]]:
    """Operations/s (a multiply-add is two) now, fp32 and int8, with each thread count, for this host's best ISA;
    the best of `reps` runs; nothing is kept."""
    host = detect()
    lib_path = compile(source(best_isa(host)), host).path
    ffi = cffi.FFI()
    ffi.cdef("double qigen_peak_fp32(int threads, long iters, int reps);"
             "double qigen_peak_int8(int threads, long iters, int reps);")
    lib = ffi.dlopen(str(lib_path))
    return {t: {"fp32": lib.qigen_peak_fp32(t, ITERS, reps), "int8": lib.qigen_peak_int8(t, ITERS, reps)}
            for t in threads}


def measure(threads: list[int] | None = None) -> dict[int, dict[str, float]]:
    """probe() with each thread count (default: 1 and all cores), kept for later runs."""
    host = detect()
    result = probe(threads or sorted({1, host.cores}))
    atomic_write(_path(host), json.dumps({"ops_per_s": result, "isa": best_isa(host), "measured_at": time.time()},
                                         indent=1).encode())
    return result


def stored(host: Host) -> dict[int, dict[str, float]] | None:
    """The last measurement for this host, or None if `qigen info --measure` has not run."""
    try:
        data = json.loads(_path(host).read_text())["ops_per_s"]
        return {int(t): {k: float(v[k]) for k in ("fp32", "int8")} for t, v in data.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
