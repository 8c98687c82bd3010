"""The CUDA toolchain pigeon builds with: nvcc (or NVRTC from cuda-python), its version, and the
identity string that names the compiler in cache keys.  Separate from the build so the cache can
key entries without importing the builder."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence


class KernelBuildError(RuntimeError):
    """A kernel failed to compile. ``source_path`` is where its source was kept."""

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        log: str = "",
        source_path: Path | None = None,
        returncode: int | None = None,
    ):
        super().__init__(message)
        self.command = tuple(command)
        self.log = log
        self.source_path = source_path
        self.returncode = returncode


class CompilerNotFoundError(KernelBuildError):
    """Neither nvcc nor NVRTC (cuda.bindings.nvrtc) can be found."""


# ---------------------------------------------------------------------------- compilers


def nvcc_path() -> str | None:
    """``$PIGEON_NVCC``, else ``nvcc`` on PATH, else ``$CUDA_HOME/bin/nvcc``, ``/usr/local/cuda/bin/nvcc``."""
    env = os.environ.get("PIGEON_NVCC")
    if env:
        return env if (os.path.isfile(env) or shutil.which(env)) else None
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def nvcc_available() -> bool:
    return nvcc_path() is not None


@functools.lru_cache(maxsize=None)
def _nvcc_version_of(path: str) -> str:
    proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise CompilerNotFoundError(f"`{path} --version` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


def nvcc_version() -> str:
    """The full ``nvcc --version`` text (cached per process and nvcc path)."""
    path = nvcc_path()
    if path is None:
        raise CompilerNotFoundError("nvcc not found (looked at $PIGEON_NVCC, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    return _nvcc_version_of(path)


def _nvrtc_module():
    from cuda.bindings import nvrtc  # noqa: PLC0415 - optional dependency

    return nvrtc


@functools.lru_cache(maxsize=None)
def nvrtc_available() -> bool:
    try:
        nvrtc = _nvrtc_module()
        err, _major, _minor = nvrtc.nvrtcVersion()
        return int(err) == 0
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> str:
    nvrtc = _nvrtc_module()
    err, major, minor = nvrtc.nvrtcVersion()
    if int(err) != 0:
        raise CompilerNotFoundError(f"nvrtcVersion failed: {err}")
    return f"nvrtc {major}.{minor}"


def select_builder(builder: str | None = None) -> str:
    """Resolve ``builder`` (None -> ``$PIGEON_BUILDER`` -> "auto") to "nvcc" or "nvrtc"."""
    builder = builder or os.environ.get("PIGEON_BUILDER") or "auto"
    if builder == "nvcc":
        if not nvcc_available():
            raise CompilerNotFoundError("builder 'nvcc' asked for, but nvcc was not found (set PIGEON_NVCC or PATH)")
        return "nvcc"
    if builder == "nvrtc":
        if not nvrtc_available():
            raise CompilerNotFoundError(
                "builder 'nvrtc' asked for, but cuda.bindings.nvrtc cannot be imported/loaded "
                "(pip install cuda-bindings and an NVRTC library such as nvidia-cuda-nvrtc)"
            )
        return "nvrtc"
    if builder != "auto":
        raise ValueError(f"unknown builder {builder!r}; use 'nvcc', 'nvrtc' or 'auto'")
    if nvcc_available():
        return "nvcc"
    if nvrtc_available():
        return "nvrtc"
    raise CompilerNotFoundError(
        "no CUDA compiler: nvcc was not found ($PIGEON_NVCC, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin) "
        "and cuda.bindings.nvrtc is not importable. Install the CUDA toolkit, or cuda-bindings with "
        "nvidia-cuda-nvrtc, or load prebuilt kernels from an artifact."
    )


def compiler_identity(builder: str | None = None) -> str:
    """The string that names the compiler in cache keys."""
    b = select_builder(builder)
    return nvcc_version() if b == "nvcc" else nvrtc_version()


