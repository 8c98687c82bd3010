"""The rewrite engine: passes as pattern -> replacement rules over the inter-operator IR.

A ``Pat`` matches one op by kind, attributes and (optionally) patterns for its inputs, binding
named ops (``name="x"``); a ``Rule`` pairs a pattern with a builder that returns the replacement
op, or ``None`` to decline.  ``rewrite(ir, rules)`` sweeps the graph in topological order,
rebuilding each op on its rewritten inputs and applying rules to it until none fires, then
repeats sweeps to a fixpoint; both loops are bounded and raise ``RewriteError`` when exceeded
(a rule set that cycles is a bug, not a slow compile).  Every firing is recorded, so
``pigeon compile --dump`` can print what each pass changed.

Equal ops are equal keys (the IR hash-conses by structure), so a rewrite that produces an
existing computation merges with it.  Replacements must keep the op's type: the engine checks,
and the verifier runs after every pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..ir.graph import IRGraph
from ..ir.ops import Op, OpKind, make_op


class RewriteError(RuntimeError):
    pass


@dataclass(frozen=True)
class Pat:
    """Matches an op of ``kind`` (any kind if None) whose attributes equal ``attrs`` (values may be
    predicates), with inputs matching ``inputs`` (None: any inputs)."""
    kind: OpKind | None = None
    attrs: tuple = ()
    inputs: tuple["Pat", ...] | None = None
    name: str | None = None
    where: Callable[[Op], bool] | None = None

    @staticmethod
    def of(kind: OpKind | None = None, *inputs: "Pat", name: str | None = None, where=None, **attrs) -> "Pat":
        return Pat(kind, tuple(sorted(attrs.items())), tuple(inputs) if inputs else None, name, where)

    def match(self, op: Op, lookup: Callable[[str], Op], binds: dict[str, Op]) -> bool:
        if self.kind is not None and op.kind is not self.kind:
            return False
        for k, want in self.attrs:
            got = op.attr(k)
            if callable(want) and not isinstance(want, type):
                if not want(got):
                    return False
            elif got != want:
                return False
        if self.where is not None and not self.where(op):
            return False
        if self.inputs is not None:
            if len(self.inputs) != len(op.inputs):
                return False
            for p, k in zip(self.inputs, op.inputs):
                if not p.match(lookup(k), lookup, binds):
                    return False
        if self.name is not None:
            if self.name in binds and binds[self.name].key != op.key:
                return False
            binds[self.name] = op
        return True


ANY = Pat()


def var(name: str) -> Pat:
    return Pat(name=name)


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: Pat
    build: Callable[["Match"], Op | None]


@dataclass
class Match:
    op: Op
    binds: dict[str, Op]
    builder: "Builder"

    def __getitem__(self, name: str) -> Op:
        return self.binds[name]

    def make(self, kind: OpKind, inputs: list[Op], **attrs) -> Op:
        return self.builder.make(kind, inputs, loc=self.op.loc, **attrs)

    def lookup(self, key: str) -> Op:
        """The op of a key (an input of a matched op, or one a replacement made)."""
        return self.builder.table[key]

    def inputs(self, op: Op | None = None) -> list[Op]:
        """The input ops of ``op`` (default: the matched op)."""
        return [self.lookup(k) for k in (op or self.op).inputs]


@dataclass
class Change:
    rule: str
    before: str
    after: str


class Builder:
    """Ops created by replacements, so later matches can look them up by key."""

    def __init__(self, lookup: dict[str, Op]):
        self.table = lookup

    def make(self, kind: OpKind, inputs: list[Op], loc=None, **attrs) -> Op:
        op = make_op(kind, inputs, loc, **attrs)
        self.table.setdefault(op.key, op)
        return self.table[op.key]


def describe(op: Op, lookup: Callable[[str], Op] | None = None) -> str:
    attrs = ", ".join(f"{k}={v!r}" for k, v in op.attrs if k != "init")
    ins = ", ".join(f"{lookup(i).kind.value}" if lookup else i[:6] for i in op.inputs)
    return f"{op.kind.value}({ins}{', ' if ins and attrs else ''}{attrs}) : {op.type}"


def rewrite(ir: IRGraph, rules: list[Rule], *, max_sweeps: int = 16, max_fires_per_op: int = 64,
            changes: list[Change] | None = None) -> IRGraph:
    """Apply ``rules`` to a fixpoint.  Returns ``ir`` itself when nothing fires."""
    changes = changes if changes is not None else []
    current = ir
    for _ in range(max_sweeps):
        new, fired = _sweep(current, rules, max_fires_per_op, changes)
        if not fired:
            return current
        current = new
    raise RewriteError(f"rewrite of {ir.name} did not reach a fixpoint in {max_sweeps} sweeps "
                       f"(rules: {[r.name for r in rules]}; last changes: "
                       f"{[c.rule for c in changes[-5:]]})")


def _sweep(ir: IRGraph, rules: list[Rule], max_fires: int, changes: list[Change]) -> tuple[IRGraph, bool]:
    table: dict[str, Op] = {op.key: op for op in ir.ops()}
    builder = Builder(table)
    lookup = table.__getitem__
    new_of: dict[str, Op] = {}
    order: list[Op] = []
    fired = False
    for op in ir.ops():
        inputs = tuple(new_of[i].key for i in op.inputs)
        cur = op if inputs == op.inputs else Op(op.kind, inputs, op.attrs, op.type, op.loc)
        table.setdefault(cur.key, cur)
        for _ in range(max_fires):
            hit = _apply_one(cur, rules, lookup, builder)
            if hit is None:
                break
            rule, repl = hit
            if repl.type != cur.type:
                raise RewriteError(f"rule {rule.name} changed the type of {cur.kind.value}: {cur.type} -> {repl.type}")
            changes.append(Change(rule.name, describe(cur, lookup), describe(repl, lookup)))
            fired = True
            cur = repl
        else:
            raise RewriteError(f"rules keep firing on {describe(cur)} (more than {max_fires} times): "
                               f"{[c.rule for c in changes[-5:]]}")
        new_of[op.key] = cur
        order.append(cur)
    if not fired:
        return ir, False
    # replacements may have created ops (and their inputs) not in the sweep order: add them in
    # dependency order before their users
    ops: dict[str, Op] = {}

    def add(o: Op):
        if o.key in ops:
            return
        for i in o.inputs:
            add(table[i])
        ops[o.key] = o
    for o in order:
        add(o)
    out = IRGraph(list(ops.values()), [new_of[k].key for k in ir.outputs], ir.name, ir.output_names)
    return out.live(), True


def _apply_one(op: Op, rules: list[Rule], lookup, builder) -> tuple[Rule, Op] | None:
    for rule in rules:
        binds: dict[str, Op] = {}
        if rule.pattern.match(op, lookup, binds):
            repl = rule.build(Match(op, binds, builder))
            if repl is not None and repl.key != op.key:
                return rule, repl
    return None


__all__ = ["ANY", "Builder", "Change", "Match", "Pat", "Rule", "RewriteError", "describe", "rewrite", "var"]
