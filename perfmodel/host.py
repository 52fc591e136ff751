"""The CPU a kernel is generated for: ISA features, cache sizes, cores and clock.

`detect()` describes the machine we run on; `from_target(name)` describes a named LLVM CPU so
kernels can be generated for another machine.  Native features are those both LLVM and
py-cpuinfo report; cache sizes come from Linux sysfs, because py-cpuinfo misreports them on
some CPUs (e.g. L1d as the sum over cores, L3 as 512 KiB on a 32 MiB AMD EPYC).
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import cpuinfo

FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni", "avxvnni")
KiB, MiB = 1 << 10, 1 << 20
SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
_CPUINFO_NAMES = {"avx512vnni": ("avx512_vnni", "avx512vnni"), "avxvnni": ("avx_vnni",)}  # py-cpuinfo spellings


class HostError(ValueError):
    """A target or feature qigen does not know; the message names the broken rule."""


@dataclass(frozen=True)
class Host:
    name: str  # LLVM CPU name, e.g. "znver3"
    vendor: str  # "AuthenticAMD", "GenuineIntel", or "" when unknown
    model: str  # brand string for the native host, the target name otherwise
    cores: int  # usable cores
    features: frozenset[str]  # a subset of FEATURES
    l1d: int  # bytes per core
    l2: int  # bytes per core
    l3: int  # bytes, shared
    freq_hz: float  # nominal clock; 0.0 when py-cpuinfo cannot tell
    native: bool  # describes the machine we run on
    bandwidth: tuple[tuple[int, float], ...] = ()  # measured read bytes/s by thread count; () when never measured
    peaks: tuple[tuple[int, float, float], ...] = ()  # measured (threads, fp32, int8) operations/s; () when never

    def has(self, *features: str) -> bool:
        unknown = [f for f in features if f not in FEATURES]
        if unknown:
            raise HostError(f"unknown feature '{unknown[0]}': features are {', '.join(FEATURES)}")
        return all(f in self.features for f in features)

    def to_dict(self) -> dict:
        """The description without the measurements, which manifests and results report on their own."""
        d = asdict(self) | {"features": sorted(self.features)}
        del d["bandwidth"], d["peaks"]
        return d


# The named targets.  llvmlite 0.50 has no "features of CPU X" query (only of the host CPU), so
# the features are listed here; tests/test_host.py checks them against LLVM's code generation.
# Caches, cores and clock are those of one typical part, named in each comment.
_AVX2 = "avx2 fma f16c"
_AVX512 = _AVX2 + " avx512f avx512bw avx512vl avx512dq"
_VNNI = _AVX512 + " avx512vnni"
_INTEL, _AMD = "GenuineIntel", "AuthenticAMD"


def _target(name: str, vendor: str, features: str, l1d_kib: int, l2_kib: int, l3_mib: float, cores: int, ghz: float) -> Host:
    return Host(name, vendor, name, cores, frozenset(features.split()),
                l1d_kib * KiB, l2_kib * KiB, int(l3_mib * MiB), ghz * 1e9, native=False)


_TARGETS = {t.name: t for t in (
    _target("haswell", _INTEL, _AVX2, 32, 256, 8, 4, 3.4),  # Core i7-4770
    _target("broadwell", _INTEL, _AVX2, 32, 256, 6, 4, 3.3),  # Core i7-5775C
    _target("skylake", _INTEL, _AVX2, 32, 256, 8, 4, 3.4),  # Core i7-6700
    _target("skylake-avx512", _INTEL, _AVX512, 32, 1024, 27.5, 20, 2.4),  # Xeon Gold 6148
    _target("cascadelake", _INTEL, _VNNI, 32, 1024, 27.5, 20, 2.5),  # Xeon Gold 6248
    _target("icelake-client", _INTEL, _VNNI, 48, 512, 8, 4, 1.3),  # Core i7-1065G7
    _target("icelake-server", _INTEL, _VNNI, 48, 1280, 60, 40, 2.3),  # Xeon Platinum 8380
    _target("tigerlake", _INTEL, _VNNI, 48, 1280, 12, 4, 3.0),  # Core i7-1185G7
    _target("sapphirerapids", _INTEL, _VNNI + " avxvnni", 48, 2048, 105, 56, 2.0),  # Xeon Platinum 8480+
    _target("alderlake", _INTEL, _AVX2 + " avxvnni", 48, 1280, 30, 16, 3.2),  # Core i9-12900K, P-core caches
    _target("znver1", _AMD, _AVX2, 32, 512, 16, 8, 3.6),  # Ryzen 7 1800X
    _target("znver2", _AMD, _AVX2, 32, 512, 32, 8, 3.6),  # Ryzen 7 3700X
    _target("znver3", _AMD, _AVX2, 32, 512, 32, 8, 3.8),  # Ryzen 7 5800X
    _target("znver4", _AMD, _VNNI, 32, 1024, 32, 8, 4.5),  # Ryzen 7 7700X
    _target("x86-64", "", "", 32, 256, 8, 4, 3.0),  # generic levels: a modest desktop
    _target("x86-64-v3", "", _AVX2, 32, 256, 8, 4, 3.0),
    _target("x86-64-v4", "", _AVX512, 32, 256, 8, 4, 3.0),
)}


def known_targets() -> tuple[str, ...]:
    return (*_TARGETS, "native")


def from_target(name: str) -> Host:
    """The host for an LLVM CPU name, or the machine we run on for "native"."""
    if name == "native":
        return detect()
    if name not in _TARGETS:
        raise HostError(f"unknown target '{name}': known targets are {', '.join(known_targets())}")
    if name not in _llvm_cpu_names():
        import llvmlite.binding as llvm

        version = ".".join(map(str, llvm.llvm_version_info))
        raise HostError(f"target '{name}' is unknown to LLVM {version}: upgrade llvmlite")
    return _TARGETS[name]


@functools.cache
def _llvm_cpu_names() -> frozenset[str]:
    """The x86-64 CPU names LLVM accepts.  LLVM only prints them, once per process, for
    cpu="help" (and aborts on an unknown name at code generation), so a child process asks."""
    ask = ("import llvmlite.binding as llvm; llvm.initialize_all_targets(); "
           "llvm.Target.from_triple('x86_64-unknown-linux-gnu').create_target_machine(cpu='help')")
    listing = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True, check=True).stderr
    return frozenset(re.findall(r"^\s+(\S+)\s+- Select the", listing, re.M))


@functools.cache
def detect() -> Host:
    """The machine we run on."""
    info = _cpuinfo()
    hz = info.get("hz_advertised") or (0, 0)
    name, llvm_features = _llvm_host()
    return Host(
        name=name, vendor=info.get("vendor_id_raw", ""), model=info.get("brand_raw", name),
        cores=len(os.sched_getaffinity(0)),
        features=_features(llvm_features, info.get("flags", ())),
        **_caches(SYSFS_CACHE, info), freq_hz=float(hz[0]), native=True,
    )


def _llvm_host() -> tuple[str, dict[str, bool]]:
    """LLVM's name and features of this CPU, asked in a child process: LLVM loaded into this one stays resident
    (about 28 MB) for the life of a model that never needs it again."""
    ask = ("import json, llvmlite.binding as llvm; "
           "print(json.dumps([llvm.get_host_cpu_name(), dict(llvm.get_host_cpu_features())]))")
    name, features = json.loads(subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True,
                                               check=True).stdout)
    return name, features


def _cpuinfo() -> dict:
    try:
        return cpuinfo.get_cpu_info()
    except Exception:  # py-cpuinfo fails in many ways on unusual systems; LLVM and sysfs still answer
        return {}


def _features(llvm_features: Mapping[str, bool], cpuinfo_flags: Iterable[str]) -> frozenset[str]:
    """FEATURES that LLVM reports and py-cpuinfo confirms (LLVM alone when py-cpuinfo has no flags)."""
    flags = set(cpuinfo_flags)
    return frozenset(f for f in FEATURES if llvm_features.get(f, False)
                     and (not flags or not flags.isdisjoint(_CPUINFO_NAMES.get(f, (f,)))))


def _caches(sysfs: Path, info: Mapping) -> dict[str, int]:
    """l1d and l2 per core and l3 shared, in bytes: from sysfs, else from py-cpuinfo."""
    sizes = _sysfs_caches(sysfs) if sysfs.is_dir() else {
        1: info.get("l1_data_cache_size"), 2: info.get("l2_cache_size"), 3: info.get("l3_cache_size")}
    missing = [f"L{level}" for level in (1, 2, 3) if not sizes.get(level)]
    if missing:
        raise HostError(f"cannot find the {', '.join(missing)} cache size in {sysfs} or py-cpuinfo: "
                        f"name a target instead of native ({', '.join(_TARGETS)})")
    return {"l1d": int(sizes[1]), "l2": int(sizes[2]), "l3": int(sizes[3])}


def _sysfs_caches(root: Path) -> dict[int, int]:
    """Cache level -> bytes from sysfs cache/index*/{level,type,size}; instruction caches skipped."""
    sizes = {}
    for index in sorted(root.glob("index*")):
        if (index / "type").read_text().strip() != "Instruction":
            size = (index / "size").read_text().strip()
            scale = {"K": KiB, "M": MiB, "G": 1 << 30}.get(size[-1], 1)
            sizes[int((index / "level").read_text())] = int(size.rstrip("KMG")) * scale
    return sizes
