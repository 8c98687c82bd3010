"""The add primitive's masked accumulation in TIR, with its schedule rule (one rule in this file).

``code_accumulate_primfunc()`` is, for G independent problems (batch x heads),

    out[g, m, n] = sum_t ((codes[g, t, m // 32] >> (m % 32)) & 1) ? v[g, t, n] : 0

over the int32 packed {0, 1} codes of pigeon/shiftadd/add.py (``codes [G, T, ceil(nbits / 32)]``,
bit m of token t) and float32 ``v [G, T, Nv]``: ``out [G, nbits, Nv]`` = B^T V with B the unpacked
bits, a select and an add per term, no multiply (ShiftAddViT's ``matmask``), summed in float32
over t in ascending order.  G, T, W, nbits and Nv are symbolic.  ``AccumulateRule`` schedules it
for llvm (problems in parallel, n by 8 unrolled under t) or cuda (a thread per output, the sum in
a register; consecutive threads take consecutive n, so the loads of v coalesce).  TVM is imported
lazily; no torch.
"""
from __future__ import annotations

NAME = "pigeon_code_accumulate"
BLOCK = 128


def launch_grid(outputs: int) -> int:
    """Blocks of the CUDA schedule for ``outputs`` = G * nbits * Nv outputs."""
    return max(1, -(-outputs // BLOCK))


def code_accumulate_primfunc(name: str = NAME):
    from tvm import te, tirx as T
    g_, t_, w_, m_, n_ = (te.var(v, "int32") for v in ("G", "T", "W", "nbits", "Nv"))
    codes = te.placeholder((g_, t_, w_), "int32", name="codes")
    v = te.placeholder((g_, t_, n_), "float32", name="v")
    t = te.reduce_axis((0, t_), name="t")

    def term(g, m, n, t):
        bit = (codes[g, t, m // 32] >> (m % 32)) & 1
        return T.Select(bit == 1, v[g, t, n], T.const(0.0, "float32"))

    out = te.compute((g_, m_, n_), lambda g, m, n: te.sum(term(g, m, n, t), axis=t), name="out")
    return te.create_prim_func([codes, v, out]).with_attr("global_symbol", name)


def _rule():
    from tvm import s_tir
    from tvm.s_tir import dlight as dl

    class AccumulateRule(dl.ScheduleRule):
        def apply(self, func, target, tunable):
            if not (func.attrs and func.attrs.get("global_symbol", "").startswith(NAME)):
                return None
            sch = s_tir.Schedule(func)
            blk = sch.get_sblock("out")
            g, m, n, t = sch.get_loops(blk)
            if target.kind.name == "cuda":
                bx, tx = sch.split(sch.fuse(g, m, n), [None, BLOCK])
                sch.bind(bx, "blockIdx.x")
                sch.bind(tx, "threadIdx.x")
                acc = sch.cache_write(blk, 0, "local")
                sch.reverse_compute_at(acc, tx)
                sch.decompose_reduction(blk, t)
            else:
                no, ni = sch.split(n, [None, 8])
                sch.reorder(g, m, no, t, ni)
                sch.parallel(sch.fuse(g, m))
                sch.decompose_reduction(blk, t)
                sch.unroll(ni)
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
