"""Lowering: inter-operator IR -> a kernel program (an ordered list of kernel launches over
named buffers).

Which values get a buffer:
* inputs, params, graph data, outputs;
* the result of every op a kernel family produces: typed linears and weight gradients (GEMM
  instances), aggregations, edge softmax and type reductions (traversal instances);
* dot products and feature sums (``sum_to``), so a broadcast consumer does not recompute them per
  element; and any elementwise value a GEMM must read as a plain matrix.
Everything else (gathers, type indexing, unary and binary ops, reshapes, slices) is fused: it is
inlined as an element expression into every traversal kernel that reads it.

Graph-level rules: edge rows are in kernel order (``KernelGraph``: sorted by edge type), so a typed
linear over edges reads each relation as one contiguous segment; node rows typed by node type are
visited through ``ntype_perm`` (gather and scatter by the same permutation).
"""
from __future__ import annotations


from ..ir.graph import IRGraph
from ..ir.kernel import GemmInstance
from ..ir.program import GemmLaunch, HostAdd, HostIndex, KernelProgram, Launch, TraversalLaunch
from ..ir.ops import Op, OpKind
from ..ir.registry import op_def
from ..ir.traversal import Buffer, Expr, RowRef, TraversalInstance, load
from ..ir.types import Domain, TypeAxis, dtype_class


class LoweringError(NotImplementedError):
    pass


_ROWS = {Domain.NODE: "node", Domain.EDGE: "edge", Domain.COMPACT: "compact", Domain.COMPACT_DST: "compact_dst"}
_MAP_LOOP = {"node": "node_map", "edge": "edge_map", "compact": "compact_map"}
# the loop rows of an aggregation's input, per side (ir/ops.py AGGREGATE_SIDES)
_AGGREGATE_LOOP = {"dst": "edge", "src": "edge", "compact": "edge", "compact_src": "compact",
                   "dcompact": "edge", "compact_dst": "compact_dst"}
# gathers of node values into compact rows: the loop rows, and how a compact row reads its node
_COMPACT_GATHER = {"compact_src": ("compact", RowRef.SRC), "compact_dst": ("compact_dst", RowRef.DST)}


# an expand_compact read in an edge loop: compact rows through edge_to_compact, the pair's relation
# is the edge's own
_EXPAND = {RowRef.SELF: RowRef.COMPACT, RowRef.ETYPE: RowRef.ETYPE, RowRef.NONE: RowRef.NONE}


def _remapped_rows(remap: dict[RowRef, RowRef]) -> str:
    """The rows a remapped expression's own buffers have: compact rows under an expand_compact,
    nodes under a gather."""
    return "compact" if remap.get(RowRef.SELF) is RowRef.COMPACT else "node"


def _gemm_rows(t) -> str:
    """The rows a GEMM loops over: nodes, edges, compact rows, or types (a linear on per-type rows)."""
    return t.per.value if t.domain is Domain.WEIGHT else _ROWS[t.domain]


def _buffer_rows(op: Op) -> str:
    t = op.type
    if t.domain is Domain.WEIGHT:
        return t.per.value
    if t.domain is Domain.GLOBAL:
        return "global"
    return _ROWS[t.domain]


class _Lowering:
    def __init__(self, ir: IRGraph, dtype: str):
        self.ir, self.dtype = ir, dtype
        self.buffers: dict[str, Buffer] = {}      # op key -> buffer
        self.launches: list[Launch] = []
        self.counter = 0
        self.consumers = {op.key: ir.users(op.key) for op in ir.ops()}
        self.outputs = set(ir.outputs)
        self._expr_memo: dict = {}
        self._gather_memo: dict[str, bool] = {}
        self._expand_memo: dict[str, bool] = {}

    def storage(self, dtype: str) -> str:
        """A buffer's storage dtype: its IR value's dtype, or the override for float values."""
        if self.dtype is not None and dtype_class(dtype) == "float":
            return self.dtype
        return dtype

    def sum_storage(self, op: Op) -> str:
        """The storage of a sum (or mean) aggregation: float32 in a 16-bit layer when it is no program
        output and only elementwise ops read it (their kernels load any dtype), else as any buffer.
        Why: rounded to bf16 and then added to another rounded value (RGCN's out = agg + x W_self + b),
        the sum often lands exactly between two bf16 numbers, and a tiny third addend (the bias after
        one SGD step, ~1e-6) rounds every such tie the same way: a systematic offset of ~1e-3 in every
        row of a column, which a bias gradient summed over all rows collects (AM-sized RGCN bf16
        training: bias gradient 36x the bf16 reference's error vs float64, benchmarks/debug_bias_grad.py).
        The kernels accumulate in float32 anyway; this only skips rounding the partial result."""
        dt = self.storage(op.type.dtype)
        return "float32" if op.attr("reduce") in ("sum", "mean") and self._f32_tail_value(op, dt) else dt

    def _f32_tail_value(self, op: Op, dt: str) -> bool:
        """Whether a value stored as ``dt`` may be kept float32 instead: ``dt`` is 16-bit, the value is
        no program output, and only elementwise ops read it (their kernels load any dtype)."""
        if dt not in ("bfloat16", "float16") or op.key in self.outputs:
            return False
        users = self.consumers[op.key]
        return bool(users) and all(u.kind in (OpKind.UNARY, OpKind.BINARY) for u in users)

    def gemm_storage(self, op: Op) -> str:
        """The storage of a dense GEMM's rows (``x @ W``, untyped, not gathered): float32 in a
        16-bit layer when it is no program output and only elementwise ops read it, else as any
        buffer; cuBLAS writes them (GemmInstance.y_dtype). Why: as for a sum (``sum_storage``):
        RGCN's ``agg + x W_self + b`` with ``x W_self`` rounded to bf16 and ``agg`` a bf16 message
        (a node of in-degree 1) lies on a bf16 tie so often that a bias of ~1e-6 after one SGD step
        rounds every tie its way; unrounded, the sum is rounded once, as the reference's float32 math."""
        dt = self.storage(op.type.dtype)
        return "float32" if self._f32_tail_value(op, dt) else dt

    def new_buffer(self, op: Op, prefix: str = "t", dtype: str | None = None) -> Buffer:
        b = Buffer(f"{prefix}{self.counter}", _buffer_rows(op), op.type.shape, dtype or self.storage(op.type.dtype))
        self.counter += 1
        self.buffers[op.key] = b
        return b

    # -- element expressions ----------------------------------------------------------------
    def expr(self, key: str, loop: str, remap: dict[RowRef, RowRef] | None = None) -> Expr:
        """The element expression of a value inside a loop over ``loop`` rows ("edge", "node" or
        "compact").  ``remap`` turns a node expression into one evaluated at src[e] / dst[e] (or
        at a compact row's source).  Memoized per (value, loop, remap) while the value has no
        buffer, so lowering is linear in the IR's size."""
        memo_key = (key, loop, None if remap is None else tuple(sorted((a.value, b.value) for a, b in remap.items())),
                    key in self.buffers)
        hit = self._expr_memo.get(memo_key)
        if hit is not None:
            return hit
        e = self._expr(key, loop, remap)
        self._expr_memo[(key, loop, memo_key[2], key in self.buffers)] = e
        return e

    def _expr(self, key: str, loop: str, remap: dict[RowRef, RowRef] | None) -> Expr:
        op = self.ir.op(key)
        if key in self.buffers:
            b = self.buffers[key]
            own = loop if remap is None else _remapped_rows(remap)   # under a gather, rows are nodes
            row = RowRef.SELF if b.rows == own else {
                "etype": RowRef.ETYPE, "ntype": RowRef.NTYPE, "global": RowRef.NONE}.get(b.rows)
            if row is None:
                how = " without a gather" if b.rows == "node" else ""
                raise LoweringError(f"{b.rows} value {b.name} read in a loop over {loop} rows{how}")
            if remap is not None:
                if row not in remap:
                    raise LoweringError(f"{b.rows} buffer {b.name} cannot be read through a gather")
                row = remap[row]
            return load(b, row)
        k = op.kind
        if k is OpKind.GATHER:
            side = op.attr("side")
            want, ref = _COMPACT_GATHER.get(side, ("edge", RowRef.DST if side == "dst" else RowRef.SRC))
            if loop != want or remap is not None:
                raise LoweringError(f"gather {side} inside a loop over {loop} rows")
            inner = self.ir.op(op.inputs[0])
            sub = {RowRef.SELF: ref, RowRef.NONE: RowRef.NONE}
            if not self._gatherable(inner.key):
                self.materialize(inner.key)
            return self.expr(inner.key, loop, sub)
        if k is OpKind.EXPAND_COMPACT:      # an edge reads its (src, etype) pair's compact row
            if loop != "edge" or remap is not None:
                raise LoweringError(f"expand_compact inside a loop over {loop} rows")
            inner = op.inputs[0]
            if self.ir.op(inner).type.domain is Domain.COMPACT_DST:     # an edge's (dst, etype) pair
                return load(self.ensure_buffer(inner), RowRef.COMPACT_DST)
            if inner not in self.buffers and self._expandable(inner):
                # a fused compact expression (work sunk into the compact domain): evaluated in the
                # edge loop with its compact loads read through edge_to_compact, nothing materialized
                return self.expr(inner, loop, _EXPAND)
            return load(self.ensure_buffer(inner), RowRef.COMPACT)
        if k is OpKind.TYPE_INDEX:
            w = self.ensure_buffer(op.inputs[0])
            row = RowRef.ETYPE if w.rows == "etype" else RowRef.NTYPE
            if remap is not None:
                if row not in remap:
                    raise LoweringError("a node-type-indexed weight read through a gather is not lowered yet")
                row = remap[row]
            return load(w, row)
        if k in (OpKind.DOT, OpKind.SUM_TO) and key not in self.buffers:
            self.materialize(key)
            return self.expr(key, loop, remap)
        d = op_def(k)
        if d.lower == "fused" and d.element is not None:    # the kind's element rule (pigeon/opset.py)
            return d.element(op, tuple(self.expr(i, loop, remap) for i in op.inputs))
        if k is OpKind.GRAPH_DATA:
            raise AssertionError("graph data always has a buffer")
        raise LoweringError(f"{k.value} cannot be fused into an element expression yet"
                            + (f" (from {op.loc})" if op.loc else ""))

    def _gatherable(self, key: str) -> bool:
        """Can a node expression be evaluated at src[e]/dst[e] by remapping its loads?"""
        if key in self.buffers:
            return True
        hit = self._gather_memo.get(key)
        if hit is None:
            op = self.ir.op(key)
            hit = op.kind in (OpKind.UNARY, OpKind.BINARY, OpKind.RESHAPE) and all(
                self._gatherable(i) for i in op.inputs)
            self._gather_memo[key] = hit
        return hit

    def _expandable(self, key: str) -> bool:
        """Can a compact expression be evaluated in an edge loop by reading its compact loads
        through edge_to_compact (and its per-relation loads by the edge's relation)?"""
        if key in self.buffers:
            return True
        op = self.ir.op(key)
        if op.type.domain in (Domain.GLOBAL, Domain.WEIGHT):
            return True         # read without rows (global) or through the type index that reads it
        if op.type.domain is not Domain.COMPACT:
            return False
        if op.kind in (OpKind.DOT, OpKind.SUM_TO):
            return True         # always materialized (a compact_map), then read through edge_to_compact
        hit = self._expand_memo.get(key)
        if hit is None:
            hit = op.kind in (OpKind.UNARY, OpKind.BINARY, OpKind.RESHAPE, OpKind.TYPE_INDEX) and all(
                self._expandable(i) for i in op.inputs)
            self._expand_memo[key] = hit
        return hit

    def materialize(self, key: str) -> str:
        """Give an element value its own buffer through a map kernel (a loop over its rows: edges,
        nodes, compact rows, or types for elementwise work on per-type weights)."""
        if key in self.buffers:
            return key
        op = self.ir.op(key)
        if op.type.domain is Domain.GLOBAL:
            raise LoweringError(f"elementwise {op.kind.value} on global weights is not lowered to kernels")
        if op.type.domain is Domain.COMPACT_DST:
            raise LoweringError(f"elementwise {op.kind.value} on destination-side compact rows is not lowered "
                                "to kernels (only typed linears and sums live there)")
        loop = op.type.per.value if op.type.domain is Domain.WEIGHT else _ROWS[op.type.domain]
        if op.kind in (OpKind.DOT, OpKind.SUM_TO):
            args = tuple(self.expr(i, loop) for i in op.inputs)
            e = op_def(op.kind).element(op, args)
        else:
            e = self.expr(key, loop)
        out = self.new_buffer(op)
        if op.type.domain is Domain.WEIGHT:
            inst = TraversalInstance("type_map", e, out, per=loop, dtype=out.dtype)
        else:
            inst = TraversalInstance(_MAP_LOOP[loop], e, out, dtype=out.dtype)
        self.launches.append(TraversalLaunch(inst))
        return key

    def ensure_buffer(self, key: str) -> Buffer:
        if key not in self.buffers:
            self.materialize(key)
        return self.buffers[key]

    # -- GEMM operands ------------------------------------------------------------------------
    def matrix_operand(self, key: str) -> tuple[Buffer, str | None]:
        """A buffer a GEMM can read as rows (looking through reshapes), and the graph index that
        gathers it (for a gathered node buffer), else a materialized buffer."""
        op = self.ir.op(key)
        while op.kind is OpKind.RESHAPE and op.key not in self.buffers:
            op = self.ir.op(op.inputs[0])
        if op.kind in (OpKind.GATHER, OpKind.EXPAND_COMPACT) and op.key not in self.buffers:
            inner = self.ir.op(op.inputs[0])
            while inner.kind is OpKind.RESHAPE and inner.key not in self.buffers:
                inner = self.ir.op(inner.inputs[0])
            index = op.attr("side")
            if op.kind is OpKind.EXPAND_COMPACT:
                index = "edge_to_compact_dst" if inner.type.domain is Domain.COMPACT_DST else "edge_to_compact"
            return self.ensure_buffer(inner.key), index
        return self.ensure_buffer(op.key), None

    def gemm(self, op: Op) -> None:
        if op.kind is OpKind.TYPED_LINEAR:
            x_key, w_key = op.inputs
            xt, wt = self.ir.op(x_key).type, self.ir.op(w_key).type
            wbuf = self.weight_buffer(w_key)
            transpose = bool(op.attr("transpose"))
            wshape = wt.shape[:-2] + ((wt.shape[-1], wt.shape[-2]) if transpose else wt.shape[-2:])
            heads = wshape[0] if len(wshape) == 3 else 1
            if len(wshape) == 2 and len(xt.shape) != 1:
                raise LoweringError("typed_linear of a multi-axis value with a 2-D weight is not lowered yet")
            k, n = wshape[-2], wshape[-1]
            x, gather = self.matrix_operand(x_key)
            rows = _gemm_rows(xt)
            typed = wt.domain is Domain.WEIGHT
            dense = not typed and gather is None and heads == 1
            out = self.new_buffer(op, dtype=self.gemm_storage(op) if dense else None)
            seg, scatter = "all", None
            if typed and wt.per is TypeAxis.NTYPE:
                if gather is not None:
                    raise AssertionError("node rows are never gathered")
                seg, gather, scatter = "ntype", "ntype_perm", "ntype_perm"
            elif typed:
                seg = "etype"
            y_dtype = "float32" if out.dtype != x.dtype else None     # gemm_storage's float32 rows
            inst = GemmInstance("rows", k, n, heads=heads, typed=typed, gather=gather is not None,
                                scatter=scatter is not None, transpose_w=transpose, y_dtype=y_dtype,
                                dtype=self._gemm_dtype(x, wbuf) if y_dtype else self._gemm_dtype(x, wbuf, out))
            self.launches.append(GemmLaunch(inst, x.name, wbuf.name, out.name, rows, seg, gather, scatter,
                                            **({"backend": "cublas"} if y_dtype else {})))
            return
        # weight gradient: dW[t] = sum over rows of type t of outer(a, b)
        a_key, b_key = op.inputs
        at = self.ir.op(a_key).type
        wshape, per = tuple(op.attr("wshape")), op.attr("per")
        heads = wshape[0] if len(wshape) == 3 else 1
        if len(wshape) == 2 and len(at.shape) != 1:
            raise LoweringError("weight_grad over multi-axis rows with a 2-D weight is not lowered yet")
        a, ga = self.matrix_operand(a_key)
        b, gb = self.matrix_operand(b_key)
        rows = _gemm_rows(at)
        out = self.new_buffer(op)
        seg = {None: "all", TypeAxis.ETYPE: "etype", TypeAxis.NTYPE: "ntype"}[per]
        if per is TypeAxis.NTYPE:
            ga = gb = "ntype_perm"
        inst = GemmInstance("weight_grad", wshape[-2], wshape[-1], heads=heads, typed=per is not None,
                            gather=ga is not None, scatter=gb is not None, dtype=self._gemm_dtype(a, b, out))
        self.launches.append(GemmLaunch(inst, a.name, out.name, b.name, rows, seg, ga, gb))

    @staticmethod
    def _gemm_dtype(*bufs: Buffer) -> str:
        dts = {b.dtype for b in bufs}
        if len(dts) != 1:
            raise LoweringError(f"a GEMM reads and writes one dtype; got {[(b.name, b.dtype) for b in bufs]}")
        return dts.pop()

    def weight_buffer(self, key: str) -> Buffer:
        """A per-type or global weight: a param, a weight gradient some kernel already wrote, or
        elementwise work on per-type weights (materialized by a type_map kernel)."""
        if key not in self.buffers:
            self.materialize(key)
        return self.buffers[key]

    # -- driver ---------------------------------------------------------------------------------
    def run(self) -> KernelProgram:
        ir = self.ir
        inputs, params, gdata = [], [], []
        for op in ir.ops():
            if op.kind is OpKind.INPUT:
                inputs.append((op.attr("name"), self.new_buffer(op, "in").name))
            elif op.kind is OpKind.PARAM:
                params.append((op.attr("name"), self.new_buffer(op, "p").name))
            elif op.kind is OpKind.GRAPH_DATA:
                # graph constants (1/degree normalizers) stay float32 in a 16-bit layer: rounded to
                # bf16, 1/c is off by up to 2^-9 relative, the same for every node of degree c, so a
                # sum over many nodes (a bias gradient) collects it instead of averaging it out
                # (AM-sized RGCN bf16 training: bias gradient 16% off, 40x the bf16 reference's error)
                gdt = self.storage(op.type.dtype)
                gdt = "float32" if gdt in ("bfloat16", "float16") else gdt
                gdata.append((op.attr("what"), self.new_buffer(op, "g", gdt).name))
        for op in ir.ops():
            k = op.kind
            if op.key in self.buffers:
                continue
            rule = op_def(k).lower      # how the op registry says this kind lowers
            if rule == "gemm":
                self.gemm(op)
            elif rule == "aggregate":
                e = self.expr(op.inputs[0], _AGGREGATE_LOOP[op.attr("side", "dst")])
                out = self.new_buffer(op, dtype=self.sum_storage(op))
                self.launches.append(TraversalLaunch(TraversalInstance(
                    "aggregate", e, out, side=op.attr("side", "dst"), reduce=op.attr("reduce"), dtype=out.dtype)))
            elif rule == "edge_softmax":
                e = self.expr(op.inputs[0], "edge")
                out = self.new_buffer(op)
                self.launches.append(TraversalLaunch(TraversalInstance("edge_softmax", e, out, dtype=out.dtype)))
            elif rule == "type_reduce":
                src = ir.op(op.inputs[0])
                rows = _ROWS[src.type.domain]       # edges, nodes or compact rows (by compact_etype)
                e = self.expr(src.key, rows)
                out = self.new_buffer(op)
                per = op.attr("per")
                self.launches.append(TraversalLaunch(TraversalInstance(
                    "type_reduce", e, out, rows=rows,
                    per=per.value if per is not None else "none", dtype=out.dtype)))
            elif rule == "host_index":      # shared weights (type -> group map)
                x = self.weight_buffer(op.inputs[0])
                out = self.new_buffer(op)
                mode = "gather" if k is OpKind.TYPE_GATHER else "scatter"
                self.launches.append(HostIndex(mode, x.name, out.name, tuple(op.attr("index"))))
            elif rule == "fused" and op.type.domain in (Domain.WEIGHT, Domain.GLOBAL):
                # sums of whole weights (backward adds a weight's gradients): a host add; other
                # elementwise work on per-type weights is materialized where it is read
                whole_add = (k is OpKind.BINARY and op.attr("fn") == "add"
                             and all(ir.op(i).type == op.type for i in op.inputs))
                if whole_add:
                    a, b = (self.weight_buffer(i) for i in op.inputs)
                    out = self.new_buffer(op)
                    self.launches.append(HostAdd(a.name, b.name, out.name))
                elif op.type.domain is Domain.GLOBAL:
                    raise LoweringError(f"elementwise {op.attr('fn') or k.value} on global weights is not lowered "
                                        "to kernels")
            elif rule == "fused":
                if op.key in self.outputs:
                    self.materialize(op.key)
            elif rule == "leaf":
                raise AssertionError(f"{k.value} always has a buffer")
            else:
                raise LoweringError(f"{k.value} is not lowered to kernels yet"
                                    + (f" (from {op.loc})" if op.loc else ""))
        outputs = []
        for name, key in zip(ir.output_names, ir.outputs):
            if key not in self.buffers:
                self.materialize(key)
            outputs.append((name, self.buffers[key].name))
        return KernelProgram(ir.name, tuple(self.buffers.values()), tuple(self.launches), tuple(inputs),
                             tuple(params), tuple(gdata), tuple(outputs))

def lower(ir: IRGraph, dtype: str | None = None) -> KernelProgram:
    """Lower a (forward or backward) IR graph to a kernel program.  Every buffer takes the dtype
    of its IR value; ``dtype`` overrides the storage of float values (an IR traced in float32
    run with bfloat16 storage)."""
    return _Lowering(ir, dtype).run()
