"""Fuzz qigen's model readers: mutated GGUF files, .qigen files and Hugging Face directories, each read by a worker
process under a memory limit, with a time limit per input. Every input must load or be refused with a
CheckpointError: a crash (the worker dies), a hang (no answer in TIMEOUT_S), any other exception, or reading it taking
more than GROWTH times its size plus MARGIN of memory (the worker's peak resident memory over its own before) is a
finding.

    python -m tests.fuzz --inputs 10000          # the long run: GGUF, .qigen and HF, split 5:1:1
    python -m tests.fuzz --inputs 300 --seed 7   # test_fuzz.py runs a few hundred in the suite
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

TIMEOUT_S = 10
MEMORY = 3 << 30  # bytes of address space a worker may map: numpy, the readers and a tiny model fit well within
GROWTH, MARGIN = 4, 64 << 20  # what reading an input may add to the worker's peak resident memory: 4x its size + 64 MiB
EXTREMES = (0, 1, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 31, 1 << 32, (1 << 63) - 1, (1 << 64) - 1, (1 << 64) - 32)


def seeds(directory: Path) -> dict[str, Path]:
    """A tiny valid model three ways: a GGUF file, a Hugging Face directory and a .qigen file."""
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("QIGEN_TEST_GGUF", "")  # test_checkpoint's path to the real model, not needed here
    from test_checkpoint import MERGES, TINY, TOKENS, TYPES, _random, _write_gguf, _write_hf

    from qigen.llm import save
    from qigen.spec import QuantSpec
    from runtime.checkpoint import load
    from runtime.model import quantize_weights, split_linears
    from runtime.tokenizer import Tokenizer

    gguf = _write_gguf(directory / "seed.gguf", TINY, _random(TINY))
    hf = _write_hf(directory / "seed-hf", TINY, _random(TINY),
                   Tokenizer.from_gguf_fields(TOKENS, MERGES, TYPES, 1, 2, None, False, "smollm"))
    ckpt = load(gguf)
    qigen = directory / "seed.qigen"
    save(qigen, quantize_weights(split_linears(ckpt), QuantSpec(4, 32)), ckpt.tokenizer, ckpt.sha256)
    return {"gguf": gguf, "hf": hf, "qigen": qigen}


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to three edits of the kinds a damaged or hostile file has: flipped bits, a truncation, a count, length,
    type or offset set to an extreme, bytes inserted or removed; half of them in the first 4 KiB, where the
    headers and metadata are."""
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        kind, span = int(rng.integers(5)), len(data) if rng.random() < 0.5 else min(len(data), 4096)  # headers often
        at = int(rng.integers(max(span, 1)))
        if kind == 0:
            data[at] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            del data[int(rng.integers(len(data) + 1)):]
        elif kind == 2:
            width = (1, 4, 8)[int(rng.integers(3))]
            data[at:at + width] = (int(rng.choice(EXTREMES)) & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        elif kind == 3:
            data[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
        else:
            del data[at:at + int(rng.integers(1, 9))]
        if not data:
            break
    return bytes(data)


def inputs(seed_paths: dict[str, Path], kind: str, count: int, seed: int, directory: Path):
    """`count` mutated inputs of one kind, written under directory: (kind, path) each."""
    rng = np.random.default_rng(seed)
    source = seed_paths[kind]
    for i in range(count):
        if kind == "hf":  # one file of the directory mutated
            target = directory / f"hf-{i}"
            shutil.copytree(source, target)
            files = sorted(p for p in target.iterdir() if p.is_file())
            victim = files[int(rng.integers(len(files)))]
            victim.write_bytes(mutate(victim.read_bytes(), rng))
        else:
            target = directory / f"{i}.{kind}"
            target.write_bytes(mutate(source.read_bytes(), rng))
        yield kind, target


def worker() -> None:
    """Read `kind path` lines, load each, answer one JSON line: loaded, refused (CheckpointError) or an error."""
    from qigen.llm import load_file
    from runtime.checkpoint import CheckpointError, load

    status = Path("/proc/self/status")
    resident = lambda key: next(int(v.split()[1]) << 10 for v in status.read_text().splitlines() if v.startswith(key))
    for line in sys.stdin:
        kind, path = line.rstrip("\n").split(" ", 1)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
        except OSError:  # (where it cannot, the peak since the worker started: an upper bound)
            pass
        before = resident("VmRSS:")
        try:
            load_file(Path(path)) if kind == "qigen" else load(path)
            answer = {"outcome": "loaded"}
        except CheckpointError as e:
            answer = {"outcome": "refused", "message": str(e)[:300]}
        except BaseException as e:  # a finding: the traceback says where
            answer = {"outcome": "traceback", "message": "".join(traceback.format_exception(e))[-1500:]}
        print(json.dumps(answer | {"grew": resident("VmHWM:") - before}), flush=True)


def _start() -> subprocess.Popen:
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    env = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", "from tests.fuzz import worker; worker()"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, preexec_fn=limit, env=env,
                            cwd=Path(__file__).parent.parent)


def run(count: int, seed: int = 0, progress=lambda s: None) -> tuple[Counter, list[dict]]:
    """Fuzz `count` inputs (GGUF, .qigen and HF split 5:1:1); the outcomes counted, and every finding."""
    outcomes, findings = Counter(), []
    with tempfile.TemporaryDirectory(prefix="qigen-fuzz-") as tmp:
        tmp = Path(tmp)
        seed_paths = seeds(tmp)
        split = {"gguf": count - 2 * (count // 7), "qigen": count // 7, "hf": count // 7}
        proc = _start()
        for n, (kind, path) in enumerate(item for k, c in split.items()
                                         for item in inputs(seed_paths, k, c, seed, tmp / k if k == "hf" else tmp)):
            size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
            proc.stdin.write(f"{kind} {path}\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT_S)
            line = proc.stdout.readline() if ready else ""
            if not line:  # died or hung: a finding, and a fresh worker for the next input
                hung = proc.poll() is None
                proc.kill()
                proc.wait()
                answer = {"outcome": "hang" if hung else "crash", "message": f"exit {proc.returncode}"}
                proc = _start()
            else:
                answer = json.loads(line)
                if answer["grew"] > GROWTH * size + MARGIN:
                    answer = {"outcome": "memory", "message": f"{answer['grew']} bytes to read {size}"}
            outcomes[answer["outcome"]] += 1
            if answer["outcome"] not in ("loaded", "refused"):
                findings.append({"kind": kind, "input": n, **answer})
            if kind == "hf":
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
            if n % 100 == 99:
                progress(f"{n + 1}/{count}: {dict(outcomes)}")
        proc.stdin.close()
        proc.wait()
    return outcomes, findings


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    outcomes, findings = run(args.inputs, args.seed, lambda s: print(s, file=sys.stderr))
    for f in findings[:20]:
        print(json.dumps(f, indent=1))
    print(json.dumps({"inputs": args.inputs, "outcomes": dict(outcomes), "findings": len(findings)}))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
