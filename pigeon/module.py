"""``pigeon.compile``: a spec plus a graph becomes a torch.nn.Module."""
from __future__ import annotations

import math
from typing import Mapping

import torch

from .dsl.layer import Layer
from .ir.graph import IRGraph
from .ir.ops import Op, OpKind
from .ir.types import TypeAxis
from .passes.pipeline import Compilation, graph_stats_for, run_pipeline
from .reference import expected_shape, run
from .torch_dtypes import TORCH_DTYPES

BACKENDS = ("reference", "kernels")


def init_param(op: Op, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    init = op.attr("init")
    if init == "zeros":
        return torch.zeros(shape)
    if init == "ones":
        return torch.ones(shape)
    block = op.type.shape
    fan_in = block[-2] if len(block) >= 2 else block[-1]
    fan_out = block[-1]
    if init == "normal":
        return torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    bound = math.sqrt(6.0 / (fan_in + fan_out))       # glorot uniform over one type's block
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


# the dtypes each backend computes in (weights are float32 master copies for 16-bit layers)
DTYPES = {"kernels": ("float32", "bfloat16"), "reference": ("float32", "float64", "bfloat16")}


def _check_dtype(backend: str, dtype: str) -> None:
    if dtype not in DTYPES["reference"] + DTYPES["kernels"]:
        raise ValueError(f"unknown dtype {dtype!r}; pigeon layers compute in float32 or bfloat16 "
                         f"(and float64 with backend='reference')")
    if dtype not in DTYPES[backend]:
        raise ValueError(f"dtype {dtype!r} is not supported by backend={backend!r} ({', '.join(DTYPES[backend])}); "
                         f"backend='reference' runs {', '.join(DTYPES['reference'])}")


def _glue(spec: Layer, ir: IRGraph, dtype: str):
    from .runtime.ops import LayerGlue
    return LayerGlue(spec.name, dtype,
                     tuple((op.attr("name"), op.type.per.value if op.type.per is not None else op.type.domain.value,
                            tuple(op.type.shape)) for op in ir.inputs()),
                     tuple(op.attr("name") for op in ir.params()),
                     tuple((n, ir.op(k).type.domain.value) for n, k in zip(ir.output_names, ir.outputs)))


def _check_type_maps(spec: Layer, ir: IRGraph, graph) -> None:
    """Shared weights' type -> group maps must have one entry per type of the graph."""
    for op in ir.of_kind(OpKind.TYPE_GATHER):
        per = op.attr("per")
        n = graph.num_etypes if per is TypeAxis.ETYPE else graph.num_ntypes
        if len(op.attr("index")) != n:
            names = [p.attr("name") for p in ir.params() if p.key in op.inputs]
            where = f" ({op.loc})" if op.loc else ""
            raise ValueError(f"{spec.name}: weight {names[0] if names else '?'!r}: groups= has {len(op.attr('index'))} "
                             f"entries but the graph has {n} {per.value}s{where}")


class CompiledLayer(torch.nn.Module):
    """A traced, compiled spec bound to one graph. ``forward(*inputs)`` takes the spec's tensor
    inputs in order (or by keyword) and returns its output (a dict if the spec returns several).
    Inputs are checked the same way on both backends (``pigeon.runtime.ops.bind_inputs``): a
    bad call raises an InputError naming the tensor and changes nothing."""

    def __init__(self, spec: Layer, ir: "IRGraph | Compilation", graph, backend: str = "kernels",
                 seed: int | None = 0, dtype: str = "float32"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
        _check_dtype(backend, dtype)
        if isinstance(ir, IRGraph):      # a traced graph: run the pass pipeline (autodiff included)
            ir, _ = run_pipeline(ir, graph_stats=graph_stats_for(graph))
        self.compilation = ir
        ir = ir.ir
        _check_type_maps(spec, ir, graph)
        self.spec, self.ir, self.graph, self.backend, self.dtype = spec, ir, graph, backend, dtype
        self.in_dims = {op.attr("name"): op.type.shape[0] for op in ir.inputs()}
        self.hparams = {}
        self.layer_id = None
        self.glue = _glue(spec, ir, dtype)
        self._graphs = {}          # reference backend: the graph on each device it ran on
        if backend == "kernels":
            self._build_kernels()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        wdt = torch.float64 if dtype == "float64" else torch.float32
        self.weights = torch.nn.ParameterDict({
            op.attr("name"): torch.nn.Parameter(init_param(op, expected_shape(op, graph), gen).to(wdt))
            for op in ir.params()})
        self.input_names = [op.attr("name") for op in ir.inputs()]

    def _build_kernels(self) -> None:
        from .passes.lower import LoweringError, lower
        from .passes.autodiff import AutodiffResult
        from .passes.schedule import choose_schedules
        from .runtime.ops import LayerPrograms, layer_kgraph, register_layer
        hint = ("This spec cannot run on pigeon's kernels yet; pigeon.compile(..., backend='reference') "
                "runs it with torch ops")
        c = self.compilation
        backward_error = None
        res = c.autodiff
        if res is None:   # forward kernels still run; backward raises this when asked
            backward_error = f"{self.spec.name}: {c.backward_error}. {hint}"
            res = AutodiffResult(c.forward or self.ir, None, (), (), (), ())
        else:             # the graphs after every pass (autodiff is one of them)
            res = AutodiffResult(c.forward, c.backward, res.saved, res.recomputed, res.grad_inputs, res.grads)
        try:
            # buffers take their IR values' dtypes; an IR traced in another float dtype than the
            # layer's gets the layer's storage for its float values
            traced = {op.type.dtype for op in self.ir.inputs()} | {op.type.dtype for op in self.ir.params()}
            override = None if traced <= {self.dtype} else self.dtype
            fwd = lower(res.forward, override)
            bwd = lower(res.backward, override) if res.backward is not None else None
        except LoweringError as e:
            raise LoweringError(f"{self.spec.name}: {e}. {hint}") from None
        self.autodiff = res
        self.kgraph = layer_kgraph(self.graph)
        # graph-dependent schedules (sum aggregations: node- or edge-parallel) from degree statistics
        stats = self.kgraph.degree_stats
        if any(b.rows == "compact" for prog in (fwd, bwd) if prog is not None for b in prog.buffers):
            stats = {**stats, **self.kgraph.compact_stats}
        fwd = choose_schedules(fwd, stats)
        bwd = choose_schedules(bwd, stats) if bwd is not None else None
        self.forward_program, self.backward_program = fwd, bwd
        self.backward_error = backward_error
        lp = LayerPrograms(self.forward_program, self.backward_program,
                           tuple(op.attr("name") for op in self.ir.inputs()),
                           tuple(op.attr("name") for op in self.ir.params()),
                           tuple(res.forward.output_names), len(self.ir.outputs), res.grads,
                           {str(self.kgraph.device): self.kgraph}, backward_error=backward_error)
        # the registry holds its entries weakly: this layer keeps its entry alive
        self._programs = register_layer(lp)
        self.layer_id = self._programs.layer_id

    def _graph_on(self, device: torch.device):
        key = str(device)
        if key not in self._graphs:
            self._graphs[key] = self.graph.to(device)
        return self._graphs[key]

    def forward(self, *args, **kwargs):
        from .runtime import ops
        if self.backend == "kernels":      # the kernel graph moves inside the op, per device
            return ops.call_layer(self.layer_id, self.glue, self.kgraph, args, kwargs, self.weights)
        g = self.graph
        inputs = ops.bind_inputs(self.glue, args, kwargs, self.weights, g.num_nodes, g.num_edges,
                                 (g.num_etypes, g.num_ntypes))
        dt = TORCH_DTYPES[self.dtype]
        dev = next(iter(self.weights.values())).device if len(self.weights) else \
            next(iter(inputs.values())).device if inputs else g.src.device
        params = {k: v.to(dt) for k, v in self.weights.items()}
        out = run(self.ir, self._graph_on(dev), {k: v.to(dt) for k, v in inputs.items()}, params)
        return ops.layer_result(out)


def compile(spec: Layer, graph, in_dim: int | Mapping[str, int] | None = None, *,
            backend: str = "kernels", seed: int | None = 0, dtype: str = "float32",
            **hparams) -> CompiledLayer:
    """Trace ``spec`` with ``hparams``, run the pass pipeline, and bind the result to ``graph``.

    ``backend="kernels"`` (the default) runs pigeon's generated kernels forward and backward (CUDA
    templates on a GPU; on a CPU each kernel instance's torch semantics, or the emulated CUDA text
    with PIGEON_CPU_BACKEND=emulate), with ``dtype`` float32 or bfloat16 storage;
    ``backend="reference"`` runs the reference interpreter (torch ops, torch autograd), in float32,
    bfloat16 or float64.  Inputs must have the layer's dtype (a bfloat16 layer also takes float32)."""
    if not isinstance(spec, Layer):
        raise TypeError(f"pigeon.compile takes a @pigeon.layer spec, got {type(spec).__name__}")
    traced = dtype if dtype in ("float32", "bfloat16", "float16", "float64") else "float32"
    compilation, _ = run_pipeline(spec.trace(in_dim, dtype=traced, **hparams), graph_stats=graph_stats_for(graph))
    layer = CompiledLayer(spec, compilation, graph, backend, seed, dtype)
    layer.hparams = dict(hparams)
    return layer
