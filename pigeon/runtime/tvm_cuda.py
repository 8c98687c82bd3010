"""CUDA source from TVM-generated TIR, on a machine without a GPU: TVM's CUDA codegen writes the
source, pigeon's nvcc build (pigeon/runtime/build.py) makes the cubin that is carried to the GPU
machine (which has no TVM)."""
from __future__ import annotations

import re

_SIG = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\)\s*\{')
_PARAM = re.compile(r"^(int|float|nv_bfloat16|half)(\*)?\s*(?:__restrict__\s+)?(\w+)$")
ELEMENT = {"int": "int32", "float": "float32", "nv_bfloat16": "bfloat16", "half": "float16"}


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
