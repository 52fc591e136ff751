"""Sampled decoding against greedy decoding through the generated step, in rounds of A B C ...: medians, spreads.

Each setting decodes TOKENS tokens after a 100-token context (kv_depth.qigen_speed) on the default model; the
sampled ones pick each token in C from the step's logits (templates/sample.c.j2). Then the sampler alone: its time
per pick on the logits after a real prompt (best of 5 runs of 300 picks), to set against a token's time where the
host's noise hides the difference in whole decodes.

    python benchmarks/sampling.py [--threads 2] [--rounds 5]
"""
import argparse
import os
import statistics
import time

from kv_depth import qigen_speed
from qigen.llm import load_model
from runtime.loader import GREEDY, Sampling

SETTINGS = {"greedy": GREEDY,
            "T 0.8, top-k 40, top-p 0.95": Sampling.seeded(0.8, 40, 0.95, 0),
            "T 0.8, top-p 0.95": Sampling.seeded(0.8, 0, 0.95, 0),
            "T 1.0, every token": Sampling.seeded(1.0, 0, 1.0, 0),
            "T 1.5, top-p 0.99": Sampling.seeded(1.5, 0, 0.99, 0)}
PROMPT = "The GNU General Public License is a free, copyleft license for software and other kinds of works."


def pick_seconds(model, sampling: Sampling) -> float:
    """The C sampler's seconds per pick on the logits after PROMPT: the best of 5 runs of 300 picks."""
    ids = model.tokenizer.encode(PROMPT)
    logits = model.prefill(ids, model.new_state(len(ids)))
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(300):
            model.step.pick(logits, sampling)
        runs.append((time.perf_counter() - t0) / 300)
    return min(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    model = load_model(threads=args.threads, progress=lambda s: None)
    load = [os.getloadavg()[0]]
    samples = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, sampling in SETTINGS.items():
            samples[name].append(qigen_speed(model, 100, args.threads, sampling))
        load.append(os.getloadavg()[0])
    greedy = statistics.median(samples["greedy"])
    print(f"Decode tokens/s at {args.threads} threads, depth 100 (median of {args.rounds} rounds, spread in "
          f"brackets); load average {min(load):.2f}-{max(load):.2f}; the sampler's ms per pick, and greedy's tokens/s "
          "with that added to each token\n\n| picking | tokens/s | of greedy | ms per pick | greedy + pick |\n"
          "|---|---|---|---|---|")
    for name, v in samples.items():
        m, pick = statistics.median(v), pick_seconds(model, SETTINGS[name])
        print(f"| {name} | {m:.1f} ({100 * (max(v) - min(v)) / m:.0f}%) | {m / greedy:.3f}x | {1e3 * pick:.3f} | "
              f"{1 / (1 + pick * greedy):.3f}x |")


if __name__ == "__main__":
    main()
