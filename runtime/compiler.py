"""Compile C source into a shared library: a pure function cached on disk by content hash.

Same source + flags + compiler → same library, stored as <cache>/kernels/<key>.so beside a
<key>.json holding its checksum. Both are written to temporary names and renamed into place, so
concurrent builds of the same kernel both succeed and a reader never sees half a file; an entry
whose checksum does not match is rebuilt.  QIGEN_DEBUG=1 prints every source that is compiled.

A library built for a target carries the CPU features it may execute in an ELF section of its own
(REQUIRES_SECTION), so the loader refuses it on a CPU without them from the file itself, whatever a
manifest beside it says.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from perfmodel.host import Host, detect


class CompileError(RuntimeError):
    """The compiler is missing or failed, or the cache cannot be written."""


@dataclass(frozen=True)
class Compiler:
    path: str
    version: str

    def accepts(self, flag: str) -> bool:
        return _accepts(self.path, flag)


@dataclass(frozen=True)
class Built:
    path: Path
    key: str
    flags: tuple[str, ...]
    compiler: Compiler
    requires: frozenset[str] = frozenset()  # CPU features the library may execute
    text: str = ""  # the source compiled (with compile(): its requirements section appended)


REQUIRES_SECTION = ".qigen_requires"


def compiler() -> Compiler:
    cc = os.environ.get("CC", "cc")
    path = shutil.which(cc)
    if path is None:
        raise CompileError(f"no C compiler: '{cc}' is not on PATH (install gcc, or set CC to a C compiler)")
    return _compiler(path)


@cache
def _compiler(path: str) -> Compiler:
    out = subprocess.run([path, "--version"], capture_output=True, text=True)
    if out.returncode:
        raise CompileError(f"'{path} --version' failed: {out.stderr.strip()}")
    return Compiler(path, out.stdout.splitlines()[0])


@cache
def _accepts(path: str, flag: str) -> bool:
    r = subprocess.run([path, flag, "-x", "c", "-E", "-", "-o", os.devnull], input="", capture_output=True, text=True)
    return r.returncode == 0


def cache_dir() -> Path:
    root = os.environ.get("QIGEN_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qigen"
    return Path(root)


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompileError(f"cache directory {path} cannot be created ({e.strerror}); set QIGEN_CACHE_DIR to a writable directory") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise CompileError(f"cache directory {path} is not writable; set QIGEN_CACHE_DIR to a writable directory")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(so: Path, meta: Path) -> bool:
    try:
        return json.loads(meta.read_text())["sha256"] == _sha256(so)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def stage(library: Path) -> Path:
    """A copy of `library` in the cache named by its content, so one path always means one code:
    the dynamic loader hands back an already open library for a path it has seen."""
    data = library.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    dest = _writable_dir(cache_dir() / "kernels") / f"staged-{digest[:24]}.so"
    if not dest.is_file() or _sha256(dest) != digest:
        atomic_write(dest, data)
    return dest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(directory: Path) -> None:
    """Remove the temporary files and build directories that writers killed mid-write left in `directory`: only
    ours (named .tmp-PID-* or .build-PID-*), only when process PID is gone."""
    for entry in [*directory.glob(".tmp-*-*"), *directory.glob(".build-*-*")]:
        pid = entry.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            except OSError:  # another cleaner got there first, or it is not ours to remove
                pass


def atomic_write(path: Path, data: bytes | Iterable) -> None:
    """Write `data` (bytes, or pieces of them in order) to `path` through a temporary file renamed into place: a
    reader never sees half a file, and a killed writer's temporary file is removed by the next write into that
    directory."""
    remove_stale(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in [data] if isinstance(data, bytes) else data:
                f.write(piece)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build(source: str, flags: tuple[str, ...]) -> Built:
    """Compile `source` with `flags` (or reuse the cached library) and return where it lies."""
    cc = compiler()
    key = hashlib.sha256("\0".join((source, *flags, cc.path, cc.version)).encode()).hexdigest()[:24]
    directory = _writable_dir(cache_dir() / "kernels")
    so, meta = directory / f"{key}.so", directory / f"{key}.json"
    built = Built(so, key, flags, cc)
    built = replace(built, text=source)
    if _cached(so, meta):
        return built
    if os.environ.get("QIGEN_DEBUG"):
        print(source, file=sys.stderr)
    try:
        remove_stale(directory)
        with tempfile.TemporaryDirectory(dir=directory, prefix=f".build-{os.getpid()}-") as tmp:
            src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
            src.write_text(source)
            r = subprocess.run([cc.path, *flags, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
            if r.returncode or not out.is_file():
                if "No space left on device" in r.stderr or "Disk quota exceeded" in r.stderr:
                    raise CompileError(f"the cache directory {directory} is full: the compiler could not write its "
                                       "output; free space or set QIGEN_CACHE_DIR")
                raise CompileError(f"{cc.path} failed on generated source ({' '.join(flags)}):\n{r.stderr[-4000:]}")
            os.replace(out, so)
        atomic_write(meta, json.dumps({"sha256": _sha256(so), "flags": flags, "compiler": cc.version}).encode())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise CompileError(f"cannot write to the cache directory {directory}: {e.strerror}; "
                               "free space or set QIGEN_CACHE_DIR") from e
        raise
    return built


def compile(source: str, target: Host, emulate: bool = False) -> Built:
    """Build for a perfmodel Host; the library requires the target's features (the host's when emulated), and
    says so in its REQUIRES_SECTION."""
    requires = detect().features if emulate else target.features
    note = (f'\nstatic const char qigen_requires[] __attribute__((used, section("{REQUIRES_SECTION}"))) = '
            f'"{" ".join(sorted(requires))}";\n')
    return replace(build(source + note, flags(target, emulate)), requires=requires)


def embedded_requires(path: Path) -> frozenset[str] | None:
    """The features a library's REQUIRES_SECTION lists, read from the ELF file without loading it; None when the
    file is no 64-bit little-endian ELF or has no such section. Every offset is checked against the file."""
    data = Path(path).read_bytes()
    if len(data) < 64 or data[:6] != b"\x7fELF\x02\x01":
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize < 64 or shstrndx >= shnum or shoff + shnum * shentsize > len(data):
        return None

    def section(i: int) -> tuple[int, int, int]:  # name offset, file offset, size
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, names, names_size = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        end = data.find(b"\0", names + name, names + names_size)
        if name < names_size and end >= 0 and data[names + name:end] == REQUIRES_SECTION.encode():
            if offset + size > len(data):
                return None
            return frozenset(data[offset:offset + size].rstrip(b"\0").decode("ascii", "replace").split())
    return None


def flags(target: Host, emulate: bool = False) -> tuple[str, ...]:
    """Flags for a perfmodel Host: its -march when the compiler knows the name, else its ISA features.

    emulate: build AVX-512 sources against SIMD Everywhere for the machine we run on (testing only).
    """
    # no kernel reads floating-point exception flags: -fno-trapping-math lets branch-free selects (clamps) vectorize
    base = ("-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-trapping-math")
    if emulate:  # -O1: SIMDE's portable AVX-512 compiles ten times slower at -O3, and speed is moot here
        return (*base, "-O1", "-march=native", "-DQIGEN_SIMDE", "-Wno-psabi")
    base = ("-O3", *base)
    if target.native:
        return (*base, "-march=native")
    if compiler().accepts(f"-march={target.name}"):
        return (*base, f"-march={target.name}")
    return (*base, "-mtune=generic", *(f"-m{f}" for f in sorted(target.features)))
