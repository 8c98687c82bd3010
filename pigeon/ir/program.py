"""The program IR: a kernel program is an ordered list of launches over named buffers.

``lower`` (pigeon/passes/lower.py) produces programs from inter-operator graphs; the executor
(pigeon/runtime/program.py) runs them through the kernel-family registry
(pigeon/runtime/family.py); artifacts serialize them (pigeon/ir/serialize.py).  Every launch
names its kernel family (``family``) and the buffers it reads and writes (``reads()`` /
``writes()``), which is all the executor needs to know about it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Literal, Union

from .expr import Buffer, RowRef
from .kernel import GemmInstance
from .serialize import register_serializable
from .traversal import TraversalInstance

@dataclass(frozen=True)
class GemmLaunch:
    family: ClassVar[str] = "gemm"
    inst: GemmInstance
    x: str                  # buffer names; the weight_grad form reads x and y and writes w (dW)
    w: str
    y: str
    rows: Literal["edge", "node", "compact", "compact_dst", "etype", "ntype"]    # which rows the instance loops over (M)
    seg: Literal["etype", "ntype", "all"]
    gather: str | None = None        # graph index array: "src", "dst", "ntype_perm", "compact_src", "edge_to_compact",
                                     # "compact_dst", "edge_to_compact_dst"
    scatter: str | None = None       # rows form: output index; weight_grad form: dY index
    backend: Literal["template", "cublas", "tvm"] = "template"   # pigeon's GEMM template; for dense
                                     # launches also cuBLAS or TVM's dlight kernel (pigeon/passes/gemm_backend.py)

    def reads(self) -> tuple[str, ...]:
        if self.inst.form == "weight_grad":
            return (self.x, self.y)
        return (self.x, self.w) + ((self.y,) if self.inst.accumulate else ())

    def writes(self) -> tuple[str, ...]:
        return (self.w,) if self.inst.form == "weight_grad" else (self.y,)

    def describe(self) -> str:
        i = self.inst
        if i.form == "weight_grad":
            return (f"gemm.weight_grad {self.rows}/{self.seg} k={i.k} n={i.n} h={i.heads}"
                    f" gather={self.gather}/{self.scatter}: outer({self.x}, {self.y}) -> {self.w}"
                    + (f" [{self.backend}]" if self.backend != "template" else ""))
        return (f"gemm.{i.form} {self.rows}/{self.seg} k={i.k} n={i.n} h={i.heads}"
                f" gather={self.gather} scatter={self.scatter} T={i.transpose_w}: {self.x},{self.w} -> {self.y}"
                + (f" [{self.backend}]" if self.backend != "template" else ""))


@dataclass(frozen=True)
class TraversalLaunch:
    family: ClassVar[str] = "traversal"
    inst: TraversalInstance

    def reads(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.inst.inputs())

    def writes(self) -> tuple[str, ...]:
        return (self.inst.out.name,)

    def describe(self) -> str:
        t = self.inst
        extra = {"aggregate": f" {t.reduce}/{t.side}/{t.schedule}", "type_reduce": f" {t.rows}->{t.per}"}.get(t.loop, "")
        return f"traversal.{t.loop}{extra} reads {list(self.reads())} -> {t.out.name}{list(t.out.shape)}"


@dataclass(frozen=True)
class HostAdd:
    """out = a + b on per-type or global weights (summing a weight's gradient contributions).
    Runs as a torch op: it is not graph work, and its size is the weight's, not the graph's."""
    family: ClassVar[str] = "host_add"
    a: str
    b: str
    out: str

    def reads(self) -> tuple[str, ...]:
        return (self.a, self.b)

    def writes(self) -> tuple[str, ...]:
        return (self.out,)

    def describe(self) -> str:
        return f"host add {self.a} + {self.b} -> {self.out}"


@dataclass(frozen=True)
class HostIndex:
    """Weights shared across types: ``gather`` out[t] = x[index[t]] (group blocks -> per-type
    blocks), or ``scatter`` out[g] = sum of x[t] over the types t with index[t] == g (its
    gradient). A torch op on weight-sized tensors, like HostAdd."""
    family: ClassVar[str] = "host_index"
    mode: Literal["gather", "scatter"]
    x: str
    out: str
    index: tuple[int, ...]

    def reads(self) -> tuple[str, ...]:
        return (self.x,)

    def writes(self) -> tuple[str, ...]:
        return (self.out,)

    def describe(self) -> str:
        return f"host {self.mode} {self.x} by type -> group map {list(self.index)[:8]} -> {self.out}"


Launch = Union[GemmLaunch, TraversalLaunch, HostAdd, HostIndex]


@dataclass(frozen=True)
class KernelProgram:
    name: str
    buffers: tuple[Buffer, ...]
    launches: tuple[Launch, ...]
    inputs: tuple[tuple[str, str], ...]    # (IR input name, buffer name)
    params: tuple[tuple[str, str], ...]
    graph_data: tuple[tuple[str, str], ...]  # (graph data name, buffer name)
    outputs: tuple[tuple[str, str], ...]   # (IR output name, buffer name)

    def buffer(self, name: str) -> Buffer:
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict[str, Buffer]:
        return {b.name: b for b in self.buffers}

    def describe(self) -> str:
        lines = [f"kernel program {self.name}: {len(self.launches)} launches, {len(self.buffers)} buffers"]
        lines += [f"  [{i}] {l.describe()}" for i, l in enumerate(self.launches)]
        return "\n".join(lines)




# the program's own classes; kernel families register their launch and instance types
register_serializable(KernelProgram, HostAdd, Buffer, RowRef)
