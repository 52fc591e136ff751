"""The `qigen` command: `info` describes a CPU, `generate` writes a kernel set that `qigen.load` runs.

Most calls go through `qigen.cli.main(argv)` in this process (the host is detected once); a few
run the real command in a subprocess: the console script, and two generators racing on one cache.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qigen
from runtime import bandwidth as probe
from perfmodel.cost import bandwidth
from perfmodel.host import FEATURES, detect
from perfmodel.search import choose_format, rank
from qigen.cli import main
from qigen.pipeline import best_isa
from qigen.quant import quantize, reference, relative_error
from qigen.spec import ISAS, KernelSpec, Schedule, check, kernel_name

HOST = detect()
ISA = best_isa(HOST)
KEYS = {"name", "spec", "schedule", "predicted", "measured_s", "relative_error", "bits_per_weight"}


def _qigen(capsys, *argv: str) -> tuple[int, str, str]:
    """`qigen ARGV` in this process: exit status, stdout, stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _generate_json(capsys, *argv) -> dict:
    code, out, err = _qigen(capsys, "generate", *argv, "--json", "--quiet")
    assert code == 0, err
    return json.loads(out)


def _command() -> list[str]:
    """The installed console script, or the module where it is not on PATH."""
    script = shutil.which("qigen")
    return [script] if script else [sys.executable, "-m", "qigen.cli"]


def _check_kernel(k, batch: int | None = None, seed: int = 0) -> None:
    """The kernel against the numpy oracle on random data, one thread (no OpenMP pool is started)."""
    spec = k.spec
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((spec.rows, spec.cols)).astype(np.float32)
    x = rng.standard_normal((batch, spec.cols) if batch else spec.cols).astype(np.float32)
    q = quantize(w, spec)
    ref = reference(spec.traits.seen(x), q, spec)  # x as the family's kernels multiply it
    np.testing.assert_allclose(k(x, k.pack(q), threads=1), ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- qigen info ---

def test_info_json(capsys, cache):
    code, out, err = _qigen(capsys, "info", "--json")
    assert code == 0, err
    d = json.loads(out)  # exactly one JSON object: json.loads refuses trailing text
    h = d["host"]
    assert isinstance(h["features"], list) and set(h["features"]) <= set(FEATURES)
    assert h["features"] == sorted(HOST.features)
    for level in ("l1d", "l2", "l3"):
        assert isinstance(h[level], int) and h[level] >= 4096  # bytes, not KiB
    assert h["l1d"] < h["l2"] < h["l3"]
    assert h["native"] is True and h["cores"] == HOST.cores
    assert d["isa"] in ISAS and d["isa"] == ISA
    assert d["read_bandwidth"] is None  # a fresh cache holds no measurement
    ex = d["example"]
    assert ex["spec"] == KernelSpec(4096, 4096, 4, 128, isa=ISA).name
    check(KernelSpec(4096, 4096, 4, 128, isa=ISA), Schedule(**ex["schedule"]))
    assert ex["predicted_s"] > 0 and ex["bandwidth_assumed"] == bandwidth(HOST, HOST.cores)


def test_info_shows_the_stored_bandwidth(capsys, cache):
    cache.mkdir()
    measured = {1: 12e9, HOST.cores + 1: 30e9}
    probe._path(HOST).write_text(json.dumps({"read_bytes_per_s": measured, "measured_at": 0}))
    d = json.loads(_qigen(capsys, "info", "--json")[1])
    assert d["read_bandwidth"] == {str(t): v for t, v in measured.items()}
    assert d["example"]["bandwidth_assumed"] == pytest.approx(bandwidth(probe.measured(HOST, measured), HOST.cores))


def test_info_text(capsys, cache):
    code, out, _ = _qigen(capsys, "info")
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert set(lines) == {"cpu", "cores", "features", "caches", "bandwidth", "peaks", "generates"}
    assert f"L1d {HOST.l1d >> 10} KiB" in lines["caches"]
    assert "not measured" in lines["bandwidth"] and "not measured" in lines["peaks"]
    assert lines["generates"].startswith(f"{ISA} kernels")


def test_info_named_target(capsys, cache):
    code, out, _ = _qigen(capsys, "info", "--target", "icelake-server", "--json")
    assert code == 0
    d = json.loads(out)
    assert "avx512vnni" in d["host"]["features"] and d["isa"] == "avx512vnni"
    assert d["host"]["name"] == "icelake-server" and d["host"]["native"] is False
    assert d["host"]["l2"] == 1280 << 10 and d["read_bandwidth"] is None
    assert d["example"]["spec"].startswith("gemv_q4_g128_asym_fp16_avx512vnni_")


def test_console_script(tmp_path):
    r = subprocess.run([*_command(), "info", "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env=os.environ | {"QIGEN_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["host"]["name"] == HOST.name
    assert not list(tmp_path.iterdir())  # info writes nothing, not even the cache directory


# --- qigen generate ---

@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def two_shapes(tmp_path_factory, shared_cache):
    """`qigen generate --shape 64x128 --shape 37x100 --bits 3 --group 32 -o DIR --json`, run once."""
    out = tmp_path_factory.mktemp("two") / "k"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setenv("QIGEN_CACHE_DIR", str(shared_cache))
        code = main(["generate", "--shape", "64x128", "--shape", "37x100", "--bits", "3", "--group", "32",
                     "-o", str(out), "--json"])
    assert code == 0, stderr.getvalue()
    return out, json.loads(stdout.getvalue()), stderr.getvalue()


def test_generate_writes_a_kernel_set(two_shapes):
    out, printed, _ = two_shapes
    assert sorted(p.name for p in out.iterdir()) == ["kernels.c", "kernels.so", "manifest.json"]
    assert json.loads((out / "manifest.json").read_text()) == printed
    assert (out / "kernels.c").read_text().startswith(f"/* Generated by qigen for target {HOST.name} ({ISA})")


def test_manifest_describes_every_kernel(two_shapes):
    _, m, _ = two_shapes
    assert [(k["spec"]["rows"], k["spec"]["cols"]) for k in m["kernels"]] == [(64, 128), (37, 100)]
    for k in m["kernels"]:
        assert set(k) == KEYS
        spec, schedule = KernelSpec(**k["spec"]), Schedule(**k["schedule"])
        assert (spec.bits, spec.group, spec.isa, spec.batch) == (3, 32, ISA, 1)
        assert k["name"] == kernel_name(spec, schedule)
        check(spec, schedule)
        assert schedule == rank(spec, HOST, m["threads"])[0].schedule  # untuned: the model's first choice
        assert k["predicted"]["seconds"] > 0 and k["predicted"]["measured_bandwidth"] is False
        assert k["measured_s"] is None
        assert 0 < k["relative_error"] < 0.3
        assert k["bits_per_weight"] >= 3 + 2 * 16 / 32  # codes, fp16 scale and offset per 32
    assert m["isa"] == ISA and m["threads"] == HOST.cores and m["target"] == HOST.to_dict()
    assert m["measured_bandwidth"] is None


def test_manifest_describes_the_library(two_shapes):
    out, m, _ = two_shapes
    lib = m["library"]
    assert (lib["file"], lib["source"]) == ("kernels.so", "kernels.c")
    assert lib["sha256"] == hashlib.sha256((out / "kernels.so").read_bytes()).hexdigest()
    assert lib["source_sha256"] == hashlib.sha256((out / "kernels.c").read_bytes()).hexdigest()
    assert lib["compiler"] and Path(lib["cc"]).is_file()
    assert {"-O3", "-march=native", "-shared", "-fopenmp"} <= set(lib["flags"])
    assert set(lib["requires"]) <= HOST.features


def test_progress_goes_to_stderr(two_shapes):
    _, m, stderr = two_shapes
    for k in m["kernels"]:
        spec = KernelSpec(**k["spec"])
        assert f"{spec.name}: error {k['relative_error']:.4f}" in stderr


def test_generated_kernels_match_the_oracle(two_shapes):
    ks = qigen.load(two_shapes[0])
    assert set(ks) == {k["name"] for k in two_shapes[1]["kernels"]}
    _check_kernel(ks.find(64, 128))
    _check_kernel(ks.find(37, 100), seed=1)
    _check_kernel(ks.find(37, 100, batch=1), batch=3, seed=2)  # a decode kernel also takes a few columns
    with pytest.raises(KeyError, match="no kernel for 64x100; have gemv_q3_g32_"):
        ks.find(64, 100)


def test_generate_table(capsys, monkeypatch, tmp_path, shared_cache):
    monkeypatch.setenv("QIGEN_CACHE_DIR", str(shared_cache))  # the same source: the cached library is reused
    code, out, _ = _qigen(capsys, "generate", "--shape", "64x128", "--shape", "37x100", "--bits", "3", "--group", "32",
                          "-o", tmp_path / "k", "--quiet")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["kernel", "schedule", "bits/w", "error", "predicted", "measured"]
    assert lines[1].startswith("gemv_q3_g32_asym_fp16_") and lines[1].split()[-1] == "-"
    assert lines[3].startswith(f"library    kernels.so ({ISA}, ")
    assert lines[4].startswith("note       bandwidth not measured")


def test_max_error_picks_a_format(capsys, cache, tmp_path):
    m = _generate_json(capsys, "--shape", "64x128", "--max-error", "0.2", "-o", tmp_path / "k")
    k = m["kernels"][0]
    assert k["relative_error"] <= 0.2
    spec = KernelSpec(**k["spec"])
    expected, err = choose_format(KernelSpec(64, 128, 4, 128, isa=ISA), HOST, 0.2, None, None, "any")
    assert spec == expected and k["relative_error"] == err
    _check_kernel(qigen.load(tmp_path / "k").find(64, 128))


def test_activations_pick_the_family(capsys, cache, tmp_path):
    """--activations int8 generates integer-dot kernels, decode and prefill; auto with --max-error picks each
    format's family; a format int8 cannot take is refused with the rule."""
    for batch in (1, 8):
        m = _generate_json(capsys, "--shape", "40x96", "--bits", "4", "--group", "32", "--activations", "int8",
                           "--batch", batch, "-o", tmp_path / f"k{batch}")
        assert m["kernels"][0]["spec"]["family"] == "wq_a8"
        _check_kernel(qigen.load(tmp_path / f"k{batch}").find(40, 96), batch=3)
    m = _generate_json(capsys, "--shape", "40x96", "--max-error", "0.2", "--activations", "auto", "-o", tmp_path / "a")
    assert KernelSpec(**m["kernels"][0]["spec"]).traits.activations == "int8"
    code, _, err = _qigen(capsys, "generate", "--shape", "40x96", "--group", "row", "--activations", "int8",
                          "-o", tmp_path / "r")
    assert code != 0 and "int8 activations need a group that is a multiple of 32" in err


def test_weights_give_the_shape_and_the_error(capsys, cache, tmp_path):
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((48, 160)) * np.linspace(0.1, 3, 160)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    m = _generate_json(capsys, "--weights", tmp_path / "w.npy", "--max-error", "0.12", "-o", tmp_path / "k")
    k = m["kernels"][0]
    spec = KernelSpec(**k["spec"])
    assert (spec.rows, spec.cols) == (48, 160)
    assert k["relative_error"] == pytest.approx(relative_error(w, spec)) and k["relative_error"] <= 0.12
    _check_kernel(qigen.load(tmp_path / "k").find(48, 160))


def test_tune_records_the_measured_time(capsys, cache, tmp_path):
    # one thread: the timing starts no OpenMP pool in this test process
    m = _generate_json(capsys, "--shape", "64x128", "--bits", "4", "--group", "128", "--threads", "1", "--tune",
                       "-o", tmp_path / "k")
    k = m["kernels"][0]
    assert k["measured_s"] > 0 and np.isfinite(k["measured_s"])
    spec, schedule = KernelSpec(**k["spec"]), Schedule(**k["schedule"])
    assert schedule in [c.schedule for c in rank(spec, HOST, 1)[:3]]  # the fastest of the top three
    _check_kernel(qigen.load(tmp_path / "k").find(64, 128))


def test_group_row(capsys, cache, tmp_path):
    m = _generate_json(capsys, "--shape", "37x100", "--bits", "4", "--group", "row", "--sym", "--scale-dtype", "fp32",
                       "-o", tmp_path / "k")
    k = m["kernels"][0]
    assert k["spec"]["group"] is None and k["spec"]["symmetric"] is True and k["spec"]["scale_dtype"] == "fp32"
    assert "_q4_grow_sym_fp32_" in k["name"]
    _check_kernel(qigen.load(tmp_path / "k").find(37, 100))


def test_prefill_batch(capsys, cache, tmp_path):
    m = _generate_json(capsys, "--shape", "64x128", "--bits", "4", "--group", "32", "--batch", "8",
                       "-o", tmp_path / "k")
    k = m["kernels"][0]
    assert k["name"].startswith("gemm_q4_g32_") and k["schedule"]["k_block"] > 0
    kernel = qigen.load(tmp_path / "k").find(64, 128, batch=8)
    _check_kernel(kernel, batch=8)
    _check_kernel(kernel, batch=3, seed=1)


def test_named_target_that_this_cpu_can_run(capsys, cache, tmp_path):
    if not HOST.has("avx2", "fma", "f16c"):
        pytest.skip("this CPU cannot run haswell kernels")
    m = _generate_json(capsys, "--shape", "64x128", "--bits", "4", "--target", "haswell", "-o", tmp_path / "k")
    assert m["target"]["name"] == "haswell" and m["isa"] == "avx2" and m["threads"] == 4
    assert "-march=haswell" in m["library"]["flags"] and "-march=native" not in m["library"]["flags"]
    assert m["measured_bandwidth"] is None
    _check_kernel(qigen.load(tmp_path / "k").find(64, 128))


def test_concurrent_generators_share_one_cache(tmp_path):
    env = os.environ | {"QIGEN_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([*_command(), "generate", "--shape", "64x128", "--bits", "4", "--group", "64",
                               "-o", str(tmp_path / f"k{i}"), "--quiet"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for code, _, err in results:
        assert code == 0, err
    manifests = [json.loads((tmp_path / f"k{i}" / "manifest.json").read_text()) for i in range(2)]
    assert manifests[0]["library"]["sha256"] == manifests[1]["library"]["sha256"]
    entries = sorted(p.name for p in (tmp_path / "cache" / "kernels").iterdir())
    assert len(entries) == 2 and entries[0].endswith(".json") and entries[1].endswith(".so")  # no temporaries left
    key = entries[1].removesuffix(".so")
    assert json.loads((tmp_path / "cache" / "kernels" / f"{key}.json").read_text())["sha256"] == \
        hashlib.sha256((tmp_path / "cache" / "kernels" / f"{key}.so").read_bytes()).hexdigest()


def test_package_exports_the_generate_function():
    import qigen.pipeline  # noqa: F401  any use of the pipeline imports the submodule

    assert callable(qigen.generate)
