"""A stable text form of the inter-operator IR: values numbered in topological order."""
from __future__ import annotations

from .graph import IRGraph
from .ops import OpKind
from .registry import OP_DEFS


def _fmt_attr(v) -> str:
    if hasattr(v, "value"):
        return str(v.value)
    return repr(v) if isinstance(v, str) else str(v)


def format_ir(ir: IRGraph, *, locs: bool = True) -> str:
    names: dict[str, str] = {}
    lines = [f"ir {ir.name} {{"]
    for i, op in enumerate(ir.ops()):
        if op.kind in (OpKind.INPUT, OpKind.PARAM):
            names[op.key] = f"%{op.attr('name')}"
        else:
            names[op.key] = f"%{i}"
        args = [names[k] for k in op.inputs]
        d = OP_DEFS.get(op.kind)
        if d is not None and d.fmt is not None:          # the kind's own printing (op registry)
            body = d.fmt(op, args)
        else:
            args += [f"{k}={_fmt_attr(v)}" for k, v in op.attrs
                     if not (op.kind in (OpKind.INPUT, OpKind.PARAM) and k == "name")]
            body = f"{op.kind.value}({', '.join(args)})"
        line = f"  {names[op.key]} = {body} : {op.type}"
        if locs and op.loc is not None:
            line = f"{line:<78} # {op.loc}"
        lines.append(line)
    outs = ", ".join(f"{n}={names[k]}" for n, k in zip(ir.output_names, ir.outputs))
    lines.append(f"  return {outs}")
    lines.append("}")
    return "\n".join(lines)
