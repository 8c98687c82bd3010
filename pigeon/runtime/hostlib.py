"""Host shared libraries of CUTLASS kernels: built with ``nvcc -shared``, kept in the kernel disk cache,
loaded with ctypes, called with device pointers and torch's stream.

Why a library and not a cubin (the decision).  pigeon's other kernels are cubins that
pigeon/runtime/launch.py loads with the driver API and launches with a flat argument list.  A
CUTLASS 3.x sm90 kernel takes one ``Params`` struct by value that holds TMA descriptors
(``CUtensorMap``, made on the host by ``cuTensorMapEncodeTiled`` with box sizes and swizzles that
CUTLASS derives from its tile and layout types), needs a cluster launch and more than 48 KB of
dynamic shared memory; the grouped kernel also rewrites descriptors on the device.  Mirroring
``Params`` in Python (ctypes structs at the C++ offsets, the descriptor parameters re-derived) would
break with every CUTLASS release and every tile change.  So the generated source
(``gemm.sm90.cu.jinja``) also holds its host code: ``extern "C"`` entry points build the arguments,
ask CUTLASS for the workspace and run ``GemmUniversalAdapter`` on the stream they are given.  nvcc
builds it into a shared object (sm_90a SASS embedded, the CUDA runtime linked statically: the
library needs only libc/libstdc++ and the driver); the cache stores it as ``kernel.so`` in place of
``kernel.cubin`` (pigeon/runtime/cache.py), keyed like a cubin (source, arch, the full ``nvcc
--version``, flags, pigeon version; no local paths: the CUTLASS include directory is not in the key,
its version is, through the source's tag comment) plus the flag ``KEY_FLAGS`` so that a library and
a cubin of one source never share an entry.  The library's CUDA runtime is a second one in the
process; both use the device's primary context (the library calls ``cudaSetDevice`` itself), so it
sees torch's allocations and runs on torch's stream.

Entry points every library has (see the template): ``pigeon_workspace(sizes)``,
``pigeon_run(ptrs, sizes, workspace, stream)``, ``pigeon_error()``.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from .cache import LIBRARY_NAME, SOURCE_NAME, CacheEntry, KernelCache
from ..codegen.cutlass_headers import build_flags as cutlass_build_flags
from .toolchain import CompilerNotFoundError, KernelBuildError, compiler_identity, nvcc_path

__all__ = ["HostLibrary", "HostLibraryError", "build_library", "load_library", "KEY_FLAGS", "nvcc_command"]

KEY_FLAGS = ("--pigeon-host-library",)      # in the cache key only, never passed to nvcc
BASE_FLAGS = ("-shared", "-Xcompiler", "-fPIC", "-O3", "--std=c++17", "-cudart", "static")
N_PTRS = 12
N_SIZES = 12


class HostLibraryError(RuntimeError):
    """A host library entry point reported an error (the message has the library's text)."""


def _arch_flags(arch: str) -> tuple[str, ...]:
    # -gencode, not -arch=sm_90a: with nvcc 13.0 the shorthand also ran a plain sm_90 pass that
    # rejects wgmma / setmaxnreg (docs: HOPPER.md of the device notes)
    num = arch[3:]
    return (f"-gencode=arch=compute_{num},code=sm_{num}",)


def nvcc_command(source: str, arch: str, src: str, out: str) -> list[str]:
    nvcc = nvcc_path()
    if nvcc is None:
        raise CompilerNotFoundError("a CUTLASS host library needs nvcc (not found: $PIGEON_NVCC, PATH, "
                                    "$CUDA_HOME/bin, /usr/local/cuda/bin)")
    return [nvcc, *BASE_FLAGS, *_arch_flags(arch), *cutlass_build_flags(source), "-o", out, src]


def build_library(source: str, arch: str = "sm_90a", *, name: str = "pigeon_lib",
                  cache: KernelCache | None = None, timeout_s: float = 1800.0) -> CacheEntry:
    """The cache entry (``kernel.so``) of ``source``, compiling it on a miss."""
    cache = cache if cache is not None else KernelCache()
    compiler = compiler_identity("nvcc")

    def build():
        with tempfile.TemporaryDirectory(prefix="pigeon-lib-") as d:
            src, out = os.path.join(d, f"{name}.cu"), os.path.join(d, f"{name}.so")
            Path(src).write_text(source, encoding="utf-8")
            cmd = nvcc_command(source, arch, src, out)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=d)
                log, rc = (proc.stdout or "") + (proc.stderr or ""), proc.returncode
            except subprocess.TimeoutExpired:
                log, rc = f"nvcc timed out after {timeout_s} s", None
            elapsed = time.perf_counter() - t0
            if rc != 0 or not os.path.isfile(out):
                key = cache.key(source, arch, KEY_FLAGS, compiler=compiler)
                failed = cache.failed_dir
                failed.mkdir(parents=True, exist_ok=True)
                kept = failed / f"{key}.cu"
                kept.write_text(source, encoding="utf-8")
                kept.with_suffix(".log").write_text(log, encoding="utf-8")
                head = "\n".join("    " + ln for ln in log.strip().splitlines()[:40])
                raise KernelBuildError(f"nvcc failed (exit {rc}) building host library '{name}' for {arch}\n"
                                       f"  source kept at: {kept}\n  compiler output:\n{head}",
                                       command=cmd, log=log, source_path=kept, returncode=rc)
            data = Path(out).read_bytes()
        return ({LIBRARY_NAME: data, SOURCE_NAME: source.encode("utf-8")},
                {"kind": "host_library", "name": name, "command": cmd[1:-3], "build_seconds": round(elapsed, 2),
                 "log": log[-4000:]})

    return cache.get_or_build(source, arch, KEY_FLAGS, build, compiler=compiler)


class HostLibrary:
    """A loaded library: :meth:`workspace` and :meth:`run` call its entry points."""

    def __init__(self, path: str | os.PathLike[str], name: str = ""):
        self.path = str(path)
        self.name = name or os.path.basename(self.path)
        lib = ctypes.CDLL(self.path)
        self._run = lib.pigeon_run
        self._run.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_longlong),
                              ctypes.c_void_p, ctypes.c_void_p]
        self._run.restype = ctypes.c_int
        self._ws = lib.pigeon_workspace
        self._ws.argtypes = [ctypes.POINTER(ctypes.c_longlong)]
        self._ws.restype = ctypes.c_longlong
        self._err = lib.pigeon_error
        self._err.argtypes = []
        self._err.restype = ctypes.c_char_p
        self._lib = lib

    @staticmethod
    def _sizes(sizes: Sequence[int]):
        s = list(int(v) for v in sizes) + [0] * (N_SIZES - len(sizes))
        return (ctypes.c_longlong * N_SIZES)(*s[:N_SIZES])

    def workspace(self, sizes: Sequence[int]) -> int:
        return int(self._ws(self._sizes(sizes)))

    def run(self, ptrs: Sequence[int], sizes: Sequence[int], workspace: int, stream: int) -> None:
        p = list(int(v) for v in ptrs) + [0] * (N_PTRS - len(ptrs))
        arr = (ctypes.c_void_p * N_PTRS)(*p[:N_PTRS])
        rc = self._run(arr, self._sizes(sizes), ctypes.c_void_p(workspace or None), ctypes.c_void_p(stream or None))
        if rc != 0:
            msg = (self._err() or b"").decode("utf-8", "replace")
            raise HostLibraryError(f"{self.name}: pigeon_run failed (code {rc}): {msg}")

    def __repr__(self) -> str:
        return f"HostLibrary({self.name!r})"


_loaded: dict[str, HostLibrary] = {}
_lock = threading.Lock()


def load_library(source: str, arch: str = "sm_90a", *, name: str = "pigeon_lib", cache: Any = None) -> HostLibrary:
    """Build (or find in the cache) and load the library of ``source``, once per process and entry."""
    entry = build_library(source, arch, name=name, cache=cache)
    key = str(entry.cubin_path)
    with _lock:
        lib = _loaded.get(key)
        if lib is None:
            lib = _loaded[key] = HostLibrary(entry.cubin_path, name)
    return lib
