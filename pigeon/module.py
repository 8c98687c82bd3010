"""``pigeon.compile``: a spec plus a graph becomes a torch.nn.Module."""
from __future__ import annotations

import math
import os
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
        from .passes.gemm_backend import choose_gemm_backends
        from .codegen.gemm import tile_buildable
        from .passes.gemm_tiles import choose_gemm_tiles
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
        if any(b.rows == "compact_dst" for prog in (fwd, bwd) if prog is not None for b in prog.buffers):
            stats = {**stats, **self.kgraph.compact_dst_stats}
        self.schedule_stats = stats
        self.lowered = (fwd, bwd)          # before the schedules: what --tune's decision points read
        choices = c.choices or {}
        fwd = choose_gemm_tiles(choose_gemm_backends(choose_schedules(fwd, stats, choices), choices), choices,
                                tile_buildable)
        bwd = choose_gemm_tiles(choose_gemm_backends(choose_schedules(bwd, stats, choices), choices), choices,
                                tile_buildable) if bwd is not None else None
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
            backend: str = "kernels", seed: int | None = 0, dtype: str = "float32", tune: bool = False,
            tune_mode: str | None = None, tune_device=None, tune_reps: int | None = None,
            tune_progress=None, **hparams) -> CompiledLayer:
    """Trace ``spec`` with ``hparams``, run the pass pipeline, and bind the result to ``graph``.

    ``backend="kernels"`` (the default) runs pigeon's generated kernels forward and backward (CUDA
    templates on a GPU; on a CPU each kernel instance's torch semantics, or the emulated CUDA text
    with PIGEON_CPU_BACKEND=emulate), with ``dtype`` float32 or bfloat16 storage;
    ``backend="reference"`` runs the reference interpreter (torch ops, torch autograd), in float32,
    bfloat16 or float64.  Inputs must have the layer's dtype (a bfloat16 layer also takes float32).

    ``tune=True`` (kernels only) measures the configurations the cost rules choose between on
    ``tune_device`` (default: cuda when there is a GPU) in ``tune_mode`` ("training", the default
    when the layer has a backward, or "inference") and builds the fastest; the winner is recorded
    in the kernel cache, and a later compile of the same key reuses it without measuring
    (pigeon/tune.py).  ``layer.tune_result`` holds every candidate's estimate, time and status;
    ``tune_progress`` gets the progress lines (default: stderr)."""
    if not isinstance(spec, Layer):
        raise TypeError(f"pigeon.compile takes a @pigeon.layer spec, got {type(spec).__name__}")
    traced = dtype if dtype in ("float32", "bfloat16", "float16", "float64") else "float32"
    ir = spec.trace(in_dim, dtype=traced, **hparams)
    result = None
    if tune:
        if backend != "kernels":
            raise ValueError("tune=True measures kernel configurations: it needs backend='kernels'")
        result = tune_layer(spec, graph, in_dim, ir=ir, dtype=dtype, seed=seed, hparams=hparams, mode=tune_mode,
                            device=tune_device, reps=tune_reps, progress=tune_progress)
    compilation, _ = run_pipeline(ir, graph_stats=graph_stats_for(graph),
                                  choices=result.choices if result is not None else None)
    layer = CompiledLayer(spec, compilation, graph, backend, seed, dtype)
    layer.hparams = dict(hparams)
    layer.tune_result = result
    return layer


def tune_stats(graph) -> tuple[dict, dict]:
    """(the pipeline's graph statistics, the kernel graph's degree and compact statistics)."""
    from .runtime.ops import layer_kgraph
    kg = layer_kgraph(graph)
    gs = {**graph_stats_for(graph), "num_nodes": graph.num_nodes, "num_etypes": graph.num_etypes,
          "num_ntypes": graph.num_ntypes}
    return gs, {**kg.degree_stats, **kg.compact_stats, **kg.compact_dst_stats}


def tune_layer(spec: Layer, graph, in_dim=None, *, ir: IRGraph | None = None, dtype: str = "float32",
               seed: int | None = 0, hparams: Mapping | None = None, mode: str | None = None, device=None,
               reps: int | None = None, progress=None, cache: bool = True, timer=None, max_full: int | None = None,
               rounds: int | None = None):
    """``pigeon compile --tune``: the candidates of ``spec`` on ``graph`` measured on ``device``
    (pigeon/tune.py; ``rounds`` of timing in rotated order, default 3 on a GPU, 1 on a CPU);
    ``cache=False`` neither reads nor writes a tuning record (the benchmark's --tune-check).
    Returns a ``pigeon.tune.TuneResult``."""
    import sys

    from . import tune as T
    from .passes.choices import MAX_FULL
    from .passes.lower import lower
    from .runtime.tune_records import TuneRecords
    hparams = dict(hparams or {})
    _check_dtype("kernels", dtype)
    traced = dtype if dtype in ("float32", "bfloat16", "float16", "float64") else "float32"
    ir = ir if ir is not None else spec.trace(in_dim, dtype=traced, **hparams)
    device = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gs, ks = tune_stats(graph)

    def build(choices, backend, ref_dtype=None):
        comp, _ = run_pipeline(ir, graph_stats=gs, choices=choices)
        layer = CompiledLayer(spec, comp, graph, backend, seed, ref_dtype or dtype)
        layer.hparams = dict(hparams)
        return layer

    def lower_fn(comp):
        fwd = lower(comp.forward)
        return [fwd] + ([lower(comp.backward)] if comp.backward is not None else [])

    def make_inputs():
        gen = torch.Generator().manual_seed(0)
        tdt = TORCH_DTYPES[dtype]
        return [torch.randn(expected_shape(op, graph), generator=gen).to(tdt) for op in ir.inputs()]

    if mode is None:
        from .passes.autodiff import AutodiffError, autodiff
        try:
            has_backward = autodiff(ir).backward is not None
        except AutodiffError:
            has_backward = False
        mode = "training" if has_backward else "inference"
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({os.environ.get('PIGEON_CPU_BACKEND', 'torch')} executor)"
    fields = {"spec": spec.name, "ir": T.ir_digest(ir), "hparams": sorted(hparams.items()), "in_dim": in_dim,
              "dtype": dtype, "graph_stats": sorted(gs.items()), "kernel_stats": sorted(ks.items()),
              "device": dev_name, "mode": mode, "pigeon": _version(),
              "env": {k: os.environ.get(k) for k in ("PIGEON_COMPACT", "PIGEON_AGGREGATE_SCHEDULE")}}
    key = T.tune_key(fields)
    if progress is None:
        def progress(msg):
            print(msg, file=sys.stderr, flush=True)
    return T.tune(ir=ir, graph_stats=gs, kernel_stats=ks, build=build, make_inputs=make_inputs, lower_fn=lower_fn,
                  key=key, fields=fields, mode=mode, device=device, dtype=dtype,
                  store=TuneRecords() if cache else None, progress=progress, timer=timer, reps=reps,
                  max_full=max_full or MAX_FULL, rounds=rounds)


def _version() -> str:
    from ._version import __version__
    return __version__
