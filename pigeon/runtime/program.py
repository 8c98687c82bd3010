"""Running a kernel program: buffers allocated on the graph's device, launches in order.

The program (pigeon/codegen/lower.py) names buffers and kernel instances; an ``Executor`` binds
tensors and hands each launch to a backend:

* ``cuda``    -- pigeon's Jinja2 CUDA templates, built with nvcc and launched on torch's stream;
* ``emulate`` -- the same CUDA text on the CPU: traversal kernels compiled as C++ by the CUDA
  emulation shim (pigeon/codegen/cuda_emulate.py); GEMMs by their semantics (the GEMM templates
  use shared memory and barriers, which the shim does not emulate);
* ``torch``   -- the plain-torch semantics of each instance (the kernel-level oracle); the default
  on a CPU.

The CUDA templates are the one definition of each kernel's GPU code; on a CPU the kernels
backend runs each instance's semantics, and the tests check the CUDA text there by emulation.
"""
from __future__ import annotations

import os
from typing import Mapping, Protocol

import torch

from ..codegen.layout import KernelGraph
from ..codegen.lower import GemmLaunch, HostAdd, KernelProgram, TraversalLaunch
from ..ir.traversal import Buffer, TraversalInstance
from ..torch_dtypes import TORCH_DTYPES


class ProgramError(ValueError):
    pass


def buffer_rows(b: Buffer, kg: KernelGraph) -> tuple[int, ...]:
    return {"node": (kg.num_nodes,), "edge": (kg.num_edges,), "etype": (kg.num_etypes,),
            "ntype": (kg.num_ntypes,), "global": ()}[b.rows]


def gemm_operands(launch: GemmLaunch, kg: KernelGraph) -> dict[str, torch.Tensor | int]:
    """Graph arrays of a GEMM launch: segment pointers, gather/scatter index lists, row count."""
    M = kg.num_edges if launch.rows == "edge" else kg.num_nodes
    seg = {"etype": kg.etype_ptr, "ntype": kg.ntype_ptr,
           "all": kg.all_edges_ptr if launch.rows == "edge" else kg.all_nodes_ptr}[launch.seg]
    index = {"src": kg.src, "dst": kg.dst, "ntype_perm": kg.ntype_perm, None: None}
    return {"M": M, "seg_ptr": seg, "gather": index[launch.gather], "scatter": index[launch.scatter]}


class Backend(Protocol):
    name: str

    def gemm(self, launch: GemmLaunch, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, kg: KernelGraph) -> None: ...

    def traversal(self, inst: TraversalInstance, kg: KernelGraph, bufs: Mapping[str, torch.Tensor],
                  out: torch.Tensor) -> None: ...


class TorchBackend:
    """Every instance by its plain-torch semantics: checks the lowering without generated code."""
    name = "torch"

    def gemm(self, launch, x, w, y, kg):
        from ..codegen.gemm import gemm_reference
        ops = gemm_operands(launch, kg)
        gemm_reference(launch.inst, x, w, ops["seg_ptr"], ops["gather"], ops["scatter"], y)

    def traversal(self, inst, kg, bufs, out):
        from ..codegen.traversal_ref import run_traversal_reference
        out.copy_(run_traversal_reference(inst, kg, bufs).reshape(out.shape))


class EmulateBackend(TorchBackend):
    """The CUDA text of traversal kernels, compiled for the CPU (tests and debugging)."""
    name = "emulate"

    def traversal(self, inst, kg, bufs, out):
        from ..codegen.cuda_emulate import run_traversal_emulated
        run_traversal_emulated(inst, kg, bufs, out)


class CudaBackend:
    """pigeon's CUDA templates, compiled with nvcc (disk cache) and launched on torch's stream."""
    name = "cuda"

    def __init__(self, arch: str | None = None):
        self.arch = arch
        self._modules: dict[str, object] = {}

    def gemm(self, launch, x, w, y, kg):
        from ..codegen.gemm import run_gemm_launch
        run_gemm_launch(launch, x, w, y, kg, self)

    def traversal(self, inst, kg, bufs, out):
        from ..codegen.traversal import run_traversal_launch
        run_traversal_launch(inst, kg, bufs, out, self)


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
    def __init__(self, program: KernelProgram, backend: Backend, *, poison: bool | None = None):
        self.program, self.backend = program, backend
        self.poison = poison if poison is not None else os.environ.get("PIGEON_POISON", "") == "1"

    def run(self, kg: KernelGraph, inputs: Mapping[str, torch.Tensor],
            params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = self.program
        bufs: dict[str, torch.Tensor] = {}
        bound = {}
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
                bound[bname] = True
        for what, bname in p.graph_data:
            bufs[bname] = getattr(kg, what).to(TORCH_DTYPES[p.buffer(bname).dtype]).contiguous()
        dev = kg.device
        for b in p.buffers:
            if b.name not in bufs:
                t = torch.empty(buffer_rows(b, kg) + b.shape, dtype=TORCH_DTYPES[b.dtype], device=dev)
                if self.poison:
                    t.fill_(float("nan"))
                bufs[b.name] = t
        for launch in p.launches:
            if isinstance(launch, GemmLaunch):
                self.backend.gemm(launch, bufs[launch.x], bufs[launch.w], bufs[launch.y], kg)
            elif isinstance(launch, TraversalLaunch):
                self.backend.traversal(launch.inst, kg, bufs, bufs[launch.inst.out.name])
            elif isinstance(launch, HostAdd):
                torch.add(bufs[launch.a], bufs[launch.b], out=bufs[launch.out])
            else:  # pragma: no cover
                raise ProgramError(f"unknown launch {launch!r}")
        return {name: bufs[bname] for name, bname in p.outputs}
