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
# CUTLASS's example collectives pigeon builds on (today 88_hopper_fmha: the Hopper FMHA kernel); the
# wheel ships them under source/examples, a packed copy keeps them beside cute/ and cutlass/
EXAMPLES = ("88_hopper_fmha",)
_NEEDS_EXAMPLE = re.compile(r"^\s*#\s*include\s*[<\"](" + "|".join(EXAMPLES) + r")/", re.M)
# flags CuTe's headers need from nvcc (constexpr host functions called in device code)
NVCC_FLAGS = ("--expt-relaxed-constexpr", "-DNDEBUG")


class CutlassNotFoundError(RuntimeError):
    pass


def needs_cutlass(source: str) -> bool:
    return _NEEDS.search(source) is not None


def needs_example(source: str) -> bool:
    """Whether ``source`` includes one of CUTLASS's example collectives (:data:`EXAMPLES`)."""
    return _NEEDS_EXAMPLE.search(source) is not None


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


def examples_dir() -> str:
    """The directory holding CUTLASS's example folders (``88_hopper_fmha/``): the include directory
    itself for a packed copy (scripts/pack_cutlass_headers.py puts them there), else the wheel's
    ``source/examples``; a one-line error when neither has them."""
    inc = include_dir()
    if all(os.path.isdir(os.path.join(inc, e)) for e in EXAMPLES):
        return inc
    d = os.path.join(os.path.dirname(inc), "examples")
    if all(os.path.isdir(os.path.join(d, e)) for e in EXAMPLES):
        return d
    raise CutlassNotFoundError(f"this kernel includes CUTLASS's example headers ({', '.join(EXAMPLES)}), found neither "
                               f"in {inc} nor in {d}: pip install nvidia-cutlass, or pack them with "
                               "scripts/pack_cutlass_headers.py")


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
    extra = ()
    if needs_example(source) and examples_dir() != include_dir():
        extra = ("-I", examples_dir())
    return ("-I", include_dir(), *extra, *NVCC_FLAGS)
