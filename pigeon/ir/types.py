"""Value types of the inter-operator IR: a domain (what the rows are), a feature shape and a dtype.

The row count of a value is never stored: it is symbolic in the graph the IR runs on
(nodes, edges, compact rows or types).  ``shape`` is the per-row feature shape.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Domain(enum.Enum):
    NODE = "node"          # one row per node (all node types share one id space)
    EDGE = "edge"          # one row per edge
    COMPACT = "compact"    # one row per unique (source node, edge type) pair
    COMPACT_DST = "compact_dst"    # one row per unique (destination node, edge type) pair
    WEIGHT = "weight"      # one row per type (edge type or node type): per-type weights
    GLOBAL = "global"      # no rows: one tensor shared by all rows (untyped weights, biases)


class TypeAxis(enum.Enum):
    ETYPE = "etype"
    NTYPE = "ntype"


ROW_DOMAINS = (Domain.NODE, Domain.EDGE, Domain.COMPACT, Domain.COMPACT_DST)
# every dtype the IR knows; value types of the inter-operator IR are the float ones today, the
# others type buffers and expressions of the integer / bitwise / fp8 families (ShiftAdd, fp8 GEMM)
FLOAT_DTYPES = ("float32", "float64", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")
INT_DTYPES = ("int8", "uint8", "int32", "int64")
DTYPES = FLOAT_DTYPES + INT_DTYPES + ("bool",)
ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
            "int8": 1, "uint8": 1, "int32": 4, "int64": 8, "bool": 1}


def dtype_class(dtype: str) -> str:
    """"float", "int" or "bool"."""
    if dtype in FLOAT_DTYPES:
        return "float"
    if dtype in INT_DTYPES:
        return "int"
    if dtype == "bool":
        return "bool"
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")


@dataclass(frozen=True)
class ValueType:
    domain: Domain
    shape: tuple[int, ...]
    dtype: str = "float32"
    per: TypeAxis | None = None    # only for Domain.WEIGHT: which type the rows are indexed by

    def __post_init__(self):
        if not isinstance(self.shape, tuple) or not all(isinstance(s, int) and s > 0 for s in self.shape):
            raise ValueError(f"shape must be a tuple of positive ints, got {self.shape!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {DTYPES}")
        if (self.domain is Domain.WEIGHT) != (self.per is not None):
            raise ValueError("a per-type axis is given exactly for WEIGHT values")

    @property
    def is_rows(self) -> bool:
        return self.domain in ROW_DOMAINS

    def with_shape(self, shape: tuple[int, ...]) -> "ValueType":
        return ValueType(self.domain, tuple(shape), self.dtype, self.per)

    def __str__(self) -> str:
        dom = f"{self.domain.value}[{self.per.value}]" if self.per else self.domain.value
        return f"{dom}{list(self.shape)} {self.dtype}"
