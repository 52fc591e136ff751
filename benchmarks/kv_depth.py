"""Decode speed against context depth for each KV-cache format, beside llama.cpp's own llama-bench in the same
run: rounds of A B A B (every qigen format, then every llama.cpp cache, at each depth), medians and spreads.

qigen decodes TOKENS greedy tokens at position `depth` through the generated step, its caches holding `depth`
random rows written in the format (the speed of attention does not depend on what the rows hold); llama-bench
fills its cache by a prefill of `depth` tokens (`-d`) and times tg TOKENS. llama.cpp runs Q4_0 (quantized from the
package's Q4_1 GGUF by its own llama-quantize) with its default f16 cache and with q8_0 keys and values (flash
attention, which its quantized V cache needs); qigen runs its default model, 4-bit g32.

    QIGEN_LLAMA_BENCH=~/.cache/llama.cpp-b11312/bin/llama-bench python benchmarks/kv_depth.py \\
        [--depths 0,512,2048,4096,8000] [--threads 2] [--rounds 3] [--out benchmarks/kv-depth]

Writes OUT.json (every sample), OUT.md (the table) and OUT.png (tokens/s against depth). The table also gives
each qigen format's decode as a % of the rate the read bandwidth allows for the bytes a token reads at that depth
(packed weights plus every cached row of keys and values), against the bandwidth probed after each round.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from perfmodel.cost import kv_bytes
from qigen.bench import probe
from qigen.bench.model import LlamaTools, llama_tools
from qigen.kvcache import FORMATS
from qigen.llm import load_model
from runtime.checkpoint import default_model
from runtime.loader import GREEDY, Sampling

TOKENS = 32
LLAMA_CACHES = {"f16": [], "q8_0": ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "1"]}


def qigen_speed(model, depth: int, threads: int, sampling: Sampling = GREEDY) -> float:
    """Tokens/s of TOKENS tokens (greedy, or picked by `sampling`) decoded at position depth."""
    state = model.new_state(depth + TOKENS + 1)
    rng = np.random.default_rng(depth)
    for cache, keys in ((state.k, True), (state.v, False)):  # layer by layer: 8k fp32 random floats are 1.6 GB at once
        for layer in cache:
            model.kv.write(layer, 0, rng.standard_normal((layer.shape[0], depth, model.config.head_dim), np.float32), keys)
    stop = np.array([], np.int32)
    model.step.decode(model.w.embed, 1, 2, stop, state.k, state.v, state.cos, state.sin, depth, threads, sampling)  # warm
    t0 = time.perf_counter()
    n = len(model.step.decode(model.w.embed, 1, TOKENS, stop, state.k, state.v, state.cos, state.sin, depth, threads,
                              sampling))
    return n / (time.perf_counter() - t0)


def bytes_per_token(model, depth: int) -> float:
    """What one decoded token at position depth reads: the packed weights, then its share of the KV cache."""
    weights = sum(lin.packed.nbytes for layer in model.linears for lin in layer.values()) + model.head.packed.nbytes
    return weights + kv_bytes(model.config, model.kv, depth, TOKENS)


def llama_speed(tools: LlamaTools, gguf: Path, depth: int, threads: int, cache: str) -> float:
    out = tools.run("llama-bench", "-m", str(gguf), "-p", "0", "-n", str(TOKENS), "-d", str(depth), "-t", str(threads),
                    "-r", "1", "-o", "json", *LLAMA_CACHES[cache])
    runs = json.loads(out[out.index("["):out.rindex("]") + 1])
    return float(runs[0]["avg_ts"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="0,512,2048,4096,8000")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/kv-depth"))
    args = p.parse_args()
    depths, formats = [int(d) for d in args.depths.split(",")], args.formats.split(",")
    where = llama_tools()
    tools = LlamaTools(where) if where else None
    gguf = Path.home() / ".cache" / "qigen-bench" / "smollm2-135m-q4_0.gguf"
    if tools and not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        tools.quantize(default_model(print), gguf, "Q4_0", args.threads)
    models = {f: load_model(kv_cache=f, threads=args.threads, progress=lambda s: None) for f in formats}
    names = [f"qigen {f}" for f in formats] + ([f"llama.cpp {c}" for c in LLAMA_CACHES] if tools else [])
    samples = {n: {d: [] for d in depths} for n in names}
    load, bandwidth = [os.getloadavg()[0]], []
    for r in range(args.rounds):
        for d in depths:
            for f in formats:
                samples[f"qigen {f}"][d].append(qigen_speed(models[f], d, args.threads))
            for c in LLAMA_CACHES if tools else ():
                samples[f"llama.cpp {c}"][d].append(llama_speed(tools, gguf, d, args.threads, c))
            print(f"round {r + 1} depth {d}: " + ", ".join(f"{n} {samples[n][d][-1]:.1f}" for n in names),
                  file=sys.stderr, flush=True)
        load.append(os.getloadavg()[0])
        bandwidth.append(probe(args.threads))
    median = {n: {d: statistics.median(v) for d, v in s.items()} for n, s in samples.items()}
    spread = {n: {d: (max(v) - min(v)) / statistics.median(v) for d, v in s.items()} for n, s in samples.items()}
    rows = [f"| {n} | " + " | ".join(f"{median[n][d]:.1f} ({100 * spread[n][d]:.0f}%)" for d in depths) + " |"
            for n in names]
    bw = statistics.median(bandwidth)
    for f in formats:
        rows.append(f"| qigen {f}, % of the bandwidth rate | " + " | ".join(
            f"{100 * median[f'qigen {f}'][d] * bytes_per_token(models[f], d) / bw:.0f}%" for d in depths) + " |")
    if tools:
        for f in formats:
            for c in LLAMA_CACHES:
                rows.append(f"| qigen {f} / llama.cpp {c} | "
                            + " | ".join(f"{median[f'qigen {f}'][d] / median[f'llama.cpp {c}'][d]:.2f}x" for d in depths)
                            + " |")
    table = "\n".join([f"Decode tokens/s at {args.threads} threads against depth (median of {args.rounds} interleaved "
                       f"rounds, spread in brackets); load average {min(load):.2f}-{max(load):.2f}; read bandwidth "
                       f"{bw / 1e9:.1f} GB/s (median of a probe after each round)", "",
                       "| | " + " | ".join(f"depth {d}" for d in depths) + " |",
                       "|---|" + "---|" * len(depths), *rows])
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"threads": args.threads, "tokens": TOKENS, "load": load,
                                                         "bandwidth": bandwidth, "samples": samples}, indent=1))
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in names:
        ax.plot(depths, [median[n][d] for d in depths], marker="o", linestyle="--" if "llama" in n else "-", label=n)
    ax.set(xlabel="context depth (tokens)", ylabel="decode tokens/s", yscale="log",
           title=f"SmolLM2-135M decode against depth, {args.threads} threads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
