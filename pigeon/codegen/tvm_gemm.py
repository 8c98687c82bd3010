"""TVM definitions and schedules of GemmInstance; see pigeon/codegen/tvm.py for the whole story.

rows: TE compute (symbolic int64 M / MX / T), blocks "acc" (fp32 k-sum) and "Z" (epilogue, cast).
weight_grad: TVMScript generated from the instance (loops over seg_ptr bounds), one variant per
target kind.  Written against apache-tvm 0.27 (tvm.tirx / tvm.s_tir, JSON-dict targets).
"""
from __future__ import annotations

import tvm
from tvm import te, tirx

from ..ir.kernel import GemmInstance
from .tir_unary import UNARY_TIR

__all__ = ["CUDA_TARGET", "EPILOGUE_OPS", "LLVM_DTYPES", "INDEX_DTYPES", "check_instance", "func_name",
           "rows_out_dtype", "gemm_primfunc", "weight_grad_tvmscript", "schedule_llvm", "schedule_cuda",
           "cuda_source"]

CUDA_TARGET = {"kind": "cuda", "arch": "sm_90"}
LLVM_DTYPES = ("float32", "bfloat16", "float16")   # all computed with fp32 accumulation
INDEX_DTYPES = ("int32", "int64")
_CUDA_THREADS = 128


# ---------------------------------------------------------------------------------------------
# epilogue
def _epilogue_expr(op: str, x: tirx.Expr) -> tirx.Expr:
    """One epilogue op ("name" or "name:const") applied to an fp32 TIR expression; the shared TIR
    table of unary fns (pigeon/codegen/tir_unary.py) gives its meaning."""
    name, _, arg = op.partition(":")
    if name not in UNARY_TIR:
        raise NotImplementedError(f"GEMM epilogue op {op!r} has no TVM definition; known: {sorted(UNARY_TIR)}")
    return UNARY_TIR[name][0](tirx, x, float(arg) if arg else 0.0)


EPILOGUE_OPS = ("neg", "relu", "sigmoid", "tanh", "exp", "gelu", "elu", "leaky_relu", "scale", "shift",
                "rsub", "rdiv", "step", "leaky_step", "elu_grad", "gelu_grad", "square", "recip")


def check_instance(inst: GemmInstance, index_dtype: str) -> None:
    if inst.form not in ("rows", "weight_grad"):
        raise ValueError(f"unknown GEMM form {inst.form!r}")
    if inst.dtype not in LLVM_DTYPES:
        raise NotImplementedError(f"GEMM dtype {inst.dtype!r}: TVM definitions cover {LLVM_DTYPES}")
    if inst.acc_dtype != "float32":
        raise NotImplementedError(f"GEMM acc_dtype {inst.acc_dtype!r}: only float32")
    if index_dtype not in INDEX_DTYPES:
        raise NotImplementedError(f"index dtype {index_dtype!r}: only {INDEX_DTYPES}")
    if inst.form == "weight_grad" and inst.epilogue:
        raise NotImplementedError("a weight_grad GEMM has no epilogue")
    for op in inst.epilogue:
        _epilogue_expr(op, tirx.Var("x", "float32"))


def rows_out_dtype(inst: GemmInstance) -> str:
    return inst.acc_dtype if inst.accumulate else inst.dtype


def func_name(inst: GemmInstance) -> str:
    return f"pigeon_gemm_{inst.form}_{inst.key()}"


# ---------------------------------------------------------------------------------------------
# definitions
def _rows_primfunc(inst: GemmInstance, index_dtype: str) -> tirx.PrimFunc:
    H, K, N, dt, acc_dt = inst.heads, inst.k, inst.n, inst.dtype, inst.acc_dtype
    M = te.var("M", "int64")
    MX = te.var("MX", "int64") if inst.gather else M
    NT = te.var("T", "int64")
    X = te.placeholder((MX, H, K), dt, name="X")
    W = te.placeholder((NT, H, N, K) if inst.transpose_w else (NT, H, K, N), dt, name="W")
    row_type = te.placeholder((M,), "int32", name="row_type") if inst.typed else None
    gather = te.placeholder((M,), index_dtype, name="gather") if inst.gather else None
    k = te.reduce_axis((0, K), name="k")

    def up(v):
        return v if dt == acc_dt else v.astype(acc_dt)

    def body(i, h, n):
        xi = gather[i] if gather is not None else i
        t = row_type[i] if row_type is not None else 0
        w = W[t, h, n, k] if inst.transpose_w else W[t, h, k, n]
        return te.sum(up(X[xi, h, k]) * up(w), axis=k)

    acc = te.compute((M, H, N), body, name="acc")

    def out(i, h, n):
        v = acc[i, h, n]
        for op in inst.epilogue:
            v = _epilogue_expr(op, v)
        return v.astype(rows_out_dtype(inst))

    Z = te.compute((M, H, N), out, name="Z")
    args = [X, W] + [b for b in (row_type, gather) if b is not None] + [Z]
    return te.create_prim_func(args).with_attr("global_symbol", func_name(inst))


def weight_grad_tvmscript(inst: GemmInstance, index_dtype: str, gpu: bool) -> str:
    H, K, N, dt, acc = inst.heads, inst.k, inst.n, inst.dtype, inst.acc_dtype
    ix = index_dtype
    params = (["x_h", "dy_h", "seg_h"] + (["gx_h"] if inst.gather else []) + (["gy_h"] if inst.scatter else [])
              + ["dw_h"])
    dw_shape = f"(NT, {H}, {N}, {K})" if inst.transpose_w else f"(NT, {H}, {K}, {N})"
    dw_at = "dW[t, h, n, k]" if inst.transpose_w else "dW[t, h, k, n]"
    x_row = "gx[i]" if inst.gather else "i"
    y_row = "gy[i]" if inst.scatter else "i"
    cast = (lambda e: e) if dt == acc else (lambda e: f'T.cast({e}, "{acc}")')
    down = (lambda e: e) if dt == acc else (lambda e: f'T.cast({e}, "{dt}")')
    store = (lambda a: down(f"{cast(dw_at)} + {a}")) if inst.accumulate else (lambda a: down(a))
    lines = [
        "@T.prim_func",
        f"def {func_name(inst)}({', '.join(p + ': T.handle' for p in params)}):",
        '    T.func_attr({"tirx.noalias": True})',
        "    MX = T.int64()", "    MY = T.int64()", "    M = T.int64()", "    S = T.int64()", "    NT = T.int64()",
        f'    X = T.match_buffer(x_h, (MX, {H}, {K}), "{dt}")',
        f'    dY = T.match_buffer(dy_h, (MY, {H}, {N}), "{dt}")',
        f'    seg = T.match_buffer(seg_h, (S,), "{ix}")',
    ]
    if inst.gather:
        lines.append(f'    gx = T.match_buffer(gx_h, (M,), "{ix}")')
    if inst.scatter:
        lines.append(f'    gy = T.match_buffer(gy_h, (M,), "{ix}")')
    lines.append(f'    dW = T.match_buffer(dw_h, {dw_shape}, "{dt}")')
    if not gpu:
        # one task per (t, h, block of KB k's): dW[t, h, kb:kb+KB, :] accumulated in an fp32 tile
        # (at most 16 x N), outer products in row order, so dY is read K / KB times, not K.
        kb = max(d for d in range(1, min(K, 16) + 1) if K % d == 0)
        nkb = K // kb
        lines += [
            f"    for task in T.parallel(NT * T.int64({H * nkb})):",
            f'        a = T.alloc_local(({kb}, {N}), "{acc}")',
            f"        t = T.meta_var(task // T.int64({H * nkb}))",
            f"        h = T.meta_var(task // T.int64({nkb}) % T.int64({H}))",
            f"        k0 = T.meta_var(task % T.int64({nkb}) * T.int64({kb}))",
            f"        for kk, n in T.grid({kb}, {N}):",
            f'            a[kk, n] = T.{acc}(0)',
            "        for i in range(T.cast(seg[t], \"int64\"), T.cast(seg[t + T.int64(1)], \"int64\")):",
            f"            for kk in range({kb}):",
            f"                xv = T.meta_var({cast(f'X[{x_row}, h, k0 + kk]')})",
            f"                for n in range({N}):",
            f"                    a[kk, n] = a[kk, n] + xv * {cast(f'dY[{y_row}, h, n]')}",
            f"        for kk, n in T.grid({kb}, {N}):",
            "            k = T.meta_var(k0 + kk)",
            f"            {dw_at} = {store('a[kk, n]')}",
        ]
    else:
        total, th = H * K * N, _CUDA_THREADS
        lines += [
            f"    for bx in T.thread_binding((NT * T.int64({total}) + T.int64({th - 1})) // T.int64({th}),"
            ' thread="blockIdx.x"):',
            f"        for tx in T.thread_binding(T.int64({th}), thread=\"threadIdx.x\"):",
            f'            a = T.alloc_local((1,), "{acc}")',
            f"            idx = T.meta_var(bx * T.int64({th}) + tx)",
            f"            if idx < NT * T.int64({total}):",
            f"                t = T.meta_var(idx // T.int64({total}))",
            f"                h = T.meta_var(idx // T.int64({K * N}) % T.int64({H}))",
            f"                k = T.meta_var(idx // T.int64({N}) % T.int64({K}))",
            f"                n = T.meta_var(idx % T.int64({N}))",
            f"                a[0] = T.{acc}(0)",
            "                for i in range(T.cast(seg[t], \"int64\"), T.cast(seg[t + T.int64(1)], \"int64\")):",
            f"                    a[0] = a[0] + {cast(f'X[{x_row}, h, k]')} * {cast(f'dY[{y_row}, h, n]')}",
            f"                {dw_at} = {store('a[0]')}",
        ]
    return "\n".join(lines) + "\n"


def gemm_primfunc(inst: GemmInstance, index_dtype: str = "int64", gpu: bool = False) -> tirx.PrimFunc:
    """The unscheduled PrimFunc of ``inst`` (rows: TE-made, with s_tir blocks; weight_grad: already
    loop-explicit, so ``gpu`` picks its thread-bound variant)."""
    check_instance(inst, index_dtype)
    if inst.form == "rows":
        return _rows_primfunc(inst, index_dtype)
    return tvm.script.from_source(weight_grad_tvmscript(inst, index_dtype, gpu))  # T is a default global


# ---------------------------------------------------------------------------------------------
# schedules
def _module(inst: GemmInstance, func: tirx.PrimFunc) -> tvm.IRModule:
    return tvm.IRModule({func_name(inst): func})


def schedule_llvm(inst: GemmInstance, index_dtype: str = "int64") -> tvm.IRModule:
    mod = _module(inst, gemm_primfunc(inst, index_dtype, gpu=False))
    if inst.form != "rows":
        return mod
    sch = tvm.s_tir.Schedule(mod)
    z = sch.get_sblock("Z", func_name=func_name(inst))
    i, h, _n = sch.get_loops(z)
    acc = sch.get_sblock("acc", func_name=func_name(inst))
    sch.compute_at(acc, h)                 # acc[i, h, :] computed just before it is stored
    sch.parallel(i)                        # (before decompose_reduction: parallel needs the
    n, kk = sch.get_loops(acc)[-2:]        #  reduction block whole)
    sch.decompose_reduction(acc, n)
    sch.reorder(kk, n)                     # k outer, n inner: W rows read contiguously
    return sch.mod


def schedule_cuda(inst: GemmInstance, index_dtype: str = "int64") -> tvm.IRModule:
    mod = _module(inst, gemm_primfunc(inst, index_dtype, gpu=True))
    if inst.form != "rows":
        return mod
    sch = tvm.s_tir.Schedule(mod)
    z = sch.get_sblock("Z", func_name=func_name(inst))
    fused = sch.fuse(*sch.get_loops(z))
    bx, tx = sch.split(fused, [None, _CUDA_THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    acc = sch.get_sblock("acc", func_name=func_name(inst))
    sch.compute_at(acc, tx)
    sch.set_scope(acc, 0, "local")         # the k-sum lives in a register
    return sch.mod


def cuda_source(inst: GemmInstance, index_dtype: str = "int64") -> str:
    """CUDA C source of ``inst`` for sm_90 (no GPU needed).  For the rows form the kernel writes
    Z [M, H, N]; scatter / accumulate are the caller's step, as on llvm."""
    target = tvm.target.Target(CUDA_TARGET)
    lib = tvm.compile(schedule_cuda(inst, index_dtype), target=target)
    sources = [m.inspect_source() for m in lib.mod.imports if m.kind == "cuda"]
    if len(sources) != 1:
        raise RuntimeError(f"expected one CUDA module, got {[m.kind for m in lib.mod.imports]}")
    return sources[0]
