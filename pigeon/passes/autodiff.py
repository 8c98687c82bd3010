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

from ..ir.fns import get_fn
from ..ir.graph import IRGraph
from ..ir.ops import Op, OpKind, make_op
from ..ir.types import Domain
from ..ir.verify import verify


class AutodiffError(ValueError):
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
    """Contributions to the gradients of y's inputs, as (input position, gradient op)."""
    k = y.kind
    if k is OpKind.GATHER:
        side = y.attr("side")
        if side not in ("src", "dst"):
            raise AutodiffError(f"no gradient rule for gather side {side!r}")
        return [(0, b.make(OpKind.AGGREGATE, [dy], reduce="sum", side=side))]
    if k is OpKind.TYPE_INDEX:
        return [(0, b.make(OpKind.TYPE_REDUCE, [dy], per=ins[0].type.per))]
    if k is OpKind.TYPED_LINEAR:
        x, w = ins
        t = bool(y.attr("transpose"))
        dx = b.make(OpKind.TYPED_LINEAR, [dy, w], **({} if t else {"transpose": True}))
        per = w.type.per if w.type.domain is Domain.WEIGHT else None
        a, c = (dy, x) if t else (x, dy)
        dw = b.make(OpKind.WEIGHT_GRAD, [a, c], per=per, wshape=w.type.shape)
        return [(0, dx), (1, dw)]
    if k is OpKind.UNARY:
        fn, c, x = y.attr("fn"), y.attr("c"), ins[0]
        f = get_fn(fn, 1)
        if f.grad is None:
            raise AutodiffError(f"no gradient rule for unary {fn!r}")
        local = f.grad(b, x, y, c)     # dy/dx, an IR value or a constant
        if isinstance(local, _Const):
            return [(0, b.scaled(dy, local.c))]
        return [(0, b.bin(dy, local, "mul"))]
    if k is OpKind.BINARY:
        fn, (p, q) = y.attr("fn"), ins
        f = get_fn(fn, 2)
        if f.grad is None:
            raise AutodiffError(f"no gradient rule for binary {fn!r}")
        da, db = f.grad(b, p, q, y, dy)
        return [(0, b.reduce_like(da, p)), (1, b.reduce_like(db, q))]
    if k is OpKind.DOT:
        lead = y.type.shape
        dy1 = b.reshape(dy, lead + (1,))
        out = []
        for pos, (mine, other) in enumerate(((ins[0], ins[1]), (ins[1], ins[0]))):
            o_lead, kdim = other.type.shape[:-1], other.type.shape[-1]
            o = b.reshape(other, o_lead + (1,) * (len(lead) - len(o_lead)) + (kdim,))
            prod = b.bin(dy1, o, "mul")                       # [*lead, K]
            m_lead = mine.type.shape[:-1]
            aligned = m_lead + (1,) * (len(lead) - len(m_lead)) + (kdim,)
            g = prod if prod.type.shape == aligned else b.make(OpKind.SUM_TO, [prod], shape=aligned)
            g = b.reshape(g, mine.type.shape)
            if mine.type.domain is Domain.GLOBAL and g.type.domain is not Domain.GLOBAL:
                g = b.make(OpKind.TYPE_REDUCE, [g], per=None)
            out.append((pos, g))
        return out
    if k is OpKind.RESHAPE:
        return [(0, b.reshape(dy, ins[0].type.shape))]
    if k is OpKind.CONCAT:
        out, start = [], 0
        for pos, x in enumerate(ins):
            stop = start + x.type.shape[-1]
            out.append((pos, b.make(OpKind.SLICE, [dy], start=start, stop=stop)))
            start = stop
        return out
    if k is OpKind.EDGE_SOFTMAX:
        ydy = b.bin(y, dy, "mul")
        s = b.make(OpKind.GATHER, [b.make(OpKind.AGGREGATE, [ydy], reduce="sum", side="dst")], side="dst")
        return [(0, b.bin(y, b.bin(dy, s, "sub"), "mul"))]
    if k is OpKind.AGGREGATE:
        side, red = y.attr("side", "dst"), y.attr("reduce")
        if red == "sum":
            return [(0, b.make(OpKind.GATHER, [dy], side=side))]
        if red == "mean" and side == "dst":
            inv = b.make(OpKind.GRAPH_DATA, [], what="inv_in_degree", dtype=dy.type.dtype)
            return [(0, b.make(OpKind.GATHER, [b.bin(dy, inv, "mul")], side="dst"))]
        raise AutodiffError(f"no gradient rule for aggregate reduce={red!r} side={side!r} "
                            "(max aggregation is forward-only for now)")
    raise AutodiffError(f"no gradient rule for {k.value}")


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
