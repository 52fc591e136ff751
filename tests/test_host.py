import json
import os
import platform
from pathlib import Path

import llvmlite.binding as llvm
import pytest

import perfmodel.host
from perfmodel.host import (FEATURES, SYSFS_CACHE, Host, HostError, KiB, MiB, _caches, _features,
                            _sysfs_caches, detect, from_target, known_targets)

NAMED = [t for t in known_targets() if t != "native"]


def _fake_sysfs(root: Path, entries: list[tuple[int, str, str]]) -> Path:
    for i, (level, kind, size) in enumerate(entries):
        index = root / f"index{i}"
        index.mkdir(parents=True)
        (index / "level").write_text(f"{level}\n")
        (index / "type").write_text(f"{kind}\n")
        (index / "size").write_text(f"{size}\n")
    return root


def test_sysfs_parsing_skips_instruction_cache(tmp_path):
    root = _fake_sysfs(tmp_path, [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"), (3, "Unified", "1M")])
    assert _sysfs_caches(root) == {1: 48 * KiB, 2: 2 * MiB, 3: 1 * MiB}
    assert _caches(root, {"l3_cache_size": 1}) == {"l1d": 48 * KiB, "l2": 2 * MiB, "l3": 1 * MiB}


def test_unified_l1_counts_as_data_cache(tmp_path):
    root = _fake_sysfs(tmp_path, [(1, "Unified", "64K"), (2, "Unified", "512K"), (3, "Unified", "8192K")])
    assert _sysfs_caches(root)[1] == 64 * KiB


def test_cpuinfo_is_the_fallback_without_sysfs(tmp_path):
    info = {"l1_data_cache_size": 65536, "l2_cache_size": 1048576, "l3_cache_size": 524288}
    assert _caches(tmp_path / "absent", info) == {"l1d": 65536, "l2": 1048576, "l3": 524288}


def test_no_cache_source_is_an_error(tmp_path):
    with pytest.raises(HostError, match="L3 cache size"):
        _caches(tmp_path / "absent", {"l1_data_cache_size": 32768, "l2_cache_size": 262144})


def _sysfs_raw() -> dict[tuple[str, str], str]:
    read = lambda index, f: (index / f).read_text().strip()  # noqa: E731
    return {(read(i, "level"), read(i, "type")): read(i, "size") for i in SYSFS_CACHE.glob("index*")}


# The development machine (AMD EPYC, znver3), where py-cpuinfo says L1d 64 KiB (both cores),
# L2 1 MiB and L3 512 KiB, and sysfs gives the true per-core sizes.
REFERENCE_SYSFS = {("1", "Data"): "32K", ("1", "Instruction"): "32K", ("2", "Unified"): "512K", ("3", "Unified"): "32768K"}


@pytest.mark.skipif(not SYSFS_CACHE.is_dir(), reason=f"{SYSFS_CACHE} is absent")
def test_detect_takes_caches_from_sysfs():
    if _sysfs_raw() != REFERENCE_SYSFS:
        pytest.skip("not the reference machine (sysfs L1d 32K, L2 512K, L3 32768K)")
    host = detect()
    assert (host.l1d, host.l2, host.l3) == (32768, 524288, 33554432)


def test_features_need_both_llvm_and_cpuinfo():
    from_llvm = {"avx2": True, "fma": True, "f16c": False, "avx512f": True, "avx512vnni": True, "avxvnni": True}
    assert _features(from_llvm, ["avx2", "fma", "f16c", "avx512_vnni", "avx_vnni"]) == {"avx2", "fma", "avx512vnni", "avxvnni"}
    assert _features(from_llvm, ["avx2", "avx512vnni"]) == {"avx2", "avx512vnni"}
    assert _features(from_llvm, []) == {"avx2", "fma", "avx512f", "avx512vnni", "avxvnni"}  # no flags: LLVM alone


def test_detect_describes_this_machine():
    host = detect()
    assert host.native and host.name == llvm.get_host_cpu_name()
    assert host.cores == len(os.sched_getaffinity(0))
    assert host.features <= set(FEATURES)
    assert host.l1d < host.l2 < host.l3
    assert from_target("native") is host


def test_named_targets():
    assert from_target("skylake-avx512").has("avx512f", "avx512bw", "avx512vl", "avx512dq")
    assert not from_target("haswell").has("avx512f")
    assert from_target("znver3").vendor == "AuthenticAMD" and not from_target("znver3").native
    assert {"haswell", "alderlake", "znver4", "x86-64-v4"} <= set(known_targets())
    assert known_targets()[-1] == "native"


def test_vnni_targets():
    assert {t for t in NAMED if from_target(t).has("avx512vnni")} == {
        "cascadelake", "icelake-client", "icelake-server", "tigerlake", "sapphirerapids", "znver4"}
    assert {t for t in NAMED if from_target(t).has("avxvnni")} == {"alderlake", "sapphirerapids"}
    assert from_target("x86-64").features == frozenset()


def test_unknown_target_lists_known_ones():
    with pytest.raises(HostError, match=r"unknown target 'foo': known targets are haswell, .*, native"):
        from_target("foo")


def test_target_unknown_to_llvm_is_an_error(monkeypatch):
    monkeypatch.setattr(perfmodel.host, "_llvm_cpu_names", lambda: frozenset({"haswell"}))
    assert from_target("haswell").name == "haswell"
    with pytest.raises(HostError, match="target 'znver4' is unknown to LLVM"):
        from_target("znver4")


def test_unknown_feature_is_an_error():
    with pytest.raises(HostError, match="unknown feature 'avx512'"):
        from_target("haswell").has("avx512")


@pytest.mark.parametrize("name", ["native", "skylake-avx512"])
def test_to_dict_is_json(name):
    data = json.loads(json.dumps(from_target(name).to_dict()))
    assert data["features"] == sorted(data["features"])
    assert Host(**data | {"features": frozenset(data["features"])}) == from_target(name)


def _binop(ty: str, op: str) -> str:
    return (f'define {ty} @f({ty} %a, {ty} %b) #0 {{\n  %r = {op} {ty} %a, %b\n  ret {ty} %r\n}}\n'
            'attributes #0 = { "min-legal-vector-width"="512" }')  # let LLVM use zmm even where it prefers ymm


# What LLVM emits for each feature it enables; the VNNI features have no such plain-IR witness.
CODEGEN_WITNESS = {
    "avx2": (_binop("<8 x i32>", "add"), "vpaddd\t%ymm"),
    "fma": ("declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)\n"
            "define <8 x float> @f(<8 x float> %a, <8 x float> %b, <8 x float> %c) {\n"
            "  %r = call <8 x float> @llvm.fma.v8f32(<8 x float> %a, <8 x float> %b, <8 x float> %c)\n"
            "  ret <8 x float> %r\n}", "vfmadd"),
    "f16c": ("define <8 x float> @f(<8 x half> %a) {\n  %r = fpext <8 x half> %a to <8 x float>\n"
             "  ret <8 x float> %r\n}", "vcvtph2ps"),
    "avx512f": (_binop("<16 x float>", "fadd"), "%zmm"),
    "avx512bw": (_binop("<64 x i8>", "add"), "vpaddb\t%zmm"),
    "avx512dq": (_binop("<8 x i64>", "mul"), "vpmullq\t%zmm"),
    "avx512vl": (_binop("<4 x i64>", "ashr"), "vpsravq\t%ymm"),
}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="LLVM's x86 code generator is needed")
@pytest.mark.parametrize("name", NAMED)
def test_target_table_matches_llvm_codegen(name):
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    machine = llvm.Target.from_triple("x86_64-unknown-linux-gnu").create_target_machine(cpu=name)
    emitted = {f for f, (ir, witness) in CODEGEN_WITNESS.items() if witness in machine.emit_assembly(llvm.parse_assembly(ir))}
    assert emitted == from_target(name).features & CODEGEN_WITNESS.keys()


def test_compute_peak_probe_counts_operations():
    """The probe compiles for this host's best ISA and reports positive fp32 and int8 rates, per thread count."""
    from runtime import peak

    found = peak.probe([1], reps=1)
    assert set(found) == {1} and found[1]["fp32"] > 1e9 and found[1]["int8"] > 1e9
