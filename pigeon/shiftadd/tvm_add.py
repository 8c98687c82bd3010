"""The add primitive's masked accumulation in TIR, with its schedule rule (one rule in this file).

``code_accumulate_primfunc()`` is, for G independent problems (batch x heads),

    out[g, m, n] = sum_t ((codes[g, t, m // 32] >> (m % 32)) & 1) ? v[g, t, n] : 0

over the int32 packed {0, 1} codes of pigeon/shiftadd/add.py (``codes [G, T, ceil(nbits / 32)]``,
bit m of token t) and float32 ``v [G, T, Nv]``: ``out [G, nbits, Nv]`` = B^T V with B the unpacked
bits, a select and an add per term, no multiply (ShiftAddViT's ``matmask``), summed in float32
over t in ascending order from +0 (so every schedule gives the same bits: each output is one
thread's sequential sum, and a padded or unset term adds +0, which changes no sum).  The unpacking
is its own stage (``bit[g, t, m]``), so a schedule can unpack a tile of codes once into shared
memory for a block of outputs.  G, T, W, nbits and Nv are symbolic.  ``AccumulateRule`` schedules it

- for llvm: the unpacking inlined, problems x rows in parallel, n by 8 unrolled under t;
- for cuda: a tiled GEMM as tvm_shift.py's.  Padded to whole tiles (``pad_einsum``: padding reads
  0 bits, never written back); a block of ``TY x TX`` = 16 x 16 threads owns a ``BM x BN`` = 64 x
  64 tile of one problem's outputs, each thread ``TM x TN`` = 4 x 4 of them in registers; the t
  loop goes by ``BT`` = 16: per step the block unpacks the ``[BT, BM]`` bits and stages the ``[BT,
  BN]`` tile of v in shared memory, then every thread runs its 4 x 4 x 16 select-adds from there
  (the 4 bits and the 4 values of a t each one 128-bit shared load).  The launch: ``grid =
  (ceil(Nv / 64), ceil(nbits / 64), G)``, ``block = (16, 16)`` (:func:`launch_dims`).

TVM is imported lazily; no torch.
"""
from __future__ import annotations

from .tvm_tiles import tile_reduction

NAME = "pigeon_code_accumulate"
TM, TN, TY, TX, BT = 4, 4, 16, 16, 16
BM, BN = TY * TM, TX * TN
BLOCK = TX * TY


def launch_dims(g: int, nbits: int, nv: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(grid, block)`` of the CUDA schedule for G problems of ``[nbits, Nv]`` outputs."""
    return (max(1, -(-nv // BN)), max(1, -(-nbits // BM)), max(1, g)), (TX, TY, 1)


def code_accumulate_primfunc(name: str = NAME):
    from tvm import te, tirx as T
    g_, t_, w_, m_, n_ = (te.var(v, "int32") for v in ("G", "T", "W", "nbits", "Nv"))
    codes = te.placeholder((g_, t_, w_), "int32", name="codes")
    v = te.placeholder((g_, t_, n_), "float32", name="v")
    bit = te.compute((g_, t_, m_), lambda g, t, m: (codes[g, t, m // 32] >> (m % 32)) & 1, name="bit")
    t = te.reduce_axis((0, t_), name="t")
    out = te.compute((g_, m_, n_), lambda g, m, n: te.sum(
        T.Select(bit[g, t, m] == 1, v[g, t, n], T.const(0.0, "float32")), axis=t), name="out")
    return te.create_prim_func([codes, v, out]).with_attr("global_symbol", name)


def _schedule_cuda(sch):
    blk = sch.get_sblock("out")
    sch.pad_einsum(blk, [1, BM, BN, BT])
    sch.compute_inline(sch.get_sblock("bit"))
    staged = [sch.get_sblock("bit_pad"), sch.get_sblock("v_pad")]
    # a thread's TM bits and TN values of a t: 128-bit loads
    tile_reduction(sch, blk, sch.get_sblock("out_pad"), sch.get_loops(blk), staged, ty=TY, tx=TX, tm=TM, tn=TN,
                   br=BT, vector_reads=range(len(staged)))


def _schedule_llvm(sch):
    sch.compute_inline(sch.get_sblock("bit"))
    blk = sch.get_sblock("out")
    g, m, n, t = sch.get_loops(blk)
    no, ni = sch.split(n, [None, 8])
    sch.reorder(g, m, no, t, ni)
    sch.parallel(sch.fuse(g, m))
    sch.decompose_reduction(blk, t)
    sch.unroll(ni)


def _rule():
    from tvm import s_tir
    from tvm.s_tir import dlight as dl

    class AccumulateRule(dl.ScheduleRule):
        """CPU: parallel problems x rows, n by 8 unrolled; GPU: 64 x 64 tiles, 4 x 4 per thread (module doc)."""

        def apply(self, func, target, tunable):
            if not (func.attrs and func.attrs.get("global_symbol", "").startswith(NAME)):
                return None
            sch = s_tir.Schedule(func)
            (_schedule_cuda if target.kind.name == "cuda" else _schedule_llvm)(sch)
            return sch

    return AccumulateRule()


def scheduled_module(func, target):
    """``func`` scheduled by its rule for ``target`` (a tvm Target or a string), as an IRModule."""
    import tvm
    target = tvm.target.Target(target) if isinstance(target, str) else target
    sch = _rule().apply(func, target, False)
    if sch is None:
        raise ValueError(f"AccumulateRule does not apply to {func.attrs.get('global_symbol')!r}")
    return sch.mod
