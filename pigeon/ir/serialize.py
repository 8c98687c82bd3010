"""JSON form of kernel programs and instances (for AOT artifacts): frozen dataclasses, enums and
tuples round-trip exactly; only classes registered here can be rebuilt, so loading an artifact
never runs arbitrary code."""
from __future__ import annotations

import dataclasses
import enum
from typing import Any


_CLASSES: dict[str, type] = {}


def register_serializable(*classes: type) -> None:
    """Classes that artifacts may contain (kernel families register their instance and launch
    types); nothing else is ever rebuilt from JSON."""
    for c in classes:
        prev = _CLASSES.get(c.__name__)
        if prev is not None and prev is not c:
            raise ValueError(f"two serializable classes are named {c.__name__}")
        _CLASSES[c.__name__] = c


def _registry() -> dict[str, type]:
    return _CLASSES


def _expr_to_json(e) -> dict:
    """An expression DAG as a node table (arguments by index), so shared nodes are written once."""
    nodes, index = [], {}
    for n in e.toposort():
        index[n] = len(nodes)
        nodes.append({"op": n.op, "shape": list(n.shape), "args": [index[a] for a in n.args], "fn": n.fn,
                      "c": n.c, "buffer": to_json(n.buffer), "row": n.row.value, "dtype": n.dtype})
    return {"__expr__": nodes}


def _expr_from_json(nodes: list, reg: dict):
    from .expr import Expr, RowRef
    built = []
    for d in nodes:
        built.append(Expr(d["op"], tuple(d["shape"]), tuple(built[i] for i in d["args"]), fn=d["fn"], c=d["c"],
                          buffer=from_json(d["buffer"], reg), row=RowRef(d["row"]), dtype=d["dtype"]))
    if not built:
        raise ValueError("empty expression in serialized program")
    return built[-1]


def to_json(obj: Any) -> Any:
    from .expr import Expr
    if isinstance(obj, Expr):
        return _expr_to_json(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__type__": type(obj).__name__,
                **{f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, enum.Enum):
        return {"__enum__": type(obj).__name__, "value": obj.value}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_json(x) for x in obj]}
    if isinstance(obj, list):
        return [to_json(x) for x in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def from_json(data: Any, _reg: dict | None = None) -> Any:
    reg = _reg or _registry()
    if isinstance(data, dict):
        if "__expr__" in data:
            return _expr_from_json(data["__expr__"], reg)
        if "__tuple__" in data:
            return tuple(from_json(x, reg) for x in data["__tuple__"])
        if "__enum__" in data:
            return reg[data["__enum__"]](data["value"])
        if "__type__" in data:
            cls = reg.get(data["__type__"])
            if cls is None:
                raise ValueError(f"unknown class {data['__type__']!r} in serialized program")
            return cls(**{k: from_json(v, reg) for k, v in data.items() if k != "__type__"})
        raise ValueError("untagged object in serialized program")
    if isinstance(data, list):
        return [from_json(x, reg) for x in data]
    return data
