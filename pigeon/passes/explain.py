"""``pigeon compile --explain``: every graph-dependent decision of a compilation, with the
estimated costs the choice compared (FLOPs of GEMMs, bytes their results write, the hub term of
an aggregation schedule).  Reads the pass records, the IR after the passes, the kernel programs
and the graph's statistics; decides nothing itself."""
from __future__ import annotations

from ..ir.graph import IRGraph
from ..ir.ops import OpKind
from ..ir.program import GemmLaunch, KernelProgram, TraversalLaunch
from ..ir.types import Domain
from .compact import MIN_EDGES_PER_ROW
from .gemm_backend import ENV, RULE_PICK, RULE_WHY, TYPED_ENV, forced, gemm_point
from .gemm_tiles import DEFAULT as DEFAULT_TILE, RULE_WHY as TILE_WHY, tile_label, tile_point
from .schedule import RESIDENT_THREADS, SKEW

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def _fmt(n: float) -> str:
    """Exact counts, grouped by thousands (the numbers are compared by eye and by tests)."""
    return f"{int(n):,}"


def _rows(domain: Domain, stats: dict) -> int:
    return {Domain.EDGE: stats["num_edges"], Domain.COMPACT: stats["compact_rows"],
            Domain.COMPACT_DST: stats.get("compact_dst_rows", stats["num_edges"]),
            Domain.NODE: stats["num_nodes"]}.get(domain, stats.get("num_types", 1))


def _linear_dims(ir, op) -> tuple[int, int, int]:
    """(k, n, heads) of a typed linear's weight ``[heads?, k, n]``."""
    w = ir.op(op.inputs[1]).type.shape
    return w[-2], w[-1], (w[0] if len(w) == 3 else 1)


def explain(ir: IRGraph, records, programs: dict[str, KernelProgram | None], stats: dict,
            dtype: str = "float32") -> list[str]:
    """Lines describing each decision (``stats``: num_nodes, num_edges, compact_rows and the
    kernel graph's degree statistics)."""
    el = ELEMENT_BYTES.get(dtype, 4)
    E, U = stats["num_edges"], stats["compact_rows"]
    out = []
    rec = {r.name: r for r in records}
    # linear reordering: each folded score
    for op in ir.of_kind(OpKind.TYPED_LINEAR):
        w = ir.op(op.inputs[1])
        if w.kind is not OpKind.DOT or w.type.domain is not Domain.WEIGHT:
            continue
        rows = _rows(op.type.domain, stats)
        k, heads = w.type.shape[0], w.type.shape[-1] if len(w.type.shape) > 1 else 1
        n_before = 1
        for s in ir.op(w.inputs[0]).type.shape[1:]:
            n_before *= s
        before = 2 * rows * k * n_before + 2 * rows * n_before
        after = 2 * rows * k * heads
        out.append(f"linear_reorder: {op.loc or op.kind.value}: x (W_r a_r) on {_fmt(rows)} rows: GEMM n={heads} "
                   f"instead of n={n_before} plus a dot: {_fmt(before)} -> {_fmt(after)} FLOP, result "
                   f"{_fmt(rows * n_before * el)} -> {_fmt(rows * heads * el)} B")
    # compaction
    r = rec.get("compaction")
    if r is not None:
        out.append(f"compaction: {r.note} (E = {_fmt(E)} edges, U = {_fmt(U)} (src, etype) pairs, "
                   f"E/U = {E / max(U, 1):.2f}, threshold {MIN_EDGES_PER_ROW})")
        for op in ir.of_kind(OpKind.TYPED_LINEAR):
            if op.type.domain is not Domain.COMPACT:
                continue
            k, n, heads = _linear_dims(ir, op)
            fe, fu = 2 * E * k * n * heads, 2 * U * k * n * heads
            out.append(f"  {op.loc or 'typed_linear'}: GEMM on U rows: {_fmt(fe)} -> {_fmt(fu)} FLOP, writes "
                       f"{_fmt(E * n * heads * el)} -> {_fmt(U * n * heads * el)} B (+{_fmt(4 * E)} B of "
                       f"edge -> pair index)")
        # edge-wise work sunk into the compact domain: a dot (or feature sum) on compact rows is
        # computed once per pair (a compact_map) and read per edge through edge_to_compact; sunk
        # elementwise ops are inlined where the edges read them (no change in cost)
        sunk = [op for op in ir.ops() if op.type.domain is Domain.COMPACT
                and op.kind in (OpKind.UNARY, OpKind.BINARY, OpKind.DOT, OpKind.RESHAPE)]
        for op in sunk:
            if op.kind is not OpKind.DOT:
                continue
            k = 1
            for s in ir.op(op.inputs[0]).type.shape:
                k *= s
            n = 1
            for s in op.type.shape:
                n *= s
            before, after = E * (k + 2 * n) * el, U * (k + n) * el + E * n * el
            out.append(f"  sink: {op.loc or 'dot'}: dot on U compact rows instead of E edges (reads a {k}-wide "
                       f"row per pair, not per edge): {_fmt(2 * E * k)} -> {_fmt(2 * U * k)} FLOP, "
                       f"{_fmt(before)} -> {_fmt(after)} B (saves {_fmt(before - after)} B)")
        rest = sum(op.kind is not OpKind.DOT for op in sunk)
        if rest:
            out.append(f"  sink: {rest} elementwise/reshape op(s) on compact rows, inlined into the edge "
                       f"kernels that read them (through edge_to_compact)")
    # destination-side compaction
    r = rec.get("compaction_dst")
    if r is not None:
        Ud = stats.get("compact_dst_rows", 0)
        out.append(f"compaction_dst: {r.note} (E = {_fmt(E)} edges, Ud = {_fmt(Ud)} (dst, etype) pairs, "
                   f"E/Ud = {E / max(Ud, 1):.2f}, threshold {MIN_EDGES_PER_ROW})")
        for op in ir.of_kind(OpKind.TYPED_LINEAR):
            if op.type.domain is not Domain.COMPACT_DST:
                continue
            k, n, heads = _linear_dims(ir, op)
            fe, fu = 2 * E * k * n * heads, 2 * Ud * k * n * heads
            # the GEMM reads a gathered K-wide destination row per GEMM row and writes n per row
            be, bu = E * (k + n * heads) * el, Ud * (k + n * heads) * el
            out.append(f"  {op.loc or 'typed_linear'}: GEMM on Ud rows: {_fmt(fe)} -> {_fmt(fu)} FLOP, reads + "
                       f"writes {_fmt(be)} -> {_fmt(bu)} B (saves {_fmt(be - bu)} B; +{_fmt(4 * E)} B of "
                       f"edge -> pair index)")
    # aggregation schedules
    for name, prog in programs.items():
        if prog is None:
            continue
        for launch in prog.launches:
            if not isinstance(launch, TraversalLaunch) or launch.inst.loop != "aggregate":
                continue
            inst = launch.inst
            d_key, n_key = {"dst": ("max_in_degree", "num_edges"), "src": ("max_out_degree", "num_edges"),
                            "compact": ("max_compact_edges", "num_edges"),
                            "compact_src": ("max_node_compacts", "num_compact"),
                            "dcompact": ("max_compact_dst_edges", "num_edges"),
                            "compact_dst": ("max_node_compact_dsts", "num_compact_dst")}[inst.side]
            width = inst.out.width
            group = 1 << max(0, (min(max(width, 1), 32) - 1).bit_length())
            if d_key in stats:
                balanced = stats[n_key] * group / RESIDENT_THREADS
                why = (f"largest list {stats[d_key]} vs {SKEW:g} x balanced share {balanced:.1f}")
            else:
                why = "no statistics for this side: node"
            out.append(f"schedule: {name} aggregate {inst.reduce}/{inst.side} -> {inst.out.name}[{width}]: "
                       f"{inst.schedule} ({why})")
    # dense GEMMs: pigeon's template or TVM's dlight kernel
    for name, prog in programs.items():
        for launch in (prog.launches if prog is not None else ()):
            point = gemm_point(launch)
            if point is not None:
                f = forced()
                chosen = (f"{ENV}={f}" if f is not None and launch.backend == f else
                          RULE_WHY if launch.backend == RULE_PICK else "given")
                if launch.inst.y_dtype is not None:
                    chosen = (f"float32 rows of {launch.inst.dtype} operands, read only elementwise: "
                              f"cuBLAS only")
                out.append(f"gemm backend: {name} {point} -> {launch.writes()[0]}: {launch.backend} ({chosen})")
            elif isinstance(launch, GemmLaunch) and launch.inst.typed and launch.backend == "cublas":
                out.append(f"gemm backend: {name} typed {launch.rows}/k{launch.inst.k}n{launch.inst.n} -> "
                           f"{launch.writes()[0]}: cublas, one call per type segment ({TYPED_ENV}=cublas)")
    # the tile of each GEMM the template runs (pigeon/passes/gemm_tiles.py)
    for name, prog in programs.items():
        for launch in (prog.launches if prog is not None else ()):
            point = tile_point(launch)
            if point is not None:
                t = tile_label(launch.inst.tile)
                out.append(f"gemm tile: {name} {point} -> {launch.writes()[0]}: {t} "
                           f"({TILE_WHY if launch.inst.tile == DEFAULT_TILE else 'given'})")
    return out
