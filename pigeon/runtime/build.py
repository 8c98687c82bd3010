"""Compile CUDA C++ source to a cubin with nvcc (or NVRTC when nvcc is missing).

``compile_cuda`` runs one build and returns the cubin together with the ptxas resource report
(registers, shared memory, stack frame, spills per kernel). ``build_kernel`` puts it behind the disk
cache of :mod:`pigeon.runtime.cache`. A failed build raises :class:`KernelBuildError`, keeps the
generated source under ``<cache root>/failed/`` for the user and never leaves a cache entry.

Neither torch nor a GPU is needed to build; only :func:`device_arch` looks at torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..codegen.cutlass_headers import build_flags as cutlass_build_flags
from .cache import CUBIN_NAME, SOURCE_NAME, CacheEntry, KernelCache, default_cache_root
from .toolchain import (CompilerNotFoundError, KernelBuildError, _nvrtc_module, compiler_identity, nvcc_available, nvcc_path, nvcc_version, nvrtc_available,
                        nvrtc_version, select_builder)

__all__ = [
    "BuildResult",
    "KernelBuildError",
    "CompilerNotFoundError",
    "compile_cuda",
    "build_kernel",
    "nvcc_path",
    "nvcc_available",
    "nvcc_version",
    "nvrtc_available",
    "nvrtc_version",
    "compiler_identity",
    "select_builder",
    "device_arch",
    "parse_ptxas_report",
]

NVCC_BASE_FLAGS = ("-cubin", "-O3", "-Xptxas", "-v", "-lineinfo", "--std=c++17")
NVRTC_BASE_FLAGS = ("-lineinfo", "--std=c++17", "--ptxas-options=-v")
ERROR_LINES = 40
_ARCH_RE = re.compile(r"^sm_\d{2,3}[af]?$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def device_arch(device: Any = None, *, arch_specific: bool = False) -> str | None:
    """``"sm_XY"`` of the CUDA device (``sm_90a`` etc. with ``arch_specific`` on 9.x/10.x/12.x), or None."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = device.index if isinstance(device, torch.device) and device.type == "cuda" else device
    if index is None or isinstance(index, int):     # a device's capability does not change: read it once
        index = torch.cuda.current_device() if index is None else index
        cap = _CAPABILITY.get(index)
        if cap is None:
            cap = _CAPABILITY[index] = torch.cuda.get_device_capability(index)
        major, minor = cap
    else:
        major, minor = torch.cuda.get_device_capability(device)
    suffix = "a" if arch_specific and major >= 9 else ""
    return f"sm_{major}{minor}{suffix}"


_CAPABILITY: dict = {}


# ---------------------------------------------------------------------------- ptxas report

_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPS_RE = re.compile(r"Function properties for (\S+)")
_FRAME_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Used (\d+) registers")
_BARRIERS_RE = re.compile(r"used (\d+) barriers")
_SMEM_RE = re.compile(r"(\d+) bytes smem")
_CMEM_RE = re.compile(r"(\d+) bytes cmem\[(\d+)\]")
_CUMSTACK_RE = re.compile(r"(\d+) bytes cumulative stack size")


def parse_ptxas_report(text: str) -> dict[str, dict[str, Any]]:
    """Parse ``ptxas -v`` output into ``{function: {registers, smem, stack, spill_stores, spill_loads, ...}}``.

    Entry functions (kernels) have ``entry: True`` and their ``registers``/``smem``/``barriers``;
    non-inlined device functions appear with their stack frame and spills only. Names are as ptxas
    prints them (mangled unless declared ``extern "C"``).
    """
    out: dict[str, dict[str, Any]] = {}
    current: str | None = None
    props_for: str | None = None

    def rec(name: str) -> dict[str, Any]:
        return out.setdefault(name, {"entry": False})

    for line in text.splitlines():
        m = _ENTRY_RE.search(line)
        if m:
            current = m.group(1)
            r = rec(current)
            r["entry"] = True
            r["arch"] = m.group(2)
            props_for = None
            continue
        m = _PROPS_RE.search(line)
        if m:
            props_for = m.group(1)
            rec(props_for)
            continue
        m = _FRAME_RE.search(line)
        if m and props_for is not None:
            r = rec(props_for)
            r["stack"], r["spill_stores"], r["spill_loads"] = (int(g) for g in m.groups())
            props_for = None
            continue
        m = _USED_RE.search(line)
        if m and current is not None:
            r = rec(current)
            r["registers"] = int(m.group(1))
            b = _BARRIERS_RE.search(line)
            r["barriers"] = int(b.group(1)) if b else 0
            s = _SMEM_RE.search(line)
            r["smem"] = int(s.group(1)) if s else 0
            c = _CUMSTACK_RE.search(line)
            if c:
                r["cumulative_stack"] = int(c.group(1))
            cm = {f"cmem[{bank}]": int(n) for n, bank in _CMEM_RE.findall(line)}
            if cm:
                r["cmem"] = cm
    for r in out.values():
        for k in ("stack", "spill_stores", "spill_loads"):
            r.setdefault(k, 0)
        if r["entry"]:
            r.setdefault("registers", 0)
            r.setdefault("smem", 0)
            r.setdefault("barriers", 0)
    return out


def _report_lines(log: str) -> str:
    keep = [
        ln
        for ln in log.splitlines()
        if ln.lstrip().startswith("ptxas") or _FRAME_RE.search(ln) or "Compiling entry function" in ln
    ]
    return "\n".join(keep)


# ---------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuildResult:
    cubin: bytes = field(repr=False)
    arch: str
    flags: tuple[str, ...]
    builder: str
    compiler: str
    command: tuple[str, ...]
    log: str = field(repr=False)
    report: str = field(repr=False)
    resources: dict[str, dict[str, Any]] = field(compare=False)
    elapsed_s: float = field(compare=False)

    def meta(self) -> dict[str, Any]:
        """JSON-able description stored in a cache entry's meta.json."""
        return {
            "arch": self.arch,
            "flags": list(self.flags),
            "builder": self.builder,
            "compiler": self.compiler,
            "command": list(self.command),
            "ptxas_report": self.report,
            "log": self.log,
            "resources": self.resources,
            "build_seconds": round(self.elapsed_s, 4),
        }


def _check_args(source: str, arch: str, flags: Sequence[str], name: str) -> tuple[str, ...]:
    if not isinstance(source, str):
        raise TypeError(f"source must be str, got {type(source).__name__}")
    if not isinstance(arch, str) or not _ARCH_RE.match(arch):
        raise ValueError(f"arch must look like 'sm_90' / 'sm_90a', got {arch!r}")
    if isinstance(flags, (str, bytes)):
        raise TypeError("flags must be a sequence of strings (e.g. ('-DN=4',)), not one string")
    flags = tuple(flags)
    for f in flags:
        if not isinstance(f, str):
            raise TypeError(f"flag {f!r} is not a string")
    if not _NAME_RE.match(name):
        raise ValueError(f"name must be a C identifier, got {name!r}")
    return flags


def _failure_key(source: str, arch: str, flags: Sequence[str], builder: str) -> str:
    h = hashlib.sha256()
    for part in (source, arch, builder, *flags):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _keep_failed_source(source: str, log: str, failed_dir: Path, key: str) -> Path:
    failed_dir.mkdir(parents=True, exist_ok=True)
    src = failed_dir / f"{key}.cu"
    src.write_text(source, encoding="utf-8")
    (failed_dir / f"{key}.log").write_text(log, encoding="utf-8")
    return src


def _failure_message(what: str, command: Sequence[str], log: str, kept: Path) -> str:
    lines = log.rstrip().splitlines()
    head = lines[:ERROR_LINES]
    more = f" (first {ERROR_LINES} of {len(lines)} lines)" if len(lines) > ERROR_LINES else ""
    body = "\n".join("    " + ln for ln in head) or "    (no output)"
    return (
        f"{what}\n"
        f"  command: {shlex.join(command)}\n"
        f"  source kept at: {kept}\n"
        f"  full log at: {kept.with_suffix('.log')}\n"
        f"  compiler output{more}:\n{body}"
    )


def compile_cuda(
    source: str,
    *,
    arch: str = "sm_90",
    flags: Sequence[str] = (),
    name: str = "kernel",
    keep_dir: str | os.PathLike[str] | None = None,
    builder: str | None = None,
    failed_dir: str | os.PathLike[str] | None = None,
    failed_key: str | None = None,
    timeout_s: float = 600.0,
) -> BuildResult:
    """Compile ``source`` for ``arch`` to a cubin.

    nvcc runs as ``nvcc -cubin -arch=<arch> -O3 -Xptxas -v -lineinfo --std=c++17 <flags>`` in a fresh
    temporary directory (or in ``keep_dir``, whose files are then left in place). With
    ``builder="nvrtc"`` (or "auto" and no nvcc) NVRTC from cuda.bindings compiles instead; ``flags``
    are passed to it as they are.

    On failure raises :class:`KernelBuildError`; the source and full log are kept as
    ``<failed_dir>/<failed_key>.cu`` / ``.log`` (default ``<cache root>/failed/<sha256>.cu``).
    """
    flags = _check_args(source, arch, flags, name)
    b = select_builder(builder)
    failed_dir = Path(failed_dir) if failed_dir is not None else default_cache_root() / "failed"
    failed_key = failed_key or _failure_key(source, arch, flags, b)
    if b == "nvrtc":
        return _compile_nvrtc(source, arch, flags, name, failed_dir, failed_key)

    nvcc = nvcc_path()
    assert nvcc is not None
    compiler = nvcc_version()
    if keep_dir is not None:
        workdir = Path(keep_dir)
        workdir.mkdir(parents=True, exist_ok=True)
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="pigeon-build-")
        workdir = Path(cleanup.name)
    try:
        src = workdir / f"{name}.cu"
        out = workdir / f"{name}.cubin"
        src.write_text(source, encoding="utf-8")
        if out.exists():
            out.unlink()
        # CUTLASS/CuTe include path and flags: derived from the source, so not part of the cache key
        cmd = [nvcc, *NVCC_BASE_FLAGS[:1], f"-arch={arch}", *NVCC_BASE_FLAGS[1:], *cutlass_build_flags(source), *flags,
               "-o", str(out), str(src)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, timeout=timeout_s)
            log = (proc.stdout or "") + (proc.stderr or "")
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired as e:
            log = _text(e.stdout) + _text(e.stderr) + f"\n[pigeon] nvcc timed out after {timeout_s} s"
            rc = None
        elapsed = time.perf_counter() - t0
        if rc != 0 or not out.is_file():
            kept = _keep_failed_source(source, log, failed_dir, failed_key)
            repro = [kept.with_suffix(".cubin").as_posix() if c == str(out) else c for c in cmd]
            repro = [kept.as_posix() if c == str(src) else c for c in repro]
            what = f"nvcc failed (exit {rc}) building '{name}' for {arch}" if rc is not None else f"nvcc timed out building '{name}' for {arch}"
            raise KernelBuildError(
                _failure_message(what, repro, log, kept), command=repro, log=log, source_path=kept, returncode=rc
            )
        cubin = out.read_bytes()
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    report = _report_lines(log)
    return BuildResult(
        cubin=cubin,
        arch=arch,
        flags=flags,
        builder="nvcc",
        compiler=compiler,
        command=tuple(cmd),
        log=log,
        report=report,
        resources=parse_ptxas_report(report),
        elapsed_s=elapsed,
    )


def _text(x: Any) -> str:
    if x is None:
        return ""
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _cuda_include_dirs() -> list[str]:
    dirs = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isdir(os.path.join(home, "include")):
            dirs.append(os.path.join(home, "include"))
    if os.path.isdir("/usr/local/cuda/include"):
        dirs.append("/usr/local/cuda/include")
    return list(dict.fromkeys(dirs))


def _compile_nvrtc(
    source: str, arch: str, flags: tuple[str, ...], name: str, failed_dir: Path, failed_key: str
) -> BuildResult:
    nvrtc = _nvrtc_module()
    compiler = nvrtc_version()

    def check(result: Any, what: str) -> Any:
        err = result[0]
        if int(err) != 0:
            _, msg = nvrtc.nvrtcGetErrorString(err)
            raise KernelBuildError(f"{what} failed: {_text(msg)}")
        return result[1] if len(result) > 1 else None

    cutlass = cutlass_build_flags(source)          # ("-I", dir, flags...): NVRTC takes -I<dir> as one option
    cutlass = (f"-I{cutlass[1]}", *cutlass[2:]) if cutlass else ()
    opts = [f"--gpu-architecture={arch}", *NVRTC_BASE_FLAGS, *(f"-I{d}" for d in _cuda_include_dirs()), *cutlass, *flags]
    command = ("nvrtc", *opts, f"{name}.cu")
    prog = check(nvrtc.nvrtcCreateProgram(source.encode("utf-8"), f"{name}.cu".encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        t0 = time.perf_counter()
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode("utf-8") for o in opts])
        elapsed = time.perf_counter() - t0
        size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        buf = b" " * size
        check(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.rstrip(b"\0 ").decode("utf-8", "replace")
        if int(err) != 0:
            kept = _keep_failed_source(source, log, failed_dir, failed_key)
            _, msg = nvrtc.nvrtcGetErrorString(err)
            raise KernelBuildError(
                _failure_message(f"NVRTC failed ({_text(msg)}) building '{name}' for {arch}", command, log, kept),
                command=command,
                log=log,
                source_path=kept,
                returncode=int(err),
            )
        size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin_buf = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin_buf), "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    report = _report_lines(log)
    return BuildResult(
        cubin=bytes(cubin_buf),
        arch=arch,
        flags=flags,
        builder="nvrtc",
        compiler=compiler,
        command=command,
        log=log,
        report=report,
        resources=parse_ptxas_report(report),
        elapsed_s=elapsed,
    )


def build_kernel(
    source: str,
    arch: str | None = None,
    flags: Sequence[str] = (),
    cache: KernelCache | None = None,
    *,
    name: str = "kernel",
    builder: str | None = None,
) -> CacheEntry:
    """Compiled cubin for ``source`` from the disk cache, compiling it with :func:`compile_cuda` on a miss.

    ``arch`` defaults to the current CUDA device's (:func:`device_arch`). A failed build raises
    :class:`KernelBuildError` and writes no cache entry; its source is kept in ``cache.failed_dir``.
    """
    if arch is None:
        arch = device_arch()
        if arch is None:
            raise ValueError("arch not given and no CUDA device to take it from")
    flags = _check_args(source, arch, flags, name)
    cache = cache if cache is not None else KernelCache()
    b = select_builder(builder)
    compiler = compiler_identity(b)
    key = cache.key(source, arch, flags, compiler=compiler)

    def build() -> tuple[dict[str, bytes], dict[str, Any]]:
        res = compile_cuda(
            source, arch=arch, flags=flags, name=name, builder=b, failed_dir=cache.failed_dir, failed_key=key
        )
        return {CUBIN_NAME: res.cubin, SOURCE_NAME: source.encode("utf-8")}, res.meta()

    return cache.get_or_build(source, arch, flags, build, compiler=compiler)


def build_kernels(rendered: Sequence[Any], arch: str | None = None, jobs: int | None = None) -> list[str]:
    """Build many rendered kernels (``.source``, ``.name``, ``.meta``: a RenderedKernel) into the
    disk cache in parallel (threads: nvcc runs in subprocesses), each for ``rk.meta["arch"]`` when
    it names one (the wgmma forward: sm_90a), else ``arch``.  Returns one line per failed build
    (name, error) instead of raising, so a tool can build everything, then report; ``jobs``
    defaults to the CPU count less one."""
    from concurrent.futures import ThreadPoolExecutor

    def one(rk) -> str | None:
        try:
            build_kernel(rk.source, rk.meta.get("arch") or arch, name=rk.name)
            return None
        except Exception as e:  # noqa: BLE001 - reported to the caller, one line per kernel
            return f"{rk.name}: {type(e).__name__}: {str(e)[:1500]}"
    if not rendered:
        return []
    n = jobs if jobs is not None else max(1, (os.cpu_count() or 2) - 1)
    with ThreadPoolExecutor(max(1, min(len(rendered), n))) as pool:
        return [f for f in pool.map(one, rendered) if f]
