"""The inter-operator dataflow graph. This module is the only user of networkx.

Nodes are op keys (so structurally equal ops are one node: common subexpressions merge on
construction); each node holds its ``Op`` and the order it was added in, which makes printing and
iteration deterministic.  An ``IRGraph`` is immutable: passes build new ones.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import networkx as nx

from .ops import Op, OpKind


class IRGraph:
    def __init__(self, ops: Iterable[Op], outputs: Iterable[str], name: str = "layer",
                 output_names: Iterable[str] | None = None):
        g = nx.DiGraph()
        for op in ops:
            if op.key in g:
                continue  # identical computation already present
            missing = [i for i in op.inputs if i not in g]
            if missing:
                raise ValueError(f"op {op.kind.value} added before its input(s) {[m[:8] for m in missing]}")
            g.add_node(op.key, op=op, order=g.number_of_nodes())
            for pos, src in enumerate(op.inputs):
                # several positions may use the same input: keep every position on the edge
                if g.has_edge(src, op.key):
                    g.edges[src, op.key]["positions"] += (pos,)
                else:
                    g.add_edge(src, op.key, positions=(pos,))
        self._g = g
        self.outputs: tuple[str, ...] = tuple(outputs)
        for o in self.outputs:
            if o not in g:
                raise ValueError(f"output {o[:8]} is not an op of the graph")
        self.output_names = tuple(output_names) if output_names else tuple(
            f"out{i}" for i in range(len(self.outputs)))
        self.name = name
        self._order = list(nx.lexicographical_topological_sort(g, key=lambda k: g.nodes[k]["order"]))

    # -- queries -----------------------------------------------------------------------------
    def op(self, key: str) -> Op:
        return self._g.nodes[key]["op"]

    def ops(self) -> Iterator[Op]:
        """Ops in a deterministic topological order."""
        for k in self._order:
            yield self._g.nodes[k]["op"]

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def __contains__(self, key: str) -> bool:
        return key in self._g

    def users(self, key: str) -> list[Op]:
        return [self.op(k) for k in sorted(self._g.successors(key), key=lambda k: self._g.nodes[k]["order"])]

    def of_kind(self, kind: OpKind) -> list[Op]:
        return [op for op in self.ops() if op.kind is kind]

    def inputs(self) -> list[Op]:
        return self.of_kind(OpKind.INPUT)

    def params(self) -> list[Op]:
        return self.of_kind(OpKind.PARAM)

    def live(self) -> "IRGraph":
        """The graph without ops that no output depends on."""
        keep = set(self.outputs)
        for o in self.outputs:
            keep |= nx.ancestors(self._g, o)
        if len(keep) == len(self):
            return self
        return IRGraph([op for op in self.ops() if op.key in keep], self.outputs, self.name, self.output_names)

    def structural_key(self) -> str:
        import hashlib
        return hashlib.sha256(repr((self.outputs, self.output_names)).encode()).hexdigest()

    def __eq__(self, other) -> bool:
        return (isinstance(other, IRGraph) and self.outputs == other.outputs
                and self.output_names == other.output_names and set(self._g) == set(other._g))

    def __hash__(self) -> int:
        return hash(self.outputs)

    def networkx(self) -> nx.DiGraph:
        """A copy of the topology, for analyses that need graph algorithms."""
        return self._g.copy()
