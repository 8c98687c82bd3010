"""The two kernel families as torch.library custom ops, for code that calls kernels directly:

* ``pigeon::gemm(inst, a, b, seg_ptr, gather, scatter, init, out_rows) -> Tensor`` -- a GemmInstance.
  Rows form: ``a`` = X, ``b`` = W, result Y with ``out_rows`` rows (``init`` is Y's starting value,
  zeros when None). Weight-grad form: ``a`` = X, ``b`` = dY, result dW (``[T, (H,) K, N]``).
* ``pigeon::traversal(inst, sizes, graph, inputs) -> Tensor`` -- a TraversalInstance on the kernel
  graph given as ``sizes`` = [N, E, R, T] and the arrays of ``GRAPH_FIELDS``; ``inputs`` in
  ``inst.inputs()`` order.

``inst`` is the instance's JSON (pigeon.ir.serialize), so fake kernels and autograd rebuild it.
On CUDA tensors the generated CUDA kernels run; on CPU tensors the instance's plain-torch
semantics (its oracle).  Autograd of a single kernel op differentiates
the instance's plain-torch semantics (the reference of that kernel).  Compiled layers do not use
this: their backward is a kernel program derived by the autodiff pass.
"""
from __future__ import annotations

import functools
import json
from typing import Optional

import torch

from ..graph.kernel_graph import KernelGraph
from ..ir.kernel import GemmInstance
from ..ir.serialize import from_json, to_json
from ..ir.traversal import TraversalInstance
from ..torch_dtypes import TORCH_DTYPES
from . import families  # noqa: F401  (registers the families' serializable instance types)

GRAPH_FIELDS = ("src", "dst", "etype", "etype_ptr", "ntype", "ntype_perm", "ntype_ptr",
                "csc_ptr", "csc_eid", "csr_ptr", "csr_eid")


def instance_json(inst) -> str:
    return json.dumps(to_json(inst), sort_keys=True)


@functools.lru_cache(maxsize=4096)
def _instance(text: str):
    inst = from_json(json.loads(text))
    if not isinstance(inst, (GemmInstance, TraversalInstance)):
        raise ValueError(f"not a kernel instance: {type(inst).__name__}")
    return inst


def graph_args(kg: KernelGraph) -> tuple[list[int], list[torch.Tensor]]:
    return [kg.num_nodes, kg.num_edges, kg.num_etypes, kg.num_ntypes], [getattr(kg, f) for f in GRAPH_FIELDS]


def _kernel_graph(sizes: list[int], graph: list[torch.Tensor]) -> KernelGraph:
    if len(sizes) != 4 or len(graph) != len(GRAPH_FIELDS):
        raise ValueError(f"pigeon::traversal takes sizes [N, E, R, T] and the arrays {GRAPH_FIELDS}")
    N, E, R, T = sizes
    arrays = dict(zip(GRAPH_FIELDS, graph))
    for name, t in arrays.items():
        if t.dtype != torch.int32:
            raise ValueError(f"graph array {name} must be int32, got {t.dtype}")
    empty = graph[0].new_empty(0)
    return KernelGraph(N, E, R, T, empty.long(), **arrays, inv_in_degree_by_etype=empty.float(),
                       inv_in_degree=empty.float(), signature=(N, E, R, T))


# ------------------------------------------------------------------------------------ GEMM

def _gemm_shape(inst: GemmInstance, a: torch.Tensor, seg_ptr: torch.Tensor, out_rows: int) -> tuple[int, ...]:
    head = (inst.heads,) if inst.heads > 1 else ()
    if inst.form == "rows":
        return (out_rows,) + head + (inst.n,)
    kn = (inst.n, inst.k) if inst.transpose_w else (inst.k, inst.n)
    return (seg_ptr.numel() - 1,) + head + kn


@torch.library.custom_op("pigeon::gemm", mutates_args=())
def gemm(inst: str, a: torch.Tensor, b: torch.Tensor, seg_ptr: torch.Tensor, gather: Optional[torch.Tensor],
         scatter: Optional[torch.Tensor], init: Optional[torch.Tensor], out_rows: int) -> torch.Tensor:
    ins = _instance(inst)
    shape = _gemm_shape(ins, a, seg_ptr, out_rows)
    out = init.clone() if init is not None else torch.zeros(shape, dtype=TORCH_DTYPES[ins.dtype], device=a.device)
    x, w, y = (a, b, out) if ins.form == "rows" else (a, out, b)
    if a.is_cuda:
        from .family_gemm import build_gemm, run_gemm
        run_gemm(ins, build_gemm(ins, device=a.device), x, w, seg_ptr, gather, scatter, y)
    else:   # CPU: the instance's semantics (the GEMM templates need shared memory and barriers)
        from .family_gemm import gemm_reference
        gemm_reference(ins, x, w, seg_ptr, gather, scatter, y)
    return out


@gemm.register_fake
def _(inst, a, b, seg_ptr, gather, scatter, init, out_rows):
    ins = _instance(inst)
    return a.new_empty(_gemm_shape(ins, a, seg_ptr, out_rows), dtype=TORCH_DTYPES[ins.dtype])


def _gemm_setup(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs[1:7] if t is not None))
    ctx.present = [t is not None for t in inputs[1:7]]
    ctx.inst, ctx.out_rows = inputs[0], inputs[7]


@torch.library.custom_op("pigeon::gemm_backward", mutates_args=())
def gemm_backward(inst: str, grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seg_ptr: torch.Tensor,
                  gather: Optional[torch.Tensor], scatter: Optional[torch.Tensor],
                  out_rows: int) -> list[torch.Tensor]:
    """Gradients of pigeon::gemm with respect to a and b (init's gradient is ``grad`` itself)."""
    from .family_gemm import gemm_reference
    ins = _instance(inst)
    shape = _gemm_shape(ins, a, seg_ptr, out_rows)

    def f(a2, b2):
        # autograd is switched off inside custom ops; torch.func's vjp works there
        out = torch.zeros(shape, dtype=TORCH_DTYPES[ins.dtype], device=a.device)
        x, w, y = (a2, b2, out) if ins.form == "rows" else (a2, out, b2)
        return gemm_reference(ins, x, w, seg_ptr, gather, scatter, y)

    _, vjp = torch.func.vjp(f, a, b)
    ga, gb = vjp(grad)
    return [ga.contiguous(), gb.contiguous()]


@gemm_backward.register_fake
def _(inst, grad, a, b, seg_ptr, gather, scatter, out_rows):
    return [torch.empty_like(a), torch.empty_like(b)]


def _gemm_backward(ctx, grad):
    it = iter(ctx.saved_tensors)
    a, b, seg, gather, scatter, init = (next(it) if p else None for p in ctx.present)
    ga, gb = gemm_backward(ctx.inst, grad.contiguous(), a, b, seg, gather, scatter, ctx.out_rows)
    return None, ga, gb, None, None, None, (grad if init is not None else None), None


torch.library.register_autograd("pigeon::gemm", _gemm_backward, setup_context=_gemm_setup)


# ------------------------------------------------------------------------------------ traversal

def _trav_shape(inst: TraversalInstance, sizes: list[int]) -> tuple[int, ...]:
    N, E, R, T = sizes
    rows = {"node": (N,), "edge": (E,), "etype": (R,), "ntype": (T,), "global": ()}[inst.out.rows]
    return rows + inst.out.shape


@torch.library.custom_op("pigeon::traversal", mutates_args=())
def traversal(inst: str, sizes: list[int], graph: list[torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
    ins = _instance(inst)
    kg = _kernel_graph(sizes, graph)
    names = [b.name for b in ins.inputs()]
    if len(inputs) != len(names):
        raise ValueError(f"pigeon::traversal: the instance reads {names}, got {len(inputs)} tensors")
    bufs = dict(zip(names, inputs))
    out = torch.empty(_trav_shape(ins, sizes), dtype=TORCH_DTYPES[ins.out.dtype], device=kg.device)
    # through the family registry, on the executor backend of the device (CUDA, or the CPU's)
    from ..ir.program import TraversalLaunch
    from .families import run_launch
    run_launch(_device_backend(kg.device), TraversalLaunch(ins), kg, {**bufs, ins.out.name: out})
    return out


@traversal.register_fake
def _(inst, sizes, graph, inputs):
    ins = _instance(inst)
    return graph[0].new_empty(_trav_shape(ins, sizes), dtype=TORCH_DTYPES[ins.out.dtype], device=graph[0].device)


def _trav_setup(ctx, inputs, output):
    inst, sizes, graph, ins = inputs
    ctx.inst, ctx.sizes, ctx.n_graph = inst, sizes, len(graph)
    ctx.save_for_backward(*graph, *ins)


@torch.library.custom_op("pigeon::traversal_backward", mutates_args=())
def traversal_backward(inst: str, sizes: list[int], graph: list[torch.Tensor], inputs: list[torch.Tensor],
                       grad: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of pigeon::traversal with respect to its inputs."""
    from .family_traversal import run_traversal_reference
    ins = _instance(inst)
    kg = _kernel_graph(sizes, graph)
    names = [b.name for b in ins.inputs()]

    def f(*leaves):
        return run_traversal_reference(ins, kg, dict(zip(names, leaves))).reshape(grad.shape)

    _, vjp = torch.func.vjp(f, *[t.float() for t in inputs])
    return [g.to(t.dtype).contiguous() for g, t in zip(vjp(grad.float()), inputs)]


@traversal_backward.register_fake
def _(inst, sizes, graph, inputs, grad):
    return [torch.empty_like(t) for t in inputs]


def _trav_backward(ctx, grad):
    saved = ctx.saved_tensors
    graph, ins = list(saved[:ctx.n_graph]), list(saved[ctx.n_graph:])
    return None, None, [None] * len(graph), traversal_backward(ctx.inst, ctx.sizes, graph, ins, grad.contiguous())


torch.library.register_autograd("pigeon::traversal", _trav_backward, setup_context=_trav_setup)


@functools.lru_cache(maxsize=None)
def _cuda_backend():
    from .program import CudaBackend
    return CudaBackend()


def _device_backend(device: torch.device):
    """The executor backend for ``device``: one CudaBackend per process (its loaded modules are
    reused), else the CPU executor ``PIGEON_CPU_BACKEND`` names."""
    from .program import BACKENDS, default_backend
    name = default_backend(device)
    return _cuda_backend() if name == "cuda" else BACKENDS[name]()
