"""`qigen bench kernels`: qigen's kernels against what the hardware allows, beside torch and numpy.

Decode (batch 1, matrix-vector): GB/s of packed data streamed against the read bandwidth probed right
before and after each measurement, and the performance model's prediction. Prefill (batch > 1,
matrix-matrix): GFLOP/s against the fp32 or int8 compute peak measured in the same run. Baselines on the same shapes, in the same run: torch fp32 (`F.linear`), torch
bf16 where torch has fast bf16 on this CPU, torch's dynamic int8 Linear, and numpy fp32. Every timing
streams weights from memory: copies rotate until they exceed twice the L3.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perfmodel.cost import bandwidth as read_bandwidth, predict
from perfmodel.host import Host, detect
from perfmodel.search import bits_per_weight
from qigen.bench import (BenchError, Progress, Task, log, machine, noisy_note, optional, probe,
                         render_text, summary, write)
from qigen.options import add_activations, add_format, comma_list, positive, threads
from qigen.pipeline import TUNE_TOP, best_isa, build
from qigen.spec import BITS, MAX_BATCH, KernelSpec, SpecError, activations, activations_help, choose_family, kernel_name
from runtime import bandwidth, peak
from runtime.loader import Kernel
from runtime.timing import MAX_COPIES, time_call, time_kernel

LLAMA_7B = ((4096, 4096), (11008, 4096), (4096, 11008))  # attention projections, MLP up/gate, MLP down


@dataclass(frozen=True)
class Plan:
    shapes: tuple[tuple[int, int], ...]
    formats: tuple[tuple[int, int | None], ...]  # (bits, group)
    activations: tuple[str, ...]  # the families' activation types, each where the format allows
    batches: tuple[int, ...]  # 1: decode; more: prefill
    threads: tuple[int, ...]
    repeats: int
    tune: bool


def _shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (positive(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text} is not ROWSxCOLS") from None
    return rows, cols


def _batch(text: str) -> int:
    if positive(text) > MAX_BATCH:
        raise ValueError(f"batch {text} is above {MAX_BATCH}")
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", type=comma_list(_shape), help="ROWSxCOLS list (default: LLaMA-7B's 4096x4096, "
                   "11008x4096, 4096x11008)")
    add_format(p, BITS, (32, 128), lists=True)
    p.add_argument("--batch", type=comma_list(_batch), help="batch sizes: 1 is decode, more is prefill (default 1,64)")
    p.add_argument("--threads", type=comma_list(threads), help="thread counts to sweep (default: 1 and all cores)")
    add_activations(p, activations()[1:], lists=True)
    p.add_argument("--repeat", type=positive, default=5, help="timed repeats; median and spread reported (default 5)")
    p.add_argument("--tune", action="store_true", help=f"time the {TUNE_TOP} best predicted schedules, keep the fastest")
    p.add_argument("-o", "--out", type=Path, default=Path("results"), help="output directory (default results/)")
    p.add_argument("--json", action="store_true", help="print the results section as JSON instead of the tables")


def plan(args: argparse.Namespace, host: Host) -> Plan:
    return Plan(shapes=args.shape or LLAMA_7B,
                formats=tuple(itertools.product(args.bits, args.group)),
                activations=args.activations,
                batches=args.batch or (1, 64), threads=args.threads or tuple(sorted({1, host.cores})),
                repeats=args.repeat, tune=args.tune)


def specs(p: Plan, isa: str) -> list[KernelSpec]:
    """Every (shape, batch, format, activations) of the plan that a family generates; says what it skips."""
    out = []
    for (r, c), n, (b, g), act in itertools.product(p.shapes, p.batches, p.formats, p.activations):
        try:
            out.append(choose_family(act, lambda name: KernelSpec(r, c, b, g, batch=n, isa=isa, family=name)))
        except SpecError as e:
            if (r, c) == p.shapes[0]:
                log(f"skipped: q{b} g{g or 'row'} batch {n} with {act} activations: {e}")
    return out


def manifest(spec: KernelSpec, candidates: list) -> dict:
    """A spec, its bits per weight and the candidates considered, with their predictions."""
    return {"spec": spec.to_dict(), "bits_per_weight": bits_per_weight(spec), "candidates": [
        {"name": kernel_name(spec, c.schedule), "schedule": c.schedule.to_dict(), "predicted": c.prediction.to_dict()}
        for c in candidates]}


def result(impl: str, rows: int, cols: int, n: int, threads: int | None, times: list[float], nbytes: int) -> dict:
    t = summary(times)
    return {"impl": impl, "phase": "decode" if n == 1 else "prefill", "rows": rows, "cols": cols, "n": n,
            "threads": threads, "times_s": t["values"], "median_s": t["median"], "spread": t["spread"],
            "noisy": t["noisy"], "bytes": nbytes, "gb_per_s": nbytes / t["median"] / 1e9,
            "gflop_per_s": 2 * n * rows * cols / t["median"] / 1e9}


@dataclass(frozen=True)
class Bench:
    """What every measurement shares: the machine (with the read bandwidth this run measured), the compute peaks
    this run measured (operations/s by thread count and activation type) and the repeats."""
    host: Host
    peaks: dict[int, dict[str, float]]
    repeats: int

    def qigen(self, kernel: Kernel, threads: int) -> dict:
        """Decode is set against the read bandwidth probed right before and after it (the higher of the two: this
        host's swings by a third within minutes); prefill against the bandwidth measured at the start."""
        spec, pred = kernel.spec, predict(kernel.spec, kernel.schedule, self.host, threads)
        decode = spec.kind == "gemv"
        before = probe(threads) if decode else None
        r = result("qigen", spec.rows, spec.cols, spec.batch, threads, time_kernel(kernel, threads, self.repeats),
                   pred.bytes)
        probes = [before, probe(threads)] if decode else []
        read = max(probes) if decode else read_bandwidth(self.host, threads)
        peak = self.peaks[threads][spec.traits.activations]
        return r | {"bits": spec.bits, "group": spec.group, "activations": spec.traits.activations,
                    "kernel": kernel.name, "predicted_s": pred.seconds, "bandwidth_probes": probes,
                    "bandwidth_pct": 100 * pred.bytes / r["median_s"] / read,
                    "peak_pct": 100 * r["gflop_per_s"] * 1e9 / peak}

    def baseline(self, impl: str, rows: int, cols: int, n: int, threads: int | None) -> dict:
        """One of BASELINES on random weights, rotating copies that exceed 2x L3 like time_kernel."""
        rng = np.random.default_rng(0)
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        x = rng.standard_normal((n, cols) if n > 1 else cols, dtype=np.float32)
        fn, per_weight = BASELINES[impl](w, x, threads)
        more = min(int(2 * self.host.l3 // (per_weight * w.size)), MAX_COPIES - 1)
        copies = [fn] + [BASELINES[impl](w, x, threads)[0] for _ in range(more)]
        turn = itertools.count()
        times = time_call(lambda: copies[next(turn) % len(copies)](), self.repeats)
        return result(impl, rows, cols, n, threads, times, int(per_weight * rows * cols + 4 * n * (rows + cols)))


def _torch_linear(dtype_name: str):
    def make(w: np.ndarray, x: np.ndarray, threads: int):
        import torch

        torch.set_num_threads(threads)
        dtype = getattr(torch, dtype_name)
        wt, xt = torch.from_numpy(w).to(dtype).clone(), torch.from_numpy(x).to(dtype)
        return functools.partial(torch.nn.functional.linear, xt, wt), wt.element_size()
    return make


def _torch_int8(w: np.ndarray, x: np.ndarray, threads: int):
    import torch

    torch.set_num_threads(threads)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = torch.from_numpy(w).clone()
    with warnings.catch_warnings():  # torch 2.x deprecates torch.ao.quantization in favour of torchao
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    xt = torch.from_numpy(x if x.ndim == 2 else x[None])
    return functools.partial(q, xt), 1


def _numpy(w: np.ndarray, x: np.ndarray, threads: int | None):
    w = w.copy()
    return ((lambda: w @ x) if x.ndim == 1 else (lambda: x @ w.T)), 4


BASELINES: dict[str, Callable] = {"torch fp32": _torch_linear("float32"), "torch bf16": _torch_linear("bfloat16"),
                                  "torch int8 dynamic": _torch_int8, "numpy fp32": _numpy}


def baselines() -> list[str]:
    """The baselines this machine can run; says which it skips and why."""
    names = ["numpy fp32"]
    if optional("torch", "the torch baselines"):
        import torch

        names += ["torch fp32", "torch int8 dynamic"]
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            names.append("torch bf16")
        else:
            log("skipped: torch bf16, which torch runs natively only on CPUs with AVX-512 BF16 or AMX (this one has neither)")
    return names


def tasks(p: Plan, kernels: dict[KernelSpec, Kernel], bench: Bench, impls: list[str]) -> list[Task]:
    """Every measurement, qigen first, so torch's and numpy's thread pools idle meanwhile."""
    out = [Task(f"qigen {k.name} threads={t}", 1, functools.partial(bench.qigen, k, t))
           for spec, k in kernels.items() for t in p.threads]
    for (rows, cols), n, impl in itertools.product(p.shapes, p.batches, impls):
        for t in (None,) if impl == "numpy fp32" else p.threads:
            out.append(Task(f"{impl} {rows}x{cols} n={n}" + (f" threads={t}" if t else ""), 1,
                            functools.partial(bench.baseline, impl, rows, cols, n, t)))
    return out


def find(records: list[dict], **match) -> dict | None:
    return next((r for r in records if all(r.get(k) == v for k, v in match.items())), None)


def tables(records: list[dict], impls: list[str]) -> dict[str, tuple[list[str], list[list]]]:
    decode, prefill, base = [], [], []
    others = [i for i in impls if i != "numpy fp32"]
    for r in records:
        shape, g = f"{r['rows']}x{r['cols']}", r.get("group") or "row"
        if r["impl"] != "qigen":
            base.append([shape, r["n"], r["impl"], r["threads"] or "BLAS default", f"{r['median_s'] * 1e3:.3f}",
                         f"{r['spread']:.0%}", f"{r['gb_per_s']:.1f}", f"{r['gflop_per_s']:.1f}"])
            continue
        vs = [find(records, impl=i, rows=r["rows"], cols=r["cols"], n=r["n"], threads=r["threads"]) for i in others]
        ratios = [f"{b['median_s'] / r['median_s']:.2f}x" if b else "-" for b in vs]
        common = [shape, r["bits"], g, r["activations"], r["threads"], f"{r['median_s'] * 1e3:.3f}", f"{r['spread']:.0%}"]
        if r["n"] == 1:
            decode.append(common + [f"{r['gb_per_s']:.1f}", f"{r['bandwidth_pct']:.0f}%",
                                    f"{r['predicted_s'] * 1e3:.3f}", *ratios])
        else:
            prefill.append(common[:1] + [r["n"]] + common[1:] + [f"{r['gflop_per_s']:.1f}", f"{r['peak_pct']:.0f}%",
                                                                 f"{r['predicted_s'] * 1e3:.3f}", *ratios])
    speedups = [f"vs {i}" for i in others]
    return {"Decode (matrix-vector)": (["shape", "bits", "group", "x", "threads", "ms", "spread", "GB/s", "% bw",
                                       "pred ms", *speedups], decode),
            "Prefill (matrix-matrix)": (["shape", "n", "bits", "group", "x", "threads", "ms", "spread", "GFLOP/s",
                                         "% peak", "pred ms", *speedups], prefill),
            "Baselines": (["shape", "n", "impl", "threads", "ms", "spread", "GB/s", "GFLOP/s"], base)}


def plot(records: list[dict], threads: tuple[int, ...], host: Host, path: Path) -> bool:
    """A roofline per thread count: decode GB/s per bits × group, the model's prediction beside each bar, the
    measured read bandwidth as a line. False (and why) when matplotlib is missing."""
    matplotlib = optional("matplotlib", "the plots")
    if not matplotlib:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in records if r["impl"] == "qigen" and r["n"] == 1]
    shapes = list(dict.fromkeys((r["rows"], r["cols"]) for r in rs))
    formats = sorted({(r["bits"], r["group"] or 0, r["activations"]) for r in rs})
    width = 0.8 / max(2 * len(formats), 1)
    fig, axes = plt.subplots(1, len(threads), figsize=(1 + (3 + 0.5 * len(shapes) * len(formats)) * len(threads), 4.5),
                             squeeze=False)
    for ax, t in zip(axes[0], threads):
        for i, (bits, group, act) in enumerate(formats):
            pts = [(s, r) for s, shape in enumerate(shapes) for r in rs if r["threads"] == t and
                   (r["rows"], r["cols"]) == shape and (r["bits"], r["group"] or 0, r["activations"]) == (bits, group, act)]
            xs = [s + (2 * i - len(formats) + 0.5) * width for s, _ in pts]
            ax.bar(xs, [r["gb_per_s"] for _, r in pts], width, color=f"C{i % 10}",
                   label=f"q{bits} g{group or 'row'}{' x int8' if act == 'int8' else ''}")
            ax.bar([x + width for x in xs], [r["bytes"] / r["predicted_s"] / 1e9 for _, r in pts], width,
                   color="none", edgecolor=f"C{i % 10}", hatch="//", label="predicted" if i == 0 else None)
        bw = read_bandwidth(host, t) / 1e9
        ax.axhline(bw, color="r", linestyle="--", label=f"read bandwidth {bw:.1f} GB/s")
        ax.set_xticks(range(len(shapes)), [f"{r}x{c}" for r, c in shapes])
        ax.set_ylabel("GB/s of packed weights streamed")
        ax.set_title(f"decode, {t} thread{'s' * (t > 1)} (hatched: model's prediction)", fontsize=9)
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> dict:
    """Measure, print the tables, write OUT/results.json (section "kernels"), results.md and kernels.png."""
    host = detect()
    p = plan(args, host)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine(host)
    impls = baselines()
    log("measuring the fp32 and int8 compute peaks (1 and all cores) for this run")
    peaks = peak.measure(sorted(set(p.threads) | {1, host.cores}))
    log("measuring the read bandwidth (1 and all cores) for this run")
    host = bandwidth.measured(host, bandwidth.measure())  # and the peaks just kept: the predictions use both
    isa = best_isa(host)
    grid = specs(p, isa)
    if not grid:
        raise BenchError("nothing to measure: no format of the grid runs with the activations asked for")
    log(f"compiling {len(grid)} kernels" + (f" and timing the {TUNE_TOP} best predicted schedules of each" if p.tune else ""))
    lib = build(grid, host, max(p.threads), tune=p.tune, repeats=p.repeats, progress=log)
    kernels = lib.kernels
    records = Progress(tasks(p, kernels, Bench(host, peaks, p.repeats), impls)).run()
    noisy = noisy_note(records, lambda r: [r["spread"]])
    sections = tables(records, impls)
    bw = ", ".join(f"{t} thread{'s' * (t > 1)} {v / 1e9:.1f} GB/s" for t, v in host.bandwidth)
    top = ", ".join(f"{t} thread{'s' * (t > 1)} {v['fp32'] / 1e9:.0f} fp32 / {v['int8'] / 1e9:.0f} int8 GOP/s"
                    for t, v in sorted(peaks.items()))
    header = (f"{host.model} ({host.name}, {host.cores} cores, {isa}); read bandwidth {bw}; compute peaks {top} "
              f"(both measured by this run); "
              f"load average {info['load_average_start'][0]:.2f}; {p.repeats} repeats, median shown")
    notes = [f"x = activations ({activations_help()}). "
             "Decode: GB/s of packed weights (codes, scales, offsets) streamed; % bw = share of the read bandwidth "
             "probed right before and after the measurement, the higher of the two; pred = the performance model's "
             "time. Prefill: % peak = GFLOP/s (a multiply-add is two operations) against the compute peak of its "
             "activation type at its thread count (register-resident chains of FMAs, or of the int8 dot products the "
             "kernels issue), measured by this run. 'vs X' = X's time / qigen's time (above 1: "
             "qigen is faster). Every timing rotates weight copies that exceed 2x L3, so weights stream from memory.",
             *([noisy] if noisy else [])]
    plotted = plot(records, p.threads, host, args.out / "kernels.png")
    data = info | {"isa": isa, "measured_bandwidth": {str(t): v for t, v in host.bandwidth},
                   "measured_peaks": {str(t): v for t, v in peaks.items()}, "plan": {
        "shapes": p.shapes, "formats": p.formats, "activations": p.activations, "batches": p.batches, "threads": p.threads, "repeats": p.repeats,
        "tune": p.tune}, "baselines": impls, "library": {"source_sha256": lib.source.hash, "kernels": [
            manifest(spec, lib.ranked[spec][:TUNE_TOP if p.tune else 1]) | {"chosen": k.name}
            for spec, k in kernels.items()]},
        "records": records, "noisy": noisy, "plots": ["kernels.png"] if plotted else []}
    write(args.out, "kernels", data, render_text("Kernels", header, sections, notes, markdown=True))
    if not args.json:
        print(render_text("Kernels", header, sections, notes, markdown=False))
    log(f"wrote {args.out}/results.json, results.md" + (", kernels.png" if plotted else ""))
    return data
