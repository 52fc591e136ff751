"""Benchmark qigen kernels against what the hardware allows, beside torch and numpy fp32.

    python benchmarks/kernels.py [--quick] [--shapes 4096x4096,11008x4096] [--bits 2,4] [--group 128]
                                 [--threads 1,2] [--batch 64,512] [--repeat 5] [--tune] [-o results/]

Decode (matrix-vector): ms per call, GB/s of packed data streamed, % of the measured read bandwidth,
the model's prediction, and speedup over torch fp32. Prefill (matrix-matrix): GFLOP/s against torch
fp32. Every timing streams weights from DRAM: copies rotate until they exceed twice the L3.
Writes OUT/kernels.json (every measurement), OUT/kernels.md (the tables) and OUT/kernels.png.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from perfmodel import bandwidth
from perfmodel.cost import bandwidth as read_bandwidth, predict
from perfmodel.host import Host, HostError, detect
from perfmodel.search import rank
from qigen.pipeline import best_isa, build_library
from qigen.render import kernel_name
from qigen.spec import BITS, KernelSpec, SpecError
from runtime.compiler import CompileError, compiler
from runtime.loader import Kernel, LoadError
from runtime.timing import time_call, time_kernel

LLAMA_7B = ((4096, 4096), (11008, 4096), (4096, 11008))  # attention projections, MLP up/gate, MLP down
TUNE_TOP = 3
BUSY_LOAD = 0.5  # 1-minute load average above which another process skews the numbers
START = time.perf_counter()


@dataclass(frozen=True)
class Plan:
    shapes: tuple[tuple[int, int], ...]
    decode: tuple[tuple[int, int | None], ...]  # (bits, group) formats timed at batch 1
    prefill: tuple[tuple[int, int | None], ...]  # (bits, group) formats timed at each batch
    batches: tuple[int, ...]
    threads: tuple[int, ...]  # decode thread counts; prefill runs with the largest
    repeats: int
    tune: bool


def _list(kind: Callable[[str], object]) -> Callable[[str], tuple]:
    def split(text: str) -> tuple:
        return tuple(kind(v) for v in text.split(","))
    split.__name__ = f"comma-separated {kind.__name__.strip('_')}"  # argparse names it in errors
    return split


def _positive(text: str) -> int:
    if int(text) < 1:
        raise ValueError(text)
    return int(text)


def _group(text: str) -> int | None:
    return None if text == "row" else int(text)


def _shape(text: str) -> tuple[int, int]:
    rows, cols = (int(v) for v in text.lower().split("x"))
    return rows, cols


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=_list(_shape), help="ROWSxCOLS list (default: the LLaMA-7B shapes)")
    p.add_argument("--bits", type=_list(int), help=f"bits list (default: decode {','.join(map(str, BITS))}, prefill 4)")
    p.add_argument("--group", type=_list(_group),
                   help="group sizes, or 'row' (default: decode 32,128, prefill 128)")
    p.add_argument("--threads", type=_list(_positive), help="decode thread counts (default: 1 and all cores)")
    p.add_argument("--batch", type=_list(_positive), help="prefill batch sizes n (default 64,512)")
    p.add_argument("--repeat", type=_positive, help="timed repeats per measurement, median reported (default 5)")
    p.add_argument("--quick", action="store_true",
                   help="4096x4096, bits 4 and 2, g128, all cores, repeat 3, prefill n=64")
    p.add_argument("--tune", action="store_true", help=f"time the {TUNE_TOP} best predicted schedules, keep the fastest")
    p.add_argument("-o", "--out", type=Path, default=Path("results"), help="output directory (default results/)")
    return p.parse_args(argv)


def plan(args: argparse.Namespace, host: Host) -> Plan:
    """Explicit options win; --quick only changes the defaults."""
    q = args.quick
    return Plan(shapes=args.shapes or (LLAMA_7B[:1] if q else LLAMA_7B),
                decode=tuple(itertools.product(args.bits or ((4, 2) if q else BITS),
                                               args.group or ((128,) if q else (32, 128)))),
                prefill=tuple(itertools.product(args.bits or (4,), args.group or (128,))),
                batches=args.batch or ((64,) if q else (64, 512)),
                threads=args.threads or ((host.cores,) if q else tuple(sorted({1, host.cores}))),
                repeats=args.repeat or (3 if q else 5), tune=args.tune)


def need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        sys.exit(f"benchmarks/kernels.py needs {module}: pip install -e .[bench]")


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


def build(specs: list[KernelSpec], host: Host, measured: dict[int, float],
          top: int) -> tuple[dict[KernelSpec, list[Kernel]], str]:
    """The `top` best predicted schedules of every spec, rendered into one library, compiled once and loaded."""
    ranked = {s: [c.schedule for c in rank(s, host, measured, threads=host.cores)[:top]] for s in specs}
    # specs that differ only in their batch (design point) may pick the same kernel: render it once
    pairs = list({kernel_name(s, sch): (s, sch) for s in specs for sch in ranked[s]}.values())
    progress(f"compiling {len(pairs)} kernels into one library")
    lib, source_hash = build_library(pairs, host)
    return {s: [replace(lib[kernel_name(s, sch)], spec=s) for sch in ranked[s]] for s in specs}, source_hash


def tune(candidates: list[Kernel], threads: int, repeats: int) -> Kernel:
    """The fastest of the candidates, timed like qigen.pipeline's tuning."""
    times = {k: statistics.median(time_kernel(k, threads, repeats)) for k in candidates}
    progress("  tuned " + ", ".join(f"{k.schedule.tag()} {t * 1e3:.3f} ms" for k, t in times.items()))
    return min(times, key=times.get)


def result(impl: str, rows: int, cols: int, n: int, threads: int | None, times: list[float], nbytes: int) -> dict:
    med = statistics.median(times)
    return {"impl": impl, "phase": "decode" if n == 1 else "prefill", "rows": rows, "cols": cols, "n": n,
            "threads": threads, "times_s": times, "median_s": med, "spread": (max(times) - min(times)) / med,
            "bytes": nbytes, "gb_per_s": nbytes / med / 1e9, "gflop_per_s": 2 * n * rows * cols / med / 1e9}


@dataclass(frozen=True)
class Bench:
    """What every measurement shares: the machine, its read bandwidth and the repeats."""
    host: Host
    measured: dict[int, float]
    repeats: int

    def qigen(self, kernel: Kernel, threads: int) -> dict:
        spec, pred = kernel.spec, predict(kernel.spec, kernel.schedule, self.host, self.measured, threads)
        r = result("qigen", spec.rows, spec.cols, spec.batch, threads, time_kernel(kernel, threads, self.repeats), pred.bytes)
        return r | {"bits": spec.bits, "group": spec.group, "kernel": kernel.name, "schedule": kernel.schedule.to_dict(),
                    "predicted_s": pred.seconds, "prediction": pred.to_dict(), "bandwidth_pct":
                    100 * pred.bytes / r["median_s"] / read_bandwidth(self.host, threads, self.measured)}

    def fp32(self, impl: str, rows: int, cols: int, n: int, threads: int | None) -> dict:
        """torch.nn.functional.linear or numpy W @ x, rotating weight copies that exceed 2x L3 like time_kernel."""
        rng = np.random.default_rng(0)
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        copies = [w] + [w.copy() for _ in range(2 * self.host.l3 // w.nbytes)]
        x = rng.standard_normal((n, cols) if n > 1 else cols, dtype=np.float32)
        if impl == "torch":
            torch = need("torch")
            torch.set_num_threads(threads)
            copies, x = [torch.from_numpy(c) for c in copies], torch.from_numpy(x)
            fn = functools.partial(torch.nn.functional.linear, x)
        else:
            fn = (lambda wc: wc @ x) if n == 1 else (lambda wc: x @ wc.T)
        turn = itertools.count()
        times = time_call(lambda: fn(copies[next(turn) % len(copies)]), self.repeats)
        return result(impl, rows, cols, n, threads, times, 4 * (rows * cols + n * (rows + cols)))


def numpy_threads() -> int | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    pools = [p for p in threadpool_info() if p["user_api"] == "blas"]
    return max((p["num_threads"] for p in pools if "numpy" in p["filepath"]), default=None)


def tasks(p: Plan, kernels: dict[KernelSpec, Kernel], bench: Bench) -> list[tuple[str, Callable[[], dict]]]:
    """Every measurement as (what, how); qigen first, so torch's and numpy's thread pools idle meanwhile."""
    most, out, part = max(p.threads), [], functools.partial
    for spec, k in kernels.items():
        for t in p.threads if spec.batch == 1 else (most,):
            out.append((f"qigen {k.name} n={spec.batch} threads={t}", part(bench.qigen, k, t)))
    for rows, cols in p.shapes:
        for n, t in [(1, t) for t in p.threads] + [(n, most) for n in p.batches]:
            out.append((f"torch fp32 {rows}x{cols} n={n} threads={t}", part(bench.fp32, "torch", rows, cols, n, t)))
        out.append((f"numpy fp32 {rows}x{cols} n=1", part(bench.fp32, "numpy", rows, cols, 1, numpy_threads())))
    return out


def find(records: list[dict], **match) -> dict | None:
    return next((r for r in records if all(r[k] == v for k, v in match.items())), None)


def tables(records: list[dict]) -> dict[str, tuple[list[str], list[list[str]]]]:
    decode, prefill, base = [], [], []
    for r in records:
        shape, g = f"{r['rows']}x{r['cols']}", r.get("group") or "row"
        if r["impl"] != "qigen":
            base.append([shape, r["n"], r["impl"], r["threads"] or "BLAS default", f"{r['median_s'] * 1e3:.3f}",
                         f"{r['spread']:.0%}", f"{r['gb_per_s']:.1f}", f"{r['gflop_per_s']:.1f}"])
            continue
        torch = find(records, impl="torch", rows=r["rows"], cols=r["cols"], n=r["n"], threads=r["threads"])
        if r["n"] == 1:
            decode.append([shape, r["bits"], g, r["threads"], f"{r['median_s'] * 1e3:.3f}", f"{r['spread']:.0%}",
                           f"{r['gb_per_s']:.1f}", f"{r['bandwidth_pct']:.0f}%", f"{r['predicted_s'] * 1e3:.3f}",
                           f"{r['predicted_s'] / r['median_s']:.2f}",
                           f"{torch['median_s'] * 1e3:.3f}" if torch else "-",
                           f"{torch['median_s'] / r['median_s']:.1f}x" if torch else "-"])
        else:
            prefill.append([shape, r["n"], r["bits"], g, r["threads"], f"{r['median_s'] * 1e3:.2f}",
                            f"{r['gflop_per_s']:.1f}", f"{torch['gflop_per_s']:.1f}" if torch else "-",
                            f"{r['gflop_per_s'] / torch['gflop_per_s']:.2f}" if torch else "-",
                            f"{r['predicted_s'] * 1e3:.2f}"])
    return {"Decode (matrix-vector)": (["shape", "bits", "group", "threads", "ms", "spread", "GB/s", "% bw",
                                       "pred ms", "pred/meas", "torch ms", "speedup"], decode),
            "Prefill (matrix-matrix)": (["shape", "n", "bits", "group", "threads", "ms", "GFLOP/s", "torch GFLOP/s",
                                         "ratio", "pred ms"], prefill),
            "fp32 baselines": (["shape", "n", "impl", "threads", "ms", "spread", "GB/s", "GFLOP/s"], base)}


def format_table(head: list[str], rows: list[list], markdown: bool) -> str:
    cells = [head] + [[str(c) for c in row] for row in rows]
    if markdown:
        return "\n".join("| " + " | ".join(r) + " |" for r in cells[:1] + [["---"] * len(head)] + cells[1:])
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def targets(records: list[dict], most: int) -> list[str]:
    """The issue's goals, each met / not met with its number."""
    q = {(r["rows"], r["cols"], r["bits"], r["group"], r["n"]): r for r in records
         if r["impl"] == "qigen" and r["threads"] == most}
    bw, ratio, prefill = [], [], []
    for (rows, cols, bits, group, n), r in q.items():
        shape = f"{rows}x{cols}"
        if n == 1 and bits == 4 and group == 128:
            pct = r["bandwidth_pct"]
            bw.append(f"decode q4 g128 {shape}, {most} threads: {pct:.0f}% of read bandwidth (goal >= 85%): "
                      + ("met" if pct >= 85 else "not met"))
        if n == 1 and bits in (2, 3) and (four := q.get((rows, cols, 4, group, 1))):
            t, b = r["median_s"] / four["median_s"], r["bytes"] / four["bytes"]
            ratio.append(f"decode q{bits} vs q4 g{group} {shape}: time ratio {t:.2f}, byte ratio {b:.2f} "
                         f"(goal: time ratio within 10% of byte ratio): " + ("met" if t <= 1.1 * b else "not met"))
        if n == 512 and (torch := find(records, impl="torch", rows=rows, cols=cols, n=512)):
            x = r["gflop_per_s"] / torch["gflop_per_s"]
            prefill.append(f"prefill n=512 q{bits} g{group} {shape}: {x:.2f}x torch fp32 GFLOP/s (goal >= 0.7x): "
                           + ("met" if x >= 0.7 else "not met"))
    return (bw + ratio + prefill
            or ["no measurement covers a target (they need q4 g128 decode, q2/q3 beside q4, prefill n=512)"])


def plot(records: list[dict], threads: int, bw: float, path: Path) -> None:
    """Decode GB/s per format, grouped by shape, with the read bandwidth and the model's prediction."""
    need("matplotlib").use("Agg")
    plt = need("matplotlib.pyplot")
    rs = [r for r in records if r["impl"] == "qigen" and r["n"] == 1 and r["threads"] == threads]
    shapes = list(dict.fromkeys((r["rows"], r["cols"]) for r in rs))
    formats = sorted({(r["bits"], r["group"] or 0) for r in rs})
    width = 0.8 / max(len(formats), 1)
    fig, ax = plt.subplots(figsize=(6.5 + 0.4 * len(shapes) * len(formats), 4.5))
    for i, (bits, group) in enumerate(formats):
        pts = [(s, r) for s, shape in enumerate(shapes) for r in rs
               if (r["rows"], r["cols"]) == shape and (r["bits"], r["group"] or 0) == (bits, group)]
        xs = [s + (i - (len(formats) - 1) / 2) * width for s, _ in pts]
        ax.bar(xs, [r["gb_per_s"] for _, r in pts], width, label=f"q{bits} g{group or 'row'}")
        ax.plot(xs, [r["bytes"] / r["predicted_s"] / 1e9 for _, r in pts], "k_", markersize=12,
                label="model prediction" if i == 0 else None)
    ax.axhline(bw / 1e9, color="r", linestyle="--", label=f"measured read bandwidth ({bw / 1e9:.1f} GB/s)")
    ax.set_xticks(range(len(shapes)), [f"{r}x{c}" for r, c in shapes])
    ax.set_ylabel("GB/s of packed data streamed")
    ax.set_title(f"qigen decode (batch 1), {threads} thread{'s' * (threads > 1)}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure(p: Plan, host: Host, measured: dict[int, float]) -> tuple[list[dict], str]:
    """Build every kernel of the run into one library, (tune,) time them and the baselines; returns the
    measurements and the library source's hash."""
    isa = best_isa(host)
    specs = [KernelSpec(r, c, b, g, batch=1, isa=isa) for r, c in p.shapes for b, g in p.decode]
    specs += [KernelSpec(r, c, b, g, batch=n, isa=isa) for r, c in p.shapes for n in p.batches for b, g in p.prefill]
    candidates, source_hash = build(specs, host, measured, TUNE_TOP if p.tune else 1)
    kernels = {}
    for i, (spec, ks) in enumerate(candidates.items(), 1):
        if p.tune:
            progress(f"tune [{i}/{len(candidates)}] {spec.name}, n={spec.batch}")
        kernels[spec] = tune(ks, max(p.threads), p.repeats) if p.tune else ks[0]
    work = tasks(p, kernels, Bench(host, measured, p.repeats))
    records = []
    for i, (what, run) in enumerate(work, 1):
        progress(f"[{i}/{len(work)}] {what}")
        records.append(run())
    return records, source_hash


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch, _ = need("torch"), need("matplotlib")  # fail before the long part
    host = detect()
    p = plan(args, host)
    load_start = os.getloadavg()
    progress("load average " + " ".join(f"{v:.2f}" for v in load_start))
    if load_start[0] > BUSY_LOAD:
        progress(f"WARNING: 1-minute load {load_start[0]:.2f} > {BUSY_LOAD}: another process is running and will "
                 "skew the numbers (most of all with as many threads as cores)")
    # the machine is shared: its bandwidth drifts, so every ratio uses a probe taken in this run
    progress("measuring the read bandwidth (perfmodel.bandwidth.measure())")
    measured = bandwidth.measure()
    records, source_hash = measure(p, host, measured)
    load_end = os.getloadavg()
    most = max(p.threads)
    sections, goals = tables(records), targets(records, most)
    bw = ", ".join(f"{t} thread{'s' * (t > 1)} {v / 1e9:.1f} GB/s" for t, v in sorted(measured.items()))
    header = (f"{host.model} ({host.name}, {host.cores} cores, {best_isa(host)}); read bandwidth {bw}"
              f" (measured by this run); load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    print(header + "".join(f"\n\n{title}\n{format_table(head, rows, markdown=False)}"
                           for title, (head, rows) in sections.items()) + "\n\nTargets\n" + "\n".join(goals))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.md").write_text(f"# qigen kernel benchmark\n\n{header}\n\n" + "".join(
        f"## {title}\n\n{format_table(head, rows, markdown=True)}\n\n" for title, (head, rows) in sections.items())
        + "## Targets\n\n" + "".join(f"- {g}\n" for g in goals))
    (args.out / "kernels.json").write_text(json.dumps({
        "host": host.to_dict(), "isa": best_isa(host), "measured_bandwidth": {str(t): v for t, v in measured.items()},
        "load_average": {"start": load_start, "end": load_end},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                     "compiler": compiler().version, "numpy_blas_threads": numpy_threads() or "BLAS default threads"},
        "kernels_source_sha256": source_hash, "plan": asdict(p), "measurements": records, "targets": goals}, indent=1))
    plot(records, most, read_bandwidth(host, most, measured), args.out / "kernels.png")
    progress(f"wrote {args.out}/kernels.json, kernels.md, kernels.png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SpecError, HostError, CompileError, LoadError) as e:
        sys.exit(f"benchmarks/kernels.py: error: {e}")
