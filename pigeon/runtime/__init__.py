"""Runtime: build CUDA kernels (nvcc / NVRTC), cache them on disk, load and launch them from PyTorch."""

from .build import (
    BuildResult,
    CompilerNotFoundError,
    KernelBuildError,
    build_kernel,
    compile_cuda,
    compiler_identity,
    device_arch,
    nvcc_available,
    nvcc_version,
    nvrtc_available,
    parse_ptxas_report,
)
from .cache import CacheEntry, KernelCache, default_cache_root
from .launch import CudaDriverError, CudaFunction, CudaModule, KernelLaunchError, load_module

__all__ = [
    "BuildResult",
    "CacheEntry",
    "CompilerNotFoundError",
    "CudaDriverError",
    "CudaFunction",
    "CudaModule",
    "KernelBuildError",
    "KernelCache",
    "KernelLaunchError",
    "build_kernel",
    "compile_cuda",
    "compiler_identity",
    "default_cache_root",
    "device_arch",
    "load_module",
    "nvcc_available",
    "nvcc_version",
    "nvrtc_available",
    "parse_ptxas_report",
]
