"""Every kernel variant the search can emit matches the numpy oracle on random data.

The variants come from the family registry alone: for each ISA, registered family, kind it generates
(matrix-vector, matrix-matrix) and bits, the search's whole schedule space is crossed with every group
size × symmetric/asymmetric × scale dtype the family allows and with ragged shapes: each kernel takes
the next schedule and the next format, until both lists are covered. The oracle multiplies x as the
family's kernels see it. AVX-512 runs through SIMD Everywhere on hosts without it.
"""
import functools
import itertools
import os
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from perfmodel.host import detect, from_target
from perfmodel.search import schedules
from qigen.family import MAX_OUTLIERS
from qigen.layout import layout, pack_codes, unpack_codes
from qigen.quant import quantize, reference
from qigen.render import render
from qigen.spec import BITS, FAMILIES, GROUPS, ISAS, KernelSpec, Schedule, SpecError, kernel_name
from runtime.compiler import build, compile, compiler, flags
from runtime.loader import load

# (rows, cols): rows and cols off every tile, one row, SmolLM2's 576 (no multiple of 128 or 256)
SHAPES = [(37, 100), (1, 64), (19, 576), (40, 33), (9, 260)]
FORMATS = list(itertools.product(GROUPS, (False, True), ("fp16", "fp32")))
GOLDEN = Path(__file__).parent / "golden"


BATCH = {"gemv": 1, "gemm": 4}  # each kind's design batch


def legal(*args, **kwargs) -> KernelSpec | None:
    try:
        return KernelSpec(*args, **kwargs)
    except SpecError:
        return None


def variants(isa: str) -> list[tuple[KernelSpec, Schedule]]:
    pairs = []
    for family, kind, bits in itertools.product(FAMILIES.values(), ("gemv", "gemm"), BITS):
        if ISAS[isa].base and not family.dot_products:  # the same code as its base ISA's
            continue
        batch = BATCH[kind]
        formats = [f for f in FORMATS if legal(64, 576, bits, *f, batch=batch, isa=isa, family=family.name)]
        if not formats:
            continue
        space = schedules(KernelSpec(64, 576, bits, *formats[0], batch=batch, isa=isa, family=family.name), threads=2)
        for i in range(max(len(space), len(formats))):
            group, sym, dtype = formats[i % len(formats)]
            rows, cols = SHAPES[i % len(SHAPES)]
            spec = KernelSpec(rows, cols, bits, group, sym, dtype, batch=batch, isa=isa, family=family.name)
            pairs.append((spec, space[i % len(space)]))
    return pairs


@functools.cache
def simde() -> bool:
    """SIMD Everywhere's headers (Debian: libsimde-dev) emulate AVX-512 on CPUs without it."""
    r = subprocess.run([compiler().path, "-x", "c", "-fsyntax-only", "-"], input="#include <simde/x86/avx512.h>\n",
                       capture_output=True, text=True)
    return r.returncode == 0


def native(isa: str) -> bool:
    return detect().has(*ISAS[isa].features)


def runnable(isa: str) -> bool:
    return native(isa) or (ISAS[isa].emulated and simde())


def skip_reason(isa: str) -> str:
    return f"this CPU lacks {isa}" + (" and SIMDE is not installed (apt-get install libsimde-dev)"
                                      if ISAS[isa].emulated else "")


@pytest.fixture(scope="module")
def libraries(kernel_cache):
    """One library per ISA, compiled side by side."""
    def one(isa):
        pairs = variants(isa)
        source = render(pairs, "native")
        emulate = not native(isa)
        built = compile(source.text, detect(), emulate=emulate)
        return isa, load(built.path, source.cdef, pairs)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, [isa for isa in ISAS if runnable(isa)]))


def _params():
    for isa in ISAS:
        marks = [] if runnable(isa) else [pytest.mark.skip(reason=skip_reason(isa))]
        for spec, schedule in variants(isa):
            yield pytest.param(isa, spec, schedule, id=kernel_name(spec, schedule), marks=marks)


@pytest.mark.parametrize("isa,spec,schedule", list(_params()))
def test_kernel_matches_reference(libraries, isa, spec, schedule):
    kernel = libraries[isa][kernel_name(spec, schedule)]
    rng = np.random.default_rng(zlib.crc32(kernel.name.encode()))  # the same data every run
    w = rng.standard_normal((spec.rows, spec.cols)).astype(np.float32)
    q = quantize(w, spec)
    packed = kernel.pack(q)
    bias = rng.standard_normal(spec.rows).astype(np.float32)
    # fp32 rounding scales with the sum of |terms| the kernel adds: scale·code and the offset (or zero point) apart
    scale = np.repeat(q.scales.astype(np.float32), spec.group_size, axis=1)[:, :spec.cols]
    offset = (scale * spec.zero_point if q.offsets is None
              else np.abs(np.repeat(q.offsets.astype(np.float32), spec.group_size, axis=1)[:, :spec.cols]))
    magnitude = (scale * q.codes + offset).T
    seen = spec.traits.seen  # x as the kernel multiplies it
    for n in (1, 2, schedule.col_tile + 1, 7):
        x = rng.standard_normal((n, spec.cols)).astype(np.float32)
        x[-1, :: 3] *= 50  # outliers: int8 activations scale each block by its own absmax
        for b in (None, bias):
            got = kernel(x, packed, bias=b, threads=2)
            np.testing.assert_allclose(got, reference(seen(x), q, spec, b), rtol=0,
                                       atol=2e-6 * (np.abs(x) @ magnitude).max() + 1e-6, err_msg=f"n={n}")
    vec = rng.standard_normal(spec.cols).astype(np.float32)
    np.testing.assert_allclose(kernel(vec, packed, threads=1), reference(seen(vec), q, spec), rtol=0,
                               atol=2e-6 * (np.abs(vec) @ magnitude).max())
    # outlier channels, kept in fp16 and unquantized x: the first, the last, adjacent ones, or as many as allowed
    c = spec.cols
    most = min(MAX_OUTLIERS, c)
    choices = [[0], [c - 1], [c // 2, c // 2 + 1, c // 2 + 2], np.arange(most) * c // most]
    channels = np.unique(np.asarray(choices[zlib.crc32(kernel.name.encode()) % 4]) % c)
    qo = q.with_outliers(w, channels)
    magnitude[channels] = np.abs(qo.outlier_weights.astype(np.float32)).T
    packed = kernel.pack(qo)
    for n in (1, schedule.col_tile + 1):
        x = rng.standard_normal((n, c)).astype(np.float32)
        x[:, channels] *= 100
        got = kernel(x, packed, bias=bias, threads=2)
        np.testing.assert_allclose(got, reference(seen(x, channels), qo, spec, bias), rtol=0,
                                   atol=2e-6 * (np.abs(x) @ magnitude).max() + 1e-6, err_msg=f"outliers {channels}")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows,cols", [(37, 100), (1, 1), (64, 576)])
@pytest.mark.parametrize("row_vectors", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_packing_round_trips(bits, rows, cols, row_vectors, family):
    spec = legal(rows, cols, bits, group=32, family=family)
    if spec is None:
        pytest.skip(f"{family} takes no {bits}-bit codes")
    lay = layout(spec, Schedule(row_vectors=row_vectors, accumulators=1))
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (rows, cols), dtype=np.uint8)
    words = pack_codes(codes, lay)
    assert words.dtype == np.uint32 and words.size == lay.packed_words
    np.testing.assert_array_equal(unpack_codes(words, lay), codes)


@pytest.mark.parametrize("bits", BITS)
def test_packed_size_is_bits_per_weight(bits):
    lay = layout(KernelSpec(64, 4096, bits), Schedule())
    assert lay.packed_words * 32 == 64 * 4096 * bits


def test_quantization_error_falls_with_bits_and_group():
    w = np.random.default_rng(0).standard_normal((64, 576)).astype(np.float32)
    from qigen.quant import relative_error

    errors = [relative_error(w, KernelSpec(64, 576, b, 128)) for b in BITS]
    assert errors == sorted(errors, reverse=True)
    assert relative_error(w, KernelSpec(64, 576, 4, 32)) < relative_error(w, KernelSpec(64, 576, 4, None))


GOLDEN_KERNELS = {
    "gemv_q4_g128_avx2.c": (KernelSpec(4096, 4096, 4, 128, isa="avx2"), Schedule(2, 2, threads=2)),
    "gemm_q3_g32_sym_avx512.c": (KernelSpec(11008, 4096, 3, 32, True, "fp32", batch=64, isa="avx512"),
                                 Schedule(2, 1, 6, 128, threads=2)),
    "gemv_q2_grow_scalar.c": (KernelSpec(37, 100, 2, None, isa="scalar"), Schedule(2, 2, threads=1)),
    "gemm_a8_q4_g32_avx512vnni.c": (KernelSpec(4096, 4096, 4, 32, batch=64, isa="avx512vnni", family="wq_a8"),
                                    Schedule(2, 1, 4, 0, threads=2)),
}


@pytest.mark.parametrize("file", GOLDEN_KERNELS)
def test_rendered_source_matches_golden(file):
    """A refactor that changes generated code shows up here; QIGEN_UPDATE_GOLDEN=1 rewrites the files."""
    text = render([GOLDEN_KERNELS[file]], "golden").text
    if os.environ.get("QIGEN_UPDATE_GOLDEN"):
        (GOLDEN / file).write_text(text)
    assert text == (GOLDEN / file).read_text()


def test_native_avx512_source_builds():
    """The real AVX-512 intrinsics (not SIMDE) compile for an AVX-512 target."""
    target = from_target("skylake-avx512")
    pairs = [(s, schedules(s, 1)[-1]) for f, kind, b in itertools.product(FAMILIES.values(), BATCH, BITS)
             if (s := legal(37, 100, b, 32, isa="avx512", batch=BATCH[kind], family=f.name))]
    built = build(render(pairs, target.name).text, flags(target))
    assert built.path.stat().st_size > 0
    assert "-march=skylake-avx512" in built.flags


def test_contiguous_copies_are_equal_and_end_to_end():
    """Weights re-homed into one huge-page buffer keep their values, in order, each on its own cache lines, in regions
    sized from the bundle alone (before packing: a model packs one matrix at a time into its place)."""
    from qigen.layout import contiguous, pack
    from runtime.loader import Kernel

    specs = [KernelSpec(37, 100, 4, 32), KernelSpec(20, 64, 8, 32, True), KernelSpec(16, 96, 3, 32, isa="scalar")]
    rng = np.random.default_rng(0)
    weights = [quantize(rng.standard_normal((s.rows, s.cols)).astype(np.float32), s) for s in specs]
    weights[2] = weights[2].with_outliers(rng.standard_normal((16, 96)).astype(np.float32), np.array([0, 5, 95]))
    packs = [pack(q, s, Schedule(1, 1)) for q, s in zip(weights, specs)]
    sizes = [Kernel(s, Schedule(1, 1), None, None).packed_bytes(q.outlier_count) for s, q in zip(specs, weights)]
    copies = [p.into(region) for p, region in zip(packs, contiguous(sizes))]
    addresses = []
    for p, c in zip(packs, copies):
        assert list(c.arrays) == list(p.arrays)
        for name, a in p.arrays.items():
            b = c.arrays[name]
            assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
            addresses.append(b.ctypes.data)
    assert addresses == sorted(addresses) and all(a % 64 == 0 for a in addresses)
    assert sizes[0] == sum(-(-a.nbytes // 64) * 64 for a in packs[0].arrays.values())
    with pytest.raises(ValueError, match="do not fit"):
        packs[1].into(np.zeros(sizes[1] - 64, np.uint8))
    # a private mapping: a shared one is shmem, whose huge pages follow shmem_enabled (often never), not the advice
    maps = Path("/proc/self/maps")
    if maps.exists():
        start = addresses[0]
        mapping = next(line for line in maps.read_text().splitlines()
                       if int(line.split("-")[0], 16) <= start < int(line.split()[0].split("-")[1], 16))
        assert mapping.split()[1] == "rw-p", mapping
