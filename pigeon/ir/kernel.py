"""Intra-operator IR: kernel instances.

A kernel instance is a frozen description of one launch family, complete enough for a template
(pigeon/templates) to generate code from it alone.
Instances hold no tensors; the runtime binds tensors to the parameters the instance names.

GemmInstance -- the segment / gather / scatter matmul with one weight per type (Hector's GEMM
template).  Two forms:

``form="rows"`` (forward, and dX in backward)::

    for each row i in [0, M), with t the segment of i (seg_ptr[t] <= i < seg_ptr[t+1]),
    for each head h in [0, H):
        a = X[gather[i], h, :]         if gather else X[i, h, :]            # [K]
        w = W[t, h]                    # [K, N]; with transpose_w the stored block is [N, K]
        y = a @ (w.T if transpose_w else w)                                  # [N]
        y = epilogue(y)
        Y[scatter[i], h, :] (+)= y     if scatter else Y[i, h, :] (+)= y

  "+=" when ``accumulate`` (atomic when ``scatter_unique`` is False), "=" otherwise.
  With ``typed=False`` there is one weight for all rows (W is [1, H, K, N]) and seg_ptr is [0, M].

``form="weight_grad"`` (dW in backward)::

    for each type t, head h:
        dW[t, h] (+)= sum over i in segment t of outer(X[gather[i], h, :], dY[scatter[i], h, :])
    here ``gather`` indexes X and ``scatter`` indexes dY (both are *read*); dW is [T, H, K, N].

Shapes are symbolic in M (rows) and T (types); K, N, H are static.  X is [*, H, K] and Y is
[*, H, N] row-major contiguous (H = 1 means a plain [*, K] matrix).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Literal, Sequence

from .expr import Expr, ExprError, unary, var
from .fns import FnError, unary_fns

DTypes = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class TileConfig:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 16
    warps: int = 4


@dataclass(frozen=True)
class GemmInstance:
    form: Literal["rows", "weight_grad"]
    k: int
    n: int
    heads: int = 1
    typed: bool = True
    gather: bool = False
    scatter: bool = False
    scatter_unique: bool = True
    transpose_w: bool = False
    accumulate: bool = False
    epilogue: Expr | None = None        # an expression of var("acc") applied before the store; unary fn
                                        # names ("leaky_relu:0.2", "scale:2") are read into one
    dtype: DTypes = "float32"           # dtype of X, W and Y
    acc_dtype: Literal["float32"] = "float32"
    tile: TileConfig = TileConfig()
    y_dtype: Literal["float32"] | None = None   # Y's dtype where it is not ``dtype``: float32 for a 16-bit
                                        # dense GEMM whose rows only elementwise kernels read
                                        # (passes/lower.py ``gemm_storage``); cuBLAS runs it, not the template

    @property
    def out_dtype(self) -> str:
        """The dtype of Y (rows form): ``y_dtype`` or ``dtype``."""
        return self.y_dtype or self.dtype

    def __post_init__(self):
        if isinstance(self.epilogue, (tuple, list)):
            object.__setattr__(self, "epilogue", epilogue_expr(self.epilogue))

    def not_dense(self) -> str | None:
        """None for a plain dense GEMM -- ``Y = X @ W`` (or ``W^T``), or its weight gradient
        ``dW = X^T dY``: untyped, no gather, scatter, heads, epilogue or accumulation -- which another
        library or code generator (cuBLAS, TVM's dlight: pigeon/passes/gemm_backend.py) can take
        over; else what makes it more (one line)."""
        why = [w for cond, w in ((self.typed, "typed (one weight per type)"),
                                 (self.gather, "gathers its rows"), (self.scatter, "scatters its rows"),
                                 (self.heads != 1, f"{self.heads} heads"), (self.epilogue is not None, "has an epilogue"),
                                 (self.accumulate, "accumulates into its output")) if cond]
        return "; ".join(why) or None

    def not_segmented(self) -> str | None:
        """None for a typed GEMM that a library can run one type segment at a time (cuBLAS:
        pigeon/runtime/family_gemm.py ``run_cublas_segments``): one head, no scatter, epilogue or
        accumulation (a gather is fine: rows are selected first); else what it has (one line)."""
        why = [w for cond, w in ((not self.typed, "untyped (a dense GEMM)"),
                                 (self.heads != 1, f"{self.heads} heads"), (self.scatter, "scatters its rows"),
                                 (self.epilogue is not None, "has an epilogue"),
                                 (self.accumulate, "accumulates into its output")) if cond]
        return "; ".join(why) or None

    def key(self) -> str:
        """Structural name of the instance: stable across processes, safe as a C identifier suffix."""
        # y_dtype at its default stays out of the text: it came after the other fields, and every
        # instance without it keeps the key (kernel names, cache entries) it had before
        text = repr(tuple((f.name, getattr(self, f.name)) for f in fields(self)
                          if not (f.name == "y_dtype" and self.y_dtype is None)))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def epilogue_expr(ops: Sequence[str]) -> Expr | None:
    """The expression of unary fns applied in order to the accumulator: ("leaky_relu:0.2",
    "scale:2") -> scale(leaky_relu(acc, 0.2), 2).  Names come from the fn registry."""
    e = var("acc")
    known = unary_fns()
    for op in ops:
        if not isinstance(op, str):
            raise ExprError(f"epilogue op {op!r} is not a string")
        name, sep, arg = op.partition(":")
        if name not in known:
            raise ExprError(f"unknown epilogue op {op!r}; known: {sorted(known)} (\"name\" or \"name:const\")")
        if known[name] and not sep:
            raise ExprError(f"epilogue op {op!r} needs a constant, e.g. '{name}:0.2'")
        if not known[name] and sep:
            raise ExprError(f"epilogue op {name!r} takes no constant, got {op!r}")
        c = None
        if known[name]:
            try:
                c = float(arg)
            except ValueError:
                raise ExprError(f"epilogue op {op!r}: {arg!r} is not a number") from None
        try:
            e = unary(name, e, c)
        except FnError as err:
            raise ExprError(str(err)) from None
    return None if not ops else e
