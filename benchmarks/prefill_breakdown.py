"""Where a 512-token prefill of a model spends its time: the matrix products, the step's generated attention,
SwiGLU and RMSNorm, and the rest (Python: residual adds, the embedding lookup). The fastest of 5 runs per thread
count, 1 and all cores.

    python benchmarks/prefill_breakdown.py [MODEL]      # default: SmolLM2-135M-Instruct, 4-bit g32
"""
import sys
import time

import numpy as np

from perfmodel.host import detect
from qigen.llm import load_model

PARTS = ("attention", "swiglu", "rmsnorm")
TOKENS, RUNS = 512, 5


def timed(seconds: dict, name: str, fn):
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds[name] += time.perf_counter() - t0
        return result
    return run


def main(path: str | None) -> None:
    rng = np.random.default_rng(0)
    for threads in sorted({1, detect().cores}):
        model = load_model(path, threads=threads)
        seconds = dict.fromkeys(PARTS, 0.0)
        for name in PARTS:  # the bound step is frozen: wrap its parts in place
            object.__setattr__(model.step, name, timed(seconds, name, getattr(model.step, name)))
        linears = [*(lin for layer in model.linears for lin in layer.values()), model.head]
        best = None
        for _ in range(RUNS):
            for name in seconds:
                seconds[name] = 0.0
            for lin in linears:
                lin.seconds = 0.0
            state = model.new_state(TOKENS)
            t0 = time.perf_counter()
            model.prefill([int(i) for i in rng.integers(100, model.config.vocab_size, TOKENS)], state)
            total = time.perf_counter() - t0
            if best is None or total < best[0]:
                best = total, sum(lin.seconds for lin in linears), dict(seconds)
        total, products, parts = best
        rest = total - products - sum(parts.values())
        shares = {"products": products, **parts, "rest": rest}
        print(f"{threads} thread(s): {1e3 * total:.1f} ms, {TOKENS / total:.0f} tokens/s; "
              + ", ".join(f"{k} {1e3 * v:.1f} ms ({100 * v / total:.0f}%)" for k, v in shares.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
