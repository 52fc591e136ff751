"""The pipeline end to end: detect → spec → search → render → compile → (tune) → write a kernel set.

A kernel set is a directory with the rendered `kernels.c`, the compiled `kernels.so` and
`manifest.json`, which records for every kernel its spec, schedule, predicted and measured time,
and for the library its ISA, compiler, flags and hashes. `load()` opens it again.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from perfmodel import bandwidth
from perfmodel.host import Host, from_target
from perfmodel.search import Candidate, bits_per_weight, choose_format, error_sample, rank
from qigen.quant import relative_error
from qigen.render import kernel_name, prototype, render
from qigen.spec import ISA_FEATURES, ISAS, KernelSpec, Schedule, SpecError, StepSpec
from runtime.compiler import atomic_write, build, compile, stage
from runtime.loader import Kernel, LoadError, Step, load as load_library
from runtime.timing import time_kernel

FREE = "free"  # bits or group left to the accuracy search
TUNE_TOP = 3


@dataclass(frozen=True)
class Request:
    shapes: tuple[tuple[int, int], ...]  # (rows, cols) per kernel
    bits: int | str = FREE
    group: int | None | str = FREE  # None: one group per row
    symmetric: bool = False
    scale_dtype: str = "fp16"
    batch: int = 1
    target: str = "native"
    isa: str = "auto"
    threads: int | None = None  # default: the target's cores
    tune: bool = False
    max_error: float | None = None
    weights: dict[tuple[int, int], np.ndarray] | None = None  # real weights per shape, for the error


def best_isa(host: Host) -> str:
    return next(isa for isa in ISAS if host.has(*ISA_FEATURES[isa]))


def _isa(request: Request, host: Host) -> str:
    if request.isa == "auto":
        return best_isa(host)
    if request.isa not in ISAS:
        raise SpecError(f"isa '{request.isa}' is unknown: choose auto, {', '.join(ISAS)}")
    missing = [f for f in ISA_FEATURES[request.isa] if not host.has(f)]
    if missing:
        raise SpecError(f"isa {request.isa} needs {', '.join(missing)}, which target {host.name} lacks")
    return request.isa


def _spec(request: Request, rows: int, cols: int, isa: str, host: Host, measured) -> tuple[KernelSpec, float]:
    """The spec for one shape and the relative reconstruction error its format achieves."""
    weights = (request.weights or {}).get((rows, cols))
    base = KernelSpec(rows, cols, bits=4 if request.bits == FREE else request.bits,
                      group=128 if request.group == FREE else request.group, symmetric=request.symmetric,
                      scale_dtype=request.scale_dtype, batch=request.batch, isa=isa)
    if request.max_error is not None:
        return choose_format(base, host, measured, request.max_error, weights,
                             None if request.bits == FREE else request.bits,
                             "any" if request.group == FREE else request.group)
    sample = error_sample(base, weights)
    return base, relative_error(sample, replace(base, rows=sample.shape[0]))


def build_library(pairs: list[tuple[KernelSpec, Schedule]], host: Host,
                  steps: tuple[StepSpec, ...] = ()) -> tuple[dict[str, Kernel | Step], str]:
    """Render, compile (cached) and load kernels (and decode steps on them) as one library: by name, and the
    source hash."""
    source = render(pairs, host.name, steps)
    built = compile(source.text, host)
    return load_library(built.path, source.cdef, pairs, built.requires, steps), source.hash


def _tune(specs: list[KernelSpec], ranked: list[list[Candidate]], host: Host, threads: int,
          progress: Callable[[str], None]) -> tuple[list[Schedule], list[float]]:
    """Compile the top candidates of every spec in one library, time each, keep the fastest."""
    pairs = [(s, c.schedule) for s, cands in zip(specs, ranked) for c in cands[:TUNE_TOP]]
    kernels, _ = build_library(pairs, host)
    chosen, measured = [], []
    for spec, cands in zip(specs, ranked):
        times = {}
        for c in cands[:TUNE_TOP]:
            times[c.schedule] = statistics.median(time_kernel(kernels[kernel_name(spec, c.schedule)], threads))
            progress(f"  tuned {kernel_name(spec, c.schedule)}: predicted {c.prediction.seconds * 1e3:.3f} ms, "
                     f"measured {times[c.schedule] * 1e3:.3f} ms")
        best = min(times, key=times.get)
        chosen.append(best)
        measured.append(times[best])
    return chosen, measured


def generate(request: Request, out: Path, progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Generate, compile and write a kernel set to `out`; returns the manifest."""
    if not request.shapes:
        raise SpecError("no shape given: pass at least one --shape ROWSxCOLS")
    host = from_target(request.target)
    if request.tune and not host.native:
        raise SpecError(f"--tune times kernels on this machine, so it needs --target native, not {request.target}")
    measured_bw = bandwidth.stored(host) if host.native else None
    isa = _isa(request, host)
    threads = host.cores if request.threads is None else request.threads
    if threads < 1:
        raise SpecError(f"threads={threads}: at least 1")
    specs, errors, ranked = [], [], []
    for rows, cols in dict.fromkeys(request.shapes):
        spec, err = _spec(request, rows, cols, isa, host, measured_bw)
        specs.append(spec)
        errors.append(err)
        ranked.append(rank(spec, host, measured_bw, threads))
        progress(f"{spec.name}: error {err:.4f}, {len(ranked[-1])} schedules, best predicted "
                 f"{ranked[-1][0].schedule.tag()} {ranked[-1][0].prediction.seconds * 1e3:.3f} ms")
    if request.tune:
        schedules, measured = _tune(specs, ranked, host, threads, progress)
    else:
        schedules, measured = [c[0].schedule for c in ranked], [None] * len(specs)
    pairs = list(zip(specs, schedules))
    source = render(pairs, host.name)
    built = compile(source.text, host)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "kernels.c", source.text.encode())
    atomic_write(out / "kernels.so", built.path.read_bytes())  # a process may have the old one open
    kernels = []
    for (spec, schedule), err, cands, t in zip(pairs, errors, ranked, measured):
        prediction = next(c.prediction for c in cands if c.schedule == schedule)
        kernels.append({"name": kernel_name(spec, schedule), "spec": spec.to_dict(), "schedule": schedule.to_dict(),
                        "predicted": prediction.to_dict(), "measured_s": t, "relative_error": err,
                        "bits_per_weight": bits_per_weight(spec)})
    manifest = {
        "target": host.to_dict(), "isa": isa, "threads": threads,
        "measured_bandwidth": measured_bw and {str(k): v for k, v in measured_bw.items()},
        "library": {"file": "kernels.so", "source": "kernels.c", "source_sha256": source.hash,
                    "sha256": hashlib.sha256((out / "kernels.so").read_bytes()).hexdigest(),
                    "compiler": built.compiler.version, "cc": built.compiler.path, "flags": list(built.flags),
                    "requires": sorted(built.requires)},
        "kernels": kernels,
    }
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


class KernelSet(dict):
    """Kernels of one generated directory by name, with `find(rows, cols)` by shape."""

    def __init__(self, kernels: dict[str, Kernel], manifest: dict):
        super().__init__(kernels)
        self.manifest = manifest

    def find(self, rows: int, cols: int, batch: int | None = None) -> Kernel:
        for k in self.values():
            if (k.spec.rows, k.spec.cols) == (rows, cols) and batch in (None, k.spec.batch):
                return k
        raise KeyError(f"no kernel for {rows}x{cols}" + (f" batch {batch}" if batch else "")
                       + f"; have {', '.join(self)}")


def load(path: str | Path) -> KernelSet:
    """Open a kernel set written by generate(): refused if this CPU lacks the features it was built for,
    rebuilt from its source if the library file does not match its checksum."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        lib = manifest["library"]
        pairs = [(KernelSpec(**k["spec"]), Schedule(**k["schedule"])) for k in manifest["kernels"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoadError(f"{path} is not a qigen kernel set (manifest.json missing or invalid: {e})") from e
    so = path / lib["file"]
    if so.is_file() and hashlib.sha256(so.read_bytes()).hexdigest() == lib["sha256"]:
        so = stage(so)
    else:
        source = (path / lib["source"]).read_text()
        if hashlib.sha256(source.encode()).hexdigest() != lib["source_sha256"]:
            raise LoadError(f"{path / lib['source']} does not match its manifest: regenerate the kernel set")
        so = build(source, tuple(lib["flags"])).path  # the library was damaged: rebuild it from its source
    cdef = "\n".join(prototype(kernel_name(s, sch)) for s, sch in pairs)
    return KernelSet(load_library(so, cdef, pairs, frozenset(lib["requires"])), manifest)
