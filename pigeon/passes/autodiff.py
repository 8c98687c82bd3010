"""Autodiff: the backward graph of an inter-operator IR, from one gradient rule per op kind.

``autodiff(ir)`` returns a forward graph (the original outputs plus the values backward saves)
and a backward graph whose inputs are the upstream gradients ``grad_<output>``, the forward's
inputs and params, and the saved values ``saved_<i>``; its outputs are ``d_<name>`` for every
input and param that has a gradient.  Which forward values are saved and which are recomputed in
backward is an explicit decision (``AutodiffResult.saved`` / ``.recomputed``): results of typed
linears, edge softmax and aggregations are saved, cheap elementwise ops and gathers (whose
edge-wise results would cost E rows of memory each) are recomputed from what is saved.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.registry import GradientError, op_def
from ..ir.graph import IRGraph
from ..ir.ops import Op, OpKind, make_op
from ..ir.types import Domain
from ..ir.verify import verify


class AutodiffError(GradientError):
    pass


RECOMPUTE_KINDS = {OpKind.GATHER, OpKind.TYPE_INDEX, OpKind.RESHAPE, OpKind.UNARY, OpKind.BINARY,
                   OpKind.DOT, OpKind.SLICE, OpKind.CONCAT, OpKind.GRAPH_DATA, OpKind.EXPAND_COMPACT}


@dataclass(frozen=True)
class AutodiffResult:
    forward: IRGraph          # original outputs, then saved_<i> outputs
    backward: IRGraph         # outputs d_<name>
    saved: tuple[str, ...]    # forward output names that backward reads (saved_<i>)
    recomputed: tuple[str, ...]   # keys of forward ops that backward recomputes instead
    grad_inputs: tuple[str, ...]  # names of the upstream-gradient inputs, one per forward output
    grads: tuple[tuple[str, str], ...]  # (input/param name, backward output name)


@dataclass(frozen=True)
class _Const:
    """A constant local derivative (d(c*x)/dx = c): the gradient is then dy scaled, not dy * a tensor."""
    c: float


class _Builder:
    def __init__(self, ir: IRGraph):
        self.ops: dict[str, Op] = {op.key: op for op in ir.ops()}

    def add(self, op: Op) -> Op:
        return self.ops.setdefault(op.key, op)

    def make(self, kind: OpKind, inputs: list[Op], **attrs) -> Op:
        return self.add(make_op(kind, inputs, None, **attrs))

    def un(self, x: Op, fn: str, c=None) -> Op:
        return self.make(OpKind.UNARY, [x], **({"fn": fn} if c is None else {"fn": fn, "c": float(c)}))

    def bin(self, a: Op, b: Op, fn: str) -> Op:
        return self.make(OpKind.BINARY, [a, b], fn=fn)

    def const_like(self, x: Op, c: float) -> "_Const":
        return _Const(float(c))

    @staticmethod
    def is_const(local) -> bool:
        return isinstance(local, _Const)

    def scaled(self, x: Op, c: float) -> Op:
        """x * c, spelled as the cheapest op."""
        if c == 1.0:
            return x
        if c == -1.0:
            return self.un(x, "neg")
        return self.un(x, "scale", c)

    def reshape(self, x: Op, shape) -> Op:
        return x if x.type.shape == tuple(shape) else self.make(OpKind.RESHAPE, [x], shape=tuple(shape))

    def reduce_like(self, g: Op, like: Op) -> Op:
        """Sum a gradient of a broadcast result back to the shape and domain of an operand."""
        if g.type.shape != like.type.shape:
            shape = like.type.shape
            if len(shape) > len(g.type.shape) or any(s not in (a, 1) for s, a in zip(shape, g.type.shape)):
                raise AutodiffError(f"cannot reduce gradient {g.type} to {like.type}")
            g = self.make(OpKind.SUM_TO, [g], shape=shape)
        if like.type.domain is Domain.GLOBAL and g.type.domain is not Domain.GLOBAL:
            g = self.make(OpKind.TYPE_REDUCE, [g], per=None)
        return g


def _rule(b: _Builder, y: Op, dy: Op, ins: list[Op]) -> list[tuple[int, Op]]:
    """Contributions to the gradients of y's inputs, as (input position, gradient op): the kind's
    gradient rule in the op registry (pigeon/opset.py)."""
    d = op_def(y.kind)
    if d.grad is None:
        raise AutodiffError(f"no gradient rule for {y.kind.value}")
    try:
        return d.grad(b, y, dy, ins)
    except GradientError as e:
        raise AutodiffError(str(e)) from None


def _rebuild(ops: list[Op], subst: dict[str, Op]) -> dict[str, Op]:
    """Re-create ops in order with some inputs substituted; returns old key -> new op."""
    new: dict[str, Op] = dict(subst)
    for op in ops:
        if op.key in new:
            continue
        inputs = tuple(new[i].key if i in new else i for i in op.inputs)
        new[op.key] = op if inputs == op.inputs else Op(op.kind, inputs, op.attrs, op.type, op.loc)
    return new


def autodiff(ir: IRGraph) -> AutodiffResult:
    b = _Builder(ir)
    forward_keys = [op.key for op in ir.ops()]
    grads: dict[str, list[Op]] = {}
    grad_inputs = []
    for name, key in zip(ir.output_names, ir.outputs):
        seed = b.add(Op(OpKind.INPUT, (), (("name", f"grad_{name}"),), ir.op(key).type))
        grads.setdefault(key, []).append(seed)
        grad_inputs.append(f"grad_{name}")

    def total(key: str) -> Op | None:
        parts = grads.get(key)
        if not parts:
            return None
        acc = parts[0]
        for p in parts[1:]:
            acc = b.bin(acc, p, "add")
        return acc

    for key in reversed(forward_keys):
        y = ir.op(key)
        if y.kind in (OpKind.INPUT, OpKind.PARAM, OpKind.GRAPH_DATA):
            continue
        dy = total(key)
        if dy is None:
            continue
        ins = [ir.op(i) for i in y.inputs]
        for pos, g in _rule(b, y, dy, ins):
            if ins[pos].kind is OpKind.GRAPH_DATA:
                continue
            grads.setdefault(ins[pos].key, []).append(g)

    grad_outputs: list[tuple[str, str]] = []
    out_keys = []
    for leaf in ir.inputs() + ir.params():
        g = total(leaf.key)
        if g is not None:
            name = leaf.attr("name")
            grad_outputs.append((name, f"d_{name}"))
            out_keys.append(g.key)

    # -- split: which forward values does backward read, saved or recomputed? ----------------
    joint = IRGraph(list(b.ops.values()), out_keys, f"{ir.name}_joint") if out_keys else None
    fwd = set(forward_keys)
    bwd_ops = [op for op in joint.ops() if op.key not in fwd] if joint else []
    needed = {i for op in bwd_ops for i in op.inputs if i in fwd}
    saved, recomputed = [], []
    stack = sorted(needed, key=forward_keys.index)
    seen = set()
    while stack:
        k = stack.pop()
        if k in seen:
            continue
        seen.add(k)
        op = ir.op(k)
        if op.kind in (OpKind.INPUT, OpKind.PARAM):
            continue
        if op.kind in RECOMPUTE_KINDS:
            recomputed.append(k)
            stack.extend(op.inputs)
        else:
            saved.append(k)
    saved.sort(key=forward_keys.index)
    recomputed.sort(key=forward_keys.index)
    subst = {k: Op(OpKind.INPUT, (), (("name", f"saved_{i}"),), ir.op(k).type) for i, k in enumerate(saved)}
    leaves = [op for op in ir.inputs() + ir.params()]
    order = leaves + [ir.op(k) for k in recomputed] + bwd_ops
    new = _rebuild(order, subst)
    bwd_list = list(subst.values()) + [new[op.key] for op in order]
    backward = IRGraph(bwd_list, [new[k].key for k in out_keys], f"{ir.name}_backward",
                       [n for _, n in grad_outputs]).live() if out_keys else None
    saved_names = tuple(f"saved_{i}" for i in range(len(saved)))
    forward = IRGraph(list(ir.ops()), list(ir.outputs) + saved, f"{ir.name}_forward",
                      list(ir.output_names) + list(saved_names))
    return AutodiffResult(verify(forward), verify(backward) if backward else None, saved_names,
                          tuple(recomputed), tuple(grad_inputs), tuple(grad_outputs))
