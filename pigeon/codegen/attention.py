"""CUDA attention kernels: AttentionInstance -> Jinja2 template -> RenderedKernel.

One template today, ``attention.simt.cu.jinja`` (the forward, one thread per query row, online
softmax over the key blocks the pattern lists).  The traced modifiers and the pattern's
elementwise mask are rendered by the one expression emitter (pigeon/codegen/expr_c.py), with the
attention index variables and the score bound to the kernel's loop variables; parts that depend
on the query row alone are hoisted out of the key loop.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, fields

from ..ir.expr import Expr
from ..ir.expr_grad import derivative
from .expr_c import ExprCodegenError, ExprEmitter, RowBinding, Scope, const_idx, storage_type
from .jinja import render as render_template
from .kernel_source import KernelParam, RenderedKernel

BLOCK = 128
MAX_GRID = 1 << 16
DTYPES = ("float32", "bfloat16", "float16")


class AttentionCodegenError(ExprCodegenError):
    pass


@dataclass(frozen=True)
class AttentionInstance:
    """One attention forward kernel: everything that changes its code (shapes that only change
    the launch, such as sequence lengths and head counts, are arguments)."""
    head_dim: int
    value_dim: int
    dtype: str = "bfloat16"
    group: int = 1                       # query heads per key/value head
    packed: bool = False                 # cu_seqlens layout
    block_m: int = 64
    block_n: int = 64
    score_mod: Expr | None = None        # of var("score") and batch/head/query/key
    mask_mod: Expr | None = None         # bool, of batch/head/query/key
    pattern_mask: Expr | None = None     # bool, of head/query/key and var("kv_shift")
    # the pattern's class name ("" without one): "Causal", "SlidingWindow", "S2" (closed form: the
    # lists come from the formula) or "BlockList", "TopK" (the lists are data given at run time); a
    # kernel that iterates key tiles by a formula (attention.sm90) needs to know which
    pattern_kind: str = ""

    def key(self) -> str:
        # pattern_kind enters the key only when set, so the keys (and the disk-cache entries) of the
        # instances without a pattern stay what they were before the field existed
        text = repr(tuple((f.name, getattr(self, f.name).digest if isinstance(getattr(self, f.name), Expr)
                           else getattr(self, f.name)) for f in fields(self)
                          if not (f.name == "pattern_kind" and not self.pattern_kind)))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AttentionConfig:
    name: str
    signature: str
    dtype: str
    block: int
    head_dim: int
    value_dim: int
    group: int
    block_m: int
    block_n: int
    packed: bool
    root_code: str
    row_code: str
    pattern_code: str
    pattern_value: str
    mask_code: str
    mask_value: str
    score_code: str
    score_value: str
    dscore_value: str = ""
    helper_code: str = ""


def check_instance(inst: AttentionInstance) -> None:
    if inst.dtype not in DTYPES:
        raise AttentionCodegenError(f"attention kernel dtype must be one of {DTYPES}, got {inst.dtype!r}")
    for name in ("head_dim", "value_dim", "group", "block_m", "block_n"):
        v = getattr(inst, name)
        if not isinstance(v, int) or v < 1:
            raise AttentionCodegenError(f"attention kernel {name} must be a positive int, got {v!r}")
    for name, want in (("score_mod", "float"), ("mask_mod", "bool"), ("pattern_mask", "bool")):
        e = getattr(inst, name)
        if e is None:
            continue
        if (e.dtype == "bool") != (want == "bool") or e.shape != ():
            raise AttentionCodegenError(f"attention {name} must be a scalar {want} expression, got {e.dtype}{list(e.shape)}")
        for n in e.toposort():
            if n.op == "load":
                raise AttentionCodegenError(f"attention {name} reads buffer {n.buffer.name}: modifiers cannot "
                                            "capture tensors yet")


def kernel_name(inst: AttentionInstance) -> str:
    return f"pigeon_attn_{inst.key()}"


# the sizes and strides every attention kernel takes, forward and backward, in this order (the
# launcher binds them by role; a kernel's list-row count follows SIZE_PARAMS)
SIZE_PARAMS = (
    ("num_batch", "int32", "int", "size:batch"), ("num_heads", "int32", "int", "size:heads"),
    ("max_q", "int32", "int", "size:max_q"), ("seq_kv", "int32", "int", "size:seq_kv"),
    ("list_batch", "int32", "int", "size:list_batch"), ("list_heads", "int32", "int", "size:list_heads"),
)
STRIDE_PARAMS = (
    ("q_sb", "int64", "long long", "stride:q_b"), ("q_sr", "int64", "long long", "stride:q_r"),
    ("q_sh", "int64", "long long", "stride:q_h"), ("k_sb", "int64", "long long", "stride:k_b"),
    ("k_sr", "int64", "long long", "stride:k_r"), ("k_sh", "int64", "long long", "stride:k_h"),
    ("v_sb", "int64", "long long", "stride:v_b"), ("v_sr", "int64", "long long", "stride:v_r"),
    ("v_sh", "int64", "long long", "stride:v_h"), ("o_sb", "int64", "long long", "stride:o_b"),
    ("o_sr", "int64", "long long", "stride:o_r"), ("o_sh", "int64", "long long", "stride:o_h"),
    ("lse_sb", "int64", "long long", "stride:lse_b"), ("lse_sh", "int64", "long long", "stride:lse_h"),
    ("scale", "float32", "float", "scale:scale"),
)

PARAMS = (
    ("O", "ptr", "{T}* __restrict__", "out:O"), ("LSE", "ptr", "float* __restrict__", "out:LSE"),
    ("Q", "ptr", "const {T}* __restrict__", "in:Q"), ("K", "ptr", "const {T}* __restrict__", "in:K"),
    ("V", "ptr", "const {T}* __restrict__", "in:V"),
    ("blk_ptr", "ptr", "const int* __restrict__", "lists:ptr"), ("blk_col", "ptr", "const int* __restrict__", "lists:col"),
    ("blk_full", "ptr", "const int* __restrict__", "lists:full"),
    ("cu_seqlens", "ptr", "const int* __restrict__", "lists:cu_seqlens"),
    *SIZE_PARAMS,
    ("list_qblocks", "int32", "int", "size:list_qblocks"),
    *STRIDE_PARAMS,
)


def _grid(threads_of):
    def grid(sizes) -> tuple[int, int, int]:
        n = threads_of(sizes)
        return (max(1, min(MAX_GRID, -(-n // BLOCK))), 1, 1)
    return grid


BACKWARD_PARAMS = (
    ("dQ", "ptr", "{T}* __restrict__", "out:dQ"), ("dK", "ptr", "float* __restrict__", "out:dK"),
    ("dV", "ptr", "float* __restrict__", "out:dV"), ("Q", "ptr", "const {T}* __restrict__", "in:Q"),
    ("K", "ptr", "const {T}* __restrict__", "in:K"), ("V", "ptr", "const {T}* __restrict__", "in:V"),
    ("O", "ptr", "const {T}* __restrict__", "in:O"), ("dO", "ptr", "const {T}* __restrict__", "in:dO"),
    ("LSE", "ptr", "const float* __restrict__", "in:LSE"),
) + tuple(p for p in PARAMS if p[3].split(":")[0] not in ("out", "in"))


@functools.lru_cache(maxsize=512)
def render_attention(inst: AttentionInstance) -> RenderedKernel:
    """The CUDA forward kernel of ``inst`` (cached per instance)."""
    return _render(inst, backward=False)


@functools.lru_cache(maxsize=512)
def render_attention_backward(inst: AttentionInstance) -> RenderedKernel:
    """The CUDA backward kernel of ``inst`` (dQ, dK, dV; cached per instance)."""
    return _render(inst, backward=True)


@dataclass(frozen=True)
class ModifierCode:
    """The traced modifiers and the pattern's mask of one instance as C code, for any attention
    template: variables ``b, h, i`` (batch, query head, query row), ``kv`` (key), ``s`` (the
    scaled score) and ``kv_shift`` must be in scope; ``*_code`` are statements, ``*_value`` the
    expressions to test or assign after them.  Scopes, outermost first: root (constants), head
    (``b``, ``h``, ``kv_shift``: once per CTA / per (batch, head) in a tensor-core template, e.g.
    ALiBi's slope), row (``i``: once per query row), then the key and the score; a template that
    has no separate (batch, head) level pastes ``head_code`` just before ``row_code``."""
    root_code: str        # at kernel level
    row_code: str         # per query row (i; after head_code)
    pattern_code: str
    pattern_value: str    # "" without a pattern mask
    mask_code: str
    mask_value: str       # "true" without a mask_mod
    score_code: str
    score_value: str      # "s" without a score_mod
    dscore_value: str     # d score_mod / d s ("1.f" without one); "" for a forward
    head_code: str = ""   # per (batch, query head): b, h, kv_shift
    helper_code: str = ""  # file-scope definitions of the approximation helpers the code calls


def approx_math(inst: AttentionInstance) -> bool:
    """Whether ``inst``'s modifier code takes hardware approximations (expr_c.APPROX_C): bf16 and
    fp16 kernels only, whose scores' probabilities are rounded to 8 (11) bits anyway."""
    return inst.dtype in ("bfloat16", "float16")


def modifier_code(inst: AttentionInstance, backward: bool, indent: tuple[int, int, int, int, int] = (4, 8, 20, 16, 16),
                  head_indent: int | None = None) -> ModifierCode:
    """``inst``'s modifier code, rendered by the one expression emitter; ``indent``: the columns of
    the root, row, pattern, mask and score code; ``head_indent`` that of the (batch, head) code
    (default: the row's)."""
    check_instance(inst)
    indices = {"batch": RowBinding("b", frozenset({"b"})), "head": RowBinding("h", frozenset({"h"})),
               "query": RowBinding("i", frozenset({"i"})), "key": RowBinding("kv", frozenset({"kv"})),
               "score": RowBinding("s", frozenset({"s"})), "kv_shift": RowBinding("kv_shift", frozenset({"b"}))}
    em = ExprEmitter({}, "attention", indices, approx_math=approx_math(inst))
    root = Scope((), None, "kernel")
    head = root.child({"b", "h"}, "batch and head")
    row = head.child({"i"}, "query row")
    kv_pattern = row.child({"kv"}, "key (pattern)")
    kv_mask = row.child({"kv"}, "key (mask)")
    kv_score = kv_mask.child({"s"}, "key (score)")

    def value(e, scope, default):
        if e is None:
            return default
        try:
            return em.eval(e, const_idx(0), scope).code
        except ExprCodegenError as err:
            raise AttentionCodegenError(f"attention modifier: {err}") from err
    pattern_value = value(inst.pattern_mask, kv_pattern, "")
    mask_value = value(inst.mask_mod, kv_mask, "true")
    score_value = value(inst.score_mod, kv_score, "s")
    dscore_value = ""
    if backward:
        dscore_value = value(derivative(inst.score_mod, "score"), kv_score, "1.f") if inst.score_mod is not None \
            else "1.f"
    if em.buffers or em.graph_arrays:         # pragma: no cover - check_instance refuses loads
        raise AttentionCodegenError("attention modifiers cannot read buffers")
    r, w, p, m, c = indent
    return ModifierCode(root.code(r), row.code(w), kv_pattern.code(p), pattern_value, kv_mask.code(m), mask_value,
                        kv_score.code(c), score_value, dscore_value, head.code(w if head_indent is None else head_indent),
                        em.helper_code())


def _render(inst: AttentionInstance, backward: bool) -> RenderedKernel:
    mc = modifier_code(inst, backward)
    T = storage_type(inst.dtype)
    table = BACKWARD_PARAMS if backward else PARAMS
    params = tuple(KernelParam(n, ct, decl.format(T=T), role) for n, ct, decl, role in table)
    name = kernel_name(inst) + ("_bwd" if backward else "")
    cfg = AttentionConfig(
        name=name, signature=", ".join(p.c for p in params), dtype=T, block=BLOCK, head_dim=inst.head_dim,
        value_dim=inst.value_dim, group=inst.group, block_m=inst.block_m, block_n=inst.block_n, packed=inst.packed,
        root_code=mc.root_code, row_code="\n".join(x for x in (mc.head_code, mc.row_code) if x), pattern_code=mc.pattern_code, pattern_value=mc.pattern_value,
        mask_code=mc.mask_code, mask_value=mc.mask_value, score_code=mc.score_code, score_value=mc.score_value,
        dscore_value=mc.dscore_value, helper_code=mc.helper_code)
    template = "attention_bwd.simt.cu.jinja" if backward else "attention.simt.cu.jinja"
    source = render_template(template, cfg)
    grid = _grid(lambda sizes: int(sizes["batch"]) * int(sizes["heads"]) * int(sizes["max_q"]))
    return RenderedKernel(name=name, source=source, params=params, block=(BLOCK, 1, 1), grid=grid,
                          template=template, meta={"instance_key": inst.key(), "backward": backward})
