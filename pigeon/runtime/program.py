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

import functools
import math
import os
import weakref
from typing import Mapping

import torch

from ..graph.kernel_graph import KernelGraph
from ..ir.expr import Buffer
from ..ir.program import KernelProgram
from . import replay as _replay
from .families import run_launch
from ..torch_dtypes import TORCH_DTYPES


class ProgramError(ValueError):
    pass


_ROW_COUNTS = {"node": "num_nodes", "edge": "num_edges", "compact": "num_compact",
               "compact_dst": "num_compact_dst", "etype": "num_etypes", "ntype": "num_ntypes"}


def buffer_rows(b: Buffer, kg: KernelGraph) -> tuple[int, ...]:
    # only the buffer's own row count is read: the compact counts are lazily computed graph arrays
    # (torch.unique over the edges), which a fake-tensor trace (torch.compile) cannot compute
    if b.rows == "global":
        return ()
    return (getattr(kg, _ROW_COUNTS[b.rows]),)


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


class _Plan:
    """What running ``program`` on ``kg`` needs that no call's tensors change: the expected shape of
    every input and weight, the graph data in the buffers' dtypes (cast once, not on every call),
    the buffers to allocate, and the sizes the CUDA-graph rule reads (pigeon/runtime/replay.py)."""
    __slots__ = ("inputs", "params", "input_names", "param_names", "graph", "allocs", "outputs",
                 "n_launches", "buffer_bytes", "__weakref__")

    def __init__(self, p: KernelProgram, kg: KernelGraph):
        def want(decl):
            return tuple((name, bname, buffer_rows(p.buffer(bname), kg) + p.buffer(bname).shape)
                         for name, bname in decl)
        self.inputs, self.params = want(p.inputs), want(p.params)
        self.input_names = tuple(n for n, _, _ in self.inputs)
        self.param_names = tuple(n for n, _, _ in self.params)
        self.graph = tuple((bname, getattr(kg, what).to(TORCH_DTYPES[p.buffer(bname).dtype]).contiguous())
                           for what, bname in p.graph_data)
        bound = {b for _, b, _ in self.inputs + self.params} | {b for b, _ in self.graph}
        allocs, nbytes = [], 0
        for b in p.buffers:
            shape, dt = buffer_rows(b, kg) + b.shape, TORCH_DTYPES[b.dtype]
            nbytes += math.prod(shape) * dt.itemsize
            if b.name not in bound:
                bound.add(b.name)
                allocs.append((b.name, shape, dt, dt.is_floating_point))
        self.allocs = tuple(allocs)
        self.outputs = tuple(p.outputs)
        self.n_launches = len(p.launches)
        self.buffer_bytes = nbytes


# (id(program), id(kg)) -> (weakref to program, weakref to kg, plan); an entry dies with either
_PLANS: dict[tuple[int, int], tuple] = {}


def _plan(p: KernelProgram, kg: KernelGraph) -> _Plan:
    key = (id(p), id(kg))
    ent = _PLANS.get(key)
    if ent is not None and ent[0]() is p and ent[1]() is kg:
        return ent[2]
    plan = _Plan(p, kg)
    refs = (weakref.ref(p), weakref.ref(kg))
    _PLANS[key] = refs + (plan,)
    for obj in (p, kg):
        weakref.finalize(obj, _drop_plan, key, refs)
    return plan


def program_buffer_bytes(p: KernelProgram, kg: KernelGraph) -> int:
    """The bytes of every buffer of ``p`` on ``kg`` (what the CUDA-graph rule reads)."""
    return _plan(p, kg).buffer_bytes


def _drop_plan(key, refs) -> None:
    ent = _PLANS.get(key)
    if ent is not None and ent[:2] == refs:
        del _PLANS[key]


def _plain(tensors) -> bool:
    """Real tensors (no fake, functional or other subclass): what the plan cache may serve."""
    return all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)


class Executor:
    """Runs a kernel program: binds tensors to its buffers, then hands every launch to its kernel
    family (pigeon/runtime/family.py) on the chosen backend.

    On the ``cuda`` backend a call may replay a CUDA graph of the program instead
    (pigeon/runtime/replay.py: ``PIGEON_CUDA_GRAPHS``, the rule, memory and fallback); ``replay``
    False turns that off for this executor. The results are the same either way."""

    def __init__(self, program: KernelProgram, backend, *, poison: bool | None = None,
                 replay: bool | None = None):
        self.program, self.backend = program, backend
        self.poison = poison if poison is not None else _replay.getenv("PIGEON_POISON") == "1"
        self.replay = replay

    def run(self, kg: KernelGraph, inputs: Mapping[str, torch.Tensor],
            params: Mapping[str, torch.Tensor], *, needed: tuple[str, ...] | None = None
            ) -> dict[str, torch.Tensor]:
        """The program's outputs by name. ``needed``: the output names the caller reads (None: all);
        a replay copies out only those, so the dict may lack the others."""
        p = self.program
        tensors = [*inputs.values(), *params.values()]
        if not _plain(tensors):      # fake or other subclass tensors: nothing cached, nothing captured
            return self._execute(_Plan(p, kg), kg, inputs, params)[0]
        plan = _plan(p, kg)
        if (self.replay is not False and getattr(self.backend, "name", None) == "cuda"
                and _replay.use_replay("cuda", kg.device, plan.n_launches, plan.buffer_bytes, tensors,
                                       mode="1" if self.replay else None)):
            key = self._key(plan, kg, inputs, params)
            if key is not None:
                out = _replay.replay_set(self.backend, p).run(
                    key, functools.partial(self._execute, plan, kg), kg, kg.device, inputs, params,
                    plan.input_names, plan.param_names, needed)
                if out is not None:
                    return out
        return self._execute(plan, kg, inputs, params)[0]

    def _key(self, plan: _Plan, kg: KernelGraph, inputs, params) -> tuple | None:
        """What a captured graph is specific to; None when an input is missing (the plain path
        raises the error)."""
        parts = [id(kg), self.poison]
        for name in plan.input_names:
            t = inputs.get(name)
            if t is None:
                return None
            parts.append((t.shape, t.dtype, t.device))
        for name in plan.param_names:
            t = params.get(name)
            if t is None:
                return None
            # a contiguous Parameter is read in place by the captured graph (replay.py): its address
            # belongs to the key; any other param is copied in like an input
            parts.append((t.shape, t.dtype, t.device, t.data_ptr() if _replay._in_place(t) else None))
        return tuple(parts)

    def _execute(self, plan: _Plan, kg: KernelGraph, inputs: Mapping[str, torch.Tensor],
                 params: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        """The plain run: ``(outputs, buffers)``."""
        p = self.program
        bufs: dict[str, torch.Tensor] = {}
        dev = kg.device
        for table, decl, what in ((inputs, plan.inputs, "input"), (params, plan.params, "param")):
            for name, bname, want in decl:
                t = table.get(name)
                if t is None:
                    raise ProgramError(f"{p.name}: {what} {name!r} is missing")
                if t.shape != want:
                    raise ProgramError(f"{p.name}: {what} {name!r} has shape {list(t.shape)}, expected {list(want)}")
                if t.device != dev:
                    raise ProgramError(f"{p.name}: {what} {name!r} is on {t.device}, the graph on {dev}")
                bufs[bname] = t.contiguous()
        bufs.update(plan.graph)
        poison = self.poison
        for bname, shape, dt, is_float in plan.allocs:
            t = torch.empty(shape, dtype=dt, device=dev)
            if poison and is_float:
                t.fill_(float("nan"))
            bufs[bname] = t
        for launch in p.launches:
            run_launch(self.backend, launch, kg, bufs)
        return {name: bufs[bname] for name, bname in plan.outputs}, bufs
