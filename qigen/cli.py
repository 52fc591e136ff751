"""The `qigen` command: `info` describes the CPU, `generate` writes a kernel set for it, `run`, `quantize` and
`perplexity` work with models, `bench` measures kernels and models."""
from __future__ import annotations

import argparse
import json
import resource
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from runtime import bandwidth, peak
from perfmodel.cost import bandwidth as model_bandwidth
from perfmodel.host import from_target, known_targets
from perfmodel.search import rank
from qigen.pipeline import FREE, Request, best_isa, generate
from qigen.options import add_activations, add_format, add_kv_cache, add_outliers, threads
from qigen.spec import DEFAULT_GROUP, ISAS, KernelSpec, QuantSpec, SpecError
from runtime.compiler import CompileError
from runtime.loader import LoadError


def _shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape '{text}' is not ROWSxCOLS, e.g. 4096x11008") from None
    return rows, cols


def _gb(v: float) -> str:
    return f"{v / 1e9:.1f} GB/s"


def info(args: argparse.Namespace) -> dict:
    host = from_target(args.target)
    if args.measure:
        if not host.native:
            raise SpecError("--measure probes this machine: use it with --target native")
        print("measuring read bandwidth and compute peaks (a few seconds)...", file=sys.stderr)
        bandwidth.measure()
        peak.measure()
    if host.native:
        host = bandwidth.measured(host)
    isa = best_isa(host)
    example = KernelSpec(4096, 4096, 4, isa=isa)
    best = rank(example, host)[0]
    return {
        "host": host.to_dict(),
        "isa": isa,
        "read_bandwidth": {str(t): v for t, v in host.bandwidth} or None,
        "compute_peaks": {str(t): v for t, v in (peak.stored(host) or {}).items()} or None if host.native else None,
        "example": {"spec": example.name, "schedule": best.schedule.to_dict(),
                    "predicted_s": best.prediction.seconds,
                    "bandwidth_assumed": model_bandwidth(host, host.cores)},
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
    peaks = d["compute_peaks"]
    print("peaks      " + ("; ".join(f"{t} thread{'s' * (t != '1')}: {v['fp32'] / 1e9:.0f} GFLOP/s fp32, "
                                    f"{v['int8'] / 1e9:.0f} GOP/s int8" for t, v in peaks.items()) if peaks
                           else "not measured (run `qigen info --measure`)"))
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
    request = Request(shapes=shapes, bits=args.bits, group=args.group,
                      symmetric=args.sym, scale_dtype=args.scale_dtype, batch=args.batch, target=args.target,
                      isa=args.isa, activations=args.activations, threads=args.threads, tune=args.tune,
                      max_error=args.max_error, weights=weights or None)
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


def _quant(args: argparse.Namespace):
    """The spec a GGUF / Hugging Face model is quantized with on load (None: run it in fp32)."""
    if args.fp32:
        return None
    return QuantSpec(bits=args.bits, group=args.group, outliers=args.outliers)


def _peak_mb() -> float:
    """This process's peak resident memory, MiB: Linux's VmHWM, else ru_maxrss (which, after a fork and exec, starts
    from the forking process's: 3.7 GB for a `qigen run` started from the test suite)."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(args: argparse.Namespace) -> dict:
    from qigen.llm import load_model
    from runtime.model import Stats, check_generation

    options = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, context=args.ctx)
    check_generation(**{k: v for k, v in options.items() if k != "seed"})  # before the model loads
    model = load_model(args.model, _quant(args), args.threads, activations=args.activations, kv_cache=args.kv_cache)
    if not args.chat:
        if args.prompt is None:
            raise ValueError("give --prompt TEXT, or --chat for a conversation")
        prompt = args.prompt
        if not args.raw and model.tokenizer.chat_template:
            prompt = model.tokenizer.chat([{"role": "user", "content": prompt}])
        stats, pieces = Stats(), []
        for piece in model.generate(prompt, stats=stats, **options):
            pieces.append(piece)
            if not args.json:
                print(piece, end="", flush=True)
        return {"text": "".join(pieces), **stats.to_dict(), "peak_memory_mb": _peak_mb()}
    messages, stats = [], Stats()
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return {"turns": len(messages) // 2, **stats.to_dict(), "peak_memory_mb": _peak_mb()}
        messages.append({"role": "user", "content": line})
        stats, pieces = Stats(), []
        for piece in model.generate(model.tokenizer.chat(messages), stats=stats, **options):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})


def print_run(r: dict) -> None:
    print(f"\n[{r['prompt_tokens']} prompt tokens at {r['prompt_tokens_per_s']:.1f}/s; {r['generated_tokens']} generated "
          f"at {r['decode_tokens_per_s']:.1f}/s ({r['ms_per_token']:.1f} ms/token); stopped: {r['stop']}; "
          f"peak memory {r['peak_memory_mb']:.0f} MB]", file=sys.stderr)


def _quantize(args: argparse.Namespace) -> dict:
    from qigen.llm import CALIBRATION, quantize_model

    calib = None if args.calib == "none" else Path(args.calib or CALIBRATION).read_text()
    quant = QuantSpec(bits=args.bits, group=args.group, symmetric=args.sym, method=args.method,
                      activations=args.activations, outliers=args.outliers)
    out = quantize_model(args.model, quant, Path(args.out), calib, act_order=args.act_order)
    return {"file": str(out), "bytes": out.stat().st_size, "quant": asdict(quant)}


def _perplexity(args: argparse.Namespace) -> dict:
    from qigen.llm import load_model

    if args.ctx < 2:
        raise ValueError(f"ctx={args.ctx}: a window holds at least 2 tokens")
    text = Path(args.text).read_text()
    model = load_model(args.model, _quant(args), args.threads, activations=args.activations, kv_cache=args.kv_cache)
    ppl, scored = model.perplexity(text, args.ctx, args.all_tokens, decode=args.decode)
    return {"perplexity": ppl, "tokens_scored": scored, "ctx": args.ctx, "kv_cache": args.kv_cache,
            "path": "decode" if args.decode else "prefill",
            "scored": "all tokens after the first of each window" if args.all_tokens
            else "second half of each window (as llama.cpp)"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qigen", description="Generate quantized CPU kernels for this or a named CPU.")
    sub = p.add_subparsers(dest="command", required=True)
    target_help = f"LLVM CPU name ({', '.join(known_targets())})"
    i = sub.add_parser("info", help="what this CPU is and what qigen generates for it")
    i.add_argument("--target", default="native", help=target_help)
    i.add_argument("--measure", action="store_true", help="measure the read bandwidth and the fp32 / int8 compute peaks (1 and all threads) and keep them")
    i.add_argument("--json", action="store_true", help="one JSON object on stdout")
    g = sub.add_parser("generate", help="generate, compile and write a kernel set")
    g.add_argument("--target", default="native", help=target_help)
    g.add_argument("--shape", type=_shape, action="append", help="ROWSxCOLS of a weight matrix (repeatable)")
    g.add_argument("--weights", action="append", help=".npy weight matrix: its shape, and its error for --max-error")
    add_format(g, FREE, FREE, sym=True, defaults=("4, or searched with --max-error",
                                                   f"{DEFAULT_GROUP}, or searched with --max-error"))
    g.add_argument("--max-error", type=float, help="pick the fastest bits/group with relative RMS error at most this")
    g.add_argument("--scale-dtype", choices=("fp16", "fp32"), default="fp16")
    g.add_argument("--batch", type=int, default=1, help="1: matrix-vector (decode); up to 512: prefill")
    g.add_argument("--isa", choices=("auto", *ISAS), default="auto")
    add_activations(g, "fp32")
    g.add_argument("--threads", type=int, help="threads to plan and tune for (default: all cores)")
    g.add_argument("--tune", action="store_true", help="time the best predicted schedules and keep the fastest")
    g.add_argument("-o", "--out", required=True, help="output directory")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")

    def model_options(c: argparse.ArgumentParser, default_help: str) -> None:
        c.add_argument("model", nargs="?", help=default_help)
        add_format(c, QuantSpec.bits, QuantSpec.group, what=" when a GGUF / HF model is quantized on load")
        add_outliers(c, " when a GGUF / HF model is quantized on load")
        c.add_argument("--fp32", action="store_true", help="run a GGUF / HF model unquantized")
        add_activations(c, None, shown="the file's, else auto")
        add_kv_cache(c)
        c.add_argument("--threads", type=threads, help="threads (default: all cores)")
        c.add_argument("--json", action="store_true", help="one JSON object on stdout")

    default = "a .qigen file, a .gguf file or a Hugging Face directory (default: SmolLM2-135M-Instruct)"
    r = sub.add_parser("run", help="generate text with a model")
    model_options(r, default)
    r.add_argument("--prompt", help="the prompt (sent as a user message when the model has a chat template)")
    r.add_argument("--raw", action="store_true", help="continue the prompt text as is, without the chat template")
    r.add_argument("--chat", action="store_true", help="interactive conversation with the model's chat template")
    r.add_argument("--max-tokens", type=int, default=128)
    r.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int)
    r.add_argument("--ctx", type=int, help="context length (default: the model's)")
    q = sub.add_parser("quantize", help="quantize a model into one .qigen file")
    q.add_argument("model", nargs="?", help="a .gguf file or a Hugging Face directory (default: SmolLM2-135M-Instruct)")
    add_format(q, QuantSpec.bits, QuantSpec.group, sym=True)
    q.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    add_activations(q, "auto")
    add_outliers(q)
    q.add_argument("--calib",
                   help="calibration text file: GPTQ and outliers take their statistics from it, and rounding weighs "
                        "each input by its Σx² there (default: the one qigen ships, qigen/calibration.txt; none: plain "
                        "round-to-nearest, no calibration, unless GPTQ or outliers need it)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal, with static groups (default on)")
    q.add_argument("-o", "--out", required=True, help="output .qigen file")
    q.add_argument("--json", action="store_true")
    pp = sub.add_parser("perplexity", help="perplexity of a model on a text")
    model_options(pp, default)
    pp.add_argument("--text", required=True, help="a UTF-8 text file")
    pp.add_argument("--ctx", type=int, default=512, help="tokens per window")
    pp.add_argument("--all-tokens", action="store_true", help="score every token, not the second half of windows")
    pp.add_argument("--decode", action="store_true",
                    help="feed tokens one at a time through the decode path (the generated step), not in prefill chunks")
    b = sub.add_parser("bench", help="measure kernels or a model on this machine: tables, results.json and plots")
    what = b.add_subparsers(dest="what", required=True)
    from qigen.bench import kernels as bench_kernels, model as bench_model

    bench_kernels.add_arguments(what.add_parser("kernels", help="kernel speed against the memory bandwidth, torch, numpy",
                                                description=bench_kernels.__doc__.split("\n\n")[0]))
    bench_model.add_arguments(what.add_parser("model", help="perplexity, size and tokens/s per bits x group x method",
                                              description=bench_model.__doc__.split("\n\n")[0]))
    return p


def _bench(args: argparse.Namespace) -> dict:
    from qigen.bench import kernels, model

    return (kernels if args.what == "kernels" else model).run(args)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        command, show = COMMANDS[args.command]
        result = command(args)
    except (ValueError, CompileError, LoadError, OSError) as e:  # SpecError, HostError, CheckpointError are ValueErrors
        print(f"qigen: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        show(result)
    return 0


def print_quantize(r: dict) -> None:
    print(f"wrote {r['file']} ({r['bytes'] / 1e6:.1f} MB)")


def print_perplexity(r: dict) -> None:
    print(f"perplexity {r['perplexity']:.3f} over {r['tokens_scored']} tokens, windows of {r['ctx']}, "
          f"scoring the {r['scored']}")


COMMANDS = {"info": (info, print_info), "generate": (_generate, print_generate), "run": (_run, print_run),
            "quantize": (_quantize, print_quantize), "perplexity": (_perplexity, print_perplexity),
            "bench": (_bench, lambda r: None)}  # bench prints its tables as it finishes


if __name__ == "__main__":
    sys.exit(main())
