"""The ordered pass pipeline. Each pass is a pure function IRGraph -> IRGraph; the verifier runs
after every one, and rewriting passes iterate to a fixpoint under a bound."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..ir.graph import IRGraph
from ..ir.verify import verify
from .dead_ops import remove_dead_ops

Pass = Callable[[IRGraph], IRGraph]


class PassError(RuntimeError):
    pass


@dataclass(frozen=True)
class PassRecord:
    name: str
    changed: bool
    ops_before: int
    ops_after: int


PIPELINE: tuple[tuple[str, Pass], ...] = (
    ("remove_dead_ops", remove_dead_ops),
)


def run_to_fixpoint(p: Pass, ir: IRGraph, *, max_iters: int = 32, name: str = "pass") -> IRGraph:
    for _ in range(max_iters):
        new = verify(p(ir))
        if new == ir:
            return new
        ir = new
    raise PassError(f"{name} did not reach a fixpoint in {max_iters} iterations")


def run_pipeline(ir: IRGraph, pipeline=PIPELINE) -> tuple[IRGraph, list[PassRecord]]:
    records = []
    ir = verify(ir)
    for name, p in pipeline:
        new = run_to_fixpoint(p, ir, name=name)
        records.append(PassRecord(name, new != ir, len(ir), len(new)))
        ir = new
    return ir, records
