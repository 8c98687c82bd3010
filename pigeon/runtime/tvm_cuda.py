"""CUDA source from TVM-generated TIR, on a machine without a GPU: TVM's CUDA codegen writes the
source, pigeon's nvcc build (pigeon/runtime/build.py) makes the cubin that is carried to the GPU
machine (which has no TVM)."""
from __future__ import annotations


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
