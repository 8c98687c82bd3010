"""The verifier: every op's type must equal what its kind's rule infers from its inputs."""
from __future__ import annotations

from .graph import IRGraph
from .ops import INITS, OpKind, SignatureError, infer_type
from .types import Domain


class VerifyError(ValueError):
    pass


def verify(ir: IRGraph) -> IRGraph:
    """Check every op; return the graph unchanged so passes can write ``return verify(new)``."""
    names: dict[tuple[OpKind, str], str] = {}
    for op in ir.ops():
        where = f" (from {op.loc})" if op.loc else ""
        if op.kind in (OpKind.INPUT, OpKind.PARAM):
            if op.inputs:
                raise VerifyError(f"{op.kind.value} {op.attr('name')!r} must have no inputs{where}")
            name = op.attr("name")
            if not isinstance(name, str) or not name.isidentifier():
                raise VerifyError(f"{op.kind.value} name {name!r} is not an identifier{where}")
            if (op.kind, name) in names:
                raise VerifyError(f"two different {op.kind.value}s are named {name!r}{where}")
            names[(op.kind, name)] = op.key
            if op.kind is OpKind.INPUT and not (op.type.is_rows or op.type.domain is Domain.WEIGHT):
                raise VerifyError(f"input {name!r} must be node-, edge-, compact-wise or per type, got {op.type}{where}")
            if op.kind is OpKind.PARAM:
                if op.type.domain not in (Domain.WEIGHT, Domain.GLOBAL):
                    raise VerifyError(f"param {name!r} must be per-type or global, got {op.type}{where}")
                if op.attr("init") not in INITS:
                    raise VerifyError(f"param {name!r} has unknown init {op.attr('init')!r}{where}")
            continue
        ins = [ir.op(k).type for k in op.inputs]
        try:
            t = infer_type(op.kind, dict(op.attrs), ins)
        except SignatureError as e:
            raise VerifyError(f"{op.kind.value}{where}: {e}") from None
        if t != op.type:
            raise VerifyError(f"{op.kind.value}{where}: stored type {op.type} but inputs give {t}")
    return ir
