"""The shift linear in TIR, with its schedule rule (one rule in this file).

``shift_linear_primfunc(p_min, p_max, bits)`` is ``out[m, n] = sum_k term(m, n, k)`` over int32
Q16.16 ``x [M, K]`` and the packed weights ``w [N, ceil(K / per_word)]`` of
pigeon/shiftadd/quant.py, unpacked in the kernel:

    code = (w[n, k // per_word] >> (k % per_word) * bits) & (2^bits - 1)
    f    = code & (2^(bits-1) - 1)           0: a zero weight
    s    = min(1 - p_min - f, 31)            the shift is -p, p = p_min + f - 1
    g    = f == 0 ? 0 : (code >> (bits-1) ? -1 : 1)
    term = (x[m, k] >> s) * g

accumulated in int32 (the contract of pigeon/shiftadd/fixed.py: shift_linear_ref checks that no
partial sum can overflow, so the order of the sum does not change a bit).  The unpacking is its own
stage (``sh[k, n]``, ``sg[k, n]``: shift and sign, k-major), so a schedule can unpack a tile of
codes once into shared memory for a whole block of outputs.  M, N and K are symbolic: one build
serves every shape.

``shift_linear_f32_primfunc(p_min, p_max, bits)`` is the floating-point variant on float32 ``x``:
the stage ``wf[k, n] = f == 0 ? 0 : sign * 2^p`` (2^p built from its exponent bits, exact) and
``out = sum_k x[m, k] * wf[k, n]`` in float32 (each product exact barring under/overflow).

``ShiftLinearRule`` (a dlight ScheduleRule) schedules both for

- a CPU (llvm): the unpacking inlined into the sum, rows in parallel, the output columns split by 8
  and unrolled under the k loop;
- a GPU (cuda): a tiled GEMM.  The problem is padded to whole tiles (``pad_einsum``: the padding
  reads 0 and is never written back); a block of ``TY x TX`` = 16 x 16 threads owns a ``BM x BN``
  = 64 x 64 tile of outputs, each thread ``TM x TN`` = 4 x 4 of them in registers (rows
  ``ty + 16 i``, columns ``tx + 16 j``: conflict-free shared reads, coalesced stores); the K loop
  goes by ``BK`` = 16: per step the block stages the x tile ``[BM, BK]`` into shared memory and
  unpacks the ``[BK, BN]`` tile of codes into shared memory (the f32 weights, or the int shift and
  sign; rows padded by one word against bank conflicts), then every thread runs its 4 x 4 x 16
  multiply-adds (int: a shift and a multiply-add) from shared memory.  The launch:
  ``grid = (ceil(N / 64), ceil(M / 64))``, ``block = (16, 16)`` (:func:`launch_dims`).
This module imports TVM lazily and never torch.
"""
from __future__ import annotations

from .tvm_tiles import tile_reduction

NAME = "pigeon_shift_linear"
NAME_F32 = "pigeon_shift_linear_f32"
TM, TN, TY, TX, BK = 4, 4, 16, 16, 16
BM, BN = TY * TM, TX * TN
BLOCK = TX * TY      # threads per block of the CUDA schedule


def launch_dims(m: int, n: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(grid, block)`` of the CUDA schedule for ``[M, N]`` outputs."""
    return (max(1, -(-n // BN)), max(1, -(-m // BM)), 1), (TX, TY, 1)


def _check(p_min, p_max, bits, lo):
    if not (lo <= p_min <= p_max <= 0):
        raise ValueError(f"the shift kernel takes {lo} <= p_min <= p_max <= 0, got {p_min}..{p_max}")
    if bits not in (5, 6) or p_max - p_min + 1 > (1 << (bits - 1)) - 1:
        raise ValueError(f"shift range {p_min}..{p_max} does not fit {bits}-bit codes")


def _code(w, n, k, per, bits):
    return (w[n, k // per] >> ((k % per) * bits)) & ((1 << bits) - 1)


def shift_linear_primfunc(p_min: int = -15, p_max: int = 0, bits: int = 6, name: str = NAME):
    from tvm import te, tirx as T
    _check(p_min, p_max, bits, -30)
    per = 32 // bits
    m_, n_, k_ = (te.var(v, "int32") for v in "MNK")
    x = te.placeholder((m_, k_), "int32", name="x")
    w = te.placeholder((n_, (k_ + per - 1) // per), "int32", name="w")

    def shift(k, n):
        f = _code(w, n, k, per, bits) & ((1 << (bits - 1)) - 1)
        return T.Select(f == 0, T.const(0, "int32"), T.min(1 - p_min - f, 31))

    def sign(k, n):
        code = _code(w, n, k, per, bits)
        f = code & ((1 << (bits - 1)) - 1)
        return T.Select(f == 0, T.const(0, "int32"), 1 - ((code >> (bits - 1)) & 1) * 2)

    sh = te.compute((k_, n_), shift, name="sh")
    sg = te.compute((k_, n_), sign, name="sg")
    k = te.reduce_axis((0, k_), name="k")
    out = te.compute((m_, n_), lambda m, n: te.sum((x[m, k] >> sh[k, n]) * sg[k, n], axis=k), name="out")
    return te.create_prim_func([x, w, out]).with_attr("global_symbol", name)


def shift_linear_f32_primfunc(p_min: int = -15, p_max: int = 0, bits: int = 6, name: str = NAME_F32):
    """float32 ``out [M, N] = sum_k x[m, k] * sign * 2^p`` over the packed codes (module doc)."""
    from tvm import te, tirx as T
    _check(p_min, p_max, bits, -126)
    per = 32 // bits
    m_, n_, k_ = (te.var(v, "int32") for v in "MNK")
    x = te.placeholder((m_, k_), "float32", name="x")
    w = te.placeholder((n_, (k_ + per - 1) // per), "int32", name="w")

    def weight(k, n):
        code = _code(w, n, k, per, bits)
        f = code & ((1 << (bits - 1)) - 1)
        # 2^(p_min + f - 1) as float32 bits; the sign bit from the code's top bit
        scale = T.reinterpret("float32", ((f + (p_min - 1 + 127)) << 23) | (((code >> (bits - 1)) & 1) << 31))
        return T.Select(f == 0, T.const(0.0, "float32"), scale)

    wf = te.compute((k_, n_), weight, name="wf")
    k = te.reduce_axis((0, k_), name="k")
    out = te.compute((m_, n_), lambda m, n: te.sum(x[m, k] * wf[k, n], axis=k), name="out")
    return te.create_prim_func([x, w, out]).with_attr("global_symbol", name)


def _schedule_cuda(sch, stages):
    blk = sch.get_sblock("out")
    sch.pad_einsum(blk, [BM, BN, BK])
    for st in stages:
        sch.compute_inline(sch.get_sblock(st))
    staged = [sch.get_sblock("x_pad")] + [sch.get_sblock(st + "_pad") for st in stages]
    # the thread's TN weights of a k: one 128-bit shared load
    tile_reduction(sch, blk, sch.get_sblock("out_pad"), sch.get_loops(blk), staged, ty=TY, tx=TX, tm=TM, tn=TN,
                   br=BK, vector_reads=range(1, len(staged)))


def _schedule_llvm(sch, stages):
    for st in stages:
        sch.compute_inline(sch.get_sblock(st))
    blk = sch.get_sblock("out")
    m, n, k = sch.get_loops(blk)
    no, ni = sch.split(n, [None, 8])
    sch.reorder(m, no, k, ni)
    sch.parallel(m)
    sch.decompose_reduction(blk, k)
    sch.unroll(ni)


def _rule():
    from tvm import s_tir
    from tvm.s_tir import dlight as dl

    class ShiftLinearRule(dl.ScheduleRule):
        """CPU: parallel rows, columns by 8 unrolled; GPU: 64 x 64 tiles, 4 x 4 per thread (module doc)."""

        def apply(self, func, target, tunable):
            if not (func.attrs and func.attrs.get("global_symbol", "").startswith(NAME)):
                return None
            sch = s_tir.Schedule(func)
            stages = ["wf"] if func.attrs["global_symbol"].startswith(NAME_F32) else ["sh", "sg"]
            (_schedule_cuda if target.kind.name == "cuda" else _schedule_llvm)(sch, stages)
            return sch

    return ShiftLinearRule()


def scheduled_module(func, target):
    """``func`` scheduled by its rule for ``target`` (a tvm Target or a string), as an IRModule."""
    import tvm
    target = tvm.target.Target(target) if isinstance(target, str) else target
    sch = _rule().apply(func, target, False)
    if sch is None:
        raise ValueError(f"ShiftLinearRule does not apply to {func.attrs.get('global_symbol')!r}")
    return sch.mod
