"""The pipeline end to end: detect → spec → search → render → compile → (tune) → write a kernel set.

A kernel set is a directory with the rendered `kernels.c`, the compiled `kernels.so` and
`manifest.json`, which records for every kernel its spec, schedule, predicted and measured time,
and for the library its ISA, compiler, flags and hashes. `load()` opens it again.
"""
from __future__ import annotations

import enum
import hashlib
import json
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from perfmodel.host import Host, from_target
from perfmodel.search import Candidate, bits_per_weight, choose_format, error_sample, rank
from qigen.layout import layout
from qigen.quant import relative_error
from qigen.render import Source, render
from qigen.spec import (DEFAULT_GROUP, ISAS, KernelSpec, Schedule, SpecError, StepSpec, best_isa, choose_family,
                        kernel_name)
from runtime import bandwidth
from runtime.compiler import Built, atomic_write, build as build_source, compile, stage
from runtime.loader import Kernel, LoadError, Step, load as load_library
from runtime.timing import time_kernel

class Search(enum.Enum):
    FREE = "free"  # bits or group left to the accuracy search (not a string: argparse parses string defaults)


FREE = Search.FREE
TUNE_TOP = 3


@dataclass(frozen=True)
class Request:
    shapes: tuple[tuple[int, int], ...]  # (rows, cols) per kernel
    bits: int | Search = FREE
    group: int | None | Search = FREE  # None: one group per row
    symmetric: bool = False
    scale_dtype: str = "fp16"
    batch: int = 1
    target: str = "native"
    isa: str = "auto"
    activations: str = "fp32"  # a family's activation type, or auto (the first the format allows)
    threads: int | None = None  # default: the target's cores
    tune: bool = False
    max_error: float | None = None
    weights: dict[tuple[int, int], np.ndarray] | None = None  # real weights per shape, for the error


def _isa(request: Request, host: Host) -> str:
    if request.isa == "auto":
        return best_isa(host)
    if request.isa not in ISAS:
        raise SpecError(f"isa '{request.isa}' is unknown: choose auto, {', '.join(ISAS)}")
    missing = [f for f in ISAS[request.isa].features if not host.has(f)]
    if missing:
        raise SpecError(f"isa {request.isa} needs {', '.join(missing)}, which target {host.name} lacks")
    return request.isa


def _spec(request: Request, rows: int, cols: int, isa: str, host: Host) -> tuple[KernelSpec, float]:
    """The spec for one shape and the relative reconstruction error its format achieves."""
    weights = (request.weights or {}).get((rows, cols))
    base = KernelSpec(rows, cols, bits=4 if request.bits == FREE else request.bits,
                      group=DEFAULT_GROUP if request.group == FREE else request.group, symmetric=request.symmetric,
                      scale_dtype=request.scale_dtype, batch=request.batch, isa=isa)
    if request.max_error is not None:
        return choose_format(base, host, request.max_error, weights,
                             None if request.bits == FREE else request.bits,
                             "any" if request.group == FREE else request.group, request.activations)
    base = choose_family(request.activations, lambda name: replace(base, family=name))
    sample = error_sample(base, weights)
    return base, relative_error(sample, replace(base, rows=sample.shape[0]))


@dataclass(frozen=True)
class Library:
    """Kernels (and decode steps on them) compiled into one library and loaded."""
    schedules: dict[KernelSpec, Schedule]  # the chosen schedule of every spec
    kernels: dict[KernelSpec, Kernel]  # and its kernel, loaded (empty when built for another CPU)
    steps: dict[StepSpec, Step]
    ranked: dict[KernelSpec, list[Candidate]]  # every legal schedule of a spec, best predicted first
    measured: dict[KernelSpec, float]  # with tune: the chosen kernel's median seconds per call
    source: Source
    built: Built


def _compile(pairs: list[tuple[KernelSpec, Schedule]], host: Host, steps: tuple[StepSpec, ...] = (),
             load: bool = True) -> tuple[dict[str, Kernel | Step], Source, Built]:
    """Render, compile (cached) and load: by name. Specs that differ only in their batch (design point) may pick
    the same kernel: it is rendered once."""
    pairs = list({kernel_name(s, sch): (s, sch) for s, sch in pairs}.values())
    source = render(pairs, host.name, steps)
    built = compile(source.text, host)
    return (load_library(built.path, source.cdef, pairs, steps) if load else {}), source, built


def build(specs: Iterable[KernelSpec], host: Host, threads: int | None = None, steps: tuple[StepSpec, ...] = (),
          tune: bool = False, repeats: int = 5, load: bool = True, share: dict[KernelSpec, KernelSpec] | None = None,
          progress: Callable[[str], None] = lambda s: None) -> Library:
    """The pipeline from specs to loaded kernels: rank every spec's schedules for `threads` (default: the host's
    cores), with `tune` compile the TUNE_TOP best predicted of each into one library and keep the fastest measured,
    then render, compile and (unless told not to: a library for another CPU) load the chosen ones, and decode steps
    on them (their products are added to specs). share: spec → another whose packing it should read where one of
    its schedules does (one copy of the weights then serves both); it takes the best such schedule, untuned."""
    threads = threads or host.cores
    specs = list(dict.fromkeys([*specs, *(s for step in steps for s in step.kernel_specs())]))
    ranked = {s: rank(s, host, threads) for s in specs}
    chosen = {s: cands[0].schedule for s, cands in ranked.items()}
    measured = {}
    if tune:
        timing, _, _ = _compile([(s, c.schedule) for s, cands in ranked.items() for c in cands[:TUNE_TOP]], host)
        for s, cands in ranked.items():
            times = {}
            for c in cands[:TUNE_TOP]:
                times[c.schedule] = statistics.median(time_kernel(replace(timing[kernel_name(s, c.schedule)], spec=s),
                                                                  threads, repeats))
                progress(f"  tuned {kernel_name(s, c.schedule)}: predicted {c.prediction.seconds * 1e3:.3f} ms, "
                         f"measured {times[c.schedule] * 1e3:.3f} ms")
            chosen[s] = min(times, key=times.get)
            measured[s] = times[chosen[s]]
    for s, other in (share or {}).items():  # after tuning: other's packing is final
        packing = layout(other, chosen[other])
        shared = next((c.schedule for c in ranked[s] if layout(s, c.schedule) == packing), None)
        if shared is not None and shared != chosen[s]:
            chosen[s] = shared
            measured.pop(s, None)
    loaded, source, built = _compile(list(chosen.items()), host, steps, load)
    kernels = {s: replace(loaded[kernel_name(s, sch)], spec=s) for s, sch in chosen.items()} if load else {}
    return Library(chosen, kernels, {step: loaded[step.name] for step in steps} if load else {}, ranked, measured,
                   source, built)


def generate(request: Request, out: Path, progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Generate, compile and write a kernel set to `out`; returns the manifest."""
    if not request.shapes:
        raise SpecError("no shape given: pass at least one --shape ROWSxCOLS")
    host = from_target(request.target)
    if request.tune and not host.native:
        raise SpecError(f"--tune times kernels on this machine, so it needs --target native, not {request.target}")
    if host.native:
        host = bandwidth.measured(host)
    isa = _isa(request, host)
    threads = host.cores if request.threads is None else request.threads
    if not 1 <= threads <= host.cores:
        raise SpecError(f"threads={threads}: from 1 to the {host.cores} cores of target {host.name}")
    if out.exists() and not out.is_dir():
        raise SpecError(f"-o {out} is a file: the output is a directory (kernels.c, kernels.so, manifest.json)")
    errors = dict(_spec(request, rows, cols, isa, host) for rows, cols in dict.fromkeys(request.shapes))
    lib = build(errors, host, threads, tune=request.tune, load=False, progress=progress)
    for spec, cands in lib.ranked.items():
        progress(f"{spec.name}: error {errors[spec]:.4f}, {len(cands)} schedules, best predicted "
                 f"{cands[0].schedule.tag()} {cands[0].prediction.seconds * 1e3:.3f} ms")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "kernels.c", lib.built.text.encode())  # what was compiled: a rebuild needs the same
    atomic_write(out / "kernels.so", lib.built.path.read_bytes())  # a process may have the old one open
    kernels = []
    for spec, schedule in lib.schedules.items():
        prediction = next(c.prediction for c in lib.ranked[spec] if c.schedule == schedule)
        kernels.append({"name": kernel_name(spec, schedule), "spec": spec.to_dict(), "schedule": schedule.to_dict(),
                        "predicted": prediction.to_dict(), "measured_s": lib.measured.get(spec),
                        "relative_error": errors[spec], "bits_per_weight": bits_per_weight(spec)})
    built = lib.built
    manifest = {
        "target": host.to_dict(), "isa": isa, "threads": threads,
        "measured_bandwidth": {str(t): v for t, v in host.bandwidth} or None,
        "library": {"file": "kernels.so", "source": "kernels.c", "source_sha256": hashlib.sha256(lib.built.text.encode()).hexdigest(),
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
        so = build_source(source, tuple(lib["flags"])).path  # the library was damaged: rebuild it from its source
    cdef = "\n".join(s.traits.prototype(s, sch, kernel_name(s, sch)) for s, sch in pairs)
    return KernelSet(load_library(so, cdef, pairs), manifest)  # its needs read from the library, not the manifest
