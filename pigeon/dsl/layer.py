"""``@pigeon.layer``: a spec function, traced into inter-operator IR on demand."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from ..ir.graph import IRGraph
from ..ir.ops import OpKind, SourceLoc
from ..ir.types import Domain, TypeAxis, ValueType
from ..ir.verify import verify
from .trace import SpecError, current, tracing
from .values import Graph, Value


class NodeTensor:
    """Annotation: this spec argument is a node-wise input (the default)."""


class EdgeTensor:
    """Annotation: this spec argument is an edge-wise input."""


class EtypeTensor:
    """Annotation: this spec argument is a per-edge-type input ([num_etypes, d], e.g. relation
    embeddings); index it with ``r[g.etype]``."""


class NtypeTensor:
    """Annotation: this spec argument is a per-node-type input ([num_ntypes, d])."""


# annotation -> (domain, type axis) of the input
_INPUT_KINDS = {NodeTensor: (Domain.NODE, None), EdgeTensor: (Domain.EDGE, None),
                EtypeTensor: (Domain.WEIGHT, TypeAxis.ETYPE), NtypeTensor: (Domain.WEIGHT, TypeAxis.NTYPE)}
_INPUT_KINDS.update({k.__name__: v for k, v in list(_INPUT_KINDS.items())})


class Layer:
    def __init__(self, fn: Callable):
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if not params:
            raise SpecError(f"spec {self.name} must take the graph handle g as its first argument")
        self.tensor_args: list[tuple[str, Domain, TypeAxis | None]] = []
        self.hparams: dict[str, Any] = {}
        for p in params[1:]:
            if p.kind is p.KEYWORD_ONLY or p.default is not p.empty:
                self.hparams[p.name] = p.default
            else:
                ann = p.annotation
                dom, per = _INPUT_KINDS.get(ann, (Domain.NODE, None)) if isinstance(ann, (str, type)) \
                    else (Domain.NODE, None)
                self.tensor_args.append((p.name, dom, per))

    def __repr__(self) -> str:
        return f"<pigeon layer {self.name}({', '.join(n for n, _, _ in self.tensor_args)})>"

    def trace(self, in_dim: int | Mapping[str, int] | None = None, *, dtype: str = "float32",
              **hparams) -> IRGraph:
        """Run the spec symbolically. ``in_dim``: the feature size of every tensor input, or a
        mapping from input name to size. ``hparams`` override the spec's keyword defaults."""
        unknown = sorted(set(hparams) - set(self.hparams))
        if unknown:
            raise SpecError(f"spec {self.name} has no hyperparameter(s) {unknown}; it takes {sorted(self.hparams)}")
        dims = {}
        for name, _, _ in self.tensor_args:
            d = in_dim.get(name) if isinstance(in_dim, Mapping) else in_dim
            if not isinstance(d, int) or d <= 0:
                raise SpecError(f"spec {self.name}: give the feature size of input {name!r} (in_dim=...)")
            dims[name] = d
        from ..ir.types import FLOAT_DTYPES
        if dtype not in FLOAT_DTYPES:
            raise SpecError(f"spec {self.name}: dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        with tracing(dtype) as tr:
            code = self.fn.__code__
            loc = SourceLoc(code.co_filename, code.co_firstlineno, self.name)
            args = [Value(tr.leaf(OpKind.INPUT, name, ValueType(dom, (dims[name],), dtype, per), loc))
                    for name, dom, per in self.tensor_args]
            result = self.fn(Graph(), *args, **{**self.hparams, **hparams})
            outs, names = _outputs(result, self.name)
            ops = list(current().ops.values())
        return verify(IRGraph(ops, [o.op.key for o in outs], self.name, names).live())


def _outputs(result, spec: str) -> tuple[list[Value], list[str]]:
    if isinstance(result, Value):
        return [result], ["out"]
    if isinstance(result, tuple) and result and all(isinstance(v, Value) for v in result):
        return list(result), [f"out{i}" for i in range(len(result))]
    if isinstance(result, dict) and result and all(isinstance(v, Value) for v in result.values()):
        return list(result.values()), list(result)
    raise SpecError(f"spec {spec} must return a pigeon value, a tuple of them or a dict of them; "
                    f"got {type(result).__name__}")


def layer(fn: Callable) -> Layer:
    """Decorator: mark a function as a pigeon spec."""
    return Layer(fn)
