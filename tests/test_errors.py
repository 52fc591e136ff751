"""Bad input gets a clear error that names the broken rule: never a crash, a traceback or a wrong answer."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import qigen
from perfmodel.host import HostError, detect, from_target
from perfmodel.search import rank
from qigen.cli import main
from qigen.pipeline import Request, best_isa, generate
from qigen.pipeline import load as load_kernel_set
from qigen.layout import pack
from qigen.quant import QuantizedWeights, quantize, reference
from qigen.render import render
from qigen.spec import KernelSpec, QuantSpec, Schedule, SpecError, check, kernel_name
from runtime.checkpoint import CheckpointError
from runtime.checkpoint import load as load_checkpoint
from runtime.compiler import CompileError, build, compile, compiler, flags
from runtime.loader import LoadError, load

HOST = detect()
ISA = best_isa(HOST)
HAS_AVX512 = HOST.has("avx512f")
QUIET = lambda s: None  # noqa: E731  progress sink for generate()


def _data(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, cols)).astype(np.float32), rng.standard_normal(cols).astype(np.float32)


def _close(y: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """Run `qigen ARGV` in this process; exit status and stderr."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=os.environ | env, cwd=cwd, capture_output=True, text=True, timeout=300)


# --- specs and schedules ---

@pytest.mark.parametrize("change, named", [
    ({"bits": 5}, "bits=5"),
    ({"bits": 1}, "bits=1"),
    ({"group": 48}, "group size 48"),
    ({"rows": 0}, "shape 0x128"),
    ({"cols": 0}, "shape 64x0"),
    ({"rows": -3}, "shape -3x128"),
    ({"batch": 0}, "batch=0"),
    ({"batch": 513}, "batch=513"),
    ({"isa": "neon"}, "isa 'neon'"),
    ({"scale_dtype": "bf16"}, "scale dtype 'bf16'"),
    ({"family": "int8"}, "kernel family 'int8'"),
])
def test_bad_spec_names_the_value(change, named):
    with pytest.raises(SpecError, match=named):
        KernelSpec(**({"rows": 64, "cols": 128, "bits": 4} | change))


def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError)


def test_gemv_schedule_beyond_the_registers():
    with pytest.raises(SpecError, match=r"r8a4n1kb0: 8x4 partial sums, 8x1 words, 4 masks.*16 vector registers of avx2"):
        check(KernelSpec(64, 128, 4, isa="avx2"), Schedule(row_vectors=8, accumulators=4))
    check(KernelSpec(64, 128, 4, isa="avx512"), Schedule(row_vectors=4, accumulators=4))  # 32 registers: fits


@pytest.mark.parametrize("schedule, named", [
    (Schedule(col_tile=2), "col_tile 1 and k_block 0"),
    (Schedule(k_block=64), "col_tile 1 and k_block 0"),
    (Schedule(row_vectors=0), "at least 1"),
    (Schedule(threads=0), "at least 1"),
])
def test_gemv_schedule_rules(schedule, named):
    with pytest.raises(SpecError, match=named):
        check(KernelSpec(64, 128, 4), schedule)


@pytest.mark.parametrize("bits, chunk, bad, good", [(2, 16, 24, 32), (3, 32, 40, 64), (4, 8, 12, 16), (8, 4, 6, 8)])
def test_gemm_k_block_must_be_a_multiple_of_the_chunk(bits, chunk, bad, good):
    spec = KernelSpec(64, 128, bits, 32, batch=8)
    with pytest.raises(SpecError, match=f"k_block={bad} is not a positive multiple of the {chunk}-code packing chunk"):
        check(spec, Schedule(1, 1, 2, bad))
    with pytest.raises(SpecError, match="k_block=0"):
        check(spec, Schedule(1, 1, 2, 0))
    check(spec, Schedule(1, 1, 2, good))


def test_gemm_schedule_rules():
    spec = KernelSpec(64, 128, 4, 32, batch=8)
    with pytest.raises(SpecError, match="accumulators is 1"):
        check(spec, Schedule(1, 2, 2, 64))
    with pytest.raises(SpecError, match=r"4x8 accumulators.*16 vector registers of avx2"):
        check(spec, Schedule(4, 1, 8, 64))


def test_render_refuses_what_one_library_cannot_hold():
    a = KernelSpec(64, 128, 4)
    with pytest.raises(SpecError, match="at least one kernel"):
        render([], "znver3")
    with pytest.raises(SpecError, match="one library holds one ISA, got avx2, avx512"):
        render([(a, Schedule()), (replace(a, isa="avx512"), Schedule())], "znver3")
    with pytest.raises(SpecError, match="listed twice"):
        render([(a, Schedule()), (a, Schedule())], "znver3")
    with pytest.raises(SpecError, match="vector registers"):
        render([(a, Schedule(8, 4))], "znver3")


def test_no_schedule_error_names_the_broken_rule():
    with pytest.raises(SpecError, match="thread"):
        rank(KernelSpec(64, 128, 4), HOST, threads=-1)


# --- targets ---

def test_unknown_target():
    with pytest.raises(HostError, match="unknown target 'nonsense'"):
        from_target("nonsense")
    with pytest.raises(HostError, match="unknown feature 'sse9'"):
        HOST.has("sse9")


@pytest.mark.parametrize("command", ["info", "generate"])
def test_cli_unknown_target(capsys, tmp_path, command):
    extra = ["--shape", "64x128", "-o", str(tmp_path / "out")] if command == "generate" else []
    code, err = _cli(capsys, command, "--target", "nonsense", *extra)
    assert code == 2 and "qigen: error: unknown target 'nonsense'" in err
    assert not (tmp_path / "out").exists()


# --- the compiler and its cache ---

def test_no_c_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "qigen-no-such-cc")
    with pytest.raises(CompileError, match="no C compiler: 'qigen-no-such-cc' is not on PATH"):
        compiler()
    with pytest.raises(CompileError, match="qigen-no-such-cc"):
        build("int f(void) { return 0; }", ("-shared",))


def test_no_c_compiler_from_the_cli(tmp_path):
    out = tmp_path / "out"
    r = _run([sys.executable, "-m", "qigen.cli", "generate", "--shape", "64x128", "-o", str(out)],
             {"CC": "nonexistent-cc", "QIGEN_CACHE_DIR": str(tmp_path / "cache")}, tmp_path)
    assert r.returncode == 2, r.stderr
    assert "qigen: error: no C compiler: 'nonexistent-cc' is not on PATH" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "manifest.json").exists()


def _fake_cc(tmp_path: Path, body: str) -> Path:
    cc = tmp_path / "fakecc"
    cc.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'fakecc 1.0'; exit 0; fi\n" + body)
    cc.chmod(0o755)
    return cc


def test_failing_compiler_output_is_in_the_error(monkeypatch, tmp_path):
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(_fake_cc(tmp_path, "echo 'fakecc: internal error 42' >&2\nexit 1\n")))
    with pytest.raises(CompileError, match="(?s)failed on generated source.*fakecc: internal error 42"):
        build("int f(void) { return 0; }", ("-O3", "-shared"))
    assert not list((tmp_path / "cache" / "kernels").iterdir())  # no temporary left behind


def test_compiler_that_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(_fake_cc(tmp_path, "exit 0\n")))
    with pytest.raises(CompileError):
        build("int f(void) { return 0; }", ("-shared",))


def test_compiler_that_fails_version(monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(CompileError, match="--version' failed"):
        compiler()


def test_unwritable_cache_dir(monkeypatch, tmp_path, capsys):
    # a cache below a regular file cannot be created, even by root (chmod does not stop root)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(CompileError, match=re.escape(f"cache directory {blocker / 'cache' / 'kernels'} cannot be created")):
        build("int f(void) { return 0; }", ("-shared",))
    code, err = _cli(capsys, "generate", "--shape", "64x128", "-o", str(tmp_path / "out"))
    assert code == 2 and f"cache directory {blocker / 'cache'}" in err and "QIGEN_CACHE_DIR" in err


SMALL = KernelSpec(37, 100, 4, 32, isa=ISA)
SMALL_PAIRS = [(SMALL, Schedule(1, 2, threads=1))]


@pytest.fixture(scope="module")
def pristine_cache(tmp_path_factory) -> Path:
    """A cache holding one small library, built once; tests damage copies of it."""
    cache = tmp_path_factory.mktemp("pristine-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QIGEN_CACHE_DIR", str(cache))
        compile(render(SMALL_PAIRS, HOST.name).text, HOST)
    return cache


def _check_library(path: Path, source) -> None:
    kernel = load(path, source.cdef, SMALL_PAIRS)[kernel_name(*SMALL_PAIRS[0])]
    w, x = _data(SMALL.rows, SMALL.cols)
    q = quantize(w, SMALL)
    _close(kernel(x, kernel.pack(q), threads=1), reference(x, q, SMALL))


@pytest.mark.parametrize("damage", ["garbage", "empty", "deleted", "checksum"])
def test_damaged_cache_entry_is_rebuilt(monkeypatch, tmp_path, pristine_cache, damage):
    shutil.copytree(pristine_cache, tmp_path / "cache")
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path / "cache"))
    source = render(SMALL_PAIRS, HOST.name)
    first = compile(source.text, HOST)  # found in the cache
    assert first.path.parent == tmp_path / "cache" / "kernels"
    assert first.path.read_bytes().startswith(b"\x7fELF")
    meta = first.path.with_suffix(".json")
    if damage == "garbage":
        first.path.write_bytes(b"garbage" * 100)  # never loaded in this process, so safe to overwrite
    elif damage == "empty":
        first.path.write_bytes(b"")
    elif damage == "deleted":
        first.path.unlink()
    else:
        meta.write_text('{"sha256": "0000"}')
    again = compile(source.text, HOST)
    assert again.path == first.path and again.key == first.key
    assert again.path.read_bytes().startswith(b"\x7fELF")
    assert json.loads(meta.read_text())["sha256"] == hashlib.sha256(again.path.read_bytes()).hexdigest()
    _check_library(again.path, source)


def test_garbage_library_is_a_load_error(tmp_path):
    so = tmp_path / "kernels.so"
    so.write_bytes(b"garbage")
    with pytest.raises(LoadError, match=re.escape(f"{so} is not a library qigen compiled")):
        load(so, "int f(void);", [])


# --- kernel sets on disk ---

@pytest.fixture(scope="module")
def pristine_set(tmp_path_factory) -> Path:
    """A kernel set generated once; tests damage copies of it."""
    root = tmp_path_factory.mktemp("pristine-set")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QIGEN_CACHE_DIR", str(root / "cache"))
        generate(Request(shapes=((37, 100),), bits=4, group=32, threads=1), root / "set", QUIET)
    return root / "set"


@pytest.fixture
def kernel_set(monkeypatch, tmp_path, pristine_set) -> Path:
    """A copy of the kernel set, and an empty cache: a damaged library must really be recompiled."""
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path / "cache"))
    return Path(shutil.copytree(pristine_set, tmp_path / "set"))


def _check_set(path: Path) -> None:
    k = qigen.load(path).find(37, 100)
    w, x = _data(37, 100, seed=3)
    q = quantize(w, k.spec)
    _close(k(x, k.pack(q), threads=1), reference(x, q, k.spec))


@pytest.mark.parametrize("damage", ["garbage", "deleted"])
def test_damaged_kernel_set_library_is_rebuilt_from_its_source(tmp_path, kernel_set, damage):
    if damage == "garbage":
        (kernel_set / "kernels.so").write_bytes(b"\x7fELF garbage")
    else:
        (kernel_set / "kernels.so").unlink()
    _check_set(kernel_set)
    assert list((tmp_path / "cache" / "kernels").glob("*.json"))  # rebuilt from kernels.c into the cache


def test_intact_kernel_set_loads_without_compiling(tmp_path, kernel_set):
    _check_set(kernel_set)
    assert not list((tmp_path / "cache" / "kernels").glob("*.json"))  # staged by content, not compiled


def test_kernel_set_with_edited_source_is_refused(kernel_set):
    (kernel_set / "kernels.so").write_bytes(b"garbage")
    with open(kernel_set / "kernels.c", "a") as f:
        f.write("/* edited */\n")
    with pytest.raises(LoadError, match="kernels.c does not match its manifest: regenerate"):
        qigen.load(kernel_set)


@pytest.mark.parametrize("damage", ["missing", "not json", "no kernels"])
def test_not_a_kernel_set(tmp_path, kernel_set, damage):
    manifest = kernel_set / "manifest.json"
    if damage == "missing":
        manifest.unlink()
    elif damage == "not json":
        manifest.write_text("{")
    else:
        manifest.write_text('{"library": {}}')
    with pytest.raises(LoadError, match="is not a qigen kernel set"):
        load_kernel_set(kernel_set)
    if damage == "missing":  # without a manifest, qigen.load takes the directory for a model
        with pytest.raises(CheckpointError, match="not a GGUF file nor a Hugging Face model directory"):
            qigen.load(kernel_set)


def test_load_from_the_working_directory(monkeypatch, kernel_set):
    monkeypatch.chdir(kernel_set)
    _check_set(Path("."))


REGENERATE = """
import sys
from pathlib import Path
import numpy as np
import qigen
from qigen.pipeline import Request, generate
from qigen.quant import quantize, reference

out = Path(sys.argv[1])
for shape in ((64, 128), (37, 100)):
    generate(Request(shapes=(shape,), bits=4, group=32, threads=1), out, lambda s: None)
    k = qigen.load(out).find(*shape)
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x = np.ones(shape[1], np.float32)
    q = quantize(w, k.spec)
    np.testing.assert_allclose(k(x, k.pack(q), threads=1), reference(x, q, k.spec), rtol=1e-4, atol=1e-3)
print("ok")
"""


def test_regenerate_a_loaded_kernel_set(tmp_path):
    r = _run([sys.executable, "-c", REGENERATE, str(tmp_path / "set")], {"QIGEN_CACHE_DIR": str(tmp_path / "cache")},
             tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


UNLOAD = """
import gc, sys, time
import numpy as np
import qigen

w = np.random.default_rng(0).standard_normal((37, 100)).astype(np.float32)
for _ in range(3):
    k = qigen.load(sys.argv[1]).find(37, 100)
    k(np.ones(100, np.float32), k.quantize(w), threads=2)  # starts libgomp's worker threads
    del k
    gc.collect()  # the library is closed, and libgomp with it
    time.sleep(0.05)
print("ok")
"""


def test_dropping_a_multithreaded_kernel_set(tmp_path, kernel_set):
    r = _run([sys.executable, "-c", UNLOAD, str(kernel_set)],
             {"QIGEN_CACHE_DIR": str(tmp_path / "cache"), "OMP_WAIT_POLICY": "active"}, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


# --- CPU features ---

def test_library_says_what_it_needs_and_the_loader_believes_only_that(tmp_path):
    """The features come from the library's own section, checked before dlopen: a runnable library that claims
    avx512f is refused on a CPU without it; a file with no such section is no qigen library."""
    claims = "avx2 avx512f" if not HAS_AVX512 else "avx2 avx512f avxvnni avx512vnni"
    forged = build('static const char r[] __attribute__((used, section(".qigen_requires"))) = "' + claims + '";\n'
                   "int f(void) { return 0; }", flags(HOST))
    missing = sorted(set(claims.split()) - HOST.features)
    if missing:
        with pytest.raises(LoadError, match=f"built for a CPU with {missing[0]}.*, which this CPU .* lacks"):
            load(forged.path, "int f(void);", [])
    plain = build("int f(void) { return 0; }", flags(HOST))
    with pytest.raises(LoadError, match="is not a library qigen compiled"):
        load(plain.path, "int f(void);", [])
    with pytest.raises(LoadError, match="cannot open"):
        load(tmp_path / "absent.so", "", [])
    garbage = tmp_path / "garbage.so"
    garbage.write_bytes(b"\x7fELF\x02\x01" + b"\xff" * 200)  # section offsets past the end of the file
    with pytest.raises(LoadError, match="is not a library qigen compiled"):
        load(garbage, "", [])


@pytest.mark.skipif(HAS_AVX512, reason="this CPU has AVX-512, so the kernel set would load")
def test_cross_compiled_avx512_set_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "skx"
    manifest = generate(Request(shapes=((64, 128),), bits=4, group=128, target="skylake-avx512"), out, QUIET)
    assert manifest["isa"] == "avx512" and "-march=skylake-avx512" in manifest["library"]["flags"]
    assert "avx512f" in manifest["library"]["requires"]
    with pytest.raises(LoadError, match="avx512f.*regenerate with --target native"):
        qigen.load(out)
    manifest["library"]["requires"] = ["avx2", "f16c", "fma"]  # an edited manifest does not make it loadable
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match="avx512f.*regenerate with --target native"):
        qigen.load(out)


@pytest.mark.skipif(HAS_AVX512, reason="this CPU has AVX-512")
def test_isa_the_target_lacks(capsys, tmp_path):
    code, err = _cli(capsys, "generate", "--shape", "64x128", "--isa", "avx512", "-o", str(tmp_path / "out"))
    assert code == 2 and "isa avx512 needs avx512f" in err


# --- calling a kernel ---

BASE = KernelSpec(37, 100, 4, 32, isa=ISA)
NARROW, WIDE = Schedule(1, 2, threads=1), Schedule(2, 1, threads=1)
PAIRS = [(BASE, NARROW), (BASE, WIDE), (replace(BASE, symmetric=True), NARROW),
         (replace(BASE, scale_dtype="fp32"), NARROW)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One library with an asymmetric fp16 kernel in two schedules, and symmetric and fp32-scale variants."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QIGEN_CACHE_DIR", str(cache))
        source = render(PAIRS, HOST.name)
        library = compile(source.text, HOST)
        kernels = load(library.path, source.cdef, PAIRS)
    return {pair: kernels[kernel_name(*pair)] for pair in PAIRS}, library.path, source.cdef


@pytest.fixture(scope="module")
def kernel(built):
    return built[0][(BASE, NARROW)]


@pytest.fixture(scope="module")
def weights(kernel):
    w, _ = _data(BASE.rows, BASE.cols, seed=1)
    return quantize(w, BASE)


@pytest.mark.parametrize("shape", [(99,), (101,), (100, 1), (2, 3, 100), (), (0, 100), (0,)])
def test_x_of_the_wrong_shape(kernel, weights, shape):
    with pytest.raises(ValueError, match=r"x has shape .*: expected \(100,\) or \(n, 100\) with n >= 1"):
        kernel(np.ones(shape, np.float32), kernel.pack(weights), threads=1)


def test_x_is_converted_to_contiguous_float32(kernel, weights):
    x = np.random.default_rng(2).standard_normal((3, 200))
    ref = reference(x[:, ::2].astype(np.float32), weights, BASE)
    packed = kernel.pack(weights)
    _close(kernel(x[:, ::2], packed, threads=1), ref)  # float64, strided
    _close(kernel(x[:, ::2].tolist(), packed, threads=1), ref)  # nested lists
    xi = np.arange(100) % 7 - 3
    _close(kernel(xi, packed, threads=1), reference(xi.astype(np.float32), weights, BASE))


def test_x_that_is_not_numbers(kernel, weights):
    with pytest.raises(ValueError, match="could not convert string to float"):
        kernel(np.array(["x"] * 100), kernel.pack(weights), threads=1)


@pytest.mark.parametrize("shape", [(36,), (38,), (1, 37), (100,)])
def test_bias_of_the_wrong_shape(kernel, weights, shape):
    with pytest.raises(ValueError, match=r"bias has shape .*: expected \(37,\)"):
        kernel(np.ones(100, np.float32), kernel.pack(weights), bias=np.ones(shape, np.float32), threads=1)


def test_bias_is_added(kernel, weights):
    x, bias = np.ones(100, np.float32), np.arange(37, dtype=np.float64)
    _close(kernel(x, kernel.pack(weights), bias=bias, threads=1), reference(x, weights, BASE, bias))


def test_negative_threads(kernel, weights):
    with pytest.raises(ValueError, match="threads=-1: at least 1"):
        kernel(np.ones(100, np.float32), kernel.pack(weights), threads=-1)


def test_zero_threads(kernel, weights):
    with pytest.raises(ValueError, match="threads=0: at least 1"):
        kernel(np.ones(100, np.float32), kernel.pack(weights), threads=0)


def test_weights_packed_for_another_schedule(built, weights):
    kernels = built[0]
    other = kernels[(BASE, WIDE)].pack(weights)
    with pytest.raises(ValueError, match="weights were packed for another layout than gemv_q4_g32_.*_r1a2n1kb0's"):
        kernels[(BASE, NARROW)](np.ones(100, np.float32), other, threads=1)


def test_weights_packed_for_another_shape(kernel):
    w, _ = _data(36, 100)
    other = pack(quantize(w, replace(BASE, rows=36)), replace(BASE, rows=36), NARROW)
    with pytest.raises(ValueError, match="packed for another layout"):
        kernel(np.ones(100, np.float32), other, threads=1)


@pytest.mark.parametrize("kernel_of, weights_of", [
    ((replace(BASE, symmetric=True), NARROW), (BASE, NARROW)),  # offsets ignored
    ((BASE, NARROW), (replace(BASE, scale_dtype="fp32"), NARROW)),  # fp32 scales read as fp16: NaN
], ids=["asym-into-sym", "fp32-into-fp16"])
def test_weights_of_another_format(built, kernel_of, weights_of):
    kernels = built[0]
    w, x = _data(37, 100, seed=4)
    packed = kernels[weights_of].quantize(w)
    with pytest.raises(ValueError, match="packed for another|not in .* format"):
        kernels[kernel_of](x, packed, threads=1)


NULL_OFFSETS = """
import sys
import numpy as np
from qigen.spec import KernelSpec, Schedule
from runtime.loader import load
from qigen.spec import kernel_name
pairs = {pairs!r}
kernels = load(sys.argv[1], sys.argv[2], pairs)
asym, sym = (kernels[kernel_name(*p)] for p in (pairs[0], pairs[2]))
w = np.random.default_rng(0).standard_normal((37, 100)).astype(np.float32)
try:
    asym(np.ones(100, np.float32), sym.quantize(w), threads=1)
except ValueError as e:
    print("ValueError:", e)
"""


def test_symmetric_weights_into_an_asymmetric_kernel(built, tmp_path):
    _, path, cdef = built
    r = _run([sys.executable, "-c", NULL_OFFSETS.format(pairs=PAIRS), str(path), cdef], {}, tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("ValueError:"), (r.returncode, r.stderr[-2000:])


# --- quantize and pack ---

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_non_finite_weights(bad):
    w, _ = _data(37, 100)
    w[5, 7] = bad
    with pytest.raises(ValueError, match="weights contain NaN or infinity"):
        quantize(w, BASE)


def test_quantize_wrong_shape(kernel):
    with pytest.raises(ValueError, match=r"weights have shape \(100, 37\), the spec is 37x100"):
        quantize(np.ones((100, 37), np.float32), BASE)
    with pytest.raises(ValueError, match="the spec is 37x100"):
        kernel.quantize(np.ones((37, 99), np.float32))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_weights_beyond_fp16_scales():
    w, _ = _data(37, 100)
    with pytest.raises(ValueError, match="fp16"):
        quantize(w * 1e6, BASE)


def test_pack_checks_the_codes_and_scales(weights):
    with pytest.raises(ValueError, match=r"codes have shape \(37, 99\), the layout expects \(37, 100\)"):
        pack(replace(weights, codes=weights.codes[:, :99]), BASE, NARROW)
    with pytest.raises(ValueError, match="a code exceeds 4 bits"):
        pack(replace(weights, codes=weights.codes | 16), BASE, NARROW)
    with pytest.raises(ValueError, match=r"scales have shape \(37, 3\), the spec needs \(37, 4\)"):
        pack(replace(weights, scales=weights.scales[:, :3]), BASE, NARROW)
    with pytest.raises(ValueError, match="symmetric kernels take weights without offsets"):
        pack(weights, replace(BASE, symmetric=True), NARROW)
    with pytest.raises(ValueError, match="asymmetric ones need them"):
        pack(QuantizedWeights(weights.codes, weights.scales, None), BASE, NARROW)


def test_outliers_are_checked(weights, kernel):
    w, _ = _data(37, 100)
    with pytest.raises(ValueError, match="in ascending order"):
        weights.with_outliers(w, np.array([7, 3]))
    with pytest.raises(ValueError, match="distinct inputs 0..99"):
        weights.with_outliers(w, np.array([3, 100]))
    with pytest.raises(ValueError, match=r"1 to 64 int32 input channels, not int32 \(65,\)"):
        weights.with_outliers(w, np.arange(65))
    with pytest.raises(ValueError, match=r"outlier weights should be finite fp16 of shape \(37, 2\)"):
        replace(weights.with_outliers(w, np.array([1, 2])), outlier_weights=np.zeros((37, 3), np.float16))
    packed = kernel.pack(weights.with_outliers(w, np.array([0, 99])))
    bad = dict(packed.arrays, outliers=np.array([3, 0, 99], np.int32))  # a count past its channels
    with pytest.raises(ValueError, match="the count k, then k channels"):
        kernel(np.ones(100, np.float32), replace(packed, arrays=bad))
    bad = dict(packed.arrays, outlier_weights=packed.arrays["outlier_weights"][:1])
    with pytest.raises(ValueError, match=r"outlier_weights should be float16 \(2, \d+\) or none"):
        kernel(np.ones(100, np.float32), replace(packed, arrays=bad))
    bad = {k: v for k, v in packed.arrays.items() if k != "outlier_weights"}
    with pytest.raises(ValueError, match="outliers without their weights"):
        kernel(np.ones(100, np.float32), replace(packed, arrays=bad))


def test_cli_outlier_count(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--outliers", "65", "-o", "x.qigen"])
    assert e.value.code == 2 and "outliers '65' is not auto or a count 0 to 64" in capsys.readouterr().err


def test_outlier_count_and_calibration_text_are_checked(tmp_path):
    from qigen.llm import calibrate
    from qigen.outliers import choose

    with pytest.raises(SpecError, match="outliers=65: choose auto or a count of input channels 0 to 64"):
        QuantSpec(outliers=65)
    with pytest.raises(SpecError, match="outliers='many'"):
        QuantSpec(outliers="many")
    w, _ = _data(37, 40)
    spec = replace(BASE, cols=40, group=None)
    with pytest.raises(ValueError, match="50 outlier channels of a layer of 40 inputs"):
        choose(w, spec, 50, np.eye(40), w[:4].T, lambda m, ch: quantize(m, spec))
    with pytest.raises(ValueError, match="calibration text is 1 tokens: at least one window of 512"):
        calibrate(load_checkpoint(os.environ["QIGEN_TEST_GGUF"]), "Hello")


def test_cli_nan_weights(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path / "cache"))
    w = np.ones((64, 128), np.float32)
    w[0, 0] = np.nan
    np.save(tmp_path / "w.npy", w)
    code, err = _cli(capsys, "generate", "--weights", str(tmp_path / "w.npy"), "-o", str(tmp_path / "out"))
    assert code == 2 and "finite" in err


# --- the command line ---

def test_tune_needs_the_native_target(capsys, tmp_path):
    code, err = _cli(capsys, "generate", "--shape", "64x128", "--target", "znver3", "--tune", "-o", str(tmp_path / "o"))
    assert code == 2 and "--tune times kernels on this machine, so it needs --target native, not znver3" in err


def test_unreachable_max_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path / "cache"))
    code, err = _cli(capsys, "generate", "--shape", "64x128", "--max-error", "1e-9", "-o", str(tmp_path / "out"))
    assert code == 2 and "qigen: error: no format meets max error 1e-09" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, named", [
    ([], "no shape given"),
    (["--shape", "64x128", "--batch", "0"], "batch=0 is out of range"),
    (["--shape", "0x128"], "shape 0x128 is empty"),
])
def test_cli_bad_request(capsys, tmp_path, argv, named):
    code, err = _cli(capsys, "generate", *argv, "-o", str(tmp_path / "out"))
    assert code == 2 and named in err


@pytest.mark.parametrize("argv, named", [
    (["--shape", "64by128"], "shape '64by128' is not ROWSxCOLS"),
    (["--shape", "64x128", "--group", "big"], "group 'big' is not a number or 'row'"),
    (["--shape", "64x128", "--bits", "5"], "5 bits is not one of 2, 3, 4, 8"),
    (["--shape", "64x128", "--group", "48"], "group 48 is not one of 32, 64, 128, 256, row"),
    (["--shape", "64x128"], "required: -o/--out"),
])
def test_cli_unparsable_arguments(capsys, tmp_path, argv, named):
    if named.startswith("required"):
        argv = ["generate", *argv]
    else:
        argv = ["generate", *argv, "-o", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize("content, named", [(None, "cannot read weights"), ("vector", "finite numeric matrix")])
def test_cli_unreadable_weights(capsys, tmp_path, content, named):
    path = tmp_path / "w.npy"
    if content == "vector":
        np.save(path, np.ones(5, np.float32))
    else:
        path.write_text("not numpy")
    code, err = _cli(capsys, "generate", "--weights", str(path), "-o", str(tmp_path / "out"))
    assert code == 2 and named in err


def test_info_measure_needs_the_native_target(capsys):
    code, err = _cli(capsys, "info", "--target", "znver3", "--measure")
    assert code == 2 and "--measure probes this machine" in err



# --- command-line values: one range rule each, a one-line error before any model loads ---

CORES = HOST.cores


@pytest.mark.parametrize("argv, named", [
    (["run", "--prompt", "hi", "--temperature", "-1"], "temperature=-1.0: a finite number, at least 0"),
    (["run", "--prompt", "hi", "--temperature", "inf"], "temperature=inf"),
    (["run", "--prompt", "hi", "--ctx", "0"], "context=0: at least 2 tokens"),
    (["run", "--prompt", "hi", "--top-p", "2"], "top_p=2.0: above 0, at most 1"),
    (["run", "--prompt", "hi", "--top-p", "0"], "top_p=0.0: above 0"),
    (["run", "--prompt", "hi", "--top-k", "-3"], "top_k=-3: at least 0"),
    (["run", "--prompt", "hi", "--max-tokens", "-5"], "max_tokens=-5: at least 1"),
    (["perplexity", "--text", "x.txt", "--ctx", "0"], "ctx=0: a window holds at least 2 tokens"),
])
def test_cli_out_of_range_values(capsys, argv, named):
    code, err = _cli(capsys, *argv)
    assert code == 2 and named in err and err.count("\n") == 1, err


@pytest.mark.parametrize("command", [["run", "--prompt", "hi"], ["perplexity", "--text", "x.txt"]])
def test_cli_unknown_kv_cache(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([*command, "--kv-cache", "q9"])
    assert e.value.code == 2 and "KV cache 'q9' is not one of fp32, fp16, q8, q4" in capsys.readouterr().err


@pytest.mark.parametrize("value, named", [("0", "0 is not a positive integer"),
                                          (str(CORES + 1), f"threads={CORES + 1}: from 1 to the {CORES} cores")])
@pytest.mark.parametrize("command", [["run", "--prompt", "hi"], ["perplexity", "--text", "x.txt"]])
def test_cli_threads_out_of_range(capsys, command, value, named):
    with pytest.raises(SystemExit) as e:
        main([*command, "--threads", value])
    assert e.value.code == 2 and named in capsys.readouterr().err


def test_generate_refuses_a_file_as_output_and_threads_past_the_target(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    code, err = _cli(capsys, "generate", "--shape", "64x128", "-o", str(tmp_path / "file"))
    assert code == 2 and "is a file: the output is a directory" in err
    code, err = _cli(capsys, "generate", "--shape", "64x128", "--threads", "1000", "-o", str(tmp_path / "out"))
    assert code == 2 and f"threads=1000: from 1 to the {CORES} cores of target" in err


def test_a_killed_writer_leaves_nothing_behind(tmp_path):
    """A writer killed mid-write leaves its temporary file; the next write into that directory removes it, and
    never a live writer's or a file that is not ours."""
    from runtime.compiler import atomic_write

    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stale, live, other = (tmp_path / f".tmp-{killed.pid}-abc", tmp_path / f".tmp-{os.getpid()}-def",
                          tmp_path / ".tmp-notes")
    for f in (stale, live, other):
        f.write_bytes(b"x" * 100)
    (tmp_path / f".build-{killed.pid}-ghi").mkdir()
    killed.kill()
    killed.wait()
    atomic_write(tmp_path / "out.qigen", b"data")
    assert (tmp_path / "out.qigen").read_bytes() == b"data"
    assert not stale.exists() and not (tmp_path / f".build-{killed.pid}-ghi").exists()
    assert live.exists() and other.exists()


def test_a_full_cache_disk_during_a_build_says_so(monkeypatch, tmp_path):
    """The linker's 'No space left on device' becomes one line naming the cache directory, not its raw output."""
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo 'fake cc 1.0'; exit 0; }\n"
                  "echo '/usr/bin/ld: final link failed: No space left on device' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CompileError, match="cache directory .* is full: .*QIGEN_CACHE_DIR") as e:
        build("int f(void) { return 0; }", ("-shared",))
    assert "/usr/bin/ld" not in str(e.value)
