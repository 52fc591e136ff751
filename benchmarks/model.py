"""Benchmark a whole model: qigen's quantized formats against plain torch and against what memory allows.

    python benchmarks/model.py [MODEL] [--bits 2,3,4,8] [--group 32,128] [--methods rtn,gptq] [--threads 1,2]
                               [--ctx 512] [--max-windows N] [--tokens 64] [--keep-models] [-o results/]

Every format is quantized into OUT/models/ (GPTQ calibrates on the first half of tests/data/gpl-3.txt) and
loaded with qigen.llm.load_model. Per format: file size, bits per weight, perplexity on the second half of the
text (no overlap with the calibration), prompt and decode tokens/s per thread count, decode as a % of the rate
the measured read bandwidth allows, and the share of decode time spent in the kernels. Baselines in the same
run: a plain-torch fp32 LLaMA with a KV cache, torch's dynamic int8 of it, and qigen's own fp32 path.
Writes OUT/model.json (every number), OUT/model.md (the table and the targets) and OUT/model.png.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from kernels import BUSY_LOAD, _list, _positive, format_table, need, numpy_threads, progress
from perfmodel import bandwidth
from perfmodel.cost import bandwidth as read_bandwidth
from perfmodel.host import detect
from qigen.llm import load_model, quantize_model
from qigen.pipeline import best_isa
from qigen.spec import BITS, QuantSpec
from runtime.checkpoint import Checkpoint, default_model, load as load_checkpoint
from runtime.compiler import compiler
from runtime.model import Model, RunState, Stats

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "gpl-3.txt"
PROMPT_TOKENS = 100  # the prompt of every speed run: the license's first 100 tokens
WARMUP_TOKENS = 2


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--bits", type=_list(int), default=BITS, help="bits list (default 2,3,4,8)")
    p.add_argument("--group", type=_list(int), default=(32, 128), help="group sizes (default 32,128)")
    p.add_argument("--methods", type=_list(str), default=("rtn", "gptq"), help="rtn and/or gptq (default both)")
    p.add_argument("--threads", type=_list(_positive), help="thread counts (default: 1 and all cores)")
    p.add_argument("--ctx", type=_positive, default=512, help="perplexity window in tokens (default 512)")
    p.add_argument("--max-windows", type=_positive, help="score at most this many windows (default: all)")
    p.add_argument("--tokens", type=_positive, default=64, help="tokens decoded per speed run (default 64)")
    p.add_argument("--keep-models", action="store_true", help="keep the .qigen files in OUT/models/")
    p.add_argument("-o", "--out", type=Path, default=Path("results"), help="output directory (default results/)")
    return p.parse_args(argv)


def torch_llama(ckpt: Checkpoint):
    """A plain-torch LLaMA (Hugging Face conventions) with a KV cache, built from nn.Linear so torch's dynamic
    quantization applies. Prefill, generate and perplexity are runtime.model.Model's own loops, so windows,
    sampling and timing are qigen's: only forward() differs."""
    torch = need("torch")
    nn, F = torch.nn, torch.nn.functional
    projections = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                   "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}

    class TorchLlama(nn.Module):
        prefill, generate, perplexity = Model.prefill, Model.generate, Model.perplexity

        def __init__(self):
            super().__init__()
            c, t = ckpt.config, {k: torch.from_numpy(v) for k, v in ckpt.tensors.items()}

            def linear(name: str) -> nn.Linear:
                layer = nn.Linear(t[name].shape[1], t[name].shape[0], bias=False)
                layer.weight = nn.Parameter(t[name], requires_grad=False)
                return layer

            self.config, self.tokenizer = c, ckpt.tokenizer
            self.layers = nn.ModuleList(nn.ModuleDict({n: linear(f"model.layers.{i}.{hf}.weight")
                                                       for n, hf in projections.items()}) for i in range(c.layers))
            self.norms = [(t[f"model.layers.{i}.input_layernorm.weight"], t[f"model.layers.{i}.post_attention_layernorm.weight"])
                          for i in range(c.layers)]
            self.embed, self.norm = t["model.embed_tokens.weight"], t["model.norm.weight"]
            self.head = linear("model.embed_tokens.weight" if c.tied_embeddings else "lm_head.weight")
            self.rope_freqs = c.rope_theta ** (-torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)

        def matmul_seconds(self) -> float:
            return 0.0  # not split out: the kernel share is qigen's figure

        def new_state(self, context: int) -> RunState:
            c = self.config
            shape = (c.layers, c.kv_heads, context, c.head_dim)
            angles = torch.outer(torch.arange(context, dtype=torch.float64), self.rope_freqs)
            return RunState(torch.zeros(shape), torch.zeros(shape), angles.cos().float(), angles.sin().float())

        def rms(self, x, w):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.rms_eps) * w

        @torch.inference_mode()
        def forward(self, tokens, state: RunState, all_logits: bool = False) -> np.ndarray:
            c, pos, hd = self.config, state.pos, self.config.head_dim
            ids = torch.as_tensor(np.asarray(tokens))
            n = len(ids)
            cos, sin = state.cos[pos:pos + n], state.sin[pos:pos + n]  # (T, head_dim/2)

            def rope(x):  # (heads, T, head_dim): rotate_half, HF's layout
                x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
                return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

            x = self.embed[ids]  # (T, hidden)
            mask = torch.full((n, pos + n), float("-inf")).triu(pos + 1)  # future positions
            for i, (lin, (attn_norm, ffn_norm)) in enumerate(zip(self.layers, self.norms)):
                h = self.rms(x, attn_norm)
                q = lin["q"](h).view(n, c.heads, hd).transpose(0, 1)
                state.k[i, :, pos:pos + n] = rope(lin["k"](h).view(n, c.kv_heads, hd).transpose(0, 1))
                state.v[i, :, pos:pos + n] = lin["v"](h).view(n, c.kv_heads, hd).transpose(0, 1)
                rep = c.heads // c.kv_heads  # GQA: each kv head serves rep query heads
                k, v = (s[i, :, :pos + n].repeat_interleave(rep, 0) for s in (state.k, state.v))
                att = torch.softmax(rope(q) @ k.transpose(1, 2) * hd ** -0.5 + mask, -1) @ v
                x = x + lin["o"](att.transpose(0, 1).reshape(n, -1))
                h = self.rms(x, ffn_norm)
                x = x + lin["down"](F.silu(lin["gate"](h)) * lin["up"](h))
            state.pos += n
            logits = self.head(self.rms(x if all_logits else x[-1:], self.norm))
            return (logits if all_logits else logits[0]).numpy()

    return TorchLlama()


def texts(ckpt: Checkpoint, ctx: int, max_windows: int | None) -> tuple[str, str, list[int]]:
    """Calibration text (first half of the license), evaluation text (second half, cut to max_windows
    windows plus slack) and the prompt's token ids."""
    text = TEXT.read_text()
    middle = text.index("\n", len(text) // 2)  # split at a line break
    calib, evaluation = text[:middle], text[middle:]
    if max_windows:
        ids = ckpt.tokenizer.encode(evaluation)
        evaluation = ckpt.tokenizer.decode(ids[:ctx * max_windows + ctx // 2])
    return calib, evaluation, ckpt.tokenizer.encode(text)[:PROMPT_TOKENS]


def weight_counts(ckpt: Checkpoint) -> tuple[int, int]:
    """(weights of the linear layers and the output head, all parameters)."""
    c = ckpt.config
    linear = c.layers * c.hidden * (c.head_dim * (2 * c.heads + 2 * c.kv_heads) + 3 * c.intermediate)
    return linear + c.vocab_size * c.hidden, sum(t.size for t in ckpt.tensors.values())


def packed_bytes(path: Path) -> int:
    """Bytes of the .qigen file's linear-layer and head tensors (codes, scales, offsets): what decode streams."""
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith(("layers.", "head."))
                   and k.endswith((".words", ".scales", ".offsets")))


def speeds(make, prompt: list[int], tokens: int, threads: tuple[int, ...], per_token: float,
           measured: dict[int, float], host, label: str):
    """Prompt and decode tokens/s per thread count (after a short warm-up), against the bandwidth rate;
    returns them and the model built for the most threads."""
    out, model = {}, None
    for t in threads:
        progress(f"  {label}: speed, {t} thread{'s' * (t > 1)}")
        model = make(t)
        list(model.generate(prompt, max_tokens=WARMUP_TOKENS, temperature=0))
        stats = Stats()
        list(model.generate(prompt, max_tokens=tokens, temperature=0, stats=stats))
        bw = read_bandwidth(host, t, measured)
        r = stats.to_dict() | {"read_bandwidth": bw, "bandwidth_rate": bw / per_token}
        out[t] = r | {"bandwidth_pct": 100 * r["decode_tokens_per_s"] / r["bandwidth_rate"]}
    return out, model


def kv_bytes(ckpt: Checkpoint, prompt: int, tokens: int) -> float:
    """fp32 key and value cache bytes each decoded token reads, averaged over the decode."""
    c = ckpt.config
    return 2 * c.layers * c.kv_heads * c.head_dim * 4 * (prompt + (tokens + 1) / 2)


def run(args: argparse.Namespace, ckpt: Checkpoint, source: Path, host, measured) -> tuple[list[dict], dict]:
    calib, evaluation, prompt = texts(ckpt, args.ctx, args.max_windows)
    weights, params = weight_counts(ckpt)
    kv = kv_bytes(ckpt, len(prompt), args.tokens)
    text = {"calibration_tokens": len(ckpt.tokenizer.encode(calib)),
            "evaluation_tokens": len(ckpt.tokenizer.encode(evaluation)), "prompt_tokens": len(prompt)}
    (args.out / "models").mkdir(parents=True, exist_ok=True)
    records = []

    def measure(record: dict, make, per_token: float) -> None:
        """Speeds, then perplexity with the model of the most threads; a failure is recorded, not raised."""
        progress(f"[{len(records) + 1}] {record['name']}")
        try:
            record["speed"], model = speeds(make, prompt, args.tokens, args.threads, per_token + kv, measured, host,
                                            record["name"])
            progress(f"  {record['name']}: perplexity")
            record["perplexity"], record["tokens_scored"] = model.perplexity(evaluation, args.ctx)
            progress(f"  {record['name']}: perplexity {record['perplexity']:.3f}, decode tokens/s " + ", ".join(
                f"{s['decode_tokens_per_s']:.1f} ({t}t)" for t, s in record["speed"].items()))
        except Exception as e:  # e.g. GPTQ failing numerically: report it and go on
            record["error"] = f"{type(e).__name__}: {e}"
            progress(f"  FAILED: {record['error']}")
        records.append(record | {"bytes_per_token": per_token + kv})

    for bits, group, method in itertools.product(args.bits, args.group, args.methods):
        name, path = f"q{bits} g{group} {method}", args.out / "models" / f"q{bits}g{group}-{method}.qigen"
        record = {"name": name, "kind": "qigen", "bits": bits, "group": group, "method": method}
        try:
            progress(f"quantizing {name}")
            t0 = time.perf_counter()
            quantize_model(source, QuantSpec(bits, group, method=method), path, calib, act_order=True,
                           progress=lambda s: None if s.startswith("gptq ") else progress("  " + s))
            size, packed = path.stat().st_size, packed_bytes(path)
            record |= {"quantize_s": time.perf_counter() - t0, "size_bytes": size, "packed_bytes": packed,
                       "bits_per_weight": 8 * packed / weights, "file_bits_per_parameter": 8 * size / params}
        except Exception as e:
            records.append(record | {"error": f"{type(e).__name__}: {e}"})
            progress(f"  FAILED: {records[-1]['error']}")
            continue
        measure(record, lambda t: load_model(path, threads=t), packed)
        if not args.keep_models:
            path.unlink()

    fp32 = {"size_bytes": 4 * params, "bits_per_weight": 32.0}
    measure({"name": "qigen fp32", "kind": "qigen fp32"} | fp32, lambda t: load_model(source, quant=None, threads=t),
            4 * weights)
    torch, model = need("torch"), torch_llama(ckpt)
    measure({"name": "torch fp32", "kind": "torch fp32"} | fp32, lambda t: torch.set_num_threads(t) or model,
            4 * weights)
    with warnings.catch_warnings():  # torch 2.x deprecates torch.ao.quantization in favour of torchao
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    fp32_rest = params - weights + ckpt.config.tied_embeddings * ckpt.config.vocab_size * ckpt.config.hidden
    measure({"name": "torch int8 dynamic", "kind": "torch int8", "bits_per_weight": 8.0,  # per-tensor scales
             "size_bytes": weights + 4 * fp32_rest}, lambda t: torch.set_num_threads(t) or model, weights)
    return records, text | {"linear_and_head_weights": weights, "parameters": params, "kv_bytes_per_token": kv}


def table(records: list[dict], threads: tuple[int, ...]) -> tuple[list[str], list[list]]:
    most, rows = max(threads), []

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in records:
        s = r.get("speed", {})
        top = s.get(most, {})
        share = top.get("decode_share_in_kernels") if r["kind"].startswith("qigen") else None
        rows.append([r["name"], num(r.get("size_bytes") and r["size_bytes"] / 1e6, ".1f"),
                     num(r.get("bits_per_weight"), ".2f"), num(r.get("perplexity"), ".3f"),
                     *(num(s[t]["prompt_tokens_per_s"] if t in s else None, ".1f") for t in threads),
                     *(num(s[t]["decode_tokens_per_s"] if t in s else None, ".1f") for t in threads),
                     num(top.get("bandwidth_rate"), ".0f"), num(top.get("bandwidth_pct"), ".0f"),
                     num(share and 100 * share, ".0f"), r.get("error", "")])
    t = [f"{n}t" for n in threads]
    return (["config", "size MB", "bits/w", "ppl", *[f"prompt tok/s {x}" for x in t], *[f"decode tok/s {x}" for x in t],
             f"bw rate tok/s {most}t", "% of rate", "% decode in linears", "error"], rows)


def targets(records: list[dict], most: int) -> list[str]:
    """The goals, each met / not met with its numbers, for every 4-bit format at the most threads."""
    ok = [r for r in records if most in r.get("speed", {})]
    torch = next((r["speed"][most]["decode_tokens_per_s"] for r in ok if r["kind"] == "torch fp32"), None)
    goals, on = [], f"{most} thread{'s' * (most > 1)}"
    for r in (r for r in ok if r.get("bits") == 4):
        s = r["speed"][most]
        tps, verdict = s["decode_tokens_per_s"], lambda good: "met" if good else "not met"
        if torch:
            goals.append(f"{r['name']} decode {tps:.1f} tok/s = {tps / torch:.2f}x torch fp32 ({torch:.1f} tok/s), "
                         f"{on} (goal >= 3x): {verdict(tps >= 3 * torch)}")
        goals.append(f"{r['name']} decode {tps:.1f} tok/s = {s['bandwidth_pct']:.0f}% of the bandwidth rate "
                     f"({s['bandwidth_rate']:.0f} tok/s = {s['read_bandwidth'] / 1e9:.1f} GB/s / "
                     f"{r['bytes_per_token'] / 1e6:.1f} MB per token), {on} (goal >= 80%): "
                     f"{verdict(s['bandwidth_pct'] >= 80)}")
    return goals or ["no measurement covers a target (they need a 4-bit format that ran, and torch fp32)"]


def plot(records: list[dict], most: int, path: Path) -> None:
    """Perplexity against decode tokens/s and against size, one point per format, Pareto fronts dashed."""
    need("matplotlib").use("Agg")
    plt = need("matplotlib.pyplot")
    ok = [r for r in records if r.get("perplexity") and most in r.get("speed", {})]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, x, label, higher in ((axes[0], lambda r: r["speed"][most]["decode_tokens_per_s"],
                                  f"decode tokens/s, {most} thread{'s' * (most > 1)}", True),
                                 (axes[1], lambda r: r["size_bytes"] / 1e6, "size MB", False)):
        for r in ok:
            base = r["kind"] != "qigen"
            ax.scatter(x(r), r["perplexity"], marker="*" if base else "os"[r["method"] == "gptq"], s=120 if base else 45,
                       color="k" if base else f"C{r['bits']}", zorder=3)
            ax.annotate(r["name"], (x(r), r["perplexity"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        front, best = [], math.inf
        for r in sorted(ok, key=lambda r: -x(r) if higher else x(r)):
            if r["perplexity"] < best * (1 - 1e-6):  # equal perplexity (qigen fp32, torch fp32) is no gain
                front.append(r)
                best = r["perplexity"]
        ax.plot([x(r) for r in front], [r["perplexity"] for r in front], "k--", lw=0.8, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity (log)")
        ax.set_yscale("log")
        ax.legend(fontsize="small")
    axes[0].set_title("colour: bits; o RTN, s GPTQ, * fp32/int8 baselines", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch, _ = need("torch"), need("matplotlib")  # fail before the long part
    host = detect()
    args.threads = args.threads or tuple(sorted({1, host.cores}))
    most = max(args.threads)
    load_start = os.getloadavg()
    progress("load average " + " ".join(f"{v:.2f}" for v in load_start))
    if load_start[0] > BUSY_LOAD:
        progress(f"WARNING: 1-minute load {load_start[0]:.2f} > {BUSY_LOAD}: another process will skew the numbers")
    # the machine is shared: its bandwidth drifts, so every ratio uses a probe taken in this run
    progress("measuring the read bandwidth (perfmodel.bandwidth.measure())")
    measured = bandwidth.measure()
    source = Path(args.model) if args.model else default_model(progress)
    progress(f"loading {source}")
    ckpt = load_checkpoint(source)
    records, counts = run(args, ckpt, source, host, measured)
    load_end = os.getloadavg()
    head, rows = table(records, args.threads)
    goals = targets(records, most)
    bw = ", ".join(f"{t} thread{'s' * (t > 1)} {v / 1e9:.1f} GB/s" for t, v in sorted(measured.items()))
    header = (f"{source.name}: {counts['parameters'] / 1e6:.1f}M parameters. {host.model} ({host.name}, {host.cores} "
              f"cores, {best_isa(host)}); read bandwidth {bw} (measured by this run); "
              f"load average {load_start[0]:.2f} -> {load_end[0]:.2f}.")
    notes = [f"GPTQ (act_order) calibrates on the first half of tests/data/gpl-3.txt ({counts['calibration_tokens']} "
             f"tokens); perplexity is measured on the second half ({counts['evaluation_tokens']} tokens"
             f"{', cut by --max-windows' if args.max_windows else ''}): windows of {args.ctx} tokens, the second half "
             "of each window scored as llama.cpp does. Calibration and evaluation text do not overlap.",
             "bits/w = 8 x bytes of the packed linear-layer and output-head tensors (codes, scales, offsets; the head "
             "stays 8-bit g32) / their weight count; size MB = the .qigen file (baselines: their weights in memory).",
             f"Speed: a {counts['prompt_tokens']}-token prompt from the license, then {args.tokens} greedy tokens "
             "(after a 2-token warm-up). Bandwidth rate = read bandwidth / bytes read per decoded token (packed "
             f"linear + head weights, plus {counts['kv_bytes_per_token'] / 1e6:.1f} MB of fp32 KV cache on average).",
             "Baselines: the source checkpoint's weights dequantized to fp32 (for the default GGUF, its Q4_1 weights) "
             "run by plain torch (nn.Linear, KV cache), by torch's dynamic int8 (quantize_dynamic) and by qigen's fp32 "
             "numpy path. '% decode in linears' is the share of qigen's decode time in its linear layers (the kernels; "
             "numpy for qigen fp32); the rest is Python/numpy (attention, norms, sampling)."]
    print(header + "\n\n" + format_table(head, rows, markdown=False) + "\n\n" + "\n".join(notes)
          + "\n\nTargets\n" + "\n".join(goals))
    (args.out / "model.md").write_text(f"# qigen model benchmark\n\n{header}\n\n{format_table(head, rows, markdown=True)}"
                                       "\n\n" + "".join(f"- {n}\n" for n in notes)
                                       + "\n## Targets\n\n" + "".join(f"- {g}\n" for g in goals))
    (args.out / "model.json").write_text(json.dumps({
        "model": str(source), "source_sha256": ckpt.sha256, "config": ckpt.config.to_dict(), "host": host.to_dict(),
        "isa": best_isa(host), "measured_bandwidth": {str(t): v for t, v in measured.items()},
        "load_average": {"start": load_start, "end": load_end},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                     "compiler": compiler().version, "numpy_blas_threads": numpy_threads() or "BLAS default threads"},
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "counts": counts,
        "notes": notes, "records": records, "targets": goals}, indent=1))
    plot(records, most, args.out / "model.png")
    progress(f"wrote {args.out}/model.json, model.md, model.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
