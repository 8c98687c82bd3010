"""``pigeon.compile``: a spec plus a graph becomes a torch.nn.Module."""
from __future__ import annotations

import math
from typing import Mapping

import torch

from .dsl.layer import Layer
from .ir.graph import IRGraph
from .ir.ops import Op
from .passes.manager import run_pipeline
from .reference import expected_shape, run

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


class CompiledLayer(torch.nn.Module):
    """A traced, compiled spec bound to one graph. ``forward(*inputs)`` takes the spec's tensor
    inputs in order (or by keyword) and returns its output (a dict if the spec returns several)."""

    def __init__(self, spec: Layer, ir: IRGraph, graph, backend: str = "kernels", seed: int | None = 0,
                 dtype: str = "float32"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
        self.spec, self.ir, self.graph, self.backend, self.dtype = spec, ir, graph, backend, dtype
        self.in_dims = {op.attr("name"): op.type.shape[0] for op in ir.inputs()}
        self.hparams = {}
        self.layer_id = None
        if backend == "kernels":
            self._build_kernels()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.weights = torch.nn.ParameterDict({
            op.attr("name"): torch.nn.Parameter(init_param(op, expected_shape(op, graph), gen))
            for op in ir.params()})
        self.input_names = [op.attr("name") for op in ir.inputs()]

    def _build_kernels(self) -> None:
        from .codegen.layout import kernel_graph
        from .codegen.lower import lower
        from .passes.autodiff import autodiff
        from .runtime.ops import LayerPrograms, register_layer
        from .codegen.lower import LoweringError
        from .passes.autodiff import AutodiffError, AutodiffResult
        hint = ("This spec cannot run on pigeon's kernels yet; pigeon.compile(..., backend='reference') "
                "runs it with torch ops")
        backward_error = None
        try:
            res = autodiff(self.ir)
        except AutodiffError as e:   # forward kernels still run; backward raises this when asked
            backward_error = f"{self.spec.name}: {e}. {hint}"
            res = AutodiffResult(self.ir, None, (), (), (), ())
        try:
            fwd = lower(res.forward, self.dtype)
            bwd = lower(res.backward, self.dtype) if res.backward is not None else None
        except LoweringError as e:
            raise LoweringError(f"{self.spec.name}: {e}. {hint}") from None
        self.autodiff = res
        self.forward_program, self.backward_program = fwd, bwd
        self.backward_error = backward_error
        self.kgraph = kernel_graph(self.graph)
        lp = LayerPrograms(self.forward_program, self.backward_program,
                           tuple(op.attr("name") for op in self.ir.inputs()),
                           tuple(op.attr("name") for op in self.ir.params()),
                           tuple(res.forward.output_names), len(self.ir.outputs), res.grads,
                           {str(self.kgraph.device): self.kgraph}, backward_error=backward_error)
        self.layer_id = register_layer(lp)
        from .ir.types import Domain
        self._kernel_inputs = tuple((op.attr("name"), op.type.domain is Domain.EDGE) for op in self.ir.inputs())
        self._kernel_params = tuple(op.attr("name") for op in self.ir.params())
        self._kernel_outputs = tuple((n, self.ir.op(k).type.domain is Domain.EDGE)
                                     for n, k in zip(self.ir.output_names, self.ir.outputs))

    def _forward_kernels(self, inputs: dict) -> dict:
        # plain tuples only: torch.compile traces this glue, and must not walk the networkx IR
        from .runtime.program import TORCH_DTYPES
        dt = TORCH_DTYPES[self.dtype]
        ins = []
        for name, is_edge in self._kernel_inputs:
            if name not in inputs:
                raise TypeError(f"{self.spec.name}: input {name!r} is missing")
            x = inputs[name]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"{self.spec.name}: input {name!r} must be a floating-point tensor")
            if is_edge:   # kernels see edges sorted by type
                x = x[self.kgraph.edge_perm.to(x.device)]
            ins.append(x.to(dt).contiguous())
        params = [self.weights[name].to(dt) for name in self._kernel_params]
        outs = torch.ops.pigeon.layer_forward(self.layer_id, ins, params)
        result = {}
        for (name, is_edge), val in zip(self._kernel_outputs, outs):
            if is_edge:
                val = val[self.kgraph.edge_perm_inverse.to(val.device)]
            result[name] = val
        return result

    def forward(self, *args, **kwargs):
        if len(args) > len(self.input_names):
            raise TypeError(f"{self.spec.name} takes {len(self.input_names)} inputs "
                            f"({', '.join(self.input_names)}), got {len(args)}")
        inputs = dict(zip(self.input_names, args)) | kwargs
        if self.backend == "kernels":      # the kernel graph moves inside the op, per device
            out = self._forward_kernels(inputs)
            return out["out"] if len(out) == 1 and "out" in out else out
        graph = self.graph
        dev = next(iter(inputs.values())).device if inputs else graph.src.device
        if graph.src.device != dev:
            graph = self.graph = graph.to(dev)
        params = {k: v for k, v in self.weights.items()}
        out = run(self.ir, graph, inputs, params)
        return out["out"] if list(out) == ["out"] else out


def compile(spec: Layer, graph, in_dim: int | Mapping[str, int] | None = None, *,
            backend: str = "kernels", seed: int | None = 0, dtype: str = "float32",
            **hparams) -> CompiledLayer:
    """Trace ``spec`` with ``hparams``, run the pass pipeline, and bind the result to ``graph``.

    ``backend="kernels"`` (the default) runs pigeon's generated kernels forward and backward (CUDA
    templates on a GPU, TVM's llvm build on a CPU), with ``dtype`` float32 or bfloat16 storage;
    ``backend="reference"`` runs the reference interpreter (torch ops, torch autograd)."""
    if not isinstance(spec, Layer):
        raise TypeError(f"pigeon.compile takes a @pigeon.layer spec, got {type(spec).__name__}")
    ir, _ = run_pipeline(spec.trace(in_dim, **hparams))
    layer = CompiledLayer(spec, ir, graph, backend, seed, dtype)
    layer.hparams = dict(hparams)
    return layer
