"""The shift linear in TIR, with its schedule rule (one rule in this file).

``shift_linear_primfunc(p_min, p_max, bits)`` is ``out[m, n] = sum_k term(m, n, k)`` over int32
Q16.16 ``x [M, K]`` and the packed weights ``w [N, ceil(K / per_word)]`` of
pigeon/shiftadd/quant.py, unpacked in the kernel:

    code = (w[n, k // per_word] >> (k % per_word) * bits) & (2^bits - 1)
    f    = code & (2^(bits-1) - 1)           0: a zero weight
    v    = x[m, k] >> (1 - p_min - f)        the shift is -p, p = p_min + f - 1
    term = f == 0 ? 0 : (code >> (bits-1) ? -v : v)

accumulated in int32 (the contract of pigeon/shiftadd/fixed.py: shift_linear_ref checks that no
partial sum can overflow).  M, N and K are symbolic: one build serves every shape.

``shift_linear_f32_primfunc(p_min, p_max, bits)`` is the floating-point variant on float32 ``x``:
``term = f == 0 ? 0 : (neg ? -x : x) * 2^p`` (2^p built from its exponent bits, so each term is
exact barring under/overflow), summed in float32 over k in ascending order.

``ShiftLinearRule`` (a dlight ScheduleRule) schedules it for a CPU (llvm: rows in parallel, the
output columns split by 8 and unrolled under the k loop) or a GPU (cuda: one thread per output,
128 per block, the sum in a register).  This module imports TVM lazily and never torch.
"""
from __future__ import annotations

NAME = "pigeon_shift_linear"
NAME_F32 = "pigeon_shift_linear_f32"
BLOCK = 128          # threads per block of the CUDA schedule: one thread per output


def launch_grid(outputs: int) -> int:
    """Blocks of the CUDA schedule for ``outputs`` = M * N outputs (the rule's split by BLOCK)."""
    return max(1, -(-outputs // BLOCK))


def _check(p_min, p_max, bits, lo):
    if not (lo <= p_min <= p_max <= 0):
        raise ValueError(f"the shift kernel takes {lo} <= p_min <= p_max <= 0, got {p_min}..{p_max}")
    if bits not in (5, 6) or p_max - p_min + 1 > (1 << (bits - 1)) - 1:
        raise ValueError(f"shift range {p_min}..{p_max} does not fit {bits}-bit codes")


def shift_linear_primfunc(p_min: int = -15, p_max: int = 0, bits: int = 6, name: str = NAME):
    from tvm import te, tirx as T
    _check(p_min, p_max, bits, -30)
    per = 32 // bits
    m_, n_, k_ = (te.var(v, "int32") for v in "MNK")
    x = te.placeholder((m_, k_), "int32", name="x")
    w = te.placeholder((n_, (k_ + per - 1) // per), "int32", name="w")
    k = te.reduce_axis((0, k_), name="k")

    def term(m, n, k):
        code = (w[n, k // per] >> ((k % per) * bits)) & ((1 << bits) - 1)
        f = code & ((1 << (bits - 1)) - 1)
        v = x[m, k] >> T.min(1 - p_min - f, 31)
        zero = T.const(0, "int32")
        return T.Select(f == 0, zero, T.Select(((code >> (bits - 1)) & 1) == 1, zero - v, v))

    out = te.compute((m_, n_), lambda m, n: te.sum(term(m, n, k), axis=k), name="out")
    return te.create_prim_func([x, w, out]).with_attr("global_symbol", name)


def shift_linear_f32_primfunc(p_min: int = -15, p_max: int = 0, bits: int = 6, name: str = NAME_F32):
    """float32 ``out [M, N] = sum_k x[m, k] * sign * 2^p`` over the packed codes (module doc)."""
    from tvm import te, tirx as T
    _check(p_min, p_max, bits, -126)
    per = 32 // bits
    m_, n_, k_ = (te.var(v, "int32") for v in "MNK")
    x = te.placeholder((m_, k_), "float32", name="x")
    w = te.placeholder((n_, (k_ + per - 1) // per), "int32", name="w")
    k = te.reduce_axis((0, k_), name="k")

    def term(m, n, k):
        code = (w[n, k // per] >> ((k % per) * bits)) & ((1 << bits) - 1)
        f = code & ((1 << (bits - 1)) - 1)
        # 2^(p_min + f - 1) as float32 bits; the sign bit from the code's top bit
        scale = T.reinterpret("float32", ((f + (p_min - 1 + 127)) << 23) | (((code >> (bits - 1)) & 1) << 31))
        return T.Select(f == 0, T.const(0.0, "float32"), x[m, k] * scale)

    out = te.compute((m_, n_), lambda m, n: te.sum(term(m, n, k), axis=k), name="out")
    return te.create_prim_func([x, w, out]).with_attr("global_symbol", name)


def _rule():
    from tvm import s_tir
    from tvm.s_tir import dlight as dl

    class ShiftLinearRule(dl.ScheduleRule):
        """CPU: parallel rows, columns by 8 unrolled; GPU: a thread per output."""

        def apply(self, func, target, tunable):
            if not (func.attrs and func.attrs.get("global_symbol", "").startswith(NAME)):
                return None
            sch = s_tir.Schedule(func)
            blk = sch.get_sblock("out")
            m, n, k = sch.get_loops(blk)
            if target.kind.name == "cuda":
                t = sch.fuse(m, n)
                bx, tx = sch.split(t, [None, BLOCK])
                sch.bind(bx, "blockIdx.x")
                sch.bind(tx, "threadIdx.x")
                acc = sch.cache_write(blk, 0, "local")
                sch.reverse_compute_at(acc, tx)
                sch.decompose_reduction(blk, k)
            else:
                no, ni = sch.split(n, [None, 8])
                sch.reorder(m, no, k, ni)
                sch.parallel(m)
                sch.decompose_reduction(blk, k)
                sch.unroll(ni)
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
