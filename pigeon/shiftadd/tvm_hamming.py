"""Hamming scores in TIR, with its schedule rule (one rule in this file).

``hamming_primfunc()`` is ``out[i, j] = nbits - sum_w popcount(q[i, w] ^ k[j, w])`` over the int32
packed codes of pigeon/shiftadd/add.py (Tq, Tk, W symbolic; ``nbits`` a scalar argument after the
buffers: ``f(q, k, out, nbits)``; the CUDA form calls ``__popc``, see
``hamming_primfunc``).  ``HammingRule`` schedules it for llvm (query rows in parallel,
key columns by 8 unrolled under the word loop) or cuda (64 x 64 tiles, below).
TVM is imported lazily; no torch.

The CUDA schedule is tiled like tvm_shift.py's: a block of ``TY x TX`` = 16 x 16 threads owns a
``BI x BJ`` = 64 x 64 tile of scores, each thread ``TI x TJ`` = 4 x 4 of them in registers; per word
step the block stages the tile's 64 query words and 64 key words in shared memory (rows padded to
whole tiles by ``pad_einsum``: padding reads 0, is never written back), each thread reads its 4 + 4
words (one 128-bit shared load each) and runs 16 xor/popcounts.  Integer sums: bit-exact in any
order.  The launch: ``grid = (ceil(Tk / 64), ceil(Tq / 64))``, ``block = (16, 16)``
(:func:`launch_dims`).
"""
from __future__ import annotations

from .tvm_tiles import tile_reduction

NAME = "pigeon_hamming"
TI, TJ, TY, TX, BW = 4, 4, 16, 16, 1
BI, BJ = TY * TI, TX * TJ
BLOCK = TX * TY


def launch_dims(tq: int, tk: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(grid, block)`` of the CUDA schedule for ``[Tq, Tk]`` scores."""
    return (max(1, -(-tk // BJ)), max(1, -(-tq // BI)), 1), (TX, TY, 1)


def hamming_primfunc(target: str = "llvm", name: str = NAME):
    """``target`` "llvm" uses TIR's popcount intrinsic; "cuda" calls ``__popc`` directly: TVM 0.27's CUDA
    codegen has no lowering for ``tirx.popcount`` ("Unresolved call ... tirx.popcount")."""
    from tvm import te, tirx as T
    if target not in ("llvm", "cuda"):
        raise ValueError(f"hamming_primfunc: target is 'llvm' or 'cuda', got {target!r}")

    def popcount(x):
        return T.popcount(x) if target == "llvm" else T.call_pure_extern("int32", "__popc", x)

    tq, tk, words = (te.var(v, "int32") for v in ("Tq", "Tk", "W"))
    nbits = te.var("nbits", "int32")
    q = te.placeholder((tq, words), "int32", name="q")
    k = te.placeholder((tk, words), "int32", name="k")
    w = te.reduce_axis((0, words), name="w")
    diff = te.compute((tq, tk), lambda i, j: te.sum(popcount(q[i, w] ^ k[j, w]), axis=w), name="diff")
    out = te.compute((tq, tk), lambda i, j: nbits - diff[i, j], name="out")
    return te.create_prim_func([q, k, out, nbits]).with_attr("global_symbol", name)


def _schedule_cuda(sch):
    blk = sch.get_sblock("diff")
    sch.pad_einsum(blk, [BI, BJ, BW])
    sch.reverse_compute_inline(sch.get_sblock("out"))        # the unpadding copy writes nbits - diff
    staged = [sch.get_sblock("q_pad"), sch.get_sblock("k_pad")]
    tile_reduction(sch, blk, sch.get_sblock("diff_pad"), sch.get_loops(blk), staged, ty=TY, tx=TX, tm=TI, tn=TJ,
                   br=BW)


def _rule():
    from tvm import s_tir
    from tvm.s_tir import dlight as dl

    class HammingRule(dl.ScheduleRule):
        def apply(self, func, target, tunable):
            if not (func.attrs and func.attrs.get("global_symbol", "").startswith(NAME)):
                return None
            sch = s_tir.Schedule(func)
            blk, out = sch.get_sblock("diff"), sch.get_sblock("out")
            i, j = sch.get_loops(out)
            if target.kind.name == "cuda":
                _schedule_cuda(sch)
                return sch
            else:
                jo, ji = sch.split(j, [None, 8])
                sch.parallel(i)
                sch.compute_at(blk, jo)
                sch.unroll(ji)
            return sch

    return HammingRule()


def scheduled_module(func, target):
    """``func`` scheduled by its rule for ``target`` (a tvm Target or a string), as an IRModule."""
    import tvm
    target = tvm.target.Target(target) if isinstance(target, str) else target
    sch = _rule().apply(func, target, False)
    if sch is None:
        raise ValueError(f"HammingRule does not apply to {func.attrs.get('global_symbol')!r}")
    return sch.mod
