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

BACKENDS = ("reference",)


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

    def __init__(self, spec: Layer, ir: IRGraph, graph, backend: str = "reference", seed: int | None = 0):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
        self.spec, self.ir, self.graph, self.backend = spec, ir, graph, backend
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.weights = torch.nn.ParameterDict({
            op.attr("name"): torch.nn.Parameter(init_param(op, expected_shape(op, graph), gen))
            for op in ir.params()})
        self.input_names = [op.attr("name") for op in ir.inputs()]

    def forward(self, *args, **kwargs):
        if len(args) > len(self.input_names):
            raise TypeError(f"{self.spec.name} takes {len(self.input_names)} inputs "
                            f"({', '.join(self.input_names)}), got {len(args)}")
        inputs = dict(zip(self.input_names, args)) | kwargs
        graph = self.graph
        dev = next(iter(inputs.values())).device if inputs else graph.src.device
        if graph.src.device != dev:
            graph = self.graph = graph.to(dev)
        params = {k: v for k, v in self.weights.items()}
        out = run(self.ir, graph, inputs, params)
        return out["out"] if list(out) == ["out"] else out


def compile(spec: Layer, graph, in_dim: int | Mapping[str, int] | None = None, *,
            backend: str = "reference", seed: int | None = 0, **hparams) -> CompiledLayer:
    """Trace ``spec`` with ``hparams``, run the pass pipeline, and bind the result to ``graph``."""
    if not isinstance(spec, Layer):
        raise TypeError(f"pigeon.compile takes a @pigeon.layer spec, got {type(spec).__name__}")
    ir, _ = run_pipeline(spec.trace(in_dim, **hparams))
    return CompiledLayer(spec, ir, graph, backend, seed)
