"""pigeon.compile's module: specs whose outputs are also saved for backward, the layer registry's
lifetime, and input checking that is the same on both backends
(and leaves a layer usable after a bad call)."""
import gc

import pytest
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.reference import InputError

IN = 4


@pytest.fixture(scope="module")
def g():
    return load("tiny")


# ---------------------------------------------------------------- outputs that backward also saves

@pg.layer
def agg_and_relu(g, x, *, out_dim: int = 8):
    W = pg.weight("W", (x.dim, out_dim), per=g.etype)
    h = pg.aggregate(g, pg.typed_linear(g.src(x), W, by=g.etype), "sum")
    return {"a": h, "b": pg.relu(h)}


@pg.layer
def attention_weights(g, x, *, out_dim: int = 6, heads: int = 2):
    W = pg.weight("W", (x.dim, heads * out_dim), per=g.etype)
    a = pg.weight("a", (heads, out_dim), per=g.etype)
    z = pg.typed_linear(g.src(x), W, by=g.etype).heads(heads)
    alpha = pg.edge_softmax(g, pg.leaky_relu(pg.dot(z, a[g.etype]), 0.2))
    return {"h": pg.aggregate(g, alpha * z, "sum").flatten(), "alpha": alpha}


@pg.layer
def same_value_twice(g, x, *, out_dim: int = 5):
    W = pg.weight("W", (x.dim, out_dim), per=g.etype)
    h = pg.aggregate(g, pg.typed_linear(g.src(x), W, by=g.etype), "mean")
    return {"first": h, "second": h}


@pg.layer
def linear_out(g, x, *, out_dim: int = 5):
    return pg.typed_linear(g.src(x), pg.weight("W", (x.dim, out_dim), per=g.etype), by=g.etype)


def _both(spec, g, in_dim=IN, **hp):
    k = pg.compile(spec, g, in_dim, backend="kernels", **hp)
    r = pg.compile(spec, g, in_dim, backend="reference", **hp)
    r.load_state_dict(k.state_dict())
    return k, r


def _forward_backward(layer, x, ups):
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    out = out if isinstance(out, dict) else {"out": out}
    loss = sum((out[n] * ups[n]).sum() for n in ups)
    grads = torch.autograd.grad(loss, [x] + list(layer.weights.values()))
    return {n: v.detach() for n, v in out.items()}, grads


@pytest.mark.parametrize("spec", [agg_and_relu, attention_weights, same_value_twice, linear_out],
                         ids=lambda s: s.name)
def test_outputs_saved_for_backward_run_on_kernels(g, spec):
    k, r = _both(spec, g)
    torch.manual_seed(0)
    x = torch.randn(g.num_nodes, IN)
    ref_out = r(x)
    ref_out = ref_out if isinstance(ref_out, dict) else {"out": ref_out}
    ups = {n: torch.randn_like(v) for n, v in ref_out.items()}
    got, g_got = _forward_backward(k, x, ups)
    want, g_want = _forward_backward(r, x, ups)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5, msg=lambda m: f"output {n}: {m}")
    for name, a, b in zip(["x"] + list(k.weights), g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_outputs_of_one_call_are_distinct_tensors(g):
    k, _ = _both(same_value_twice, g)
    out = k(torch.randn(g.num_nodes, IN))
    assert out["first"].data_ptr() != out["second"].data_ptr()
    torch.testing.assert_close(out["first"], out["second"])


def test_outputs_saved_for_backward_under_opcheck(g):
    k, _ = _both(attention_weights, g)
    x = torch.randn(g.num_nodes, IN, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in k.weights.values()]
    torch.library.opcheck(torch.ops.pigeon.layer_forward.default, (k.layer_id, [x], params))


def test_outputs_saved_for_backward_under_torch_compile(g):
    k, _ = _both(attention_weights, g)
    x = torch.randn(g.num_nodes, IN, requires_grad=True)
    compiled = torch.compile(k, fullgraph=True, backend="eager")
    got, want = compiled(x), k(x)
    for n in want:
        torch.testing.assert_close(got[n], want[n])
    (got["h"].sum() + got["alpha"].square().sum()).backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- the registry of compiled layers

def test_registry_forgets_layers_nobody_holds(g):
    from pigeon.runtime import ops
    gc.collect()
    start = len(ops._REGISTRY)
    layers = [pg.compile(linear_out, g, IN, backend="kernels", out_dim=d) for d in range(1, 21)]
    assert len(ops._REGISTRY) == start + 20
    del layers
    gc.collect()
    assert len(ops._REGISTRY) == start


def test_layers_with_one_id_share_an_entry_that_lives_while_one_does(g):
    from pigeon.runtime import ops
    gc.collect()
    start = len(ops._REGISTRY)
    a = pg.compile(linear_out, g, IN, backend="kernels", out_dim=7)
    b = pg.compile(linear_out, g, IN, backend="kernels", out_dim=7)
    assert a.layer_id == b.layer_id and len(ops._REGISTRY) == start + 1
    x = torch.randn(g.num_nodes, IN)
    want = b(x).detach()        # an output's autograd graph holds the entry too
    del a
    gc.collect()
    torch.testing.assert_close(b(x), want)          # b's entry survived a's death
    del b
    gc.collect()
    assert len(ops._REGISTRY) == start


def test_backward_after_the_layer_is_gone(g):
    x = torch.randn(g.num_nodes, IN, requires_grad=True)
    out = pg.compile(agg_and_relu, g, IN, backend="kernels")(x)    # the layer is a temporary
    gc.collect()
    (out["a"].sum() + out["b"].sum()).backward()
    assert torch.isfinite(x.grad).all()


def test_deepcopy_of_a_layer_outlives_the_original(g):
    import copy
    a = pg.compile(linear_out, g, IN, backend="kernels", out_dim=3)
    b = copy.deepcopy(a)
    x = torch.randn(g.num_nodes, IN)
    want = a(x)
    del a
    gc.collect()
    torch.testing.assert_close(b(x), want)


# ---------------------------------------------------------------- input checking, both backends

@pg.layer
def node_and_edge(g, x, w: pg.EdgeTensor, *, out_dim: int = 3):
    W = pg.weight("W", (x.dim, out_dim), per=g.etype)
    return pg.aggregate(g, pg.typed_linear(g.src(x), W, by=g.etype) * w, "sum")


NE = {"x": IN, "w": 1}


def _error(layer, *args, **kwargs):
    with pytest.raises(Exception) as info:
        layer(*args, **kwargs)
    return type(info.value), str(info.value)


BAD_CALLS = {
    "wrong_dtype": lambda g: ((torch.randn(g.num_nodes, IN, dtype=torch.float64), torch.randn(g.num_edges, 1)), {}),
    "wrong_shape": lambda g: ((torch.randn(g.num_nodes, IN + 1), torch.randn(g.num_edges, 1)), {}),
    "edge_rows": lambda g: ((torch.randn(g.num_nodes, IN), torch.randn(g.num_nodes, 1)), {}),
    "missing": lambda g: ((torch.randn(g.num_nodes, IN),), {}),
    "wrong_device": lambda g: ((torch.randn(g.num_nodes, IN, device="meta"), torch.randn(g.num_edges, 1)), {}),
    "non_tensor": lambda g: ((torch.randn(g.num_nodes, IN).tolist(), torch.randn(g.num_edges, 1)), {}),
    "integer": lambda g: ((torch.ones(g.num_nodes, IN, dtype=torch.long), torch.randn(g.num_edges, 1)), {}),
    "unknown_keyword": lambda g: ((torch.randn(g.num_nodes, IN), torch.randn(g.num_edges, 1)), {"y": 1}),
    "too_many": lambda g: ((torch.randn(g.num_nodes, IN), torch.randn(g.num_edges, 1), 3), {}),
    "twice": lambda g: ((torch.randn(g.num_nodes, IN), torch.randn(g.num_edges, 1)), {"x": 1}),
}

MESSAGES = {
    "wrong_dtype": r"^node_and_edge: input 'x' is torch.float64 but the layer computes in float32; pass x.float\(\)"
                   r".*dtype='float64'",
    "wrong_shape": r"^node_and_edge: input 'x' has shape \[40, 5\], expected \[40, 4\]",
    "edge_rows": r"^node_and_edge: input 'w' has shape \[40, 1\], expected \[\d+, 1\] \(edge-wise",
    "missing": r"^node_and_edge: input 'w' is missing",
    "wrong_device": r"^node_and_edge: input 'x' is on meta but the layer is on cpu",
    "non_tensor": r"^node_and_edge: input 'x' must be a torch.Tensor, got list",
    "integer": r"^node_and_edge: input 'x' must be a floating-point tensor, got torch.int64",
    "unknown_keyword": r"^node_and_edge: unexpected input 'y'; it takes x, w",
    "too_many": r"^node_and_edge takes 2 inputs \(x, w\), got 3",
    "twice": r"^node_and_edge: input 'x' given twice",
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_both_backends_refuse_bad_inputs_alike(g, case):
    k, r = _both(node_and_edge, g, NE)
    args, kwargs = BAD_CALLS[case](g)
    ek, er = _error(k, *args, **kwargs), _error(r, *args, **kwargs)
    assert ek == er, f"kernels: {ek}\nreference: {er}"
    assert issubclass(ek[0], InputError) and "\n" not in ek[1]
    assert __import__("re").search(MESSAGES[case], ek[1]), ek[1]
    x, w = torch.randn(g.num_nodes, IN), torch.randn(g.num_edges, 1)     # and the layer still works
    torch.testing.assert_close(k(x, w), r(x, w), rtol=1e-5, atol=1e-5)


def test_reference_layer_is_not_moved_by_a_bad_call(g):
    layer = pg.compile(node_and_edge, g, NE, backend="reference")
    x, w = torch.randn(g.num_nodes, IN), torch.randn(g.num_edges, 1)
    want = layer(x, w)
    with pytest.raises(InputError, match="'x' is on meta"):
        layer(x.to("meta"), w.to("meta"))
    assert layer.graph.src.device.type == "cpu"
    torch.testing.assert_close(layer(x, w), want)


def test_float64_layers_on_the_reference_backend(g):
    layer = pg.compile(node_and_edge, g, NE, backend="reference", dtype="float64")
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    out = layer(torch.randn(g.num_nodes, IN, dtype=torch.float64), torch.randn(g.num_edges, 1, dtype=torch.float64))
    assert out.dtype == torch.float64
    with pytest.raises(InputError, match=r"'x' is torch.float32 but the layer computes in float64; pass x.double\(\)"):
        layer(torch.randn(g.num_nodes, IN), torch.randn(g.num_edges, 1, dtype=torch.float64))


def test_unsupported_dtypes_are_refused_at_compile(g):
    with pytest.raises(ValueError, match="dtype 'float64'.*backend='reference'"):
        pg.compile(node_and_edge, g, NE, backend="kernels", dtype="float64")
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        pg.compile(node_and_edge, g, NE, backend="reference", dtype="int8")


def test_bfloat16_layers_take_float32_inputs_on_both_backends(g):
    k = pg.compile(node_and_edge, g, NE, backend="kernels", dtype="bfloat16")
    r = pg.compile(node_and_edge, g, NE, backend="reference", dtype="bfloat16")
    r.load_state_dict(k.state_dict())
    x, w = torch.randn(g.num_nodes, IN), torch.randn(g.num_edges, 1)
    b = r(x, w)
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b, r(x.bfloat16(), w.bfloat16()))
    assert _error(k, x.double(), w) == _error(r, x.double(), w)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a = k.to(dev)(x.to(dev), w.to(dev))     # every executor (CUDA, torch semantics, emulation) takes bf16
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.float().cpu(), b.float(), rtol=5e-2, atol=5e-2)
