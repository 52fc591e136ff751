"""The performance model and the schedule search: a readable formula, an exact enumeration, a ranking.

No kernel is compiled here; the host is a fixed description so the figures do not depend on the
machine the tests run on.
"""
import json
from dataclasses import replace

import numpy as np
import pytest

from runtime import bandwidth as probe
from perfmodel import cost
from perfmodel.cost import ASSUMED_BANDWIDTH, ASSUMED_BANDWIDTH_MAX, bandwidth, predict, weight_bytes
from perfmodel.host import Host, KiB, MiB
from perfmodel.search import (bits_per_weight, choose_format,
                              formats, rank, schedules)
from qigen.quant import relative_error
from qigen.spec import BITS, GROUPS, KernelSpec, Schedule, SpecError, check

AVX2 = frozenset({"avx2", "fma", "f16c"})
HOST = Host("testcpu", "", "a fixed 8-core AVX2 host", cores=8, features=AVX2, l1d=32 * KiB, l2=512 * KiB,
            l3=32 * MiB, freq_hz=3e9, native=False)
MEASURED = {1: 10e9, 4: 25e9, 8: 30e9}  # bytes/s per thread count


def on(measured: dict[int, float] | None) -> Host:
    """HOST carrying a measured read bandwidth (None or {}: never measured)."""
    return replace(HOST, bandwidth=tuple(sorted((measured or {}).items())))

GEMV_SPECS = [KernelSpec(64, 128, b, 128, isa=isa) for b in BITS for isa in ("avx2", "avx512", "scalar")]
GEMM_SPECS = [KernelSpec(64, 128, b, 32, batch=n) for b in BITS for n in (8, 64)]


def _space(spec: KernelSpec, threads: int) -> list[Schedule]:
    """The whole enumerated space, legal or not."""
    return list(spec.traits.space(spec, threads))


def _legal(spec: KernelSpec, schedule: Schedule) -> bool:
    try:
        check(spec, schedule)
    except SpecError:
        return False
    return True


# --- the search ---

@pytest.mark.parametrize("spec", GEMV_SPECS + GEMM_SPECS, ids=lambda s: s.name)
def test_schedules_are_the_legal_part_of_the_space(spec):
    found = schedules(spec, threads=3)
    assert found, "every spec has at least one legal schedule"
    assert len(set(found)) == len(found)
    for s in found:
        check(spec, s)  # raises SpecError if the search let an illegal schedule through
        assert s.threads == 3
    # nothing legal is dropped, except gemm k-blocks past twice the row (they only add padding)
    dropped = [s for s in _space(spec, 3) if s not in found]
    for s in dropped:
        assert not _legal(spec, s) or (spec.kind == "gemm" and s.k_block >= 2 * spec.cols), s


def test_avx512_has_more_registers_so_more_gemv_schedules():
    spec = KernelSpec(4096, 4096, 4, 128, isa="avx2")
    assert len(schedules(replace(spec, isa="avx512"), 1)) > len(schedules(spec, 1))


@pytest.mark.parametrize("spec", [KernelSpec(4096, 4096, 4, 128), KernelSpec(37, 100, 3, 32),
                                  KernelSpec(512, 1024, 2, None, batch=16)], ids=lambda s: s.name)
@pytest.mark.parametrize("measured", [None, MEASURED], ids=["assumed", "measured"])
def test_rank_is_sorted_by_predicted_time(spec, measured):
    ranked = rank(spec, on(measured), threads=4)
    seconds = [c.prediction.seconds for c in ranked]
    assert seconds == sorted(seconds)
    assert [c.schedule for c in ranked] and {c.schedule for c in ranked} == set(schedules(spec, 4))
    for c in ranked:
        assert c.prediction == predict(spec, c.schedule, on(measured), 4)
        assert c.prediction.measured_bandwidth == (measured is not None)


def test_rank_threads_default_to_the_host_cores():
    assert {c.schedule.threads for c in rank(KernelSpec(64, 128, 4), HOST)} == {HOST.cores}


# --- the cost formula ---

def test_prediction_is_the_larger_of_memory_and_compute_plus_overhead():
    spec, s = KernelSpec(4096, 4096, 4, 128), Schedule(2, 2, threads=8)
    p = predict(spec, s, on(MEASURED))
    assert p.seconds == pytest.approx(max(p.memory_s, p.compute_s) + cost.CALL_OVERHEAD)
    assert p.bytes == weight_bytes(spec, s) + 4 * (spec.cols + spec.rows)
    assert p.memory_s == pytest.approx(p.bytes / p.bandwidth)
    assert p.bandwidth == MEASURED[8]
    assert json.loads(json.dumps(p.to_dict())) == p.to_dict()


@pytest.mark.parametrize("spec", [KernelSpec(64, 4096, 4, 128), KernelSpec(64, 1024, 3, 32, batch=32)],
                         ids=lambda s: s.kind)
def test_predictions_grow_with_rows(spec):
    schedule = schedules(spec, 4)[0]
    fixed = [predict(replace(spec, rows=m), schedule, HOST, 4) for m in (64, 256, 1024, 4096, 16384)]
    assert all(a.memory_s < b.memory_s for a, b in zip(fixed, fixed[1:]))
    assert all(a.seconds <= b.seconds for a, b in zip(fixed, fixed[1:]))
    assert fixed[-1].seconds > fixed[0].seconds
    best = [rank(replace(spec, rows=m), HOST, 4)[0].prediction.seconds for m in (64, 256, 1024, 4096, 16384)]
    assert all(a <= b for a, b in zip(best, best[1:])) and best[-1] > best[0]


def test_gemm_prediction_grows_with_batch():
    seconds = [rank(KernelSpec(1024, 1024, 4, 128, batch=n), HOST, 8)[0].prediction.seconds
               for n in (2, 16, 128, 512)]
    assert all(a < b for a, b in zip(seconds, seconds[1:]))


@pytest.mark.parametrize("group", [32, 128, None])
def test_memory_time_follows_the_bits(group):
    schedule = Schedule(1, 2, threads=8)
    memory = {b: predict(KernelSpec(4096, 4096, b, group), schedule, on(MEASURED)).memory_s for b in BITS}
    assert memory[2] < memory[3] < memory[4] < memory[8]


def test_scales_and_offsets_count_as_bytes():
    spec, s = KernelSpec(4096, 4096, 4, 128), Schedule()
    assert weight_bytes(replace(spec, symmetric=True), s) < weight_bytes(spec, s)
    assert weight_bytes(spec, s) < weight_bytes(replace(spec, scale_dtype="fp32"), s)
    assert weight_bytes(replace(spec, group=32), s) > weight_bytes(spec, s) > weight_bytes(replace(spec, group=None), s)


@pytest.mark.parametrize("bits", BITS)
def test_bits_per_weight_without_padding(bits):
    # 64 rows fill whole tiles and 128 columns whole chunks: codes plus an fp16 scale and offset per 128
    spec = KernelSpec(64, 128, bits, 128)
    assert bits_per_weight(spec) == pytest.approx(bits + 2 * 16 / 128)
    assert bits_per_weight(replace(spec, symmetric=True)) == pytest.approx(bits + 16 / 128)
    assert bits_per_weight(replace(spec, scale_dtype="fp32")) == pytest.approx(bits + 2 * 32 / 128)


def test_padding_counts_in_bits_per_weight():
    # 37x100 pads to 40 rows and whole 8-code chunks; the partial group still pays a full scale
    assert bits_per_weight(KernelSpec(37, 100, 4, 32)) > bits_per_weight(KernelSpec(64, 128, 4, 32))


# --- bandwidth ---

@pytest.mark.parametrize("threads, expected", [(1, 10e9), (2, 15e9), (3, 20e9), (4, 25e9), (6, 27.5e9), (8, 30e9),
                                               (16, 30e9)])
def test_bandwidth_interpolates_between_measured_points(threads, expected):
    assert bandwidth(on(MEASURED), threads) == pytest.approx(expected)


def test_bandwidth_is_flat_below_the_first_point():
    assert bandwidth(on({2: 20e9, 8: 40e9}), 1) == 20e9
    assert bandwidth(on({4: 20e9}), 5) == 20e9  # one point: flat everywhere


@pytest.mark.parametrize("measured", [None, {}], ids=["none", "empty"])
def test_bandwidth_assumed_when_unmeasured(measured):
    assert bandwidth(on(measured), 1) == ASSUMED_BANDWIDTH
    assert bandwidth(on(measured), 4) == 4 * ASSUMED_BANDWIDTH
    assert bandwidth(on(measured), 64) == HOST.cores * ASSUMED_BANDWIDTH  # no more threads than cores
    server = replace(on(measured), cores=64)
    assert bandwidth(server, 64) == ASSUMED_BANDWIDTH_MAX  # capped at what memory channels give


def test_prediction_uses_the_measured_bandwidth():
    spec, s = KernelSpec(4096, 4096, 4, 128), Schedule(1, 2, threads=2)
    measured = predict(spec, s, on({1: 5e9, 8: 40e9}))
    assumed = predict(spec, s, HOST)
    assert measured.measured_bandwidth and not assumed.measured_bandwidth
    assert measured.bandwidth == pytest.approx(10e9) and assumed.bandwidth == 2 * ASSUMED_BANDWIDTH
    assert measured.memory_s == pytest.approx(2 * assumed.memory_s)


def test_prefill_prediction_is_bounded_by_the_measured_peak():
    """A matrix-matrix kernel takes at least its operations over the measured peak of its arithmetic (fp32 or int8)
    at its thread count; unmeasured, the cycle count alone; decode is not bounded so."""
    fp32, int8 = KernelSpec(4096, 4096, 4, 128, batch=512), KernelSpec(4096, 4096, 4, 128, batch=512, family="wq_a8")
    peaks = replace(HOST, peaks=((1, 1e9, 4e9), (8, 8e9, 32e9)))
    for spec, per_thread in ((fp32, 1e9), (int8, 4e9)):
        s = schedules(spec, threads=1)[0]
        at = lambda threads: predict(spec, replace(s, threads=threads), peaks).compute_s
        assert at(1) == pytest.approx(2 * 4096 * 4096 * 512 / per_thread)  # far below the cycle count
        assert at(8) == pytest.approx(at(1) / 8)
        assert predict(spec, s, HOST).compute_s < at(1)
    gemv = KernelSpec(4096, 4096, 4, 128)
    s = schedules(gemv, threads=1)[0]
    assert predict(gemv, s, peaks).compute_s == predict(gemv, s, HOST).compute_s


def test_stored_bandwidth_round_trips_through_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path))
    assert probe.stored(HOST) is None  # never measured
    path = probe._path(HOST)
    path.write_text(json.dumps({"read_bytes_per_s": {"1": 1.5e10, "8": 4e10}, "measured_at": 0}))
    assert probe.stored(HOST) == {1: 1.5e10, 8: 4e10}
    assert probe.stored(replace(HOST, cores=4)) is None  # a measurement is per host and core count
    path.write_text("{not json")
    assert probe.stored(HOST) is None  # a damaged file is as good as none


# --- the accuracy search ---

def test_formats_enumerates_what_is_free():
    assert formats(None, "any") == [(b, g) for b in BITS for g in GROUPS]
    assert formats(4, "any") == [(4, g) for g in GROUPS]
    assert formats(None, 64) == [(b, 64) for b in BITS]
    assert formats(None, None) == [(b, None) for b in BITS]
    assert formats(3, None) == [(3, None)]


BASE = KernelSpec(512, 1024, 4, 128)


@pytest.mark.parametrize("max_error", [1.0, 0.4, 0.2, 0.1, 0.05, 0.01])
def test_choose_format_respects_max_error(max_error):
    spec, err = choose_format(BASE, HOST, max_error, None, None, "any")
    assert err <= max_error
    sample = np.random.default_rng(0).standard_normal((256, BASE.cols)).astype(np.float32)
    assert err == pytest.approx(relative_error(sample, replace(spec, rows=256)))
    assert (spec.rows, spec.cols, spec.isa, spec.batch) == (BASE.rows, BASE.cols, BASE.isa, BASE.batch)


def test_looser_error_budget_means_fewer_bits():
    chosen = [choose_format(BASE, HOST, e, None, None, "any")[0].bits for e in (0.01, 0.05, 0.1, 0.2, 0.4, 1.0)]
    assert chosen == sorted(chosen, reverse=True)
    assert chosen[0] == 8 and chosen[-1] == 2


def test_choose_format_keeps_what_is_fixed():
    spec, err = choose_format(BASE, HOST, 0.2, None, 4, "any")
    assert spec.bits == 4 and err <= 0.2
    spec, err = choose_format(BASE, HOST, 0.2, None, None, 64)
    assert spec.group == 64 and err <= 0.2
    with pytest.raises(SpecError, match="no format meets max error 0.01"):
        choose_format(BASE, HOST, 0.01, None, 2, "any")


def test_choose_format_measures_the_given_weights():
    # weights that are exactly 2-bit codes per 32-group: 2 bits and group 32 reconstruct them exactly
    rng = np.random.default_rng(1)
    w = (rng.integers(0, 4, (64, 128)) * 0.5 - 0.75).astype(np.float32)
    spec, err = choose_format(KernelSpec(64, 128, 4, 128), HOST, 1e-6, w, None, "any")
    assert err <= 1e-6 and spec.bits == 2
    assert err == pytest.approx(relative_error(w, spec), abs=1e-12)


def test_unreachable_error_names_the_best_achievable():
    with pytest.raises(SpecError, match=r"no format meets max error 1e-09: the most accurate allowed gives 0\.00"):
        choose_format(KernelSpec(64, 128, 4, 128), HOST, 1e-9, None, None, "any")
