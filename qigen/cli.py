"""The `qigen` command: `info` describes the CPU, `generate` writes a kernel set for it."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from perfmodel import bandwidth
from perfmodel.cost import bandwidth as model_bandwidth
from perfmodel.host import HostError, from_target, known_targets
from perfmodel.search import rank
from qigen.pipeline import FREE, Request, best_isa, generate
from qigen.spec import BITS, ISAS, KernelSpec, SpecError
from runtime.compiler import CompileError
from runtime.loader import LoadError


def _shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape '{text}' is not ROWSxCOLS, e.g. 4096x11008") from None
    return rows, cols


def _group(text: str) -> int | str:
    if text == "row":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group '{text}' is not a number or 'row'") from None


def _gb(v: float) -> str:
    return f"{v / 1e9:.1f} GB/s"


def info(args: argparse.Namespace) -> dict:
    host = from_target(args.target)
    if args.measure:
        if not host.native:
            raise SpecError("--measure probes this machine: use it with --target native")
        print("measuring read bandwidth (a few seconds)...", file=sys.stderr)
        bandwidth.measure()
    measured = bandwidth.stored(host) if host.native else None
    isa = best_isa(host)
    example = KernelSpec(4096, 4096, 4, 128, isa=isa)
    best = rank(example, host, measured)[0]
    return {
        "host": host.to_dict(),
        "isa": isa,
        "read_bandwidth": {str(t): v for t, v in measured.items()} if measured else None,
        "example": {"spec": example.name, "schedule": best.schedule.to_dict(),
                    "predicted_s": best.prediction.seconds,
                    "bandwidth_assumed": model_bandwidth(host, host.cores, measured)},
    }


def print_info(d: dict) -> None:
    h = d["host"]
    print(f"cpu        {h['model']} ({h['name']}, {h['vendor'] or 'unknown vendor'}){'' if h['native'] else ' [named target]'}")
    print(f"cores      {h['cores']} at {h['freq_hz'] / 1e9:.2f} GHz")
    print(f"features   {' '.join(h['features']) or 'none of avx2/fma/f16c/avx512*'}")
    print(f"caches     L1d {h['l1d'] >> 10} KiB, L2 {h['l2'] >> 10} KiB per core; L3 {h['l3'] >> 20} MiB shared")
    bw = d["read_bandwidth"]
    print("bandwidth  " + (", ".join(f"{t} thread{'s' * (t != '1')}: {_gb(v)}" for t, v in bw.items()) if bw
                           else "not measured (run `qigen info --measure`); the model assumes "
                                + _gb(d["example"]["bandwidth_assumed"])))
    ex = d["example"]
    print(f"generates  {d['isa']} kernels; e.g. {ex['spec']} → schedule "
          + ", ".join(f"{k}={v}" for k, v in ex["schedule"].items())
          + f", predicted {ex['predicted_s'] * 1e3:.3f} ms")


def _generate(args: argparse.Namespace) -> dict:
    weights = {}
    for path in args.weights or []:
        try:
            w = np.load(path)
        except (OSError, ValueError) as e:
            raise SpecError(f"cannot read weights {path}: {e}") from e
        if w.ndim != 2 or not np.issubdtype(w.dtype, np.number) or not np.isfinite(w).all():
            raise SpecError(f"weights {path} must be a finite numeric matrix (shape {w.shape}, dtype {w.dtype})")
        weights[w.shape] = w.astype(np.float32)
    shapes = tuple(args.shape or []) + tuple(s for s in weights if s not in (args.shape or []))
    request = Request(shapes=shapes, bits=args.bits or FREE, group={None: FREE, "row": None}.get(args.group, args.group),
                      symmetric=args.sym, scale_dtype=args.scale_dtype, batch=args.batch, target=args.target,
                      isa=args.isa, threads=args.threads, tune=args.tune, max_error=args.max_error,
                      weights=weights or None)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    return generate(request, Path(args.out), log)


def print_generate(m: dict) -> None:
    print(f"{'kernel':58} {'schedule':14} {'bits/w':>6} {'error':>7} {'predicted':>10} {'measured':>10}")
    for k in m["kernels"]:
        t = k["measured_s"]
        print(f"{k['name']:58} {'r{row_vectors}a{accumulators}n{col_tile}kb{k_block}'.format(**k['schedule']):14} "
              f"{k['bits_per_weight']:6.2f} {k['relative_error']:7.4f} {k['predicted']['seconds'] * 1e3:8.3f}ms "
              + (f"{t * 1e3:8.3f}ms" if t else f"{'-':>10}"))
    lib = m["library"]
    print(f"library    {lib['file']} ({m['isa']}, {lib['compiler']}, {' '.join(lib['flags'])})")
    if not m["measured_bandwidth"]:
        print("note       bandwidth not measured: predictions assume a default; run `qigen info --measure`")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qigen", description="Generate quantized CPU kernels for this or a named CPU.")
    sub = p.add_subparsers(dest="command", required=True)
    target_help = f"LLVM CPU name ({', '.join(known_targets())})"
    i = sub.add_parser("info", help="what this CPU is and what qigen generates for it")
    i.add_argument("--target", default="native", help=target_help)
    i.add_argument("--measure", action="store_true", help="measure the read bandwidth (1 and all threads) and keep it")
    i.add_argument("--json", action="store_true", help="one JSON object on stdout")
    g = sub.add_parser("generate", help="generate, compile and write a kernel set")
    g.add_argument("--target", default="native", help=target_help)
    g.add_argument("--shape", type=_shape, action="append", help="ROWSxCOLS of a weight matrix (repeatable)")
    g.add_argument("--weights", action="append", help=".npy weight matrix: its shape, and its error for --max-error")
    g.add_argument("--bits", type=int, choices=BITS, help="bits per weight (default 4, or searched with --max-error)")
    g.add_argument("--group", type=_group,
                   help="group size 32/64/128/256 or 'row' (default 128, or searched with --max-error)")
    g.add_argument("--max-error", type=float, help="pick the fastest bits/group with relative RMS error at most this")
    g.add_argument("--sym", action="store_true", help="symmetric quantization (no offsets)")
    g.add_argument("--scale-dtype", choices=("fp16", "fp32"), default="fp16")
    g.add_argument("--batch", type=int, default=1, help="1: matrix-vector (decode); up to 512: prefill")
    g.add_argument("--isa", choices=("auto", *ISAS), default="auto")
    g.add_argument("--threads", type=int, help="threads to plan and tune for (default: all cores)")
    g.add_argument("--tune", action="store_true", help="time the best predicted schedules and keep the fastest")
    g.add_argument("-o", "--out", required=True, help="output directory")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "info":
            result, show = info(args), print_info
        else:
            result, show = _generate(args), print_generate
    except (SpecError, HostError, CompileError, LoadError, OSError) as e:
        print(f"qigen: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
