"""The physical floor of a benchmark case: FLOPs of its typed linears and the bytes it must move,
against the GPU's peak numbers (``PEAK_FLOPS``, ``PEAK_BYTES_PER_S``).

floor = max(FLOPs / peak FLOP/s of the dtype, min bytes / peak bytes/s); training counts 3x the
forward's FLOPs.  The counts follow pigeon/models/*.py with the benchmark's hyperparameters
(:func:`hparams`)."""
from __future__ import annotations

__all__ = ["PEAK_FLOPS", "PEAK_BYTES_PER_S", "INDEX_BYTES_PER_EDGE", "ELEMENT_BYTES", "HEADS", "hparams", "out_dim",
           "param_count", "forward_flops", "min_bytes", "case_floor", "kernel_min_bytes", "STORAGE_BYTES"]

# The GPU's ceilings that the floors use: the calibration numbers measured on the H200 (dense GEMM
# FLOP/s per storage dtype, and HBM bytes/s).  Floors on any other device still use them.
PEAK_FLOPS = {"float32": 50e12, "bfloat16": 750e12}
PEAK_BYTES_PER_S = 4.2e12
INDEX_BYTES_PER_EDGE = 12                    # src, dst, etype as int32
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2}
HEADS = 4                                    # RGAT and HGT


def hparams(model: str, dim: int) -> dict:
    """The hyperparameters of each model at hidden size ``dim`` (out size = dim for all three)."""
    return {"rgcn": {"out_dim": dim}, "rgat": {"out_dim": dim // HEADS, "heads": HEADS},
            "hgt": {"heads": HEADS}}[model]


def out_dim(model: str, dim: int) -> int:
    hp = hparams(model, dim)
    return hp["out_dim"] * hp["heads"] if model == "rgat" else hp.get("out_dim", dim)


def param_count(model: str, dim: int, num_etypes: int, num_ntypes: int) -> int:
    """Number of weights of pigeon's layer (pigeon/models/*.py) on a graph with R relations and T
    node types."""
    R, T, d = num_etypes, num_ntypes, dim
    hp = hparams(model, dim)
    if model == "rgcn":
        o = hp["out_dim"]
        return R * d * o + d * o + o                                  # W, W_self, b
    if model == "rgat":
        H, D = hp["heads"], hp["out_dim"]
        return R * d * H * D + 2 * R * H * D                          # W, a_src, a_dst
    if model == "hgt":
        H = hp["heads"]
        dh = d // H
        return T * 4 * d * d + R * (2 * H * dh * dh + H) + T          # W_k,q,v,out; W_att, W_msg, mu; skip
    raise ValueError(f"unknown model {model!r}")


def forward_flops(model: str, dim: int, num_nodes: int, num_edges: int, src_rel_pairs: int | None = None,
                  dst_rel_pairs: int | None = None) -> int:
    """FLOPs of the forward's typed linears (2 * rows * K * N per GEMM; elementwise work, dots and
    softmax not counted) in the cheapest form the algebra allows.  A typed linear of gathered source
    rows, x[src] W_r, needs one row per unique (source, relation) pair, not per edge (compaction);
    RGCN's sum of x[src] W_r over a relation's edges equals (sum of x[src]) W_r, one row per unique
    (destination, relation) pair; RGAT's destination score <x[dst] W_r, a_r> is x[dst] (W_r a_r).
    Without the pair counts every per-edge linear counts E rows (the models as written), which is
    no lower bound once pigeon's rewrites apply."""
    N, E, d = num_nodes, num_edges, dim
    us = E if src_rel_pairs is None else min(E, src_rel_pairs)
    ud = E if dst_rel_pairs is None else min(E, dst_rel_pairs)
    hp = hparams(model, dim)
    if model == "rgcn":                       # x_src W_r on min(U_src, U_dst) rows, x W_self on N rows
        o = hp["out_dim"]
        return 2 * min(us, ud) * d * o + 2 * N * d * o
    if model == "rgat":                       # z_src = x W_r per (src, r); the dst score per (dst, r) with n = heads
        H, o = hp["heads"], hp["out_dim"]
        if src_rel_pairs is None and dst_rel_pairs is None:
            return 2 * (2 * E) * d * (H * o)
        return 2 * us * d * (H * o) + 2 * ud * d * H
    if model == "hgt":                        # K, Q, V, out on N rows; W_att, W_msg per head per (src, r)
        H = hp["heads"]
        dh = d // H
        return 4 * (2 * N * d * d) + 2 * (2 * us * H * dh * dh)
    raise ValueError(f"unknown model {model!r}")


def min_bytes(model: str, dim: int, dtype: str, mode: str, num_nodes: int, num_edges: int, num_etypes: int,
              num_ntypes: int) -> int:
    """Bytes a case must move at least: inputs, weights and graph indices read once, outputs written
    once; training also writes the gradients of the input and the weights once and reads the forward
    output once."""
    s = ELEMENT_BYTES[dtype]
    x = num_nodes * dim * s
    w = param_count(model, dim, num_etypes, num_ntypes) * s
    out = num_nodes * out_dim(model, dim) * s
    total = x + w + INDEX_BYTES_PER_EDGE * num_edges + out
    if mode == "training":
        total += x + w + out
    return total


def case_floor(model: str, dim: int, dtype: str, mode: str, num_nodes: int, num_edges: int, num_etypes: int,
               num_ntypes: int, src_rel_pairs: int | None = None, dst_rel_pairs: int | None = None) -> dict:
    """The physical floor of a case: max(FLOPs / peak FLOP/s of the dtype, min bytes / peak bytes/s),
    training = 3x the forward's FLOPs (the FLOPs of the cheapest form: :func:`forward_flops`)."""
    flops = forward_flops(model, dim, num_nodes, num_edges, src_rel_pairs, dst_rel_pairs) * (3 if mode == "training" else 1)
    nbytes = min_bytes(model, dim, dtype, mode, num_nodes, num_edges, num_etypes, num_ntypes)
    t_flops, t_bytes = flops / PEAK_FLOPS[dtype], nbytes / PEAK_BYTES_PER_S
    return {"flops": flops, "bytes": nbytes, "floor_ms": max(t_flops, t_bytes) * 1e3,
            "bound": "compute" if t_flops >= t_bytes else "memory"}


# ---------------------------------------------------------------------------------------- one kernel

STORAGE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int32": 4, "int64": 8, "int8": 1,
                 "uint8": 1, "bool": 1}
INDEX_BYTES = 4                              # the kernel graph's index arrays are int32


def kernel_min_bytes(inst, counts: dict) -> int:
    """The bytes one traversal kernel instance (pigeon.ir.traversal.TraversalInstance: an aggregation
    or an edge softmax) must move at least, on a graph with ``counts`` rows of each kind (``node``,
    ``edge``, ``compact``, ``etype``, ``ntype``):

    - every (buffer, row reference) its expression loads, once per row it reaches: a buffer read
      through the row the loop reduces into (``dst`` for an aggregation by destination, an edge
      softmax) once per output row; a per-type buffer once per type; a global one once; every other
      load (the loop's own rows, gathered source rows, compact rows of edges) once per loop row,
      i.e. the gathered rows, not the distinct rows they come from;
    - one int32 index per loop row for each gather (row references other than self, none and the
      per-type ones, which read the type array: also one index per loop row), and one per loop row
      for the segment it belongs to (which output row it reduces into);
    - the output written once.

    For the sum of x[src] over incoming edges this is E*d*s (gathered rows) + 2*4*E (src and the
    destination segment) + N*d*s, the bound of benchmarks/bench_aggregate.py."""
    from pigeon.ir.expr import RowRef
    rows_of = {**counts, "global": 1}
    loop_rows = rows_of[inst.loop_rows]
    out_rows = rows_of[inst.out_rows]
    reduces_into, groups = None, out_rows        # the row each member reduces into, and how many there are
    if inst.loop == "edge_softmax":
        reduces_into, groups = RowRef.DST, rows_of["node"]
    elif inst.loop == "aggregate":
        reduces_into = {"dst": RowRef.DST, "src": RowRef.SRC, "compact": RowRef.COMPACT,
                        "compact_src": RowRef.SRC, "dcompact": RowRef.COMPACT_DST,
                        "compact_dst": RowRef.DST}[inst.side]
    total = out_rows * inst.out.width * STORAGE_BYTES.get(inst.out.dtype, 4)
    seen, refs = set(), set()
    for e in inst.expr.toposort():
        if e.op != "load" or (e.buffer.name, e.row) in seen:
            continue
        seen.add((e.buffer.name, e.row))
        b = e.buffer
        el = STORAGE_BYTES.get(b.dtype, 4)
        if e.row is RowRef.NONE:
            n = 1
        elif e.row in (RowRef.ETYPE, RowRef.NTYPE):
            n = rows_of[b.rows]
        elif e.row is reduces_into and e.row is not RowRef.SELF:
            n = groups
        else:
            n = loop_rows
        total += n * b.width * el
        if e.row not in (RowRef.SELF, RowRef.NONE) and e.row is not reduces_into:
            refs.add(e.row)
    if reduces_into is not None:
        refs.add("segment")
    return total + INDEX_BYTES * loop_rows * len(refs)
