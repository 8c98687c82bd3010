"""The CUDA tiling the ShiftAdd TVM kernels share (shift linear, Hamming scores, masked accumulation):
each output is a reduction ``out[(g,) m, n] = sum_r f(a[m, r], b[r, n])``, scheduled as a small GEMM.

A block of ``ty x tx`` threads owns a ``ty*tm x tx*tn`` output tile (blockIdx.y / x; an optional
batch loop on blockIdx.z); each thread keeps its ``tm x tn`` outputs in registers; the reduction
steps by ``br``, and for each step the ``staged`` operand blocks (the padded inputs, already
unpacked where a kernel unpacks) are copied to shared memory by all the block's threads; the
``vector_reads``-th operands of the output block are also cached per thread in registers with one
vectorized load.  The callers pad their einsum to the tile first, so no bounds checks remain.
One definition: the three schedules differ only in their blocks, tile sizes and loads."""
from __future__ import annotations

__all__ = ["tile_reduction"]


def tile_reduction(sch, blk, out_pad, loops, staged, *, ty: int, tx: int, tm: int, tn: int, br: int,
                   vector_reads=()) -> None:
    """Schedule reduction block ``blk`` (loops ``[*batch, m, n, r]``) as above; ``out_pad``: the
    block copying the padded result out, computed per thread."""
    *batch, m, n, r = loops
    mo, mi, mt = sch.split(m, [None, ty, tm])
    no, ni, nt = sch.split(n, [None, tx, tn])
    ro, ri = sch.split(r, [None, br])
    sch.reorder(*batch, mo, no, mi, ni, ro, ri, mt, nt)
    for b in batch:
        sch.bind(b, "blockIdx.z")
    sch.bind(mo, "blockIdx.y")
    sch.bind(no, "blockIdx.x")
    sch.bind(mi, "threadIdx.y")
    sch.bind(ni, "threadIdx.x")
    sch.set_scope(blk, 0, "local")
    sch.reverse_compute_at(out_pad, ni)
    depth = len(batch) + 5                            # batch, mo, no, mi, ni, ro: the copy's loops follow
    for b in staged:
        sch.set_scope(b, 0, "shared")
        sch.compute_at(b, ro)
        inner = sch.get_loops(b)[depth:]
        fused = sch.fuse(*inner) if len(inner) > 1 else inner[0]
        _, y, x = sch.split(fused, [None, ty, tx])
        sch.bind(y, "threadIdx.y")
        sch.bind(x, "threadIdx.x")
    for i in vector_reads:
        loc = sch.cache_read(blk, i, "local")
        sch.compute_at(loc, ri)
        sch.vectorize(sch.get_loops(loc)[-1])
    sch.decompose_reduction(blk, ro)
    sch.unroll(ri)
    sch.unroll(mt)
    sch.unroll(nt)
