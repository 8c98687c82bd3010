"""The reference interpreter: runs any inter-operator IR with plain torch ops.

It is the oracle every kernel, pass and model is compared to, so it favours the obvious way over
the fast way.  It runs on any device and in any float dtype, and backward comes from torch
autograd.  Per-type matmuls loop over types (never materialising one weight copy per edge).
"""
from __future__ import annotations

from typing import Mapping

import torch

from . import opset  # noqa: F401  (registers every op kind's record)
from .ir.graph import IRGraph
from .ir.ops import Op, OpKind
from .ir.registry import op_def
from .ir.types import Domain
from .semantics import (aggregate, binary_fn, edge_softmax, graph_data, rows_of, sum_to, type_count, typed_matmul,
                        unary_fn)

# the torch meanings of the graph operations live in pigeon/semantics.py; re-exported here for
# the kernel families' oracles and the tests
__all__ = ["InputError", "aggregate", "binary_fn", "check_tensors", "edge_softmax", "evaluate", "evaluate_op",
           "expected_shape", "graph_data", "rows_of", "run", "sum_to", "type_count", "typed_matmul", "unary_fn"]


class InputError(ValueError):
    """A tensor passed to a compiled layer does not fit what the IR expects."""


def expected_shape(op: Op, graph) -> tuple[int, ...]:
    """Concrete shape of an input or param on ``graph``."""
    t = op.type
    if t.domain is Domain.WEIGHT:
        return (type_count(graph, t.per),) + t.shape
    if t.domain is Domain.GLOBAL:
        return t.shape
    return (rows_of(graph, t.domain),) + t.shape


def check_tensors(ir: IRGraph, graph, inputs: Mapping[str, torch.Tensor],
                  params: Mapping[str, torch.Tensor]) -> None:
    """Raise InputError naming the tensor when a bound tensor's shape, dtype or device is off."""
    for kind, table, ops in (("input", inputs, ir.inputs()), ("param", params, ir.params())):
        for op in ops:
            name = op.attr("name")
            if name not in table:
                raise InputError(f"{kind} {name!r} is missing; expected a tensor of shape "
                                 f"{list(expected_shape(op, graph))}")
            x = table[name]
            if not isinstance(x, torch.Tensor):
                raise InputError(f"{kind} {name!r} must be a torch.Tensor, got {type(x).__name__}")
            want = expected_shape(op, graph)
            if tuple(x.shape) != want:
                raise InputError(f"{kind} {name!r} has shape {list(x.shape)}, expected {list(want)} "
                                 f"({op.type} on a graph of {graph.num_nodes} nodes, {graph.num_edges} edges)")
            if not x.is_floating_point():
                raise InputError(f"{kind} {name!r} must be a floating-point tensor, got {x.dtype}")
            if x.device != graph.src.device:
                raise InputError(f"{kind} {name!r} is on {x.device} but the graph is on {graph.src.device}")


def evaluate_op(op: Op, args: list[torch.Tensor], arg_types: list, graph,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The value of one op given its input values and their IR types: its registry entry's
    reference form (pigeon/opset.py)."""
    d = op_def(op.kind)
    if d.reference is None:
        raise ValueError(f"reference interpreter has no rule for {op.kind}")
    return d.reference(op, args, arg_types, graph, dtype)


def evaluate(ir: IRGraph, graph, inputs: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
             *, check: bool = True) -> dict[str, torch.Tensor]:
    """Values of every op, by op key."""
    if check:
        check_tensors(ir, graph, inputs, params)
    env: dict[str, torch.Tensor] = {}
    dtype = next((v.dtype for v in list(inputs.values()) + list(params.values())), torch.float32)
    for op in ir.ops():
        if op.kind is OpKind.INPUT:
            env[op.key] = inputs[op.attr("name")]
        elif op.kind is OpKind.PARAM:
            env[op.key] = params[op.attr("name")]
        else:
            args = [env[i] for i in op.inputs]
            env[op.key] = evaluate_op(op, args, [ir.op(i).type for i in op.inputs], graph, dtype)
    return env


def run(ir: IRGraph, graph, inputs: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
        *, check: bool = True) -> dict[str, torch.Tensor]:
    """Run the IR on ``graph``; returns the outputs by name."""
    env = evaluate(ir, graph, inputs, params, check=check)
    return {name: env[key] for name, key in zip(ir.output_names, ir.outputs)}
