"""Enumerate a kernel's schedules exactly, drop the illegal ones, rank by predicted time."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from perfmodel.cost import Prediction, predict, weight_bytes
from perfmodel.host import Host
from qigen.quant import relative_error
from qigen.spec import BITS, GROUPS, KernelSpec, Schedule, SpecError, check

ROW_VECTORS = (1, 2, 3, 4)
ACCUMULATORS = (1, 2, 3, 4)
COL_TILES = (2, 4, 6, 8)  # 1 is the matrix-vector kernel's job; wider spills on AVX2
K_BLOCKS = (64, 128, 256)


@dataclass(frozen=True)
class Candidate:
    schedule: Schedule
    prediction: Prediction


def schedules(spec: KernelSpec, threads: int) -> list[Schedule]:
    """Every legal schedule of the space; a schedule breaking a register or divisibility rule is dropped."""
    if spec.kind == "gemv":
        space = (Schedule(r, a, 1, 0, threads) for r, a in itertools.product(ROW_VECTORS, ACCUMULATORS))
    else:
        space = (Schedule(r, 1, n, kb, threads) for r, n, kb in itertools.product(ROW_VECTORS, COL_TILES, K_BLOCKS)
                 if kb < 2 * spec.cols)  # a block past twice the row only adds padding
    legal, broken = [], None
    for s in space:
        try:
            check(spec, s)
        except SpecError as e:
            broken = e
            continue
        legal.append(s)
    if not legal:
        raise SpecError(f"no schedule of {spec.name} is legal: {broken}")
    return legal


def rank(spec: KernelSpec, host: Host, measured: dict[int, float] | None, threads: int | None = None) -> list[Candidate]:
    threads = threads or host.cores
    found = [Candidate(s, predict(spec, s, host, measured)) for s in schedules(spec, threads)]
    # ties go to more independent sums, then the smaller tile: less padding, more even thread split
    return sorted(found, key=lambda c: (c.prediction.seconds, -c.schedule.row_vectors * c.schedule.accumulators,
                                        c.schedule.row_vectors, c.schedule.col_tile, c.schedule.k_block))


def formats(bits: int | None, group: int | None | str) -> list[tuple[int, int | None]]:
    """The (bits, group) pairs an accuracy search considers; a fixed value stays fixed. group 'any' = free."""
    return [(b, g) for b in ([bits] if bits else BITS) for g in (GROUPS if group == "any" else [group])]


def bits_per_weight(spec: KernelSpec) -> float:
    """Packed codes, scales and offsets per weight (one row vector per tile: the least padding)."""
    schedule = Schedule() if spec.kind == "gemv" else Schedule(accumulators=1, k_block=256)
    return 8 * weight_bytes(spec, schedule) / (spec.rows * spec.cols)


def error_sample(spec: KernelSpec, weights: np.ndarray | None) -> np.ndarray:
    """The matrix whose reconstruction error judges a format: the real weights, else 256 Gaussian rows."""
    if weights is not None:
        return weights
    return np.random.default_rng(0).standard_normal((min(spec.rows, 256), spec.cols)).astype(np.float32)


def choose_format(spec: KernelSpec, host: Host, measured: dict[int, float] | None, max_error: float,
                  weights: np.ndarray | None, bits: int | None, group: int | None | str) -> tuple[KernelSpec, float]:
    """The fastest (bits, group) whose relative RMS reconstruction error of `weights` (or of a Gaussian
    matrix when none are given) is at most max_error; returns the spec and the error it achieves."""
    sample = error_sample(spec, weights)
    options, best = [], 1.0
    for b, g in formats(bits, group):
        s = replace(spec, bits=b, group=g)
        err = relative_error(sample, replace(s, rows=sample.shape[0]))
        best = min(best, err)
        if err <= max_error:
            options.append((rank(s, host, measured)[0].prediction.seconds, bits_per_weight(s), err, s))
    if not options:
        raise SpecError(f"no format meets max error {max_error:g}: the most accurate allowed gives {best:.4g}")
    _, _, err, s = min(options, key=lambda o: o[:3])
    return s, err
