"""Hamming scores in TIR, with its schedule rule (one rule in this file).

``hamming_primfunc()`` is ``out[i, j] = nbits - sum_w popcount(q[i, w] ^ k[j, w])`` over the int32
packed codes of pigeon/shiftadd/add.py (Tq, Tk, W symbolic; ``nbits`` a scalar argument after the
buffers: ``f(q, k, out, nbits)``; the CUDA form calls ``__popc``, see
``hamming_primfunc``).  ``HammingRule`` schedules it for llvm (query rows in parallel,
key columns by 8 unrolled under the word loop) or cuda (a thread per score, the sum in a register).
TVM is imported lazily; no torch.
"""
from __future__ import annotations

NAME = "pigeon_hamming"
BLOCK = 128          # threads per block of the CUDA schedule: one thread per score


def launch_grid(outputs: int) -> int:
    """Blocks of the CUDA schedule for ``outputs`` = Tq * Tk scores."""
    return max(1, -(-outputs // BLOCK))


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
                bx, tx = sch.split(sch.fuse(i, j), [None, BLOCK])
                sch.bind(bx, "blockIdx.x")
                sch.bind(tx, "threadIdx.x")
                sch.compute_at(blk, tx)
                sch.set_scope(blk, 0, "local")
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
