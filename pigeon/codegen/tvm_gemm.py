"""The dense GEMM as TIR, scheduled by TVM's dlight ``gpu.Matmul`` rule: the TVM candidate that
``pigeon compile --tune`` measures against pigeon's GEMM template for untyped, gather-free GEMMs
(RGCN's root weight ``x @ W_self``, its data gradient ``dy @ W_self^T``).

``TvmGemm(k, n, transpose_w, dtype)`` is ``y[M, n] = x[M, k] @ w`` with ``w`` ``[k, n]`` (or ``[n, k]``
with ``transpose_w``), products and sum in float32, one rounding to ``dtype`` at the store.  M is a
TIR variable: one kernel serves every row count, so sources can be made ahead of time on a machine
with TVM (the GPU machine has none) and carried in the kernel cache.

``scheduled(target)`` applies dlight's Matmul rule (TVM's own, not pigeon's: this is the point of
the candidate); ``launch_extents(mod)`` reads the schedule's thread bindings as small expression
trees in M (``["floordiv", ["add", "M", 31], 32]``), JSON-serialisable, which :func:`eval_extent`
evaluates at launch time without TVM.  This module imports TVM lazily and never torch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
TAGS = ("blockIdx.x", "blockIdx.y", "blockIdx.z", "threadIdx.x", "threadIdx.y", "threadIdx.z")
_OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
        "floordiv": lambda a, b: a // b, "floormod": lambda a, b: a % b, "min": min, "max": max}


def definition_digest() -> str:
    """Hash of this file: part of the key a generated source is recorded under."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


@dataclass(frozen=True)
class TvmGemm:
    k: int
    n: int
    transpose_w: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if not (isinstance(self.k, int) and isinstance(self.n, int) and self.k > 0 and self.n > 0):
            raise ValueError(f"TvmGemm: k and n are positive ints, got k={self.k!r} n={self.n!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"TvmGemm: dtype is one of {DTYPES}, got {self.dtype!r}")

    @property
    def symbol(self) -> str:
        return f"pigeon_tvm_gemm_k{self.k}_n{self.n}_{'t' if self.transpose_w else 'n'}_{self.dtype}"

    @property
    def kernel_name(self) -> str:
        """The CUDA kernel's name in the generated source (TVM appends ``_kernel``)."""
        return self.symbol + "_kernel"

    def describe(self) -> dict:
        return {"k": self.k, "n": self.n, "transpose_w": self.transpose_w, "dtype": self.dtype,
                "symbol": self.symbol, "rule": "dlight.gpu.Matmul"}

    def primfunc(self):
        from tvm import te
        m = te.var("M", "int32")
        x = te.placeholder((m, self.k), self.dtype, name="x")
        w = te.placeholder((self.n, self.k) if self.transpose_w else (self.k, self.n), self.dtype, name="w")
        r = te.reduce_axis((0, self.k), name="r")

        def wv(r_, j):
            return w[j, r_] if self.transpose_w else w[r_, j]
        acc = te.compute((m, self.n), lambda i, j: te.sum(x[i, r].astype("float32") * wv(r, j).astype("float32"),
                                                           axis=r), name="acc")
        y = te.compute((m, self.n), lambda i, j: acc[i, j].astype(self.dtype), name="y")
        return te.create_prim_func([x, w, y]).with_attr("global_symbol", self.symbol)

    def scheduled(self, target):
        """The IRModule scheduled by dlight's Matmul rule for a tvm cuda Target."""
        import tvm
        from tvm.s_tir import dlight as dl
        mod = tvm.IRModule({self.symbol: self.primfunc()})
        with target:
            out = dl.ApplyDefaultSchedule(dl.gpu.Matmul())(mod)
        if not _is_scheduled(out[self.symbol]):
            raise RuntimeError(f"{self.symbol}: dlight's Matmul rule did not schedule the GEMM (TVM {tvm.__version__})")
        return out


def _walk(node, visit) -> None:
    visit(node)
    for f in ("body", "block", "then_case", "else_case", "init"):
        child = getattr(node, f, None)
        if child is not None:
            _walk(child, visit)
    for child in getattr(node, "seq", None) or ():
        _walk(child, visit)


def _bindings(func) -> dict:
    from tvm import tirx
    found = {}

    def visit(node):
        if isinstance(node, tirx.For) and node.kind == tirx.ForKind.THREAD_BINDING:
            found[node.thread_binding.thread_tag] = node.extent
    _walk(func.body, visit)
    return found


def _is_scheduled(func) -> bool:
    return any(t.startswith("threadIdx") for t in _bindings(func))


def _tree(e):
    from tvm import tirx
    if isinstance(e, tirx.IntImm):
        return int(e.value)
    if isinstance(e, tirx.Var):
        return e.name
    for cls, name in ((tirx.Add, "add"), (tirx.Sub, "sub"), (tirx.Mul, "mul"), (tirx.FloorDiv, "floordiv"),
                      (tirx.FloorMod, "floormod"), (tirx.Min, "min"), (tirx.Max, "max")):
        if isinstance(e, cls):
            return [name, _tree(e.a), _tree(e.b)]
    raise ValueError(f"launch extent {e} ({type(e).__name__}) is not an integer expression pigeon can evaluate")


def launch_extents(mod, symbol: str) -> dict:
    """``{"grid": [x, y, z], "block": [x, y, z]}`` as expression trees in M, from the thread
    bindings of the scheduled ``mod`` (virtual threads must be 1: they do not launch)."""
    found = _bindings(mod[symbol])
    for tag, e in found.items():
        if tag.startswith("vthread") and _tree(e) != 1:
            raise ValueError(f"{symbol}: virtual thread {tag} of extent {e}: not supported")
        if not tag.startswith("vthread") and tag not in TAGS:
            raise ValueError(f"{symbol}: unknown thread binding {tag}")
    ext = {t: _tree(found[t]) if t in found else 1 for t in TAGS}
    block = [ext[t] for t in TAGS[3:]]
    if not all(isinstance(b, int) for b in block):
        raise ValueError(f"{symbol}: block extents {block} depend on M")
    return {"grid": [ext[t] for t in TAGS[:3]], "block": block}


def eval_extent(tree, sizes: dict) -> int:
    """Evaluate an extent tree (:func:`launch_extents`) for the shape variables ``sizes``."""
    if isinstance(tree, int):
        return tree
    if isinstance(tree, str):
        return int(sizes[tree])
    op, a, b = tree
    return int(_OPS[op](eval_extent(a, sizes), eval_extent(b, sizes)))
