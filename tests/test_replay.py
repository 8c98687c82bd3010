"""CUDA-graph replay of kernel programs (pigeon/runtime/replay.py) on the CPU: the selection rule,
the LRU bound, the capture-failure fallback, the per-(program, graph) plan cache, and the whole
replay path (static copies, replays, output clones, autograd) with a stand-in for torch's CUDA
graphs whose replay overwrites the static outputs in place, as a real one does."""
import warnings

import pytest
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.models import rgat, rgcn
from pigeon.runtime import ops, program, replay, train_replay
from pigeon.runtime.program import Executor

from fake_cuda import FakeCuda, FakeGraph, install_for_layers  # noqa: E402,F401

IN = 8
CUDA = torch.device("cuda")


# ---------------------------------------------------------------- the rule

@pytest.fixture
def clean_env(monkeypatch):
    for name in (replay.ENV,) + replay.DEBUG_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(replay.CUDA, "capturing", lambda: False)
    return monkeypatch


def test_mode_values(clean_env):
    assert replay.graphs_mode() == "auto"
    for v, want in (("auto", "auto"), ("1", "1"), ("0", "0"), (" ON ", "1"), ("off", "0"), ("", "auto")):
        clean_env.setenv(replay.ENV, v)
        assert replay.graphs_mode() == want, v
    clean_env.setenv(replay.ENV, "sometimes")
    with pytest.raises(replay.ReplayError, match="PIGEON_CUDA_GRAPHS='sometimes'"):
        replay.graphs_mode()


def test_size_rule(clean_env):
    small, big = 1 << 20, replay.MAX_BUFFER_BYTES + 1
    assert replay.use_replay("cuda", CUDA, 5, small)
    assert not replay.use_replay("cuda", CUDA, 5, big)          # kernels hide the host time
    assert not replay.use_replay("cuda", CUDA, 1, small)        # one launch: nothing to save
    assert replay.use_replay("cuda", CUDA, 5, replay.MAX_BUFFER_BYTES)
    clean_env.setattr(replay, "MAX_BUFFER_BYTES", 1 << 10)
    assert not replay.use_replay("cuda", CUDA, 5, small)
    clean_env.setenv(replay.ENV, "1")                            # always on cuda
    assert replay.use_replay("cuda", CUDA, 1, big)
    clean_env.setenv(replay.ENV, "0")                            # never
    assert not replay.use_replay("cuda", CUDA, 5, small)
    assert replay.use_replay("cuda", CUDA, 5, small, mode="1")   # Executor(replay=True)


def test_never_on_cpu_backends_or_devices(clean_env):
    clean_env.setenv(replay.ENV, "1")
    for name in ("torch", "emulate"):
        assert not replay.use_replay(name, CUDA, 5, 1)
        assert not replay.use_replay(name, torch.device("cpu"), 5, 1)
    assert not replay.use_replay("cuda", torch.device("cpu"), 5, 1)


def test_never_while_debugging_tracing_or_capturing(clean_env):
    clean_env.setenv(replay.ENV, "1")
    for name in replay.DEBUG_ENVS:
        clean_env.setenv(name, "1")
        assert not replay.use_replay("cuda", CUDA, 5, 1), name
        clean_env.setenv(name, "0")
        assert replay.use_replay("cuda", CUDA, 5, 1), name
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = torch.empty(3)
    assert not replay.use_replay("cuda", CUDA, 5, 1, [fake])     # fake tensors (torch.compile tracing)
    with mode:
        assert not replay.use_replay("cuda", CUDA, 5, 1, [])     # a dispatch mode is active
    clean_env.setattr(replay.CUDA, "capturing", lambda: True)    # inside a caller's capture
    assert not replay.use_replay("cuda", CUDA, 5, 1)


def test_cpu_executor_never_reaches_replay(monkeypatch):
    monkeypatch.setenv(replay.ENV, "1")

    def boom(*a, **k):
        raise AssertionError("a CPU backend reached the replay machinery")
    monkeypatch.setattr(replay, "replay_set", boom)
    monkeypatch.setattr(replay, "use_replay", boom)
    g = load("tiny")
    layer = pg.compile(rgcn, g, IN, out_dim=4)
    x = torch.randn(g.num_nodes, IN, requires_grad=True)
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- a stand-in for torch's CUDA graphs

@pytest.fixture
def fake_cuda(monkeypatch):
    """The cuda executor path on the CPU (tests/fake_cuda.py install_for_layers)."""
    yield install_for_layers(monkeypatch)
    replay._SETS.clear()


def _counter_execute(calls):
    """A one-output program: out = 2 * x + w (a fresh buffer per run, as the executor allocates)."""
    def execute(inputs, params):
        calls.append(1)
        out = 2 * inputs["x"] + params["w"]
        return {"out": out}, {"out": out}
    return execute


def test_replay_set_captures_on_the_second_call_and_returns_clones(fake_cuda):
    calls = []
    rs = replay.ReplaySet("p")
    ex = _counter_execute(calls)
    dev = torch.device("cpu")
    res = []
    for i in range(4):
        x, w = torch.full((3,), float(i)), torch.ones(3)
        out = rs.run(("k",), ex, None, dev, {"x": x}, {"w": w}, ("x",), ("w",))
        res.append(out["out"])
    assert fake_cuda.captures == 1 and fake_cuda.warmups == 1 and len(rs) == 1
    for i, r in enumerate(res):                 # every result kept its value
        torch.testing.assert_close(r, torch.full((3,), 2.0 * i + 1))
    static = rs.replays[("k",)].out_static[0]
    assert all(r.data_ptr() != static.data_ptr() for r in res)


def test_lru_bound(fake_cuda, monkeypatch):
    monkeypatch.setattr(replay, "MAX_REPLAYS", 2)
    rs = replay.ReplaySet("p")
    ex = _counter_execute([])
    dev = torch.device("cpu")
    for key in ("a", "b", "c", "a", "a", "b", "b", "c", "c"):
        n = {"a": 2, "b": 3, "c": 4}[key]
        out = rs.run((key,), ex, None, dev, {"x": torch.ones(n)}, {"w": torch.zeros(n)}, ("x",), ("w",))
        torch.testing.assert_close(out["out"], torch.full((n,), 2.0))
        assert len(rs) <= 2
    assert list(rs.replays) == [("b",), ("c",)]       # a, least recently used, went first
    assert rs.captures == 3


def test_capture_failure_falls_back_with_one_warning(fake_cuda):
    fake_cuda.fail = RuntimeError("operation not permitted when stream is capturing")
    g = load("tiny")
    layer = pg.compile(rgat, g, IN, out_dim=3, heads=2)
    x = torch.randn(g.num_nodes, IN)
    want = layer(x)                                   # the first call: plain
    with pytest.warns(RuntimeWarning, match=r"CUDA-graph capture of kernel program .* failed "
                                            r"\(RuntimeError: operation not permitted"):
        got = layer(x)                                # the second: capture fails, plain result
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)   # no second warning
    lp = ops.get_layer(layer.layer_id)
    rs = replay.replays_of(lp.backend(x.device), lp.forward)
    assert len(rs) == 0 and len(rs.failed) == 1


# ---------------------------------------------------------------- whole layers through the replay path

def _reference(layer, x, up):
    """Forward and gradients of ``layer`` on the plain executor."""
    xx = x.detach().clone().requires_grad_(True)
    out = layer(xx)
    grads = torch.autograd.grad((out * up).sum(), [xx] + list(layer.weights.values()))
    return out.detach(), grads


@pytest.mark.parametrize("spec,hp", [(rgcn, {"out_dim": 4}), (rgat, {"out_dim": 3, "heads": 2})],
                         ids=["rgcn", "rgat"])
def test_layers_replayed_equal_plain(fake_cuda, monkeypatch, spec, hp):
    g = load("tiny")
    layer = pg.compile(spec, g, IN, **hp)
    torch.manual_seed(0)
    xs = [torch.randn(g.num_nodes, IN) for _ in range(3)]
    ups = [torch.randn(g.num_nodes, layer(xs[0]).shape[1]) for _ in range(3)]
    monkeypatch.setenv(replay.ENV, "0")
    want = [_reference(layer, x, up) for x, up in zip(xs, ups)]
    monkeypatch.setenv(replay.ENV, "1")
    for _ in range(2):                                # the first call of each program is plain
        _reference(layer, xs[0], ups[0])
    # two forwards, then two backwards: each backward must see its own forward's saved values
    leaves = [x.clone().requires_grad_(True) for x in xs]
    outs = [layer(x) for x in leaves]
    grads = [torch.autograd.grad((o * up).sum(), [x] + list(layer.weights.values()))
             for o, x, up in zip(outs, leaves, ups)]
    for (w_out, w_grads), out, got in zip(want, outs, grads):
        torch.testing.assert_close(out.detach(), w_out, rtol=0, atol=0)
        for a, b in zip(got, w_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # training calls replay through pigeon/runtime/train_replay.py (tests/test_train_replay.py):
    # one forward and one backward graph, captured on the key's second call
    lp = ops.get_layer(layer.layer_id)
    trs = [v for v in lp.train_replays.values() if isinstance(v, train_replay.TrainReplay)]
    assert len(trs) == 1 and trs[0].bwd is not None and trs[0].replays >= 3
    backend = lp.backend(xs[0].device)
    assert replay.replays_of(backend, lp.backward) is None or replay.replays_of(backend, lp.backward).captures == 0


def test_poisoned_buffers_are_rewritten_by_every_replay(fake_cuda, monkeypatch):
    monkeypatch.setenv("PIGEON_POISON", "1")
    g = load("tiny")
    layer = pg.compile(rgat, g, IN, out_dim=3, heads=2)
    x = torch.randn(g.num_nodes, IN)
    outs = [layer(x * (i + 1)) for i in range(4)]
    monkeypatch.setenv(replay.ENV, "0")
    for i, o in enumerate(outs):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, layer(x * (i + 1)), rtol=0, atol=0)


def test_executor_replay_false_never_captures(fake_cuda):
    g = load("tiny")
    layer = pg.compile(rgcn, g, IN, out_dim=4)
    lp = ops.get_layer(layer.layer_id)
    kg = lp.kg(torch.device("cpu"))
    x = torch.randn(g.num_nodes, IN)
    params = {k: v.detach() for k, v in layer.weights.items()}
    for _ in range(3):
        Executor(lp.forward, lp.backend(x.device), replay=False).run(kg, {"x": x}, params)
    assert fake_cuda.captures == 0


# ---------------------------------------------------------------- per-call work cached

def test_graph_data_is_cast_once_per_program_and_graph():
    g = load("tiny")
    layer = pg.compile(rgcn, g, IN, out_dim=4)        # mean aggregation reads 1/degree
    lp = ops.get_layer(layer.layer_id)
    p, kg = lp.forward, lp.kg(torch.device("cpu"))
    assert p.graph_data, "rgcn's forward reads graph data"
    a, b = program._plan(p, kg), program._plan(p, kg)
    assert a is b
    x = torch.randn(g.num_nodes, IN)
    params = {k: v.detach() for k, v in layer.weights.items()}
    ex = Executor(p, lp.backend(x.device))
    _, bufs1 = ex._execute(a, kg, {"x": x}, params)
    _, bufs2 = ex._execute(program._plan(p, kg), kg, {"x": x}, params)
    for _, bname in p.graph_data:
        assert bufs1[bname] is bufs2[bname]
    # another kernel graph gets its own plan
    kg2 = kg.to("cpu")
    assert program._plan(p, kg2) is not a


def test_plans_die_with_their_graph():
    import gc
    g = load("tiny")
    layer = pg.compile(rgcn, g, IN, out_dim=4)
    lp = ops.get_layer(layer.layer_id)
    kg2 = lp.kg(torch.device("cpu")).to("cpu")
    program._plan(lp.forward, kg2)
    key = (id(lp.forward), id(kg2))
    assert key in program._PLANS
    del kg2
    gc.collect()
    assert key not in program._PLANS


def test_eager_fast_path_equals_the_op(monkeypatch):
    g = load("tiny")
    layer = pg.compile(rgat, g, IN, out_dim=3, heads=2)
    x = torch.randn(g.num_nodes, IN)
    up = torch.randn(g.num_nodes, 6)
    fast = _reference(layer, x, up)
    monkeypatch.setenv(ops.FASTPATH_ENV, "0")
    op = _reference(layer, x, up)
    torch.testing.assert_close(fast[0], op[0], rtol=0, atol=0)
    for a, b in zip(fast[1], op[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eager_fast_path_rules(monkeypatch):
    x = torch.randn(3)
    assert ops._eager([x], [torch.nn.Parameter(x)])
    monkeypatch.setenv(ops.FASTPATH_ENV, "0")
    assert not ops._eager([x], [])
    monkeypatch.delenv(ops.FASTPATH_ENV)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = torch.empty(3)
    assert not ops._eager([fake], [])
    with mode:
        assert not ops._eager([], [])


def test_a_call_autograd_would_not_record_skips_the_autograd_function(monkeypatch):
    g = load("tiny")
    layer = pg.compile(rgat, g, IN, out_dim=3, heads=2)
    x = torch.randn(g.num_nodes, IN)
    want = layer(x).detach()                       # weights require grad: the autograd.Function
    calls = []
    real = ops._LayerForward.apply
    monkeypatch.setattr(ops._LayerForward, "apply", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = layer(x)
    assert not calls and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert layer(x).requires_grad and calls      # grad mode with weights that need grad: recorded
    assert ops._records_grad([x], [torch.nn.Parameter(x)]) and not ops._records_grad([x], [x])


def test_params_are_read_in_place_and_replaced_params_recapture(fake_cuda, monkeypatch):
    """Contiguous weights are not copied into a replay: an in-place update (an optimizer step) is
    what the next replay reads, and a weight replaced by a new tensor makes a new key."""
    g = load("tiny")
    layer = pg.compile(rgcn, g, IN, out_dim=4)
    x = torch.randn(g.num_nodes, IN)
    with torch.no_grad():
        for _ in range(3):                                    # plain, capture, replay
            layer(x)
        lp = ops.get_layer(layer.layer_id)
        fwd = replay.replays_of(lp.backend(x.device), lp.forward)
        rep = next(iter(fwd.replays.values()))
        assert rep.copied_param_names == () and len(rep.in_place_params) == len(layer.weights)
        name, w = next(iter(layer.weights.items()))
        w.mul_(-3.0)                                          # in place: same address, same key
        got = layer(x)
        assert fwd.captures == 1
        monkeypatch.setenv(replay.ENV, "0")
        torch.testing.assert_close(got, layer(x), rtol=0, atol=0)
        monkeypatch.setenv(replay.ENV, "1")
        layer.weights[name] = torch.nn.Parameter(w.detach().clone() + 1.0)   # a new tensor: a new key
        outs = [layer(x) for _ in range(3)]
        assert fwd.captures == 2
        monkeypatch.setenv(replay.ENV, "0")
        want = layer(x)
        for o in outs:
            torch.testing.assert_close(o, want, rtol=0, atol=0)


def test_bf16_layer_casts_are_copied_in_and_replayed(fake_cuda, monkeypatch):
    """A 16-bit layer's weights reach the executor as per-call casts of float32 masters: new tensors
    each call, copied in (not keyed by address), so the layer is captured once and replayed."""
    g = load("tiny")
    layer = pg.compile(rgat, g, IN, out_dim=3, heads=2, dtype="bfloat16")
    x = torch.randn(g.num_nodes, IN)
    with torch.no_grad():
        outs = [layer(x) for _ in range(4)]
        lp = ops.get_layer(layer.layer_id)
        fwd = replay.replays_of(lp.backend(x.device), lp.forward)
        assert fwd.captures == 1 and next(iter(fwd.replays.values())).replays >= 2
        monkeypatch.setenv(replay.ENV, "0")
        want = layer(x)
    for o in outs:
        torch.testing.assert_close(o.float(), want.float(), rtol=0, atol=0)


def test_strided_params_are_copied_in(fake_cuda):
    calls = []
    rs = replay.ReplaySet("p")
    ex = _counter_execute(calls)
    dev = torch.device("cpu")
    base = torch.ones(3, 2)
    w = base[:, 0]                                            # a strided view
    for i in range(3):
        out = rs.run(("k",), ex, None, dev, {"x": torch.full((3,), float(i))}, {"w": w}, ("x",), ("w",))
    rep = rs.replays[("k",)]
    assert rep.copied_param_names == ("w",)
    assert not replay._in_place(torch.ones(3)) and replay._in_place(torch.nn.Parameter(torch.ones(3)))
    base.mul_(5.0)                                            # the copy-in reads the new values
    out = rs.run(("k",), ex, None, dev, {"x": torch.zeros(3)}, {"w": w}, ("x",), ("w",))
    torch.testing.assert_close(out["out"], torch.full((3,), 5.0))
