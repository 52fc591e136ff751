"""`qigen bench model`: which bits, group size and method to pick for a model on this CPU.

Every bits × group × method is quantized (GPTQ, outlier channels and weighted rounding calibrate on the first half
of a shipped English text, the GNU GPL v3) and measured: file size, bits per weight, perplexity on the second half (no overlap), prompt and
decode tokens/s per thread count (median of --repeat runs), decode as a share of the rate the memory bandwidth
measured in the same run allows, and the share of decode time in generated kernels. Baselines in the same run:
the unquantized model in plain torch (fp32, and bf16 where torch has it natively), torch's dynamic int8, qigen's
fp32 path and llama.cpp on the same GGUF in its nearest types: measured by llama.cpp's own tools (llama-bench,
llama-quantize, llama-perplexity) when llama-bench is on PATH or named by $QIGEN_LLAMA_BENCH, else through
llama-cpp-python when it is installed.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from runtime import bandwidth
from perfmodel.cost import kv_bytes
from perfmodel.host import detect
from qigen.bench import (BenchError, Progress, Task, log, machine, noisy_note, optional,
                         probe, render_text, summary, write)
from qigen.kvcache import DEFAULT as DEFAULT_KV_CACHE, FORMATS as KV_FORMATS
from qigen.options import add_activations, add_format, add_kv_cache, comma_list, outliers, positive, threads
from qigen.llm import load_model, quantize_model
from qigen.pipeline import best_isa
from qigen.arch import ROLES, linear_weights
from qigen.spec import BITS, QuantSpec
from runtime.checkpoint import Checkpoint, default_model, load as load_checkpoint
from runtime.model import Model, RunState, Stats

TEXT = Path(__file__).with_name("gpl-3.txt")
PROMPT_TOKENS = 100  # the prompt of every speed run: the license's first 100 tokens
WARMUP_TOKENS = 2
PPL_RANGE = 4  # the plots show perplexity up to this factor above the best: past it a format is unusable
METHODS = ("rtn", "gptq")
LLAMA_CPP_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15, "Q3_K_M": 12, "Q2_K": 10}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
LLAMA_BENCH = "QIGEN_LLAMA_BENCH"  # names llama.cpp's llama-bench; its llama-quantize and llama-perplexity beside it


def llama_tools() -> Path | None:
    """The directory of llama.cpp's own tools: $QIGEN_LLAMA_BENCH's, else that of llama-bench on PATH; None without."""
    named = os.environ.get(LLAMA_BENCH)
    if named:
        if not (Path(named).is_file() and os.access(named, os.X_OK)):
            raise BenchError(f"{LLAMA_BENCH}={named} is no executable file: name llama.cpp's llama-bench")
        return Path(named).resolve().parent
    found = shutil.which("llama-bench")
    return Path(found).resolve().parent if found else None


class LlamaTools:
    """llama.cpp's own command-line tools in one directory (their shared libraries beside them)."""

    def __init__(self, where: Path):
        self.where = where

    def run(self, tool: str, *args: str, timeout: float = 3600) -> str:
        path = self.where / tool
        if not path.is_file():
            raise RuntimeError(f"{tool} is not beside llama-bench in {self.where}")
        env = os.environ | {"LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(self.where),
                                                                            os.environ.get("LD_LIBRARY_PATH")]))}
        r = subprocess.run([str(path), *args], capture_output=True, text=True, env=env, timeout=timeout)
        if r.returncode:
            raise RuntimeError(f"{tool} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
        return r.stdout + r.stderr

    def quantize(self, source: Path, out: Path, llama_type: str, threads: int) -> None:
        self.run("llama-quantize", "--allow-requantize", str(source), str(out), llama_type, str(threads))

    def speed(self, path: Path, threads: int, prompt: int, tokens: int, repeats: int) -> tuple[list[float], list[float]]:
        """llama-bench's prompt and decode tokens/s per repetition: pp`prompt` and tg`tokens` at `threads`."""
        out = self.run("llama-bench", "-m", str(path), "-p", str(prompt), "-n", str(tokens), "-t", str(threads),
                       "-r", str(repeats), "-o", "json")
        runs = json.loads(out[out.index("["):out.rindex("]") + 1])
        pp = next(r["samples_ts"] for r in runs if r["n_prompt"] and not r["n_gen"])
        tg = next(r["samples_ts"] for r in runs if r["n_gen"] and not r["n_prompt"])
        return [float(v) for v in pp], [float(v) for v in tg]

    def perplexity(self, path: Path, text: str, ctx: int, threads: int, windows: int | None) -> tuple[float, int]:
        """llama-perplexity's own estimate (windows of ctx, second half scored: the convention qigen follows) and
        the tokens it scored, on its own tokenization of the text."""
        text_file = path.with_suffix(".txt")
        text_file.write_text(text)
        args = ["-m", str(path), "-f", str(text_file), "-c", str(ctx), "-t", str(threads), "-b", str(ctx)]
        out = self.run("llama-perplexity", *args, *(["--chunks", str(windows)] if windows else []))
        text_file.unlink()
        ppl = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
        chunks = re.search(r"calculating perplexity over (\d+) chunks", out)
        if not ppl or not chunks:
            raise RuntimeError(f"llama-perplexity printed no estimate: {out.strip()[-300:]}")
        return float(ppl.group(1)), int(chunks.group(1)) * (ctx - ctx // 2 - 1)


def _method(text: str) -> str:
    if text not in METHODS:
        raise ValueError(f"method {text} is not one of {', '.join(METHODS)}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
    add_format(p, BITS, (32, 128), lists=True)
    p.add_argument("--method", type=comma_list(_method), default=METHODS, help="rtn and/or gptq (default both)")
    add_activations(p, ("auto",), lists=True)
    p.add_argument("--outliers", type=comma_list(outliers), default=(0,),
                   help="outlier channels per layer to sweep (qigen quantize --outliers): counts and/or auto, "
                        "calibrated like GPTQ (default 0)")
    add_kv_cache(p, lists=True)
    p.add_argument("--threads", type=comma_list(threads), help="thread counts to sweep (default: 1 and all cores)")
    p.add_argument("--repeat", type=positive, default=3, help="speed runs per thread count; median and spread (default 3)")
    p.add_argument("--ctx", type=positive, default=512, help="perplexity window in tokens (default 512)")
    p.add_argument("--max-windows", type=positive, help="score at most this many windows (default: the whole half)")
    p.add_argument("--tokens", type=positive, default=64, help="tokens decoded per speed run (default 64)")
    p.add_argument("--baselines", type=comma_list(str), default=("all",),
                   help="baselines to run: all, none, or a list of qigen-fp32, torch-fp32, torch-bf16, torch-int8, "
                        "llama.cpp (default all that this machine has)")
    p.add_argument("--keep-models", action="store_true", help="keep the quantized files in OUT/models/")
    p.add_argument("-o", "--out", type=Path, default=Path("results"), help="output directory (default results/)")
    p.add_argument("--json", action="store_true", help="print the results section as JSON instead of the table")


def torch_llama(ckpt: Checkpoint, dtype: str = "float32"):
    """A plain-torch LLaMA (Hugging Face conventions) with a KV cache, built from nn.Linear so torch's dynamic
    quantization applies. Prefill, generate and perplexity are runtime.model.Model's own loops, so windows,
    sampling and timing are qigen's: only forward() differs."""
    import torch

    dt = getattr(torch, dtype)
    nn, F = torch.nn, torch.nn.functional
    projections = {part.name.split(".")[1].removesuffix("_proj"): part.name for r in ROLES for part in r.parts}

    class TorchLlama(nn.Module):
        prefill, generate, perplexity = Model.prefill, Model.generate, Model.perplexity
        step = None  # no generated decode step: generate decodes through forward

        def __init__(self):
            super().__init__()
            c, t = ckpt.config, {k: torch.from_numpy(v).to(dt) for k, v in ckpt.tensors.items()}

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
            return RunState(torch.zeros(shape, dtype=dt), torch.zeros(shape, dtype=dt), angles.cos().to(dt),
                            angles.sin().to(dt))

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
            mask = torch.full((n, pos + n), float("-inf"), dtype=dt).triu(pos + 1)  # future positions
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
            return (logits if all_logits else logits[0]).float().numpy()

    return TorchLlama()


def texts(ckpt: Checkpoint, ctx: int, max_windows: int | None) -> tuple[str, str, list[int]]:
    """Calibration text (first half of the license), evaluation text (second half, cut to max_windows
    windows plus slack) and the prompt's token ids (the license's first PROMPT_TOKENS)."""
    text = TEXT.read_text()
    middle = text.index("\n", len(text) // 2)  # split at a line break
    calib, evaluation = text[:middle], text[middle:]
    if max_windows:
        ids = ckpt.tokenizer.encode(evaluation)
        evaluation = ckpt.tokenizer.decode(ids[:ctx * max_windows + ctx // 2])
    return calib, evaluation, ckpt.tokenizer.encode(text)[:PROMPT_TOKENS]


def weight_counts(ckpt: Checkpoint) -> tuple[int, int]:
    """(weights of the linear layers and the output head, all parameters)."""
    return linear_weights(ckpt.config), sum(t.size for t in ckpt.tensors.values())


def packed_bytes(path: Path) -> int:
    """Bytes of the .qigen file's linear-layer and head tensors (codes, scales, offsets, outlier channels and their
    weights): what decode streams."""
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith(("layers.", "head."))
                   and k.endswith((".words", ".scales", ".offsets", ".outliers", ".outlier_weights")))


class Run:
    """One invocation: the model, its texts and the options every measurement shares."""

    def __init__(self, args: argparse.Namespace, ckpt: Checkpoint, source: Path):
        self.args, self.ckpt, self.source = args, ckpt, source
        self.calib, self.evaluation, self.prompt = texts(ckpt, args.ctx, args.max_windows)
        self.weights, self.params = weight_counts(ckpt)
        self.eval_ids = ckpt.tokenizer.encode(self.evaluation)
        if len(self.eval_ids) < args.ctx:
            raise BenchError(f"the evaluation text has {len(self.eval_ids)} tokens, fewer than one --ctx window of "
                             f"{args.ctx}: lower --ctx")

    def speed(self, model, threads: int, per_token: float) -> dict:
        """Prompt and decode tokens/s at `threads`: --repeat runs after a short warm-up, medians and spreads. The
        read bandwidth is probed before and after every run (this host's swings by a third within minutes); each
        run's share of the bandwidth rate takes the higher of its two probes."""
        list(model.generate(self.prompt, max_tokens=WARMUP_TOKENS, temperature=0))
        runs, probes = [], [probe(threads)]
        for _ in range(self.args.repeat):
            stats = Stats()
            list(model.generate(self.prompt, max_tokens=self.args.tokens, temperature=0, stats=stats))
            runs.append(stats.to_dict())
            probes.append(probe(threads))
        return self.speed_record([r["prompt_tokens_per_s"] for r in runs], [r["decode_tokens_per_s"] for r in runs],
                                 probes, per_token, float(np.median([r["decode_share_in_kernels"] for r in runs])))

    def speed_record(self, prompt_runs: list[float], decode_runs: list[float], probes: list[float], per_token: float,
                     share_in_kernels: float | None) -> dict:
        """One thread count's speed entry: medians and spreads of the runs, and decode against the bandwidth rate,
        each run set against the higher of the probes around it (probes: one more than runs, or two around all)."""
        prompt, decode = summary(prompt_runs), summary(decode_runs)
        bytes_per_token = per_token
        around = zip(probes, probes[1:]) if len(probes) == len(decode_runs) + 1 else [probes] * len(decode_runs)
        shares = [100 * d * bytes_per_token / max(p) for d, p in zip(decode_runs, around)]
        bw = float(np.median(probes))
        return {"prompt_tokens_per_s": prompt["median"], "prompt_spread": prompt["spread"],
                "decode_tokens_per_s": decode["median"], "decode_spread": decode["spread"],
                "decode_runs": decode["values"], "ms_per_token": 1e3 / decode["median"],
                "share_in_kernels": share_in_kernels, "read_bandwidth": bw, "bandwidth_probes": probes,
                "bandwidth_rate": bw / bytes_per_token, "bandwidth_pct": float(np.median(shares))}

    def kv(self, name: str) -> float:
        """Bytes of a KV cache in format `name` that each decoded token reads, on average over a speed run."""
        return kv_bytes(self.ckpt.config, KV_FORMATS[name], len(self.prompt), self.args.tokens)

    def measure(self, record: dict, make, per_token: float) -> dict:
        """Speed per thread count, then perplexity with the last model; a failure is recorded, not raised.
        per_token: the bytes each decoded token reads (weights and KV cache)."""
        try:
            model = None
            record["speed"] = {}
            for t in self.args.threads:
                model = make(t)
                record["speed"][t] = self.speed(model, t, per_token)
            record["perplexity"], record["tokens_scored"] = model.perplexity(self.evaluation, self.args.ctx)
        except Exception as e:  # e.g. GPTQ failing numerically: report it and go on with the rest
            record["error"] = f"{type(e).__name__}: {e}"
            log(f"{record['name']} FAILED: {record['error']}")
        return record | {"bytes_per_token": per_token}

    def qigen(self, bits: int, group: int | None, method: str, activations: str, outliers: int | str = 0,
              kv: str = DEFAULT_KV_CACHE) -> dict:
        """One format with the KV cache `kv`: quantized by the first of --kv-cache's formats, kept for the rest."""
        quant = QuantSpec(bits, group, method=method, activations=activations, outliers=outliers)
        act = quant.resolved_activations
        kept = f" outliers {outliers}" if outliers else ""
        cache = f" kv {kv}" if kv != DEFAULT_KV_CACHE else ""
        name = f"q{bits} g{group or 'row'} {method} {act}{kept}{cache}"
        path = self.args.out / "models" / f"q{bits}g{group or 'row'}-{method}-{act}{kept.replace(' ', '-')}.qigen"
        record = {"name": name, "kind": "qigen", "bits": bits, "group": group, "method": method, "activations": act,
                  "outliers": outliers, "kv_cache": kv}
        try:
            if kv == self.args.kv_cache[0]:
                t0 = time.perf_counter()
                quantize_model(self.source, quant, path, self.calib, act_order=True, progress=lambda s: None)
                record["quantize_s"] = time.perf_counter() - t0
            packed = packed_bytes(path)
            record |= {"size_bytes": path.stat().st_size, "packed_bytes": packed,
                       "bits_per_weight": 8 * packed / self.weights}
        except Exception as e:
            log(f"{name} FAILED: {type(e).__name__}: {e}")
            return record | {"error": f"{type(e).__name__}: {e}"}
        record = self.measure(record, lambda t: load_model(path, threads=t, kv_cache=kv), packed + self.kv(kv))
        if not self.args.keep_models and kv == self.args.kv_cache[-1]:
            path.unlink()
        return record

    def qigen_fp32(self) -> dict:
        return self.measure({"name": "qigen fp32", "kind": "qigen fp32", "size_bytes": 4 * self.params,
                             "bits_per_weight": 32.0, "kv_cache": "fp32"},
                            lambda t: load_model(self.source, quant=None, threads=t, kv_cache="fp32"),
                            4 * self.weights + self.kv("fp32"))

    def torch(self, kind: str) -> dict:
        """The plain-torch model in fp32 or bf16, or torch's dynamic int8 of its Linear layers."""
        import torch

        model = torch_llama(self.ckpt, "bfloat16" if kind == "torch bf16" else "float32")
        per_token = {"torch fp32": 4, "torch bf16": 2, "torch int8": 1}[kind]  # bytes per linear weight
        size = per_token * self.params
        if kind == "torch int8":
            with warnings.catch_warnings():  # torch 2.x deprecates torch.ao.quantization in favour of torchao
                warnings.simplefilter("ignore")
                torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
            c = self.ckpt.config  # int8 linears and head; fp32 embeddings (kept apart when tied) and norms
            size = self.weights + 4 * (self.params - self.weights + c.tied_embeddings * c.vocab_size * c.hidden)
        record = {"name": kind, "kind": kind, "bits_per_weight": 8.0 * per_token, "size_bytes": size, "kv_cache": "fp32"}
        return self.measure(record, lambda t: torch.set_num_threads(t) or model,
                            per_token * self.weights + self.kv("fp32"))

    def llama_bench(self, record: dict, tools: LlamaTools, path: Path, per_token: float) -> dict:
        """Speed from llama-bench (pp of the speed runs' prompt length, tg of --tokens, --repeat repetitions) with
        the bandwidth probed around it, perplexity from llama-perplexity."""
        record["speed"] = {}
        for t in self.args.threads:
            before = probe(t)
            pp, tg = tools.speed(path, t, len(self.prompt), self.args.tokens, self.args.repeat)
            record["speed"][t] = self.speed_record(pp, tg, [before, probe(t)], per_token, None) | {"tool": "llama-bench"}
        record["perplexity"], record["tokens_scored"] = tools.perplexity(path, self.evaluation, self.args.ctx,
                                                                         max(self.args.threads), self.args.max_windows)
        return record

    def llama_cpp(self, llama_type: str) -> dict:
        """llama.cpp on the source GGUF re-quantized to `llama_type`, same threads: by its own tools when there
        (llama_tools), else through llama-cpp-python on the same texts and windows."""
        path = self.args.out / "models" / f"llama-cpp-{llama_type}.gguf"
        record = {"name": f"llama.cpp {llama_type}", "kind": "llama.cpp", "llama_type": llama_type,
                  "kv_cache": "fp16"}  # (its default, f16)
        try:
            where = llama_tools()
            tools = LlamaTools(where) if where else None
            if tools:
                tools.quantize(self.source, path, llama_type, max(self.args.threads))
            else:
                quantize_gguf(self.source, path, LLAMA_CPP_TYPES[llama_type], max(self.args.threads))
            record |= {"size_bytes": path.stat().st_size, "bits_per_weight": 8 * path.stat().st_size / self.params}
            if tools:
                record = self.llama_bench(record, tools, path, path.stat().st_size + self.kv("fp16"))
            else:
                record = self.measure(record, lambda t: LlamaCpp(path, t, self.args.ctx, self.ckpt.tokenizer),
                                      path.stat().st_size + self.kv("fp16"))
        except Exception as e:
            record["error"] = f"{type(e).__name__}: {e}"
            log(f"{record['name']} FAILED: {record['error']}")
        if not self.args.keep_models:
            path.unlink(missing_ok=True)
            path.with_suffix(".log").unlink(missing_ok=True)
        return record


@contextlib.contextmanager
def llama_log(path: Path):
    """llama.cpp writes its own log to file descriptor 2: send it to `path` instead of over the progress bar."""
    sys.stderr.flush()
    saved, log_file = os.dup(2), open(path, "ab")
    os.dup2(log_file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        log_file.close()


def quantize_gguf(source: Path, out: Path, ftype: int, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = ftype, threads, True  # the default GGUF is already Q4_1
    with llama_log(out.with_suffix(".log")):
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if failed:
        raise RuntimeError(f"llama.cpp could not quantize {source} to type {ftype}: see {out.with_suffix('.log')}")


class LlamaCpp:
    """llama.cpp behind qigen's generate / perplexity interface, fed the same token ids."""

    def __init__(self, path: Path, threads: int, ctx: int, tokenizer):
        self.tokenizer, self.path, self.threads, self.ctx = tokenizer, path, threads, ctx
        self.llm = self.open(logits_all=False)  # speed runs: the last token's logits only, as llama-bench

    def open(self, logits_all: bool):
        import llama_cpp

        with llama_log(self.path.with_suffix(".log")):
            return llama_cpp.Llama(str(self.path), n_ctx=max(self.ctx, PROMPT_TOKENS + 256), n_threads=self.threads,
                                   n_threads_batch=self.threads, n_batch=512, logits_all=logits_all, verbose=False)

    def generate(self, prompt: list[int], max_tokens: int, temperature: float = 0.0, stats: Stats | None = None):
        stats = stats if stats is not None else Stats()
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        stats.prompt_tokens, stats.prompt_s = len(prompt), time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(max_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            self.llm.eval([token])
            stats.generated_tokens += 1
            yield ""
        stats.decode_s, stats.stop = time.perf_counter() - t0, "max tokens"

    def perplexity(self, text: str, ctx: int) -> tuple[float, int]:
        """qigen's convention (runtime.model.Model.perplexity): windows of ctx ids, second half scored."""
        ids, nll, scored = self.tokenizer.encode(text), 0.0, 0
        llm = self.open(logits_all=True)  # every window token's logits
        for start in range(0, len(ids) - ctx + 1, ctx):
            window = ids[start:start + ctx]
            llm.reset()
            llm.eval(window)
            z = np.asarray(llm.scores[ctx // 2:ctx - 1], dtype=np.float64)
            logp = z - z.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            nll -= logp[np.arange(len(z)), window[ctx // 2 + 1:]].sum()
            scored += len(z)
        return float(np.exp(nll / scored)), scored


def baselines(names: tuple[str, ...], source: Path) -> list[str]:
    """The baselines asked for that this machine can run; says which it skips and why."""
    known = ("qigen-fp32", "torch-fp32", "torch-bf16", "torch-int8", "llama.cpp")
    if names in (("all",), ("none",)):
        want = list(known) if names == ("all",) else []
    elif unknown := [n for n in names if n not in known]:
        raise BenchError(f"baseline {unknown[0]} is unknown: choose all, none or from {', '.join(known)}")
    else:
        want = list(names)
    have = []
    for name in want:
        if name.startswith("torch") and not optional("torch", f"the {name} baseline"):
            continue
        if name == "torch-bf16":
            import torch

            if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                log("skipped: torch bf16, which torch runs natively only on CPUs with AVX-512 BF16 or AMX "
                    "(this one has neither)")
                continue
        if name == "llama.cpp":
            if source.suffix != ".gguf":
                log(f"skipped: llama.cpp, which needs a GGUF model ({source} is not one)")
                continue
            if llama_tools():
                log(f"llama.cpp: its own tools in {llama_tools()}")
            elif not optional("llama_cpp", "the llama.cpp baseline (llama-bench on PATH or named by "
                                           f"${LLAMA_BENCH}, or pip install 'qigen[llama]')"):
                continue
        have.append(name)
    return have


def divisibility_notes(ckpt: Checkpoint, groups: tuple[int | None, ...]) -> list[str]:
    """Group sizes that don't divide a layer's input size: qigen handles them with a partial last group."""
    c, notes = ckpt.config, []
    for g in (g for g in groups if g):
        ragged = sorted({k for k in (c.hidden, c.heads * c.head_dim, c.intermediate) if k % g})
        if ragged:
            notes.append(f"group {g} does not divide input size{'s' * (len(ragged) > 1)} {', '.join(map(str, ragged))}: "
                         f"the last group of those rows is partial ({', '.join(str(k % g) for k in ragged)} weights)")
    return notes


def table(records: list[dict], threads: tuple[int, ...]) -> tuple[list[str], list[list]]:
    most, rows = max(threads), []
    torch = next((r["speed"][most]["decode_tokens_per_s"] for r in records
                  if r["kind"] == "torch fp32" and most in r.get("speed", {})), None)

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in records:
        s = r.get("speed", {})
        top = s.get(most, {})
        share = top.get("share_in_kernels") if r["kind"].startswith("qigen") else None
        rows.append([r["name"], num(r.get("size_bytes") and r["size_bytes"] / 1e6, ".1f"),
                     num(r.get("bits_per_weight"), ".2f"), num(r.get("perplexity"), ".3f"),
                     *(num(s[t]["prompt_tokens_per_s"] if t in s else None, ".1f") for t in threads),
                     *(num(s[t]["decode_tokens_per_s"] if t in s else None, ".1f") for t in threads),
                     num(top.get("decode_spread") and 100 * top["decode_spread"], ".0f"),
                     num(torch and top.get("decode_tokens_per_s") and top["decode_tokens_per_s"] / torch, ".2f"),
                     num(top.get("bandwidth_pct"), ".0f"), num(share and 100 * share, ".0f"), r.get("error", "")])
    t = [f"{n}t" for n in threads]
    return (["config", "size MB", "bits/w", "ppl", *[f"prompt tok/s {x}" for x in t], *[f"decode tok/s {x}" for x in t],
             f"spread % {most}t", f"x torch fp32 {most}t", f"% bw rate {most}t", "% in kernels", "error"], rows)


def plot(records: list[dict], most: int, path: Path) -> bool:
    """Perplexity against decode tokens/s and against size, one point per format, Pareto fronts dashed."""
    matplotlib = optional("matplotlib", "the plots")
    if not matplotlib:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        best_ppl = min(r["perplexity"] for r in ok)
        ax.set_ylim(best_ppl / 1.15, PPL_RANGE * best_ppl)
        ax.legend(fontsize="small")
    off = [r["name"] for r in ok if r["perplexity"] > PPL_RANGE * min(r["perplexity"] for r in ok)]
    axes[0].set_title("colour: bits; o RTN, s GPTQ, * baselines (fp32, bf16, int8, llama.cpp)", fontsize=9)
    if off:
        axes[1].set_title(f"off the top (perplexity > {PPL_RANGE}x the best): {', '.join(off)}", fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> dict:
    """Measure every format and baseline, print the table, write OUT/results.json (section "model"), results.md
    and model.png."""
    host = detect()
    args.threads = args.threads or tuple(sorted({1, host.cores}))
    info = machine(host)
    log("measuring the read bandwidth (1 and all cores) for this run")
    measured = bandwidth.measure()
    source = Path(args.model) if args.model else default_model(log)
    ckpt = load_checkpoint(source)
    (args.out / "models").mkdir(parents=True, exist_ok=True)
    bench = Run(args, ckpt, source)
    names = baselines(args.baselines, source)
    notes = divisibility_notes(ckpt, args.group)
    for n in notes:
        log(n)
    gptq = 1 + 8 * ckpt.config.layers / 30  # GPTQ costs several RTN quantizations; weights only steer the estimate
    combos = {}  # (bits, group, method, resolved activations, outliers): "auto" may coincide with an explicit choice
    for b, g, m, a, o, kv in itertools.product(args.bits, args.group, args.method, args.activations, args.outliers,
                                               args.kv_cache):
        try:
            combos.setdefault((b, g, m, QuantSpec(b, g, activations=a).resolved_activations, o, kv), a)
        except ValueError as e:  # e.g. int8 activations asked for 3-bit weights
            log(f"skipped: q{b} g{g or 'row'} {m} with {a} activations: {e}")
    tasks = [Task(f"q{b} g{g or 'row'} {m} {act}" + (f" outliers {o}" if o else "") + f" kv {kv}",
                  (gptq if m == "gptq" else 1) if kv == args.kv_cache[0] else 0.5,
                  functools.partial(bench.qigen, b, g, m, a, o, kv)) for (b, g, m, act, o, kv), a in combos.items()]
    tasks += [Task(n, 1, bench.qigen_fp32 if n == "qigen-fp32" else functools.partial(bench.torch, n.replace("-", " ")))
              for n in names if n != "llama.cpp"]
    if "llama.cpp" in names:
        tasks += [Task(f"llama.cpp {t}", 1.5, functools.partial(bench.llama_cpp, t)) for t in LLAMA_CPP_TYPES]
    records = Progress(tasks).run()
    most = max(args.threads)
    head, rows = table(records, args.threads)
    noisy = noisy_note(records, lambda r: [s["decode_spread"] for s in r.get("speed", {}).values()])
    bw = ", ".join(f"{t} thread{'s' * (t > 1)} {v / 1e9:.1f} GB/s" for t, v in sorted(measured.items()))
    header = (f"{source.name}: {bench.params / 1e6:.1f}M parameters. {host.model} ({host.name}, {host.cores} cores, "
              f"{best_isa(host)}); read bandwidth {bw} (measured by this run); load average "
              f"{info['load_average_start'][0]:.2f}; {args.repeat} speed runs per thread count, median shown.")
    notes += [
        f"Perplexity: the second half of the GNU GPL v3 ({len(bench.eval_ids)} tokens"
        f"{', cut by --max-windows' if args.max_windows else ''}) in windows of {args.ctx} tokens, the second half of "
        "each window scored as llama.cpp does (prefill and decode multiply alike, so the number is what generation "
        "computes). GPTQ (act_order), outlier channels and RTN's weighted rounding calibrate on the first half: no "
        "overlap. llama.cpp's own llama-perplexity, where it runs, tokenizes the text itself (with a BOS per window).",
        "bits/w = 8 x bytes of the packed linear-layer and output-head tensors (codes, scales, offsets, outlier "
        "channels and their fp16 weights; the head stays "
        "8-bit g32) / their weight count; llama.cpp: 8 x file bytes / parameters. Size MB = the file (torch: its "
        "weights in memory).",
        f"Speed: a {len(bench.prompt)}-token prompt, then {args.tokens} greedy tokens, after a {WARMUP_TOKENS}-token "
        "warm-up; spread = (max - min) / median of the decode runs. % bw rate = median over the runs of decode tokens/s / "
        "(read bandwidth / bytes read per token: packed weights plus the KV cache, on average over the run "
        f"{bench.kv(DEFAULT_KV_CACHE) / 1e6:.1f} MB in qigen's default {DEFAULT_KV_CACHE}, "
        f"{bench.kv('fp32') / 1e6:.1f} MB in fp32 for torch and qigen fp32, {bench.kv('fp16') / 1e6:.1f} MB in f16 "
        "for llama.cpp), with the read bandwidth probed right before and after each "
        "run, the higher of the two. % in kernels = "
        "share of qigen's decode time inside generated C (the decode step; numpy for qigen fp32).",
        "Baselines: the source checkpoint's weights (for the default GGUF its Q4_1 weights) dequantized and run by "
        "plain torch (nn.Linear, KV cache), by torch's dynamic int8 (quantize_dynamic), by qigen's fp32 path, and, "
        "by llama.cpp after re-quantizing the same GGUF (already 4-bit, so its types are bounded by it): by its own "
        "llama-quantize, llama-bench (pp of the prompt's length, tg of the decoded tokens, its repetitions) and "
        f"llama-perplexity when llama-bench is on PATH or named by ${LLAMA_BENCH}, else through llama-cpp-python.",
        *([noisy] if noisy else [])]
    plotted = plot(records, most, args.out / "model.png")
    data = info | {"model": str(source), "source_sha256": ckpt.sha256, "config": ckpt.config.to_dict(),
                   "isa": best_isa(host), "measured_bandwidth": {str(t): v for t, v in measured.items()},
                   "options": {k: v for k, v in vars(args).items() if k not in ("command", "what")},
                   "baselines": names, "records": records, "noisy": noisy, "notes": notes,
                   "plots": ["model.png"] if plotted else []}
    write(args.out, "model", data, render_text("Model", header, {"Formats and baselines": (head, rows)}, notes, True))
    if not args.json:
        print(render_text("Model", header, {"Formats and baselines": (head, rows)}, notes, markdown=False))
    log(f"wrote {args.out}/results.json, results.md" + (", model.png" if plotted else ""))
    return data
