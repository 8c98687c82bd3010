"""The fn registry (pigeon/ir/fns.py): every fn's forms agree (C through the emulated CUDA text is
covered by traversal_cases; here TIR vs torch), and a fn registered inside a test runs through
trace, reference, autodiff, lowering and every backend with no other file touched."""
import random

import pytest
import torch

import pigeon as pg
from pigeon.graph.kernel_graph import kernel_graph
from pigeon.passes.lower import lower
from pigeon.dsl.values import unary
from pigeon.graph import load
from pigeon.ir import expr as ex
from pigeon.ir.fns import BOOL, FLOAT, FNS, INT, FnDef, register_fn, unregister_fn
from pigeon.ir.traversal import Buffer, RowRef
from pigeon.passes.autodiff import autodiff
from pigeon.reference import run
from pigeon.runtime.program import EmulateBackend, Executor, TorchBackend



def build_elementwise_llvm(e):
    """The TIR form through TVM's llvm build (TVM generates the ShiftAdd family's kernels)."""
    pytest.importorskip("tvm")
    from pigeon.runtime.tvm_llvm import build_elementwise_llvm as build
    return build(e)


CONSTS = {"leaky_relu": 0.1, "scale": -1.7, "shift": 0.3, "rsub": 2.0, "rdiv": 1.5, "leaky_step": 0.05}


def _inputs(cls: str, rows: int, gen: torch.Generator) -> torch.Tensor:
    if cls == FLOAT:
        return torch.randn(rows, 1, generator=gen) * 2 + 0.01
    if cls == INT:
        return torch.randint(-1000, 1000, (rows, 1), generator=gen, dtype=torch.int32)
    return torch.rand(rows, 1, generator=gen) > 0.5


@pytest.mark.parametrize("name", sorted(n for n, f in FNS.items() if f.tir is not None))
def test_tir_form_equals_torch_form(name):
    f = FNS[name]
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    for cls in f.operands:
        dtype = {FLOAT: "float32", INT: "int32", BOOL: "bool"}[cls]
        xs = [_inputs(cls, 64, gen) for _ in range(f.arity)]
        loads = [ex.load(Buffer(f"x{i}", "node", (1,), dtype), RowRef.SELF) for i in range(f.arity)]
        e = ex.unary(name, loads[0], CONSTS.get(name)) if f.arity == 1 else ex.binary(name, *loads)
        if name in ("shl", "shr"):
            xs[1] = torch.randint(0, 8, (64, 1), generator=gen, dtype=torch.int32)
        if name in ("floordiv", "mod"):       # signed, never zero
            xs[1] = torch.randint(1, 9, (64, 1), generator=gen, dtype=torch.int32) * (
                torch.randint(0, 2, (64, 1), generator=gen, dtype=torch.int32) * 2 - 1)
        lib = build_elementwise_llvm(e)
        out = torch.empty(64, 1, dtype=getattr(torch, e.dtype))
        lib["main"](*xs, out)
        want = f.torch(torch, xs[0], CONSTS.get(name)) if f.arity == 1 else f.torch(torch, *xs)
        torch.testing.assert_close(out, want.to(out.dtype).reshape(out.shape), rtol=2e-6, atol=1e-6,
                                   msg=lambda m: f"{name} on {dtype}: {m}")


@pytest.fixture
def softplus():
    fn = register_fn(FnDef(
        "softplus_test", 1, "log1pf(expf(x))",
        torch=lambda T, x, c: T.log1p(T.exp(x)),
        tir=lambda T, x, c: T.log(T.const(1.0, x.dtype) + T.exp(x)),
        grad=lambda G, x, y, c: G.un(x, "sigmoid")))
    yield fn
    unregister_fn("softplus_test")


def test_registered_fn_runs_through_every_stage(softplus):
    @pg.layer
    def spec(g, x, *, out_dim: int = 8):
        W = pg.weight("W", (x.dim, out_dim), per=g.etype)
        m = unary(pg.typed_linear(g.src(x), W, by=g.etype), "softplus_test")
        return pg.aggregate(g, m, "sum")

    g = load("tiny")
    seed = random.randrange(1 << 30)
    gen = torch.Generator().manual_seed(seed)
    ir = spec.trace(6)
    assert any(op.attr("fn") == "softplus_test" for op in ir.ops())
    # reference == plain torch
    layer = pg.compile(spec, g, 6, backend="reference")
    x = torch.randn(g.num_nodes, 6, generator=gen, requires_grad=True)
    W = layer.weights["W"]
    want = torch.zeros(g.num_nodes, 8).index_add(
        0, g.dst, torch.nn.functional.softplus(torch.einsum("ek,ekn->en", x[g.src], W[g.etype])))
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # autodiff + lowering, every CPU backend, forward and backward, against the reference
    res = autodiff(ir)
    fwd, bwd = lower(res.forward), lower(res.backward)
    kg = kernel_graph(g)
    params = {"W": W.detach()}
    xd = x.detach()
    want_f = run(res.forward, g, {"x": xd}, params)
    up = torch.randn(g.num_nodes, 8, generator=gen)
    want_b = run(res.backward, g, {"x": xd, "grad_out": up} | {s: want_f[s] for s in res.saved}, params)
    for backend in (TorchBackend(), EmulateBackend()):
        got_f = Executor(fwd, backend, poison=True).run(kg, {"x": xd}, params)
        torch.testing.assert_close(got_f["out"], want_f["out"], rtol=1e-5, atol=1e-5)
        used = {n for n, _ in bwd.inputs}
        ins = {k: v for k, v in ({"x": xd, "grad_out": up} | {s: got_f[s] for s in res.saved}).items() if k in used}
        got_b = Executor(bwd, backend, poison=True).run(kg, ins, params)
        for _, name in res.grads:
            torch.testing.assert_close(got_b[name], want_b[name], rtol=1e-4, atol=1e-4)
    # the gradient matches torch autograd of the plain-torch layer
    (want * up).sum().backward()
    torch.testing.assert_close(got_b[dict(res.grads)["x"]], x.grad, rtol=1e-4, atol=1e-4)
    # the C form reaches the kernel text, the TIR form builds and agrees
    from pigeon.codegen.traversal import render_traversal
    srcs = [render_traversal(l.inst).source for l in fwd.launches if hasattr(l, "inst") and hasattr(l.inst, "loop")]
    assert any("log1pf(expf(" in s for s in srcs)
    e = ex.unary("softplus_test", ex.load(Buffer("x0", "node", (1,)), RowRef.SELF))
    lib = build_elementwise_llvm(e)
    xs = torch.randn(32, 1, generator=gen)
    out = torch.empty(32, 1)
    lib["main"](xs, out)
    torch.testing.assert_close(out, torch.nn.functional.softplus(xs), rtol=1e-5, atol=1e-6)


def test_unknown_fn_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown unary fn 'nope'"):
        ex.unary("nope", ex.load(Buffer("x0", "node", (1,)), RowRef.SELF))
    with pytest.raises(ValueError, match="operand dtype int32"):
        ex.unary("sigmoid", ex.load(Buffer("x0", "node", (1,), "int32"), RowRef.SELF))
