"""Decode and prompt speed while other programs keep cores busy, beside llama.cpp's own llama-bench under the same load.

For 0, 1 and 2 busy processes (each `while True: pass`, started a second before and killed after), rounds of
A B A B: `qigen run` of the default model in a fresh process at its default thread count and at 1 thread (a
PROMPT_TOKENS-token prompt, then TOKENS greedy tokens; its own tokens/s for each), then llama-bench on Q4_0 at the
same thread counts (`-p PROMPT_TOKENS -n TOKENS`) when QIGEN_LLAMA_BENCH names it or it is on PATH. Medians and
spreads, the load average beside them.

    QIGEN_LLAMA_BENCH=~/.cache/llama.cpp-b11312/bin/llama-bench python benchmarks/contention.py \\
        [--busy 0,1,2] [--rounds 3] [--out benchmarks/contention]

Writes OUT.json (every sample) and OUT.md (the table).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qigen.bench.model import LlamaTools, llama_tools
from runtime.checkpoint import default_model

TOKENS = 128
PROMPT_TOKENS = 256
TEXT = Path(__file__).parent.parent / "qigen" / "bench" / "gpl-3.txt"


def qigen(threads: int | None, prompt: str) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) of one `qigen run` in a fresh process."""
    command = [sys.executable, "-m", "qigen.cli", "run", "--raw", "--prompt", prompt, "--max-tokens", str(TOKENS),
               "--json", *(["--threads", str(threads)] if threads else [])]
    out = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return out["prompt_tokens_per_s"], out["decode_tokens_per_s"]


def llama(tools: LlamaTools, gguf: Path, threads: int) -> tuple[float, float]:
    out = tools.run("llama-bench", "-m", str(gguf), "-p", str(PROMPT_TOKENS), "-n", str(TOKENS), "-t", str(threads),
                    "-r", "1", "-o", "json")
    runs = json.loads(out[out.index("["):out.rindex("]") + 1])
    speed = {"pp" if r["n_prompt"] else "tg": float(r["avg_ts"]) for r in runs}
    return speed["pp"], speed["tg"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", default="0,1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/contention"))
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    where = llama_tools()
    tools = LlamaTools(where) if where else None
    gguf = Path.home() / ".cache" / "qigen-bench" / "smollm2-135m-q4_0.gguf"
    if tools and not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        tools.run("llama-quantize", "--allow-requantize", str(default_model(print)), str(gguf), "Q4_0")
    from qigen.llm import load_model  # the prompt, cut to PROMPT_TOKENS of the model's own tokens

    tokenizer = load_model(progress=lambda s: None).tokenizer
    prompt = tokenizer.decode(tokenizer.encode(TEXT.read_text())[:PROMPT_TOKENS])
    runs = {f"qigen {cores} threads (default)": lambda: qigen(None, prompt), "qigen 1 thread": lambda: qigen(1, prompt)}
    if tools:
        runs |= {f"llama.cpp Q4_0 {cores} threads": lambda: llama(tools, gguf, cores),
                 "llama.cpp Q4_0 1 thread": lambda: llama(tools, gguf, 1)}
    samples, load = {}, {}
    for busy in (int(b) for b in args.busy.split(",")):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(1.0)
            load[busy] = [os.getloadavg()[0]]
            for _ in range(args.rounds):
                for name, run in runs.items():
                    samples.setdefault(busy, {}).setdefault(name, []).append(run())
                    print(f"{busy} busy, {name}: {samples[busy][name][-1]}", file=sys.stderr)
                load[busy].append(os.getloadavg()[0])
        finally:
            for h in hogs:
                h.kill()
                h.wait()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"cores": cores, "tokens": TOKENS, "prompt_tokens": PROMPT_TOKENS,
                                                         "load": load, "samples": samples}, indent=1))
    med = lambda v, i: statistics.median(s[i] for s in v)
    spread = lambda v, i: f"{min(s[i] for s in v):.0f}-{max(s[i] for s in v):.0f}"
    idle = samples.get(0, {})
    lines = [f"Tokens/s on {cores} cores with busy processes beside (medians of {args.rounds} rounds, ranges; "
             f"{PROMPT_TOKENS}-token prompt, {TOKENS} greedy tokens; load average per setting in the first column)", "",
             "| busy processes | run | prompt tok/s | decode tok/s | decode of its idle speed |", "|---|---|---|---|---|"]
    for busy, by_run in samples.items():
        for name, v in by_run.items():
            of_idle = f"{100 * med(v, 1) / med(idle[name], 1):.0f}%" if name in idle else ""
            lines.append(f"| {busy} (load {min(load[busy]):.1f}-{max(load[busy]):.1f}) | {name} | {med(v, 0):.0f} "
                         f"({spread(v, 0)}) | {med(v, 1):.0f} ({spread(v, 1)}) | {of_idle} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
