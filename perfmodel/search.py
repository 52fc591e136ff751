"""Enumerate a kernel's schedules exactly, drop the illegal ones, rank by predicted time."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from perfmodel.cost import Prediction, predict, weight_bytes
from perfmodel.host import Host
from qigen.quant import relative_error
from qigen.spec import BITS, GROUPS, KernelSpec, Schedule, SpecError, check, choose_family


@dataclass(frozen=True)
class Candidate:
    schedule: Schedule
    prediction: Prediction


def schedules(spec: KernelSpec, threads: int) -> list[Schedule]:
    """Every legal schedule of the family's space; a schedule breaking a register or divisibility rule is dropped."""
    legal, broken = [], None
    for s in spec.traits.space(spec, threads):
        try:
            check(spec, s)
        except SpecError as e:
            broken = e
            continue
        legal.append(s)
    if not legal:
        raise SpecError(f"no schedule of {spec.name} is legal: {broken}")
    return legal


def rank(spec: KernelSpec, host: Host, threads: int | None = None) -> list[Candidate]:
    threads = threads or host.cores
    found = [Candidate(s, predict(spec, s, host)) for s in schedules(spec, threads)]
    # ties go to more independent sums, then the smaller tile: less padding, more even thread split
    return sorted(found, key=lambda c: (c.prediction.seconds, -c.schedule.row_vectors * c.schedule.accumulators,
                                        c.schedule.row_vectors, c.schedule.col_tile, c.schedule.k_block))


def formats(bits: int | None, group: int | None | str) -> list[tuple[int, int | None]]:
    """The (bits, group) pairs an accuracy search considers; a fixed value stays fixed. group 'any' = free."""
    return [(b, g) for b in ([bits] if bits else BITS) for g in (GROUPS if group == "any" else [group])]


def bits_per_weight(spec: KernelSpec) -> float:
    """Bits of the packed bundle (codes, scales, offsets, ...) per weight, with the least padding any schedule has."""
    return 8 * min(weight_bytes(spec, s) for s in schedules(spec, 1)) / (spec.rows * spec.cols)


def error_sample(spec: KernelSpec, weights: np.ndarray | None) -> np.ndarray:
    """The matrix whose reconstruction error judges a format: the real weights, else 256 Gaussian rows."""
    if weights is not None:
        return weights
    return np.random.default_rng(0).standard_normal((min(spec.rows, 256), spec.cols)).astype(np.float32)


def choose_format(spec: KernelSpec, host: Host, max_error: float, weights: np.ndarray | None, bits: int | None,
                  group: int | None | str, activations: str | None = None) -> tuple[KernelSpec, float]:
    """The fastest (bits, group) whose relative RMS reconstruction error of `weights` (or of a Gaussian
    matrix when none are given) is at most max_error; returns the spec and the error it achieves. activations:
    each format's family is chosen by activation type (auto: the first the format allows); None keeps spec's, and
    a format that family does not take is passed over."""
    sample = error_sample(spec, weights)
    options, best = [], 1.0
    for b, g in formats(bits, group):
        try:
            s = (choose_family(activations, lambda name: replace(spec, bits=b, group=g, family=name)) if activations
                 else replace(spec, bits=b, group=g))
        except SpecError:
            continue
        err = relative_error(sample, replace(s, rows=sample.shape[0]))
        best = min(best, err)
        if err <= max_error:
            options.append((rank(s, host)[0].prediction.seconds, bits_per_weight(s), err, s))
    if not options:
        raise SpecError(f"no format meets max error {max_error:g}: the most accurate allowed gives {best:.4g}")
    _, _, err, s = min(options, key=lambda o: o[:3])
    return s, err
