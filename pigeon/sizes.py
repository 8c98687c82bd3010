"""How much memory running an IR on a graph takes, estimated before anything is allocated.

Every value of the IR is sized on the graph (rows from its domain: nodes, edges, compact rows or
types; times its feature shape; times the element size of the dtype it is stored in).  Weights are
float32 parameters (plus a cast copy when the kernels store another dtype), inputs are float32
tensors (plus a cast copy), intermediate values are stored in the run's dtype.  The sum is an upper
bound of one forward call of the reference interpreter or a kernel program, which both keep every
value of the call alive, and it is what ``pigeon compile`` compares with its memory limit.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from .ir.graph import IRGraph
from .ir.ops import OpKind
from .reference import expected_shape

ELEMENT_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
DEFAULT_LIMIT = 64 * 2**30
LIMIT_ENV = "PIGEON_MAX_BYTES"


class SizeError(ValueError):
    pass


@dataclass(frozen=True)
class Item:
    what: str                 # "param W", "input x", "%5 = typed_linear (rgat.py:10)"
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    def __str__(self) -> str:
        return f"{self.what} {list(self.shape)} {self.dtype} = {format_bytes(self.nbytes)}"


@dataclass(frozen=True)
class Estimate:
    items: tuple[Item, ...]

    @property
    def total(self) -> int:
        return sum(i.nbytes for i in self.items)

    @property
    def largest(self) -> Item | None:
        return max(self.items, key=lambda i: i.nbytes, default=None)


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def estimate(ir: IRGraph, graph, dtype: str = "float32", *, copies: int = 1) -> Estimate:
    """The values one forward call of ``ir`` on ``graph`` holds, with storage ``dtype``.

    ``copies`` counts extra runs that hold their own weights and values at once (``--check`` runs
    the reference interpreter next to the kernels: 2).
    """
    if dtype not in ELEMENT_BYTES:
        raise SizeError(f"unknown dtype {dtype!r}; expected one of {sorted(ELEMENT_BYTES)}")
    el = ELEMENT_BYTES[dtype]
    f32 = ELEMENT_BYTES["float32"]
    items = []
    for i, op in enumerate(ir.ops()):      # numbered as pigeon.ir.printer numbers them
        shape = tuple(int(s) for s in expected_shape(op, graph))
        n = math.prod(shape)
        if op.kind is OpKind.PARAM:
            what, nbytes = f"param {op.attr('name')}", n * f32 * copies + (n * el if el != f32 else 0)
            items.append(Item(what, shape, "float32", nbytes))
        elif op.kind is OpKind.INPUT:
            what, nbytes = f"input {op.attr('name')}", n * f32 + (n * el if el != f32 else 0)
            items.append(Item(what, shape, "float32", nbytes))
        else:
            loc = f" ({os.path.basename(op.loc.file)}:{op.loc.line})" if getattr(op, "loc", None) else ""
            items.append(Item(f"%{i} = {op.kind.value}{loc}", shape, dtype, n * el + (n * f32 * (copies - 1))))
    return Estimate(tuple(items))


def parse_bytes(text: str) -> int:
    """``12345``, ``64G``, ``64GiB``, ``1.5T``, ``512MB`` (binary units: K/M/G/T = 2**10.. 2**40)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise SizeError(f"{LIMIT_ENV}={text!r}: give a size in bytes, such as 68719476736 or 64G")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise SizeError(f"{LIMIT_ENV}={text!r}: the limit must be positive")
    return value


def total_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_limit(device=None) -> tuple[int, str]:
    """The limit in bytes and where it comes from: ``$PIGEON_MAX_BYTES``, else the smallest of
    64 GiB, the machine's RAM and (for a CUDA device) the GPU's memory."""
    env = os.environ.get(LIMIT_ENV)
    if env:
        return parse_bytes(env), f"{LIMIT_ENV}={env}"
    limit, why = DEFAULT_LIMIT, "default 64 GiB"
    ram = total_ram()
    if ram is not None and ram < limit:
        limit, why = ram, "the machine's RAM"
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch
        mem = torch.cuda.get_device_properties(device).total_memory
        if mem < limit:
            limit, why = mem, f"the memory of {torch.cuda.get_device_name(device)}"
    return limit, f"{why}; set {LIMIT_ENV} to change it"
