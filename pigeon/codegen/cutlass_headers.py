"""Where the CUTLASS / CuTe C++ headers are, for kernels that include them.

The headers ship in the ``nvidia-cutlass`` wheel (``cutlass_library/source/include``);
``$PIGEON_CUTLASS_INCLUDE`` overrides it (a pruned copy carried to a machine without the wheel:
scripts/pack_cutlass_headers.py).  A kernel source that includes ``<cute/...>`` or ``<cutlass/...>``
gets ``-I<dir>`` at build time.  The include path is not part of the cache key (it differs between
machines); the CUTLASS version is, through the version comment the generated source carries
(:func:`source_tag`).
"""
from __future__ import annotations

import functools
import os
import re

_NEEDS = re.compile(r"^\s*#\s*include\s*[<\"](cute|cutlass)/", re.M)
# flags CuTe's headers need from nvcc (constexpr host functions called in device code)
NVCC_FLAGS = ("--expt-relaxed-constexpr", "-DNDEBUG")


class CutlassNotFoundError(RuntimeError):
    pass


def needs_cutlass(source: str) -> bool:
    return _NEEDS.search(source) is not None


@functools.lru_cache(maxsize=1)
def _package_dir() -> str | None:
    try:
        import cutlass_library  # noqa: PLC0415
    except ImportError:
        return None
    d = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return d if os.path.isdir(os.path.join(d, "cute")) else None


def include_dir() -> str:
    """The include directory holding ``cute/`` and ``cutlass/``, or a one-line error saying how to get it."""
    env = os.environ.get("PIGEON_CUTLASS_INCLUDE")
    if env:
        if not os.path.isdir(os.path.join(env, "cute")):
            raise CutlassNotFoundError(f"PIGEON_CUTLASS_INCLUDE={env} has no cute/ directory")
        return os.path.abspath(env)                 # nvcc runs in a temporary directory
    d = _package_dir()
    if d is None:
        raise CutlassNotFoundError("this kernel includes CUTLASS/CuTe headers: pip install nvidia-cutlass "
                                   "(or set PIGEON_CUTLASS_INCLUDE to a directory holding cute/ and cutlass/)")
    return d


@functools.lru_cache(maxsize=1)
def version() -> str:
    """The CUTLASS version of the headers (from cutlass/version.h), e.g. "4.2.0"; "unknown" without them."""
    try:
        text = open(os.path.join(include_dir(), "cutlass", "version.h"), encoding="utf-8").read()
    except (OSError, CutlassNotFoundError):
        return "unknown"
    parts = [re.search(rf"#define CUTLASS_{p}\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else "unknown"


def source_tag() -> str:
    """A comment line for generated sources: it puts the CUTLASS version into the cache key."""
    return f"// built against CUTLASS/CuTe {version()}"


def build_flags(source: str) -> tuple[str, ...]:
    """Extra compiler flags for ``source``: none unless it includes CUTLASS/CuTe headers."""
    if not needs_cutlass(source):
        return ()
    return ("-I", include_dir(), *NVCC_FLAGS)
