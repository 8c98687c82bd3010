"""Running a kernel program: buffers allocated on the graph's device, launches in order.

The program (pigeon/passes/lower.py) names buffers and kernel instances; an ``Executor`` binds
tensors and hands each launch to a backend:

* ``cuda``    -- pigeon's Jinja2 CUDA templates, built with nvcc and launched on torch's stream;
* ``emulate`` -- the same CUDA text on the CPU: traversal kernels compiled as C++ by the CUDA
  emulation shim (pigeon/runtime/emulate.py); GEMMs by their semantics (the GEMM templates
  use shared memory and barriers, which the shim does not emulate);
* ``torch``   -- the plain-torch semantics of each instance (the kernel-level oracle); the default
  on a CPU.

The CUDA templates are the one definition of each kernel's GPU code; on a CPU the kernels
backend runs each instance's semantics, and the tests check the CUDA text there by emulation.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from ..graph.kernel_graph import KernelGraph
from ..ir.expr import Buffer
from ..ir.program import KernelProgram
from .families import run_launch
from ..torch_dtypes import TORCH_DTYPES


class ProgramError(ValueError):
    pass


def buffer_rows(b: Buffer, kg: KernelGraph) -> tuple[int, ...]:
    return {"node": (kg.num_nodes,), "edge": (kg.num_edges,), "compact": (kg.num_compact,),
            "etype": (kg.num_etypes,), "ntype": (kg.num_ntypes,), "global": ()}[b.rows]


class TorchBackend:
    """Every instance by its family's plain-torch semantics: checks the lowering without generated code."""
    name = "torch"


class EmulateBackend:
    """The CUDA text of every emulable family (traversals), compiled for the CPU; semantics elsewhere."""
    name = "emulate"


class CudaBackend:
    """pigeon's CUDA templates, compiled with nvcc (disk cache) and launched on torch's stream.
    ``modules`` holds loaded kernels by name (an artifact fills it with its cubins)."""
    name = "cuda"

    def __init__(self, arch: str | None = None):
        self.arch = arch
        self._modules: dict[str, object] = {}

    @property
    def modules(self) -> dict:
        return self._modules


BACKENDS = {"torch": TorchBackend, "emulate": EmulateBackend, "cuda": CudaBackend}
CPU_BACKEND_ENV = "PIGEON_CPU_BACKEND"


def default_backend(device: torch.device) -> str:
    """``cuda`` on a GPU; on a CPU ``torch`` (each instance's semantics) unless
    ``PIGEON_CPU_BACKEND=emulate`` asks for the emulated CUDA text."""
    if device.type == "cuda":
        return "cuda"
    name = os.environ.get(CPU_BACKEND_ENV, "torch")
    if name not in ("torch", "emulate"):
        raise ProgramError(f"{CPU_BACKEND_ENV}={name!r}: expected 'torch' or 'emulate'")
    return name


def describe_backend(name: str) -> str:
    return {"cuda": "CUDA templates (nvcc)", "torch": "each kernel instance's torch semantics (no GPU)",
            "emulate": "CUDA text emulated on the CPU (traversals) + GEMM semantics"}[name]


class Executor:
    """Runs a kernel program: binds tensors to its buffers, then hands every launch to its kernel
    family (pigeon/runtime/family.py) on the chosen backend."""

    def __init__(self, program: KernelProgram, backend, *, poison: bool | None = None):
        self.program, self.backend = program, backend
        self.poison = poison if poison is not None else os.environ.get("PIGEON_POISON", "") == "1"

    def run(self, kg: KernelGraph, inputs: Mapping[str, torch.Tensor],
            params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = self.program
        bufs: dict[str, torch.Tensor] = {}
        for table, decl, what in ((inputs, p.inputs, "input"), (params, p.params, "param")):
            for name, bname in decl:
                if name not in table:
                    raise ProgramError(f"{p.name}: {what} {name!r} is missing")
                t = table[name]
                b = p.buffer(bname)
                want = buffer_rows(b, kg) + b.shape
                if tuple(t.shape) != want:
                    raise ProgramError(f"{p.name}: {what} {name!r} has shape {list(t.shape)}, expected {list(want)}")
                if t.device != kg.device:
                    raise ProgramError(f"{p.name}: {what} {name!r} is on {t.device}, the graph on {kg.device}")
                bufs[bname] = t.contiguous()
        for what, bname in p.graph_data:
            bufs[bname] = getattr(kg, what).to(TORCH_DTYPES[p.buffer(bname).dtype]).contiguous()
        dev = kg.device
        for b in p.buffers:
            if b.name not in bufs:
                t = torch.empty(buffer_rows(b, kg) + b.shape, dtype=TORCH_DTYPES[b.dtype], device=dev)
                if self.poison and t.is_floating_point():
                    t.fill_(float("nan"))
                bufs[b.name] = t
        for launch in p.launches:
            run_launch(self.backend, launch, kg, bufs)
        return {name: bufs[bname] for name, bname in p.outputs}
