"""C code of traversal element expressions (pigeon/ir/traversal.py) at one (row, flat feature index).

The emitter writes straight-line code: one ``const`` temporary per distinct subexpression, with
static shapes folded into the index arithmetic (ravel/unravel by compile-time constants). Code
is placed into *scopes*, the nested loop levels a kernel template lays out (e.g. kernel -> node
-> feature element -> edge). Every value records the loop variables it depends on and is emitted
in the innermost scope that binds one of them, i.e. as far out as it can go: a destination-node
load inside an edge loop is read once per node, a constant once per thread. A memo per scope
emits a subexpression evaluated at the same index once. ``dot`` and ``sum_to`` become small
inner loops over their static extent (``#pragma unroll`` up to ``UNROLL_MAX``) whose
loop-invariant parts are hoisted out the same way.

Loads convert the storage type (float32, float64, bfloat16, float16) to float with the
overloaded ``pg_f``; all math is float. C identifiers come from ``Buffer.name`` (prefixed
``b_``), graph array names (``g_``) and counters (``t<n>``, ``s<n>``, ``k<n>``, ``m<n>``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..ir.expr import Buffer, Expr, RowRef
from ..ir.fns import INT_C, FnError, get_fn
from ..ir.types import dtype_class
from .jinja import cfloat
from .kernel_source import c_ident

UNROLL_MAX = 32
# dot loops of the traversal kernels (ExprEmitter(vectorize=True)) run in chunks of VEC_CHUNK
# elements; a load whose index steps by one along the loop then reads its chunk with 16-byte
# loads (one per 8 bf16 / fp16 or 4 float32 elements) and takes the elements from registers. A
# per-element 2-byte load of a row slice per thread left RGAT's edge-wise dots at ~1/4 of DRAM
# bandwidth (AM-sized bf16 training, H200). The buffers read so must be 16-byte aligned
# (``aligned`` lists them; the launcher copies one that is not).
VEC_CHUNK = 8
VEC_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LANE_FN = {"float32": "pg_lane_f32", "bfloat16": "pg_lane_bf16", "float16": "pg_lane_f16"}

C_STORAGE = {"float32": "float", "float64": "double", "bfloat16": "__nv_bfloat16", "float16": "__half",
             "int8": "signed char", "uint8": "unsigned char", "int32": "int", "int64": "long long", "bool": "bool"}
# C types of compute dtypes (pigeon.ir.expr.compute_dtype)
C_COMPUTE = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long", "bool": "bool"}


def compute_type(dtype: str) -> str:
    if dtype not in C_COMPUTE:
        raise ExprCodegenError(f"no C compute type for dtype {dtype!r} (known: {sorted(C_COMPUTE)})")
    return C_COMPUTE[dtype]


def fn_code(fn: str, arity: int, names: dict[str, str], dtype: str) -> str:
    """C of a registered fn over the C operands in ``names`` (x, y, c); integer operands use the
    integer spelling where the float one differs (fminf -> min)."""
    try:
        f = get_fn(fn, arity)
    except FnError as e:
        raise ExprCodegenError(str(e)) from None
    template = INT_C.get(fn, f.c) if dtype_class(dtype) != "float" else f.c
    if f.takes_const and "c" not in names:
        raise ExprCodegenError(f"unary {fn} needs a constant c")
    return _subst(template, names)


class ExprCodegenError(ValueError):
    pass


# Hardware approximations of float fns, for kernels whose results are stored in bfloat16/float16
# (ExprEmitter(approx_math=True); the attention codegen sets it for its bf16/fp16 kernels only,
# never for float32 kernels or the RGNN traversal kernels).  Error bounds, against bf16's unit
# roundoff 2^-8 (fp16's 2^-11):
#   tanh -> pg_tanh_approx: PTX ``tanh.approx.f32``, max relative error 2^-10.987 (PTX ISA), one
#           MUFU op instead of tanhf's ~20 instructions with a branch; on the host (the CPU
#           emulator) the helper is tanhf.  A soft-cap c * tanh(s / c) moves by at most c * 2^-11
#           absolutely, i.e. exp(score) relatively by c * 2^-11 (below bf16's 2^-8 for c <= 8;
#           flash-attention's own soft-cap uses the same instruction).
#   exp  -> exp2f(x * log2(e)): ex2.approx.f32 (max 2 ulp) on the pre-scaled argument; the rounding
#           of the product adds a relative error <= |x| log2(e) ln(2) 2^-24 = |x| 2^-24 (6e-6 at
#           |x| = 88, where expf overflows): 2^-17 or less, far below 2^-8.  The CPU emulator runs
#           the same formula.
#   sigmoid -> 1 / (1 + exp2f(-x log2(e))): the same bound as exp (the 1 + and the divide are exact
#           to 1 ulp).
APPROX_C = {"tanh": "pg_tanh_approx(x)", "exp": "exp2f((x) * 1.44269504f)",
            "sigmoid": "(1.f / (1.f + exp2f((x) * -1.44269504f)))"}
APPROX_HELPERS = {"pg_tanh_approx": """\
#ifndef PIGEON_APPROX_TANH
#define PIGEON_APPROX_TANH
// tanh.approx.f32: max relative error 2^-10.987 (PTX ISA); the host (the CPU emulator) takes tanhf
static __device__ __forceinline__ float pg_tanh_approx(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return tanhf(x);
#endif
}
#endif"""}


def storage_type(dtype: str) -> str:
    if dtype not in C_STORAGE:
        raise ExprCodegenError(f"no C storage type for dtype {dtype!r} (known: {sorted(C_STORAGE)})")
    return C_STORAGE[dtype]


def buffer_param(b: Buffer) -> str:
    return "b_" + c_ident(b.name, "buffer name")


c_float = cfloat   # a C float literal exactly equal to float32(c)


# ------------------------------------------------------------------------------ index arithmetic

@dataclass(frozen=True)
class Atom:
    """An opaque non-negative int: a loop variable, or a quotient/remainder that did not fold."""
    code: str
    vars: frozenset
    ub: int                                  # exclusive upper bound
    div_of: tuple | None = field(default=None, compare=False)   # (Idx, divisor) for ``(x / d)``


@dataclass(frozen=True)
class Idx:
    """An affine int index ``sum coef * atom + const`` (coefs and const >= 0), kept canonical
    (terms sorted by code) so equal indices have equal code and fold: ``(j * 8 + k) / 8 -> j``
    when ``k < 8``, ``(j * 8 + k) % 8 -> k``."""
    terms: tuple = ()                        # ((Atom, coef), ...)
    const: int = 0

    @property
    def is_const(self) -> bool:
        return not self.terms

    @property
    def ub(self) -> int:
        return sum(c * (a.ub - 1) for a, c in self.terms) + self.const + 1

    @property
    def vars(self) -> frozenset:
        out = frozenset()
        for a, _ in self.terms:
            out |= a.vars
        return out

    @property
    def code(self) -> str:
        parts = [a.code if c == 1 else f"{a.code} * {c}" for a, c in self.terms]
        if self.const or not parts:
            parts.append(str(self.const))
        return " + ".join(parts)


def _make(terms: dict, const: int) -> Idx:
    items = tuple(sorted(((a, c) for a, c in terms.items() if c), key=lambda t: t[0].code))
    return Idx(items, const)


def const_idx(c: int) -> Idx:
    return Idx((), int(c))


def var_idx(name: str, ub: int) -> Idx:
    return Idx(((Atom(name, frozenset({name}), ub), 1),), 0)


def _atom_idx(a: Atom) -> Idx:
    return Idx(((a, 1),), 0)


def idx_mul(x: Idx, c: int) -> Idx:
    if c == 0:
        return const_idx(0)
    return _make({a: k * c for a, k in x.terms}, x.const * c)


def idx_add(x: Idx, y: Idx) -> Idx:
    terms = dict(x.terms)
    for a, k in y.terms:
        terms[a] = terms.get(a, 0) + k
    return _make(terms, x.const + y.const)


def idx_div(x: Idx, c: int) -> Idx:
    if c == 1:
        return x
    if x.ub <= c:
        return const_idx(0)
    high = {a: k // c for a, k in x.terms if k % c == 0}
    low = [(a, k) for a, k in x.terms if k % c]
    low_max = sum(k * (a.ub - 1) for a, k in low) + x.const % c
    if low_max < c:
        return _make(high, x.const // c)
    if len(x.terms) == 1 and x.terms[0][1] == 1 and x.const == 0 and x.terms[0][0].div_of is not None:
        base, d = x.terms[0][0].div_of
        return idx_div(base, d * c)
    return _atom_idx(Atom(f"({_operand(x)} / {c})", x.vars, -(-x.ub // c), (x, c)))


def idx_mod(x: Idx, c: int) -> Idx:
    if c == 1:
        return const_idx(0)
    if x.ub <= c:
        return x
    r = _make({a: k for a, k in x.terms if k % c}, x.const % c)
    if r.ub <= c:
        return r
    return _atom_idx(Atom(f"({_operand(r)} % {c})", r.vars, c))


def _operand(x: Idx) -> str:
    """``x.code`` safe as the left operand of ``/`` or ``%``."""
    if x.is_const or (len(x.terms) == 1 and x.terms[0][1] == 1 and not x.const):
        return x.code
    return f"({x.code})"


def strides(shape: tuple[int, ...]) -> list[int]:
    return [math.prod(shape[i + 1:]) for i in range(len(shape))]


def unravel(f: Idx, shape: tuple[int, ...]) -> list[Idx]:
    return [idx_mod(idx_div(f, st), n) for st, n in zip(strides(shape), shape)]


def bcast_flat(f: Idx, shape: tuple[int, ...], arg: tuple[int, ...]) -> Idx:
    """Flat index into an argument of shape ``arg`` read at the multi-index ``unravel(f, shape)``
    with left-aligned broadcasting (axes of size 1 in ``arg`` read index 0)."""
    if len(arg) > len(shape) or any(a not in (s, 1) for a, s in zip(arg, shape)):
        raise ExprCodegenError(f"shape {list(arg)} does not broadcast (left-aligned) to {list(shape)}")
    if tuple(arg) == tuple(shape[:len(arg)]):
        return idx_div(f, math.prod(shape[len(arg):]))
    out = const_idx(0)
    for i, (a, st, I) in enumerate(zip(arg, strides(arg), unravel(f, shape))):
        if a != 1:
            out = idx_add(out, idx_mul(I, st))
    return out


# ------------------------------------------------------------------------------ scopes and values

@dataclass(frozen=True)
class Value:
    code: str                 # a C identifier or literal
    vars: frozenset = frozenset()


class Scope:
    """One loop level of a kernel: the variables it binds and the code emitted at its top."""

    def __init__(self, binds=(), parent: "Scope | None" = None, name: str = ""):
        self.binds = frozenset(binds)
        self.parent = parent
        self.name = name
        self.lines: list[str] = []
        self.memo: dict = {}

    def chain(self):
        s = self
        while s is not None:
            yield s
            s = s.parent

    def child(self, binds=(), name: str = "") -> "Scope":
        return Scope(binds, self, name)

    def code(self, indent: int) -> str:
        pad = " " * indent
        return "\n".join(pad + ln if ln else ln for block in self.lines for ln in block.split("\n"))


@dataclass(frozen=True)
class RowBinding:
    """How a RowRef finds its row: ``code`` is an int C expression of ``vars``; with ``array`` set
    the row is ``array[code]`` (loaded once into a temporary)."""
    code: str
    vars: frozenset
    array: str | None = None


def _subst(template: str, names: dict[str, str]) -> str:
    pat = r"\b(" + "|".join(map(re.escape, names)) + r")\b"
    return re.sub(pat, lambda m: names[m.group(1)], template)


def _indent(text: str, n: int = 4) -> str:
    return "\n".join((" " * n + ln) if ln else ln for ln in text.split("\n"))


class ExprEmitter:
    """Emits C for expressions of one kernel. ``rows`` maps every RowRef the loop allows to its
    binding; a load through any other RowRef is an error naming the loop."""

    def __init__(self, rows: dict[RowRef, RowBinding], loop_name: str,
                 indices: dict[str, RowBinding] | None = None, approx_math: bool = False,
                 vectorize: bool = False):
        self.rows = rows
        self.vectorize = vectorize
        self.chunks: dict[str, str] = {}        # dot chunk variable -> its in-chunk variable
        self.aligned: set[str] = set()          # buffers read with 16-byte loads
        # float fns as hardware approximations (APPROX_C; for bf16/fp16 kernels only): the
        # file-scope helpers they call are collected in ``helpers`` (see :meth:`helper_code`)
        self.approx_math = approx_math
        self.helpers: set[str] = set()
        # index variables the loop binds (pigeon.ir.expr index nodes): the row, and for attention
        # loops batch/head/query/key; feature indices come from the flat index being evaluated
        self.indices = dict(indices or {})
        if "row" not in self.indices and RowRef.SELF in rows and rows[RowRef.SELF].array is None:
            self.indices["row"] = rows[RowRef.SELF]
        self.loop_name = loop_name
        self.n = 0
        self.graph_arrays: set[str] = set()
        self.buffers: dict[str, Buffer] = {}

    def helper_code(self) -> str:
        """File-scope C definitions of the approximation helpers the emitted code calls ("" if none)."""
        return "\n".join(APPROX_HELPERS[n] for n in sorted(self.helpers))

    def unary_code(self, fn: str, names: dict[str, str], dtype: str) -> str:
        if self.approx_math and fn in APPROX_C and dtype_class(dtype) == "float":
            template = APPROX_C[fn]
            self.helpers.update(n for n in APPROX_HELPERS if n in template)
            return _subst(template, names)
        return fn_code(fn, 1, names, dtype)

    # -- helpers -------------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    @staticmethod
    def place(vars: frozenset, scope: Scope) -> Scope:
        """The innermost scope of ``scope``'s chain binding any of ``vars`` (the root if none)."""
        last = scope
        bound = frozenset()
        target = None
        for s in scope.chain():
            bound |= s.binds
            if target is None and s.binds & vars:
                target = s
            last = s
        missing = vars - bound
        if missing:
            raise ExprCodegenError(f"internal: variables {sorted(missing)} are not bound in scope {scope.name!r}")
        return target if target is not None else last

    @staticmethod
    def lookup(key, scope: Scope):
        for s in scope.chain():
            if key in s.memo:
                return s.memo[key]
        return None

    def define(self, ctype: str, prefix: str, rhs: str, vars: frozenset, scope: Scope, key) -> Value:
        target = self.place(vars, scope)
        name = self.fresh(prefix)
        target.lines.append(f"const {ctype} {name} = {rhs};")
        v = Value(name, vars)
        target.memo[key] = v
        return v

    def row(self, ref: RowRef, scope: Scope) -> Value | None:
        if ref is RowRef.NONE:
            return None
        b = self.rows.get(ref)
        if b is None:
            raise ExprCodegenError(f"row reference {ref.value!r} is not allowed in a {self.loop_name} loop")
        if b.array is None:
            return Value(b.code, b.vars)
        key = ("row", ref)
        v = self.lookup(key, scope)
        if v is None:
            self.graph_arrays.add(b.array)
            v = self.define("int", "s", f"g_{b.array}[{b.code}]", b.vars, scope, key)
        return v

    def _loop(self, scope: Scope, extent: int, body, what: str) -> Value:
        """``acc = sum over m in [0, extent) of body(m_idx, inner_scope)``, hoisted as far out as
        its operands allow."""
        if extent == 1:
            return body(const_idx(0), scope)
        if (self.vectorize and what in ("dot", "sum_to") and extent % VEC_CHUNK == 0 and VEC_CHUNK < extent <= UNROLL_MAX):
            return self._chunked_loop(scope, extent, body)
        var = self.fresh("k" if what == "dot" else "m")
        inner = scope.child({var}, f"{what} loop {var}")
        val = body(var_idx(var, extent), inner)
        vars = val.vars - {var}
        target = self.place(vars, scope)
        acc = self.fresh("t")
        pragma = "#pragma unroll" if extent <= UNROLL_MAX else "#pragma unroll 4"
        body_text = "\n".join(inner.lines + [f"{acc} += {val.code};"])
        target.lines.append(f"float {acc} = 0.f;\n{pragma}\nfor (int {var} = 0; {var} < {extent}; ++{var}) {{\n"
                            f"{_indent(body_text)}\n}}")
        return Value(acc, vars)

    def _chunked_loop(self, scope: Scope, extent: int, body) -> Value:
        """``_loop`` as chunks of VEC_CHUNK: ``k = kc + kv``, kc a multiple of VEC_CHUNK (its own
        scope: where a chunk's 16-byte loads go), kv the element in the chunk (unrolled, so each
        lane taken from a loaded chunk is a register)."""
        kc, kv = self.fresh("kc"), self.fresh("kv")
        self.chunks[kc] = kv
        chunk = scope.child({kc}, f"dot chunk {kc}")
        inner = chunk.child({kv}, f"dot lane {kv}")
        # kc's bound keeps kc + kv < extent, so index arithmetic folds as it does for one k
        k = idx_add(var_idx(kc, extent - VEC_CHUNK + 1), var_idx(kv, VEC_CHUNK))
        val = body(k, inner)
        vars = val.vars - {kc, kv}
        target = self.place(vars, scope)
        acc = self.fresh("t")
        inner_text = "\n".join(inner.lines + [f"{acc} += {val.code};"])
        chunk_text = "\n".join(chunk.lines + [f"#pragma unroll\nfor (int {kv} = 0; {kv} < {VEC_CHUNK}; ++{kv}) {{\n"
                                               f"{_indent(inner_text)}\n}}"])
        target.lines.append(f"float {acc} = 0.f;\n#pragma unroll\nfor (int {kc} = 0; {kc} < {extent}; "
                            f"{kc} += {VEC_CHUNK}) {{\n{_indent(chunk_text)}\n}}")
        return Value(acc, vars)

    def _vector_load(self, b: Buffer, row: Value | None, idx: Idx, scope: Scope, key) -> Value | None:
        """A load at ``idx`` stepping by one along a chunked dot loop, as a lane of 16-byte loads
        of the chunk (None: not that shape; the caller loads the element)."""
        if not self.chunks or b.dtype not in VEC_BYTES:
            return None
        n = 16 // VEC_BYTES[b.dtype]                      # elements per 16-byte load
        coef = {a.code: c for a, c in idx.terms}
        pair = [(kc, kv) for kc, kv in self.chunks.items() if coef.get(kc) == 1 and coef.get(kv) == 1]
        if len(pair) != 1:
            return None
        kc, kv = pair[0]
        if idx.const % n or any(c % n for a, c in idx.terms if a.code not in (kc, kv)):
            return None
        if row is not None and b.width % n:
            return None
        base = _make({a: c for a, c in idx.terms if a.code != kv}, idx.const)
        if row is None:
            off, vars = base.code, base.vars
        else:
            vars = row.vars | base.vars
            off = f"(long long){row.code} * {b.width}" + ("" if base.is_const and base.const == 0 else f" + {base.code}")
        vkey = ("vload", b.name, row.code if row is not None else None, base.code)
        vec = self.lookup(vkey, scope)
        q = VEC_CHUNK // n                                 # 16-byte loads per chunk
        if vec is None:
            target = self.place(vars, scope)
            name = self.fresh("v")
            loads = ", ".join(f"pg_ld16(&{buffer_param(b)}[{off}{f' + {i * n}' if i else ''}])" for i in range(q))
            target.lines.append(f"const uint4 {name}[{q}] = {{{loads}}};")
            vec = Value(name, vars)
            target.memo[vkey] = vec
        self.aligned.add(b.name)
        lane = f"{vec.code}[0], {kv}" if q == 1 else f"{vec.code}[{kv} / {n}], {kv} % {n}"
        return self.define("float", "t", f"{LANE_FN[b.dtype]}({lane})", vars | {kv}, scope, key)

    # -- expressions ---------------------------------------------------------------------
    def eval(self, e: Expr, idx: Idx, scope: Scope) -> Value:
        """The value of ``e`` at flat feature index ``idx`` (``0 <= idx < prod(e.shape)``)."""
        key = ("expr", e, idx.code)
        v = self.lookup(key, scope)
        if v is not None:
            return v
        v = self._eval(e, idx, scope)
        if v.code and key not in self.place(v.vars, scope).memo:
            self.place(v.vars, scope).memo[key] = v
        return v

    def _eval(self, e: Expr, idx: Idx, scope: Scope) -> Value:
        op = e.op
        ctype = compute_type(e.dtype)
        key = ("expr", e, idx.code)
        if op == "const":
            if e.c is None:
                raise ExprCodegenError("const expression without a value")
            if e.dtype == "bool":
                return Value("true" if e.c else "false")
            if dtype_class(e.dtype) == "int":
                return Value(f"({ctype})({int(e.c)})")
            return Value(c_float(e.c) if e.dtype == "float32" else repr(float(e.c)))
        if op == "index":
            if e.fn.startswith("feat"):
                axis = int(e.fn[4:])
                if axis >= len(e.shape):
                    raise ExprCodegenError(f"index {e.fn} of a value of shape {list(e.shape)}")
                i = unravel(idx, e.shape)[axis]
                return Value(f"(int)({i.code})", i.vars)
            b = self.indices.get(e.fn)
            if b is None:
                raise ExprCodegenError(f"index variable {e.fn!r} is not bound in a {self.loop_name} loop "
                                       f"(bound: {sorted(self.indices)})")
            return Value(f"(int)({b.code})", b.vars)
        if op == "var":
            b = self.indices.get(e.fn)
            if b is None:
                raise ExprCodegenError(f"value {e.fn!r} is not bound in a {self.loop_name} (bound: {sorted(self.indices)})")
            return Value(b.code, b.vars)
        if op == "load":
            b = e.buffer
            if b is None:
                raise ExprCodegenError("load without a buffer")
            if tuple(e.shape) != tuple(b.shape):
                raise ExprCodegenError(f"load of {b.name}: expression shape {list(e.shape)} != buffer shape {list(b.shape)}")
            prev = self.buffers.setdefault(b.name, b)
            if prev != b:
                raise ExprCodegenError(f"two different buffers are named {b.name!r}: {prev} and {b}")
            storage_type(b.dtype)
            row = self.row(e.row, scope)
            W = b.width
            if ctype == "float":
                v = self._vector_load(b, row, idx, scope, key)
                if v is not None:
                    return v
            if row is None:
                off, vars = idx.code, idx.vars
            else:
                vars = row.vars | idx.vars
                if W == 1:
                    off = row.code
                else:
                    off = f"(long long){row.code} * {W}" + ("" if idx.is_const and idx.const == 0 else f" + {idx.code}")
            read = f"{buffer_param(b)}[{off}]"
            rhs = f"pg_f({read})" if ctype == "float" and dtype_class(b.dtype) == "float" else f"({ctype}){read}"
            return self.define(ctype, "t", rhs, vars, scope, key)
        if op == "reshape":
            (a,) = e.args
            if math.prod(a.shape) != math.prod(e.shape):
                raise ExprCodegenError(f"reshape {list(a.shape)} -> {list(e.shape)} changes the element count")
            return self.eval(a, idx, scope)
        if op == "cast":
            (a,) = e.args
            x = self.eval(a, idx, scope)
            return self.define(ctype, "t", f"({ctype})({x.code})", x.vars, scope, key)
        if op == "unary":
            (a,) = e.args
            if tuple(a.shape) != tuple(e.shape):
                raise ExprCodegenError(f"unary {e.fn}: argument shape {list(a.shape)} != {list(e.shape)}")
            x = self.eval(a, idx, scope)
            names = {"x": x.code}
            if e.c is not None:
                names["c"] = c_float(e.c)
            return self.define(ctype, "t", self.unary_code(e.fn, names, a.dtype), x.vars, scope, key)
        if op in ("binary", "where"):
            vals = [self.eval(a, bcast_flat(idx, e.shape, a.shape), scope) for a in e.args]
            vars = frozenset().union(*(v.vars for v in vals))
            if op == "where":
                rhs = f"({vals[0].code} ? ({ctype})({vals[1].code}) : ({ctype})({vals[2].code}))"
            else:
                rhs = fn_code(e.fn, 2, {"x": vals[0].code, "y": vals[1].code}, e.args[0].dtype)
            return self.define(ctype, "t", rhs, vars, scope, key)
        if op == "dot":
            a, b = e.args
            if not a.shape or not b.shape or a.shape[-1] != b.shape[-1]:
                raise ExprCodegenError(f"dot of shapes {list(a.shape)} and {list(b.shape)}: last axes differ")
            K = a.shape[-1]
            ia = idx_mul(bcast_flat(idx, e.shape, a.shape[:-1]), K)
            ib = idx_mul(bcast_flat(idx, e.shape, b.shape[:-1]), K)

            def body(k: Idx, s: Scope) -> Value:
                va = self.eval(a, idx_add(ia, k), s)
                vb = self.eval(b, idx_add(ib, k), s)
                return self.define("float", "t", f"{va.code} * {vb.code}", va.vars | vb.vars, s,
                                   ("dotterm", e, idx.code, k.code))
            return self._loop(scope, K, body, "dot")
        if op == "sum_to":
            (a,) = e.args
            A, S = tuple(a.shape), tuple(e.shape)
            if len(A) < len(S) or any(s not in (n, 1) for s, n in zip(S, A)):
                raise ExprCodegenError(f"sum_to {list(A)} -> {list(S)}: not a reduction to a broadcastable shape")
            sa = strides(A)
            I = unravel(idx, S)
            kept = const_idx(0)
            summed = []   # (size, stride in A)
            for i, n in enumerate(A):
                if n == 1:
                    continue
                if i < len(S) and S[i] == n:
                    kept = idx_add(kept, idx_mul(I[i], sa[i]))
                else:
                    summed.append((n, sa[i]))
            M = math.prod(n for n, _ in summed)

            def body(m: Idx, s: Scope) -> Value:
                off = kept
                inner = M
                for n, st in summed:
                    inner //= n
                    off = idx_add(off, idx_mul(idx_mod(idx_div(m, inner), n), st))
                return self.eval(a, off, s)
            return self._loop(scope, M, body, "sum_to")
        raise ExprCodegenError(f"unknown expression op {op!r}")
