"""CUDA source from TVM-generated TIR, on a machine without a GPU: TVM's CUDA codegen writes the
source, pigeon's nvcc build (pigeon/runtime/build.py) makes the cubin that is carried to the GPU
machine (which has no TVM)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from typing import Callable

_SIG = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\)\s*\{')
_PARAM = re.compile(r"^(int|float|nv_bfloat16|half)(\*)?\s*(?:__restrict__\s+)?(\w+)$")
ELEMENT = {"int": "int32", "float": "float32", "nv_bfloat16": "bfloat16", "half": "float16"}


def tvm_available() -> bool:
    return importlib.util.find_spec("tvm") is not None


def source_key(fmt: str, kernel: dict, arch: str, definition: str) -> str:
    """sha256 a TVM-generated source is recorded under: the record format, the kernel's description,
    the arch, pigeon's version and the digest of the files that define its TIR (an edited
    definition is a new key, so an old carried source is never used)."""
    from .cache import pigeon_version
    payload = json.dumps({"format": fmt, "kernel": kernel, "arch": arch, "pigeon": pigeon_version(),
                          "definition": definition}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def recorded(cache, key: str, available: bool, make: Callable[[], dict], missing: Callable[[], Exception]) -> dict:
    """The kernel cache's record under ``key`` (one with a ``source``), else -- where TVM is
    ``available`` -- ``make()``, recorded and returned; else ``missing()`` is raised.  The one
    mechanism by which TVM-generated CUDA reaches the GPU machine, which has no TVM."""
    rec = cache.get_record(key)
    if rec is not None and isinstance(rec.get("source"), str):
        return rec
    if not available:
        raise missing()
    rec = make()
    cache.put_record(key, rec)
    return rec


class SignatureError(ValueError):
    """A generated kernel's signature is not what its launcher can call."""


def kernel_params(source: str, kernel_name: str) -> list[tuple[str, bool, str]]:
    """``(element dtype, is a pointer, name)`` of each parameter of ``kernel_name``'s definition in a
    TVM-generated CUDA ``source`` (the signature pigeon's launchers bind arguments by)."""
    sigs = {m.group(1): m.group(2) for m in _SIG.finditer(source)}
    if kernel_name not in sigs:
        raise SignatureError(f"generated source has no kernel {kernel_name} (has {sorted(sigs)})")
    out = []
    for text in (p.strip() for p in sigs[kernel_name].split(",")):
        m = _PARAM.match(text)
        if m is None:
            raise SignatureError(f"{kernel_name}: cannot read parameter {text!r}")
        ctype, ptr, name = m.groups()
        out.append((ELEMENT[ctype], bool(ptr), name))
    return out


def cuda_target(arch: str = "sm_90"):
    import tvm
    return tvm.target.Target({"kind": "cuda", "arch": arch})


def cuda_source(mod, arch: str = "sm_90", cse: bool = True) -> str:
    """The CUDA C source TVM generates for a module scheduled for the GPU (threads bound).

    ``cse=False`` turns off TVM's common-subexpression pass: with it, TVM hoists expressions of the
    shape variables (``M * N``, ``(K + 4) / 5``) into extra kernel parameters that only TVM's own
    host code knows how to compute; without it the kernel takes just its buffers and shape
    variables, which a launcher without TVM (pigeon/runtime/shiftadd_kernel.py) can pass."""
    import tvm
    with tvm.transform.PassContext(config={} if cse else {"tirx.disable_cse_tir": True}):
        lib = tvm.compile(mod, target=cuda_target(arch))
    return lib.mod.imports[0].inspect_source()


def build_cuda_cubin(mod, arch: str = "sm_90", name: str = "tvm_kernel"):
    """``cuda_source`` through ``compile_cuda`` (nvcc -cubin): a BuildResult."""
    from .build import compile_cuda
    return compile_cuda(cuda_source(mod, arch), arch=arch, name=name)
