"""Token dispatch and combine of the ShiftAdd mixture MLP (``shiftadd.moe.cu.jinja``): config -> CUDA source.

One template family, three kinds (the template's head gives the exact semantics):

- ``dispatch``: ``buf[r] = x[src[r] // k]`` (times ``scale[src[r]]`` when ``scaled``; 0 where
  ``src[r] < 0``) for the rows r of the expert-sorted buffer, one launch;
- ``combine``: ``out[t] = sum_j gate[t, j] * y_e[r]`` over the k slots ``s = slot[t, j] = e * C + r``
  of token t (``scaled`` False: gate 1; ``s < 0``: skipped), float32 accumulation, each row written
  once (a gather per token, no atomics), reading the ``experts`` expert outputs through one
  pointer each.

- ``plan``: the layout itself from the expert ids ``[T, k]`` (pigeon/shiftadd/moe.py route's
  ``slot``, ``src`` and the per-expert counts), one block of 256 threads (chunk counts, a scan over
  the threads per expert, the ranks), so routing is one launch and no host read.  ``layout``
  "compact" (plan only): the kept rows packed by expert with no padding (row base[e] + rank) and
  one more output ``ends [E]``, the group ends ``torch._grouped_mm`` takes (moe.route's compact
  layout); dispatch and combine serve both layouts unchanged (they read src / slot only; the
  compact combine takes one output of R rows, ``experts`` 1).

The backward of dispatch is an unscaled combine and the backward of combine a scaled dispatch
(pigeon/shiftadd/moe.py).  :func:`config_for` picks 16-byte vectors when the row length allows
(``D * itemsize % 16 == 0``), else scalar accesses.  The launch
(pigeon/runtime/shiftadd_kernel.py ``moe_dispatch`` / ``moe_combine``): ``grid = ceil(rows / 8)``
blocks of 256 threads, 32 threads per row.  No torch here."""
from __future__ import annotations

from dataclasses import dataclass

from .expr_c import storage_type
from .jinja import render
from .kernel_source import DTYPE_TAG, KernelParam, RenderedKernel

TEMPLATE = "shiftadd.moe.cu.jinja"
KINDS = ("dispatch", "combine", "plan")
LAYOUTS = ("capacity", "compact")
INDEX = ("int64", "int32")
DTYPES = ("bfloat16", "float16", "float32")
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
BLOCK, TPR = 256, 32
MAX_EXPERTS = 16


class MoeConfigError(ValueError):
    pass


@dataclass(frozen=True)
class MoeConfig:
    kind: str
    dtype: str
    vec: int
    scaled: bool
    experts: int = 1
    index: str = "int64"
    layout: str = "capacity"
    tpr: int = TPR
    block: int = BLOCK

    def __post_init__(self):
        if self.kind not in KINDS:
            raise MoeConfigError(f"MoE kernel: kind is one of {KINDS}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise MoeConfigError(f"MoE {self.kind} kernel: dtype is one of {DTYPES}, got {self.dtype!r}")
        if self.index not in INDEX:
            raise MoeConfigError(f"MoE {self.kind} kernel: index is one of {INDEX}, got {self.index!r}")
        if self.layout not in LAYOUTS or (self.kind != "plan" and self.layout != "capacity"):
            raise MoeConfigError(f"MoE {self.kind} kernel: layout is one of {LAYOUTS} (plan) or 'capacity' "
                                 f"(dispatch / combine read the layout through src / slot), got {self.layout!r}")
        if self.kind == "plan" and (self.dtype, self.vec, self.scaled) != ("float32", 1, False):
            raise MoeConfigError("MoE plan kernel: dtype float32, vec 1, scaled False (unused fields)")
        if self.vec not in (1, 16 // ITEMSIZE[self.dtype]):
            raise MoeConfigError(f"MoE {self.kind} kernel: vec is 1 or {16 // ITEMSIZE[self.dtype]} for {self.dtype}, "
                                 f"got {self.vec!r}")
        if not isinstance(self.experts, int) or not 1 <= self.experts <= MAX_EXPERTS or \
                (self.kind == "dispatch" and self.experts != 1):
            raise MoeConfigError(f"MoE {self.kind} kernel: experts is 1..{MAX_EXPERTS} (dispatch: 1), "
                                 f"got {self.experts!r}")
        if self.tpr != TPR or self.block != BLOCK:
            raise MoeConfigError(f"MoE {self.kind} kernel: tpr {TPR} and block {BLOCK}, got {self.tpr}, {self.block}")

    @property
    def rows(self) -> int:
        return self.block // self.tpr

    @property
    def name(self) -> str:
        short = DTYPE_TAG[self.dtype]
        if self.kind == "plan":
            return f"pigeon_moe_plan_{self.index}_e{self.experts}{'_compact' if self.layout == 'compact' else ''}"
        e = f"_e{self.experts}" if self.kind == "combine" else ""
        return f"pigeon_moe_{self.kind}_{short}_v{self.vec}{'_scaled' if self.scaled else ''}{e}"


def vec_for(d: int, dtype: str) -> int:
    """16-byte vectors when a row of ``d`` elements is a whole number of them, else 1."""
    return 16 // ITEMSIZE[dtype] if (d * ITEMSIZE[dtype]) % 16 == 0 else 1


def config_for(kind: str, d: int, dtype: str, scaled: bool, experts: int = 1) -> MoeConfig:
    if dtype not in DTYPES:
        raise MoeConfigError(f"MoE {kind} kernel: dtype is one of {DTYPES}, got {dtype!r}")
    return MoeConfig(kind, dtype, vec_for(d, dtype), bool(scaled), experts)


def plan_config(experts: int, index: str = "int64", layout: str = "capacity") -> MoeConfig:
    return MoeConfig("plan", "float32", 1, False, experts, index, layout)


def params(cfg: MoeConfig) -> tuple[KernelParam, ...]:
    t = storage_type(cfg.dtype)
    if cfg.kind == "plan":
        ends = (KernelParam("ends", "ptr", "int* __restrict__", "buffer:ends"),) if cfg.layout == "compact" else ()
        return (KernelParam("slot", "ptr", "int* __restrict__", "buffer:slot"),
                KernelParam("src", "ptr", "int* __restrict__", "buffer:src"),
                KernelParam("counts", "ptr", "int* __restrict__", "buffer:counts")) + ends + \
               (KernelParam("ids", "ptr", f"const {storage_type(cfg.index)}* __restrict__", "buffer:ids"),
                KernelParam("T", "int32", "int", "size:T"),
                KernelParam("k", "int32", "int", "size:k"),
                KernelParam("C", "int32", "int", "size:C"))
    if cfg.kind == "dispatch":
        return (KernelParam("buf", "ptr", f"{t}* __restrict__", "buffer:buf"),
                KernelParam("x", "ptr", f"const {t}* __restrict__", "buffer:x"),
                KernelParam("src", "ptr", "const int* __restrict__", "buffer:src"),
                KernelParam("scale", "ptr", "const float* __restrict__", "buffer:scale"),
                KernelParam("R", "int32", "int", "size:R"),
                KernelParam("D", "int32", "int", "size:D"),
                KernelParam("k", "int32", "int", "size:k"))
    ys = tuple(KernelParam(f"y{e}", "ptr", f"const {t}* __restrict__", f"buffer:y{e}") for e in range(cfg.experts))
    return ((KernelParam("out", "ptr", f"{t}* __restrict__", "buffer:out"),) + ys +
            (KernelParam("slot", "ptr", "const int* __restrict__", "buffer:slot"),
             KernelParam("gate", "ptr", "const float* __restrict__", "buffer:gate"),
             KernelParam("T", "int32", "int", "size:T"),
             KernelParam("D", "int32", "int", "size:D"),
             KernelParam("C", "int32", "int", "size:C"),
             KernelParam("k", "int32", "int", "size:k")))


def render_moe(cfg: MoeConfig) -> RenderedKernel:
    ps = params(cfg)
    source = render(TEMPLATE, cfg, name=cfg.name, signature=", ".join(p.c for p in ps))
    rows = cfg.rows if cfg.kind != "plan" else 1 << 62          # plan: one block
    return RenderedKernel(name=cfg.name, source=source, params=ps, block=(cfg.block, 1, 1),
                          grid=lambda n: (max(1, -(-int(n) // rows)), 1, 1), template=TEMPLATE,
                          meta={"config": cfg.__dict__.copy()})


def prebuild_configs(experts: int = 2) -> list[MoeConfig]:
    """The configs the mixture MLP runs with vectorized rows: both kinds, scaled or not, three dtypes
    (combine over E outputs for the capacity layout, over 1 for the compact one), the plans of both layouts."""
    return [MoeConfig(kind, d, 16 // ITEMSIZE[d], s, n)
            for kind in ("dispatch", "combine") for d in DTYPES for s in (False, True)
            for n in ((1,) if kind == "dispatch" else (experts, 1))] + \
        [plan_config(experts, i, lay) for i in INDEX for lay in LAYOUTS]
