"""A rendered kernel: CUDA source plus everything a launcher needs to call it.

The kernel signature in the source is generated from ``params`` (the same tuple the launcher
binds arguments from), so the launcher and the kernel cannot drift apart.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# launcher C type (pigeon.runtime.launch.C_TYPES) -> C declaration of a scalar parameter
SCALAR_DECL = {"int32": "int", "int64": "long long", "float32": "float", "float64": "double"}
DTYPE_TAG = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}     # dtype names in kernel names


def c_ident(name: str, what: str = "identifier") -> str:
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ValueError(f"{what} {name!r} is not a C identifier")
    return name


@dataclass(frozen=True)
class KernelParam:
    """One kernel parameter.

    ``ctype``: the launcher type ("ptr", "int32", "int64", "float32", ...).
    ``decl``: its C type in the kernel signature (e.g. ``const float* __restrict__``).
    ``role``: what the launcher binds to it, ``"<kind>:<what>"``, e.g. ``buffer:t3``,
    ``graph:csc_ptr``, ``size:num_nodes``; the kernel family's launcher interprets it.
    """
    name: str
    ctype: str
    decl: str
    role: str

    def __post_init__(self):
        c_ident(self.name, "parameter name")

    @property
    def c(self) -> str:
        return f"{self.decl} {self.name}"


@dataclass(frozen=True)
class RenderedKernel:
    """``grid(sizes)`` gives the launch grid from the graph sizes (e.g. a KernelGraph)."""
    name: str
    source: str = field(repr=False)
    params: tuple[KernelParam, ...]
    block: tuple[int, int, int]
    grid: Callable[[Any], tuple[int, int, int]] = field(compare=False, repr=False)
    shared_mem: int = 0
    template: str = ""
    meta: dict = field(default_factory=dict, compare=False)
    # further kernels defined in ``source`` (same module and cubin), launched after this one by the
    # family's launcher: e.g. the fix-up of an edge-chunk aggregate; their own ``source`` is empty
    companions: tuple["RenderedKernel", ...] = field(default=(), compare=False)

    def __post_init__(self):
        c_ident(self.name, "kernel name")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"kernel {self.name}: duplicate parameter names {names}")

    @property
    def ctypes(self) -> list[str]:
        return [p.ctype for p in self.params]

    def signature(self) -> str:
        return ", ".join(p.c for p in self.params)
