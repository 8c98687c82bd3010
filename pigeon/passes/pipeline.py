"""The pass pipeline: one flat, ordered list.  Autodiff is a pass like the others, so backward
graphs go through every pass after it.

The pipeline transforms a ``Compilation``: the user's graph (``ir``), and after the autodiff pass
the forward graph (user outputs plus the values backward saves) and the backward graph.  A graph
pass (``GraphPass``) runs on every graph the compilation holds at that point; ``StagePass`` passes
(autodiff) transform the compilation.  The verifier runs after every pass; every pass is recorded
with what it changed (``pigeon compile --dump`` prints the records).

``choices`` (``run_pipeline(..., choices=)``, kept in ``Compilation.choices``) takes the
graph-dependent decisions explicitly instead of by their cost rules: ``"linear_reorder": False``
skips the reordering pass, ``"compaction": True | False`` compacts or not whatever the E/U rule
says (``"compaction_dst"`` the same for the destination side), and ``"schedule:..."`` entries are read after lowering (pigeon/passes/schedule.py).  The
decision points and their options are listed by pigeon/passes/choices.py; ``pigeon compile
--tune`` measures them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from ..ir.graph import IRGraph
from ..ir.verify import verify
from .autodiff import AutodiffError, AutodiffResult, autodiff
from .compact import DST_RULES as COMPACT_DST_RULES, RULES as COMPACT_RULES, Decision as CompactDecision
from .compact import decide as decide_compaction, decide_dst as decide_compaction_dst
from .reorder import linear_reorder
from .rewrite import Change, Rule, rewrite
from .simplify import RULES as SIMPLIFY_RULES


class PassError(RuntimeError):
    pass


@dataclass(frozen=True)
class Compilation:
    ir: IRGraph                                # the user's outputs (after the passes before autodiff)
    forward: IRGraph | None = None             # after autodiff: outputs + saved values
    backward: IRGraph | None = None
    autodiff: AutodiffResult | None = None
    backward_error: str | None = None          # why there is no backward graph
    graph_stats: dict | None = None            # the graph's statistics, for graph-dependent passes
    choices: dict | None = None                # explicit decisions (see the module docstring)

    def graphs(self) -> dict[str, IRGraph]:
        out = {"ir": self.ir}
        if self.forward is not None:
            out["forward"] = self.forward
        if self.backward is not None:
            out["backward"] = self.backward
        return out


@dataclass
class PassRecord:
    name: str
    graphs: dict[str, tuple[int, int]] = field(default_factory=dict)   # graph -> (ops before, after)
    changes: list[tuple[str, Change]] = field(default_factory=list)    # (graph, change)
    note: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.changes) or any(a != b for a, b in self.graphs.values())

    def summary(self) -> str:
        sizes = ", ".join(f"{g} {a}->{b} ops" for g, (a, b) in self.graphs.items())
        head = f"pass {self.name}: {'changed' if self.changed else 'no change'} ({sizes})"
        return head + (f"; {self.note}" if self.note else "")


@dataclass(frozen=True)
class GraphPass:
    name: str
    run: Callable[[IRGraph, list[Change]], IRGraph]


@dataclass(frozen=True)
class StagePass:
    name: str
    run: Callable[[Compilation, PassRecord], Compilation]


def rules_pass(name: str, rules: list[Rule]) -> GraphPass:
    return GraphPass(name, lambda ir, changes: rewrite(ir, rules, changes=changes))


def _dead_ops(ir: IRGraph, changes: list[Change]) -> IRGraph:
    live = ir.live()
    if len(live) != len(ir):
        keep = {op.key for op in live.ops()}
        for op in ir.ops():
            if op.key not in keep:
                changes.append(Change("dead", f"{op.kind.value} : {op.type}", "(removed)"))
    return live


def _autodiff(c: Compilation, rec: PassRecord) -> Compilation:
    try:
        res = autodiff(c.ir)
    except AutodiffError as e:
        rec.note = f"no backward: {e}"
        return replace(c, forward=c.ir, backward=None, autodiff=None, backward_error=str(e))
    rec.note = (f"saves {len(res.saved)} forward values, recomputes {len(res.recomputed)} ops; "
                f"backward {len(res.backward) if res.backward is not None else 0} ops")
    return replace(c, forward=res.forward, backward=res.backward, autodiff=res)


def _compact_decision(c: Compilation, choice: str, decide) -> CompactDecision:
    """``choices[choice]`` when given (--tune's candidates), else ``decide`` on the graph's statistics."""
    given = (c.choices or {}).get(choice)
    return decide(c.graph_stats) if given is None else \
        CompactDecision(bool(given), f"chosen explicitly ({choice}={bool(given)})")


def _compact_pass(c: Compilation, rec: PassRecord, choice: str, decide, rules) -> Compilation:
    """One compaction side: the decision (``choice`` given, else ``decide``), then ``rules`` on the IR."""
    d = _compact_decision(c, choice, decide)
    if not d.compact:
        rec.note = f"not applied: {d.why}"
        return c
    changes: list[Change] = []
    out = verify(rewrite(c.ir, rules, changes=changes))
    rec.changes.extend(("ir", ch) for ch in changes)
    sunk = sum(ch.rule.startswith("sink_") for ch in changes)
    rec.note = (f"applied: {d.why}" + (f"; {sunk} edge-wise op(s) sunk into the compact domain" if sunk else "")
                if changes else f"nothing to compact ({d.why})")
    return replace(c, ir=out)


def _compaction(c: Compilation, rec: PassRecord) -> Compilation:
    """Compact materialization where the graph's statistics say it pays (pigeon/passes/compact.py).
    Before autodiff, so the backward graph is built on the compact rows."""
    return _compact_pass(c, rec, "compaction", decide_compaction, COMPACT_RULES)


def _compaction_dst(c: Compilation, rec: PassRecord) -> Compilation:
    """Destination-side compaction (typed linears of destination rows on unique (dst, etype)
    pairs) where E / Ud says it pays (pigeon/passes/compact.py ``decide_dst``)."""
    return _compact_pass(c, rec, "compaction_dst", decide_compaction_dst, COMPACT_DST_RULES)


SIMPLIFY = rules_pass("simplify", SIMPLIFY_RULES)
DEAD_OPS = GraphPass("remove_dead_ops", _dead_ops)
LINEAR_REORDER = GraphPass("linear_reorder", linear_reorder)
COMPACTION = StagePass("compaction", _compaction)
COMPACTION_DST = StagePass("compaction_dst", _compaction_dst)
AUTODIFF = StagePass("autodiff", _autodiff)

PIPELINE: tuple = (SIMPLIFY, DEAD_OPS, LINEAR_REORDER, COMPACTION, COMPACTION_DST, AUTODIFF, SIMPLIFY, DEAD_OPS)
FORWARD_ONLY: tuple = (SIMPLIFY, DEAD_OPS)


# graph passes that ``choices`` can turn off (name -> the choice's key)
OPTIONAL_GRAPH_PASSES = {"linear_reorder": "linear_reorder"}


def run_pipeline(ir: IRGraph, pipeline=PIPELINE, *, graph_stats: dict | None = None, choices: dict | None = None
                 ) -> tuple[Compilation, list[PassRecord]]:
    """Run the passes in order; returns the compilation and one record per pass.  ``graph_stats``
    (``num_edges``, ``compact_rows``: see ``graph_stats_for``) feeds the graph-dependent passes;
    without it they keep the graph as traced.  ``choices``: explicit decisions (module docstring)."""
    choices = dict(choices) if choices else None
    c = Compilation(verify(ir), graph_stats=graph_stats, choices=choices)
    records = []
    for p in pipeline:
        rec = PassRecord(p.name)
        key = OPTIONAL_GRAPH_PASSES.get(p.name) if isinstance(p, GraphPass) else None
        if key is not None and (choices or {}).get(key) is False:
            rec.note = f"not applied: chosen explicitly ({key}=False)"
            records.append(rec)
            continue
        if isinstance(p, StagePass):
            before = {k: len(g) for k, g in c.graphs().items()}
            c = p.run(c, rec)
            after = c.graphs()
            # a graph the stage creates counts from nothing (the forward graph from the user's)
            before.setdefault("forward", before["ir"])
            rec.graphs = {k: (before.get(k, 0), len(g)) for k, g in after.items() if k != "ir" or "forward" not in after}
        else:
            new = {}
            for gname, g in c.graphs().items():
                if gname == "ir" and c.forward is not None:
                    continue      # after autodiff the forward graph stands for the user's graph
                changes: list[Change] = []
                try:
                    out = verify(p.run(g, changes))
                except Exception as e:
                    if isinstance(e, (PassError,)):
                        raise
                    raise PassError(f"pass {p.name} on the {gname} graph: {e}") from e
                rec.graphs[gname] = (len(g), len(out))
                rec.changes.extend((gname, ch) for ch in changes)
                new[gname] = out
            c = replace(c, **new)
            if c.forward is not None and "forward" in new:
                c = replace(c, ir=_user_view(c))
        records.append(rec)
    return c, records


def graph_stats_for(graph) -> dict:
    """The statistics the graph-dependent passes read (cheap: the compact map is cached)."""
    return {"num_edges": graph.num_edges, "compact_rows": graph.compact().num_rows,
            "compact_dst_rows": graph.compact_dst().num_rows}


def _user_view(c: Compilation) -> IRGraph:
    """The forward graph restricted to the user's outputs (what the reference backend runs)."""
    n = len(c.ir.outputs)
    f = c.forward
    return IRGraph(list(f.ops()), f.outputs[:n], c.ir.name, f.output_names[:n]).live()
