"""Tensor-core attention forward: AttentionInstance -> ``attention.mma.cu.jinja`` -> RenderedKernel.

The flash-attention-2 form on CuTe's sm80 atoms (cp.async, ldmatrix, mma.sync m16n8k16), which
run on sm_80 and later, sm_90 included.  Same parameters, block lists (the pattern's 64x64 lists)
and modifier code (:func:`pigeon.codegen.attention.modifier_code`) as the SIMT forward, so the
launcher binds both the same way; only the grid differs (one CTA per (query tile, head, batch)).

Schedule knobs (:class:`AttentionMmaConfig`, :func:`tuning`): the query tile (64 rows, or 128 rows
walking the union of two list rows' key blocks), 16-row m-tiles per warp, Q in registers or re-read
from shared memory, and the minimum CTAs per SM; and five code-form knobs, each reverting one part of
the template's rework between db8bc18 and 77791a9 (issue 8, the packed-document forward 2.09 -> 2.77 ms
on the H200): the pattern's full/partial softmax paths, dynamic shared memory, the merged block walk,
the stepped addressing, and (after 77791a9) the per-row modifier code (:data:`CODE_FORMS`).  Defaults per head dim (:data:`DEFAULTS`);
``PIGEON_ATTN_MMA_TUNE`` (or ``render_attention_mma(inst, knobs=...)``) overrides them for A/B runs
(benchmarks/tune_attention_mma.py).

:func:`unsupported` says why an instance cannot take this template (the SIMT one serves it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .cutlass_headers import source_tag
from .attention import PARAMS, AttentionInstance, ModifierCode, kernel_name, modifier_code
from .expr_c import storage_type
from .jinja import render as render_template
from .kernel_source import KernelParam, RenderedKernel

BLOCK_M = BLOCK_N = 64              # the pattern blocks (block-list rows) the template takes
TILE_M = (64, 128)                  # query rows per CTA
HEAD_DIMS = (64, 128)
FULL_BRANCHES = ("split", "inline", "always")   # the pattern check's code forms (Schedule.full_branch)
STATIC_SMEM_MAX = 48 * 1024         # the most __shared__ array bytes a kernel may declare
MMA_ATOMS = {"bfloat16": ("SM80_16x8x16_F32BF16BF16F32_TN", "__floats2bfloat162_rn", "__nv_bfloat162"),
             "float16": ("SM80_16x8x16_F32F16F16F32_TN", "__floats2half2_rn", "__half2")}


@dataclass(frozen=True)
class MmaTemplateConfig:
    """What both tensor-core attention templates (forward and backward) take."""
    name: str
    signature: str
    dtype: str
    mma: str
    pack: str
    vec2: str
    head_dim: int
    block_m: int
    block_n: int
    group: int
    packed: bool
    mods: ModifierCode
    cutlass_tag: str


@dataclass(frozen=True)
class AttentionMmaConfig(MmaTemplateConfig):
    q_in_registers: bool = True     # Q's fragments held across key blocks, or re-read from shared memory
    min_blocks: int = 2             # __launch_bounds__ minimum CTAs per SM (caps registers)
    warp_m_tiles: int = 1           # 16-row m-tiles per warp: block_m / (16 warp_m_tiles) warps per CTA
    list_block_m: int = BLOCK_M     # query rows per block-list row (block_m is the CTA's query tile)
    key_step: int = BLOCK_N         # keys per online-softmax step: block_n or block_n / 2
    full_branch: str = "split"      # the pattern check: "split" (full / partial softmax paths chosen per
    #                                 block), "inline" (one path, per-element `if (!full)`: db8bc18),
    #                                 "always" (one path, the check on every element, `full` unread)
    static_smem: bool = False       # __shared__ arrays (db8bc18) instead of extern dynamic shared memory
    plain_walk: bool = False        # 64-row tiles: the list row's entries in order, no per-step `mine`
    #                                 (db8bc18), instead of KeyBlocks' merge walk
    row_addr: bool = False          # per-row load_tile addresses and swz() per ldmatrix (db8bc18), instead
    #                                 of the stepped source pointer and XOR-offset ldmatrix addresses
    row_elem: bool = False          # the modifiers' query-row code per kept element (db8bc18), instead of
    #                                 once per thread row (634a233)


@dataclass(frozen=True)
class Schedule:
    """The forward's schedule knobs: ``block_m`` query rows per CTA (64, or 128 = two list rows),
    ``warp_m_tiles`` 16-row m-tiles per warp (1 or 2), Q in registers or in shared memory,
    ``min_blocks`` of ``__launch_bounds__``, ``key_step`` keys per online-softmax step (64, or 32:
    each key block's scores in two halves); and the code forms of :data:`CODE_FORMS` (``full_branch``,
    ``static_smem``, ``plain_walk``, ``row_addr``, ``row_elem``: the defaults are today's template, the others
    revert one part of it to its db8bc18 form each)."""
    block_m: int = 64
    warp_m_tiles: int = 1
    q_in_registers: bool = True
    min_blocks: int = 2
    key_step: int = BLOCK_N
    full_branch: str = "split"
    static_smem: bool = False
    plain_walk: bool = False
    row_addr: bool = False
    row_elem: bool = False

    def __post_init__(self):
        if self.block_m not in TILE_M or self.warp_m_tiles not in (1, 2) or self.min_blocks < 1 \
                or self.key_step not in (BLOCK_N, BLOCK_N // 2) or self.full_branch not in FULL_BRANCHES:
            raise ValueError(f"attention mma schedule {self}: block_m in {TILE_M}, warp_m_tiles 1 or 2, "
                             f"min_blocks >= 1, key_step {BLOCK_N} or {BLOCK_N // 2}, full_branch in {FULL_BRANCHES}")
        if self.plain_walk and self.block_m != BLOCK_M:
            raise ValueError(f"attention mma schedule {self}: walk_list (the plain walk of one list row) needs "
                             f"block_m {BLOCK_M} (a {self.block_m}-row tile walks the merge of its list rows)")

    def check(self, head_dim: int) -> "Schedule":
        """``self``, if it fits ``head_dim`` (static shared memory: at most 48 KiB), else ValueError."""
        if self.static_smem and self.shared_bytes(head_dim) > STATIC_SMEM_MAX:
            raise ValueError(f"attention mma schedule {self.tag()} at D={head_dim}: smem_static takes at most "
                             f"{STATIC_SMEM_MAX} bytes of __shared__ arrays, the tiles need {self.shared_bytes(head_dim)}")
        return self

    @property
    def threads(self) -> int:
        return 32 * self.block_m // (16 * self.warp_m_tiles)

    def shared_bytes(self, head_dim: int) -> int:
        """Shared memory: the Q tile [block_m][D] and the K and V tiles [64][D], 2-byte elements."""
        return (self.block_m + 2 * BLOCK_N) * head_dim * 2

    def launch_smem(self, head_dim: int) -> int:
        """The launch's dynamic shared memory bytes (0 with static ``__shared__`` arrays)."""
        return 0 if self.static_smem else self.shared_bytes(head_dim)

    def _forms(self) -> list[str]:
        """The knob words of the code forms that differ from the default (none: today's template)."""
        return [w for w, (field, value) in CODE_FORMS.items() if value != _DEFAULT_FORMS[field]
                and getattr(self, field) == value]

    def code(self) -> str:
        """A C-identifier suffix naming the schedule (kernel names differ per schedule; the default
        code forms add nothing, so today's kernel names and sources are unchanged)."""
        forms = "".join("_" + w for w in self._forms())
        return (f"m{self.block_m}w{self.threads // 32}{'r' if self.q_in_registers else 's'}b{self.min_blocks}"
                f"k{self.key_step}{forms}")

    def tag(self) -> str:
        """The knob string that selects this schedule (``PIGEON_ATTN_MMA_TUNE``)."""
        parts = [f"bm{self.block_m}", f"mt{self.warp_m_tiles}"]
        if not self.q_in_registers:
            parts.append("q_smem")
        return ",".join(parts + [f"minb{self.min_blocks}", f"ks{self.key_step}"] + self._forms())


# by head dim, from the H200 runs of benchmarks/tune_attention_mma.py
# (benchmarks/results/attention_mma_knobs_h200_b0611d6.md): at D=64 re-reading Q from shared memory
# and 3 CTAs per SM gave +13-17% over the plain 64-row form.  At D=128 the 64-row knobs moved it by
# under 3% (and 3 CTAs spill); the default is flash-attention 2's D=128 layout, 128-row tiles of 4 warps
# x 32 rows (each K/V fragment feeds two m-tiles: half the K/V shared-memory reads and global bytes
# per FLOP of the 64-row form), Q re-read from shared memory (Q fragments held for two m-tiles would
# need 64 more registers next to 128 of output), 2 CTAs per SM (255 registers each), and each 64-key
# block's scores in two 32-key softmax steps (flash-attention 2's 128 x 32 form: 32 score registers
# instead of 64; with 64 the kernel spills ~100-180 bytes, with 32 none).  Measured on the H200 at
# 0797018 (benchmarks/results/attention_mma_knobs_h200_0797018.md, B4 H32 S4096 bf16): that 128-row
# form ran 230 / 142 TFLOP/s dense / causal against the plain 64-row form's 245 / 163 (the 32-key
# steps' extra rescales and 246-255 registers), so D=128 stays on the plain 64-row form; the
# 128-row schedule is kept as the ``bm128`` knob.
# D=128 takes the one-path pattern check (full_inline): measured on the H200 at c43ced9
# (benchmarks/results/attention_doc_ab_h200_c43ced9.md, B4 H32 S4096 bf16) packed documents 2.108 ->
# 1.981 ms and causal 3.323 -> 3.242 ms against the split full/partial paths (14 KB less code); D=64
# was not measured and keeps the split paths.
DEFAULTS = {64: Schedule(64, 1, False, 3), 128: Schedule(full_branch="inline")}
# The code-form knobs (word -> (Schedule field, value)); the first word of each field is today's form.
# Issue 8 (the packed-document forward 2.09 ms at db8bc18 -> 2.77 at 77791a9 on the H200): each of the
# others reverts one part of the template's rework to its db8bc18 form, so an A/B of one process per
# setting (benchmarks/tune_attention_mma.py --variants document) tells which part costs what;
# "full_inline,smem_static,walk_list,addr_row,rows_elem" together render db8bc18's kernel text (64-row
# tiles, 64-key steps; up to comments, the one-step key loop and template<ROWS> of load_tile, and the
# modifiers' (batch, head) code of 634a233, which a causal or document pattern does not have).
CODE_FORMS = {
    "full_split": ("full_branch", "split"),     # the pattern check in a partial-block path, a full-block path without it
    "full_inline": ("full_branch", "inline"),   # one path, the check under a per-element `if (!full)` (db8bc18)
    "full_always": ("full_branch", "always"),   # one path, the check on every element (exact: a full block passes it)
    "smem_dyn": ("static_smem", False),         # extern dynamic shared memory
    "smem_static": ("static_smem", True),       # __shared__ arrays, no launch smem (db8bc18; at most 48 KiB)
    "walk_merge": ("plain_walk", False),        # KeyBlocks' merge of the tile's list rows, `mine` per step
    "walk_list": ("plain_walk", True),          # bm64: one list row's entries in order, no `mine` (db8bc18)
    "addr_step": ("row_addr", False),           # stepped cp.async source pointer, XOR-offset ldmatrix addresses
    "addr_row": ("row_addr", True),             # per-row source addresses, swz() per ldmatrix (db8bc18)
    "rows_hoist": ("row_elem", False),          # the modifiers' query-row code once per thread row (634a233)
    "rows_elem": ("row_elem", True),            # ... per kept element, (n, e) element loops (db8bc18)
}
_DEFAULT_FORMS = {"full_branch": "split", "static_smem": False, "plain_walk": False, "row_addr": False,
                  "row_elem": False}
KNOBS = ("default", "bm64", "bm128", "mt1", "mt2", "q_smem", "q_regs", "minb<N>", "ks32", "ks64", *CODE_FORMS)


def tuning(head_dim: int, knobs: str | None = None) -> Schedule:
    """The schedule of the forward at ``head_dim``: ``knobs`` (default: ``PIGEON_ATTN_MMA_TUNE``),
    comma-separated, or the per-head-dim default (:data:`DEFAULTS`) when neither is set.  A knob
    string starts from the plain 64-row form (4 warps x 16 rows, Q in registers, 2 CTAs per SM;
    ``""`` is that form) or, with ``default``, from the default; then ``bm64`` / ``bm128`` (query
    rows per CTA; ``bm128`` alone means 4 warps x 32 rows), ``mt1`` / ``mt2`` (16-row m-tiles per
    warp), ``q_smem`` / ``q_regs``, ``minb<N>``, ``ks32`` / ``ks64`` (keys per softmax step), and the
    code forms of :data:`CODE_FORMS` (``full_split`` / ``full_inline`` / ``full_always``, ``smem_dyn`` /
    ``smem_static``, ``walk_merge`` / ``walk_list``, ``addr_step`` / ``addr_row``, ``rows_hoist`` / ``rows_elem``).  A schedule that
    cannot be (``walk_list`` on 128-row tiles, ``smem_static`` over 48 KiB) is a ValueError."""
    import dataclasses
    import os
    if knobs is None:
        knobs = os.environ.get("PIGEON_ATTN_MMA_TUNE")
    if knobs is None:
        return DEFAULTS[head_dim]
    words = [w.strip() for w in knobs.split(",") if w.strip()]
    s = DEFAULTS[head_dim] if "default" in words else Schedule()
    kw = {}
    for w in words:
        if w == "default":
            continue
        if w in ("bm64", "bm128"):
            kw["block_m"] = int(w[2:])
        elif w in ("mt1", "mt2"):
            kw["warp_m_tiles"] = int(w[2:])
        elif w in ("q_smem", "q_regs"):
            kw["q_in_registers"] = w == "q_regs"
        elif w in ("ks32", "ks64"):
            kw["key_step"] = int(w[2:])
        elif w.startswith("minb") and w[4:].isdigit():
            kw["min_blocks"] = int(w[4:])
        elif w in CODE_FORMS:
            field, value = CODE_FORMS[w]
            kw[field] = value
        else:
            raise ValueError(f"PIGEON_ATTN_MMA_TUNE: unknown knob {w!r} in {knobs!r} (knobs: {', '.join(KNOBS)})")
    if kw.get("block_m") == 128 and "warp_m_tiles" not in kw:
        kw["warp_m_tiles"] = 2
    return dataclasses.replace(s, **kw).check(head_dim)


def unsupported(inst: AttentionInstance) -> str | None:
    """Why ``inst`` cannot run on the tensor-core forward, or None when it can."""
    if inst.dtype not in MMA_ATOMS:
        return f"dtype {inst.dtype} (tensor cores take bfloat16 and float16)"
    if inst.head_dim != inst.value_dim or inst.head_dim not in HEAD_DIMS:
        return f"head dims {inst.head_dim}/{inst.value_dim} (the template has {HEAD_DIMS}, equal for q and v)"
    if (inst.block_m, inst.block_n) != (BLOCK_M, BLOCK_N):
        return f"pattern blocks {inst.block_m}x{inst.block_n} (the template iterates {BLOCK_M}x{BLOCK_N})"
    return None


def _grid(block_m: int):
    def grid(sizes) -> tuple[int, int, int]:
        return (max(1, -(-int(sizes["max_q"]) // block_m)), int(sizes["heads"]), int(sizes["batch"]))
    return grid


def render_attention_mma(inst: AttentionInstance, knobs: str | None = None) -> RenderedKernel:
    """The tensor-core forward kernel of ``inst`` under the schedule :func:`tuning` gives for
    ``knobs`` (default: ``PIGEON_ATTN_MMA_TUNE``, else the head dim's default); cached per
    (instance, schedule)."""
    why = unsupported(inst)
    if why is not None:
        raise ValueError(f"attention instance {inst.key()} cannot use the tensor-core forward: {why}")
    return _render(inst, tuning(inst.head_dim, knobs).check(inst.head_dim))


@functools.lru_cache(maxsize=512)
def _render(inst: AttentionInstance, sched: Schedule) -> RenderedKernel:
    mc = modifier_code(inst, backward=False, indent=(4, 16, 24, 20, 24), head_indent=4)
    T = storage_type(inst.dtype)
    params = tuple(KernelParam(n, ct, decl.format(T=T), role) for n, ct, decl, role in PARAMS)
    mma, pack, vec2 = MMA_ATOMS[inst.dtype]
    name = kernel_name(inst) + "_mma_" + sched.code()
    cfg = AttentionMmaConfig(name=name, signature=", ".join(p.c for p in params), dtype=T, mma=mma, pack=pack,
                             vec2=vec2, head_dim=inst.head_dim, block_m=sched.block_m, block_n=BLOCK_N,
                             group=inst.group, packed=inst.packed, mods=mc, cutlass_tag=source_tag(),
                             q_in_registers=sched.q_in_registers, min_blocks=sched.min_blocks,
                             warp_m_tiles=sched.warp_m_tiles, list_block_m=inst.block_m, key_step=sched.key_step,
                             full_branch=sched.full_branch, static_smem=sched.static_smem,
                             plain_walk=sched.plain_walk, row_addr=sched.row_addr, row_elem=sched.row_elem)
    template = "attention.mma.cu.jinja"
    return RenderedKernel(name=name, source=render_template(template, cfg), params=params,
                          block=(sched.threads, 1, 1), grid=_grid(sched.block_m),
                          shared_mem=sched.launch_smem(inst.head_dim), template=template,
                          meta={"instance_key": inst.key(), "backward": False, "variant": "mma",
                                "schedule": sched.tag()})
