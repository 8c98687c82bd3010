"""Run generated CUDA kernels on the CPU: the same kernel text, compiled as C++ with g++.

``pigeon/templates/cuda_emulate.h`` defines the CUDA names the kernels use (``__global__``,
``threadIdx``..., ``atomicAdd``, ``__nv_bfloat16``/``__half``); stub ``cuda_bf16.h`` and
``cuda_fp16.h`` next to it make the kernel's own includes resolve to the shim, so the kernel
source is compiled byte for byte as rendered. After each kernel comes a generated host loop
``extern "C" void emulate_<name>(<kernel params>, gx, gy, gz, bx, by, bz)`` that runs every block
and thread of the launch sequentially. Shared libraries are cached by the hash of everything that
goes into them, under ``$PIGEON_EMULATE_CACHE`` (default ``<tmp>/pigeon-emulate-<uid>``).

:class:`EmulatedModule` has the launcher interface of ``pigeon.runtime.launch.CudaModule``
(``module.function(name).launch(grid, block, args, types)``), taking CPU tensors, so a kernel
family's launcher runs unchanged on it. Kernels with ``__syncthreads()`` (and shared memory)
run on one OS thread per CUDA thread of a block with a real barrier (``cuda_emulate_threads.h``,
included and its ``pg_emulate_launch_threads`` chosen when the source calls ``__syncthreads``); warp shuffles are not emulated (the shim leaves
them undefined, so such kernels fail to compile).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from ..codegen.kernel_source import RenderedKernel

CXX_FLAGS = ("-x", "c++", "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas")
_CTYPES = {"ptr": ctypes.c_void_p, "int32": ctypes.c_int32, "int64": ctypes.c_int64, "uint32": ctypes.c_uint32,
           "uint64": ctypes.c_uint64, "float32": ctypes.c_float, "float64": ctypes.c_double}
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


class EmulationError(RuntimeError):
    pass


def shim_text() -> str:
    return (resources.files("pigeon") / "templates" / "cuda_emulate.h").read_text(encoding="utf-8")


THREADS_HEADER = "cuda_emulate_threads.h"


def threads_text() -> str:
    return (resources.files("pigeon") / "templates" / THREADS_HEADER).read_text(encoding="utf-8")


def _threaded(rk: RenderedKernel) -> bool:
    return "__syncthreads" in rk.source


def cxx_path() -> str | None:
    return os.environ.get("PIGEON_CXX") or shutil.which("g++") or shutil.which("c++")


def available() -> bool:
    return cxx_path() is not None


def cache_root() -> Path:
    env = os.environ.get("PIGEON_EMULATE_CACHE")
    if env:
        return Path(env)
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"pigeon-emulate-{uid}"


def host_loop(rk: RenderedKernel) -> str:
    params = ", ".join([p.c for p in rk.params] + [f"int pg_{a}" for a in ("gx", "gy", "gz", "bx", "by", "bz")])
    args = ", ".join(p.name for p in rk.params)
    launch = "pg_emulate_launch_threads" if _threaded(rk) else "pg_emulate_launch"
    return (f'\nextern "C" void emulate_{rk.name}({params}) {{\n'
            f"    {launch}(dim3(pg_gx, pg_gy, pg_gz), dim3(pg_bx, pg_by, pg_bz),\n"
            f"                      [&]() {{ {rk.name}({args}); }});\n}}\n")


def emulator_source(kernels: Sequence[RenderedKernel]) -> str:
    """Each kernel's source exactly as rendered, followed by its host loop (after the threads header
    when a kernel calls ``__syncthreads``)."""
    head = f'#include "{THREADS_HEADER}"\n' if any(_threaded(rk) for rk in kernels) else ""
    return head + "".join(f"// ---- {rk.name}\n{rk.source}\n{host_loop(rk)}" + "".join(map(host_loop, rk.companions))
                          for rk in kernels)


# headers kernel sources include that the shim stands for (cuda.h: TVM-generated sources)
STUBS = ("cuda_bf16.h", "cuda_fp16.h", "cuda_runtime.h", "cuda.h")


def _shim_dir(root: Path, shim: str) -> Path:
    threads = threads_text()
    d = root / ("shim-" + hashlib.sha256("\0".join((shim, threads, *STUBS)).encode()).hexdigest()[:16])
    if not (d / "cuda_fp16.h").is_file():
        tmp = Path(tempfile.mkdtemp(prefix="shim-", dir=root))
        (tmp / "cuda_emulate.h").write_text(shim, encoding="utf-8")
        (tmp / THREADS_HEADER).write_text(threads, encoding="utf-8")
        for stub in STUBS:
            (tmp / stub).write_text('#pragma once\n#include "cuda_emulate.h"\n', encoding="utf-8")
        try:
            os.replace(tmp, d)
        except OSError:   # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return d


def build_emulator(kernels: Sequence[RenderedKernel], *, cxx: str | None = None) -> Path:
    """Compile the kernels into a shared library (cached by content hash); returns its path."""
    cxx = cxx or cxx_path()
    if cxx is None:
        raise EmulationError("no C++ compiler (g++/c++ on PATH or $PIGEON_CXX) to emulate CUDA kernels")
    source = emulator_source(kernels)
    shim = shim_text()
    h = hashlib.sha256()
    for part in (source, shim, threads_text(), cxx, *CXX_FLAGS):
        h.update(part.encode())
        h.update(b"\0")
    key = h.hexdigest()[:24]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    so = root / f"{key}.so"
    if so.is_file():
        return so
    inc = _shim_dir(root, shim)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        src = work / "kernels.cu.cpp"
        src.write_text(source, encoding="utf-8")
        out = work / "k.so"
        cmd = [cxx, *CXX_FLAGS, "-I", str(inc), "-include", "cuda_emulate.h", str(src), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not out.is_file():
            kept = root / f"failed-{key}.cpp"
            kept.write_text(source, encoding="utf-8")
            log = (proc.stdout + proc.stderr).strip().splitlines()
            raise EmulationError(f"emulation build failed (exit {proc.returncode}); source kept at {kept}\n"
                                 f"  command: {' '.join(cmd)}\n" + "\n".join("    " + ln for ln in log[:40]))
        os.replace(out, so)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return so


def _dims(x: Any) -> tuple[int, int, int]:
    if isinstance(x, int):
        x = (x,)
    x = tuple(int(v) for v in x)
    if not 1 <= len(x) <= 3 or any(v < 1 for v in x):
        raise ValueError(f"launch dims must be 1-3 positive ints, got {x}")
    return (x + (1, 1))[:3]


class EmulatedFunction:
    def __init__(self, module: "EmulatedModule", rk: RenderedKernel, fn: Any):
        self.module, self.rk, self.name, self._fn = module, rk, rk.name, fn
        self._fn.argtypes = [_CTYPES[p.ctype] for p in rk.params] + [ctypes.c_int] * 6
        self._fn.restype = None

    def launch(self, grid, block, args: Sequence[Any], types: Sequence[str] | None = None, *,
               shared_mem: int = 0, stream: Any = None) -> None:
        """Same interface as ``CudaFunction.launch``; tensors must be on the CPU."""
        import torch
        where = f"emulated kernel {self.name!r}"
        params = self.rk.params
        if len(args) != len(params):
            raise TypeError(f"{where}: takes {len(params)} parameters, got {len(args)} args")
        if types is not None and [t for t in types] != [p.ctype for p in params]:
            raise TypeError(f"{where}: types {list(types)} != parameter types {[p.ctype for p in params]}")
        if shared_mem:
            raise EmulationError(f"{where}: dynamic shared memory cannot be emulated")
        vals = []
        for i, (a, p) in enumerate(zip(args, params)):
            if p.ctype == "ptr":
                if a is None:
                    vals.append(None)
                    continue
                if not isinstance(a, torch.Tensor):
                    raise TypeError(f"{where}: arg {i} ({p.name}) must be a tensor")
                if a.device.type != "cpu":
                    raise ValueError(f"{where}: arg {i} ({p.name}) is on {a.device}; emulation runs on CPU tensors")
                vals.append(a.data_ptr())
            else:
                if isinstance(a, torch.Tensor):
                    raise TypeError(f"{where}: arg {i} ({p.name}) is a scalar {p.ctype}, got a tensor")
                vals.append(a)
        self._fn(*vals, *_dims(grid), *_dims(block))

    __call__ = launch


class EmulatedModule:
    """Kernels compiled for the CPU; ``function(name)`` as on ``CudaModule``."""

    def __init__(self, kernels: RenderedKernel | Sequence[RenderedKernel], *, cxx: str | None = None):
        kernels = [kernels] if isinstance(kernels, RenderedKernel) else list(kernels)
        kernels = list({rk.name: rk for rk in kernels}.values())
        self.path = build_emulator(kernels, cxx=cxx)
        self.kernels = {k.name: k for rk in kernels for k in (rk, *rk.companions)}
        with _lock:
            lib = _loaded.get(str(self.path))
            if lib is None:
                lib = ctypes.CDLL(str(self.path))
                _loaded[str(self.path)] = lib
        self._lib = lib
        self._functions: dict[str, EmulatedFunction] = {}

    def function(self, name: str) -> EmulatedFunction:
        fn = self._functions.get(name)
        if fn is None:
            if name not in self.kernels:
                raise KeyError(f"kernel {name!r} is not in this emulated module (have {sorted(self.kernels)})")
            fn = EmulatedFunction(self, self.kernels[name], getattr(self._lib, f"emulate_{name}"))
            self._functions[name] = fn
        return fn

    __getitem__ = function
