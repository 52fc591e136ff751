"""`qigen bench`: measure kernels (`kernels`) and whole models (`model`) on this machine.

What both share lives here: a progress bar with the time left, repeats summarised as median and spread
with a noisy-machine warning, tables, and the results directory. One directory holds both benchmarks:
`results.json` keeps a section per benchmark (a run replaces only its own) and validates against
`schema.json`; `results.md` holds every section's tables; each benchmark draws its own PNG.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import bandwidth
from runtime.compiler import atomic_write, compiler

BUSY_LOAD = 0.5  # 1-minute load average above which another process skews the numbers
NOISY_SPREAD = 0.10  # (max - min) / median of the repeats above which a measurement is called noisy
SCHEMA = Path(__file__).with_name("schema.json")
FORMAT = "qigen-bench/1"


class BenchError(ValueError):
    """A benchmark that cannot run as asked; the message says what to change."""


def optional(module: str, why: str):
    """The module, or None after saying what is skipped without it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        log(f"skipped: {why} needs the Python package {module.split('.')[0]}, which is not installed")
        return None


def log(message: str) -> None:
    """A line on stderr, above the progress bar."""
    if Progress.current:
        Progress.current.clear()
    print(message, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


@dataclass
class Task:
    what: str
    weight: float  # expected cost, in any unit shared by the tasks of one run
    run: Callable[[], object]


class Progress:
    """A bar on stderr with the share of work done and an estimate of the time left (elapsed × remaining / done
    work, by the tasks' weights); one line per task when stderr is not a terminal."""
    current: Progress | None = None

    def __init__(self, tasks: list[Task], stream=sys.stderr):
        self.tasks, self.stream, self.tty = tasks, stream, stream.isatty()
        self.total = sum(t.weight for t in tasks) or 1.0

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")

    def run(self) -> list[object]:
        Progress.current, results, done, t0 = self, [], 0.0, time.perf_counter()
        try:
            for i, task in enumerate(self.tasks, 1):
                elapsed = time.perf_counter() - t0
                left = f"~{_clock(elapsed * (self.total - done) / done)} left" if done else "estimating"
                bar = "#" * int(24 * done / self.total)
                line = (f"[{bar:<24}] {100 * done / self.total:3.0f}% {i}/{len(self.tasks)} "
                        f"{_clock(elapsed)} elapsed, {left}: {task.what}")
                self.clear()
                self.stream.write(line[:os.get_terminal_size(self.stream.fileno()).columns - 1] if self.tty else line + "\n")
                self.stream.flush()
                results.append(task.run())
                done += task.weight
            self.clear()
            self.stream.write(f"done: {len(self.tasks)} measurements in {_clock(time.perf_counter() - t0)}\n")
        finally:
            Progress.current = None
        return results


PROBE_REPS = 3  # passes of the bandwidth probe around each decode measurement (best taken): a second or so


def probe(threads: int) -> float:
    """The read bandwidth at `threads` now, set beside each decode measurement: this host's swings by a third within
    minutes. Not kept: the stored measurement (1 and all cores) is the cost model's."""
    return bandwidth.probe([threads], PROBE_REPS)[threads]


def summary(values: list[float]) -> dict:
    """Repeats as their median and spread = (max - min) / median; noisy above NOISY_SPREAD."""
    med = statistics.median(values)
    spread = (max(values) - min(values)) / med if med else 0.0
    return {"values": list(values), "median": med, "spread": spread, "noisy": spread > NOISY_SPREAD}


def noisy_note(records: list[dict], spreads: Callable[[dict], list[float]]) -> str | None:
    """A warning naming how many measurements spread more than NOISY_SPREAD, or None."""
    bad = [s for r in records for s in spreads(r) if s > NOISY_SPREAD]
    if not bad:
        return None
    return (f"noisy machine: {len(bad)} measurement{'s' * (len(bad) > 1)} spread more than {NOISY_SPREAD:.0%} "
            f"between repeats (worst {max(bad):.0%}); rerun on an idle machine or with a larger --repeat")


def machine(host) -> dict:
    """The host, its load and the software versions: every section of results.json starts with these."""
    torch = sys.modules.get("torch")
    load = os.getloadavg()
    if load[0] > BUSY_LOAD:
        log(f"WARNING: 1-minute load {load[0]:.2f} > {BUSY_LOAD}: another process is running and will skew "
            "the numbers (most of all with as many threads as cores)")
    return {"host": host.to_dict(), "load_average_start": list(load),
            "versions": {"python": platform.python_version(), "numpy": np.__version__,
                         "torch": torch.__version__ if torch else None, "compiler": compiler().version,
                         "platform": platform.platform()}}


def format_table(head: list[str], rows: list[list], markdown: bool) -> str:
    cells = [head] + [[str(c) for c in row] for row in rows]
    if markdown:
        return "\n".join("| " + " | ".join(r) + " |" for r in cells[:1] + [["---"] * len(head)] + cells[1:])
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def render_text(title: str, header: str, tables: dict[str, tuple[list[str], list[list]]], notes: list[str],
                markdown: bool) -> str:
    """A section's tables and notes, for the terminal or for results.md."""
    if markdown:
        return (f"## {title}\n\n{header}\n\n" + "".join(f"### {t}\n\n{format_table(h, r, True)}\n\n"
                                                        for t, (h, r) in tables.items() if r)
                + "".join(f"- {n}\n" for n in notes))
    return (header + "".join(f"\n\n{t}\n{format_table(h, r, False)}" for t, (h, r) in tables.items() if r)
            + "\n\n" + "\n".join(notes))


def write(out: Path, section: str, data: dict, markdown: str) -> Path:
    """Put `data` (and its markdown) as `section` of OUT/results.json, keeping the other sections; rewrite
    OUT/results.md from every section. Both files are replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    try:
        results = json.loads(path.read_text())
        if results.get("format") != FORMAT:
            raise ValueError
    except (OSError, ValueError, AttributeError):
        results = {"format": FORMAT}
    results[section] = data | {"markdown": markdown}
    atomic_write(path, json.dumps(results, indent=1, default=_jsonable).encode())
    parts = [results[s]["markdown"] for s in ("kernels", "model") if s in results]
    atomic_write(out / "results.md", ("# qigen bench\n\n" + "\n".join(parts)).encode())
    return path


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
