"""Remove ops that no output depends on."""
from ..ir.graph import IRGraph


def remove_dead_ops(ir: IRGraph) -> IRGraph:
    return ir.live()
