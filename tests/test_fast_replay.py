"""The one-step no-grad replay call (pigeon/runtime/fast_replay.py) on the CPU with the stand-in
CUDA graphs of tests/fake_cuda.py: after a key's plain call and capture, calls go straight to the
replay, give the full path's results bit for bit, and fall back to the full path whenever what the
entry proved could have changed (weights replaced or moved, the replay evicted, the modes, grad,
bad inputs, another input shape)."""
import pytest
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.models import hgt, rgat, rgcn
from pigeon.reference import InputError
from pigeon.runtime import fast_replay, ops, replay

from test_replay import fake_cuda  # noqa: F401  (the fixture)

IN = 8


@pytest.fixture
def hits(monkeypatch):
    """Counts the calls the fast path served."""
    n = {"hit": 0, "miss": 0}
    real = fast_replay.try_call

    def spy(*a):
        out = real(*a)
        n["hit" if out is not None else "miss"] += 1
        return out
    monkeypatch.setattr(fast_replay, "try_call", spy)      # ops calls it through the module
    return n


def _plain(layer, x, monkeypatch):
    monkeypatch.setenv(replay.ENV, "0")
    with torch.no_grad():
        out = layer(x)
    monkeypatch.setenv(replay.ENV, "1")
    return out


@pytest.mark.parametrize("spec,hp", [(rgcn, {"out_dim": 4}), (rgat, {"out_dim": 3, "heads": 2}),
                                     (hgt, {"heads": 2})], ids=["rgcn", "rgat", "hgt"])
def test_steady_calls_take_the_fast_path_and_equal_the_full_path(fake_cuda, hits, monkeypatch, spec, hp):  # noqa: F811
    g = load("tiny")
    layer = pg.compile(spec, g, IN, **hp)
    xs = [torch.randn(g.num_nodes, IN) for _ in range(6)]
    with torch.no_grad():
        outs = [layer(x) for x in xs]           # plain, capture, then replays: learned on the way
    assert hits["hit"] >= 3
    for x, o in zip(xs, outs):
        want = _plain(layer, x, monkeypatch)
        if isinstance(want, dict):
            for k in want:
                torch.testing.assert_close(o[k], want[k], rtol=0, atol=0)
        else:
            torch.testing.assert_close(o, want, rtol=0, atol=0)
    assert replay.replays_of(ops.get_layer(layer.layer_id).backend(xs[0].device),
                             ops.get_layer(layer.layer_id).forward).captures == 1


def _warm(layer, x):
    with torch.no_grad():
        for _ in range(4):
            layer(x)


def _call_counts(layer, x, hits, kind, monkeypatch):
    """One no-grad call: it counts one ``kind`` ("hit" / "miss") and equals the full path's result."""
    before = hits[kind]
    with torch.no_grad():
        got = layer(x)
    assert hits[kind] == before + 1, kind
    torch.testing.assert_close(got, _plain(layer, x, monkeypatch), rtol=0, atol=0)


def test_in_place_weight_updates_are_read_and_replaced_weights_miss(fake_cuda, hits, monkeypatch):  # noqa: F811
    g = load("tiny")
    layer = pg.compile(rgcn, g, IN, out_dim=4)
    x = torch.randn(g.num_nodes, IN)
    _warm(layer, x)
    name, w = next(iter(layer.weights.items()))
    with torch.no_grad():
        w.mul_(-2.0)                                   # an optimizer step: same tensor, same address
    _call_counts(layer, x, hits, "hit", monkeypatch)
    layer.weights[name] = torch.nn.Parameter(w.detach().clone() + 1.0)          # a new tensor
    _call_counts(layer, x, hits, "miss", monkeypatch)
    w2 = layer.weights[name]
    w2.data = w2.data.clone() * 3.0                    # same Parameter object, new memory
    _call_counts(layer, x, hits, "miss", monkeypatch)


def test_a_replaced_weight_is_learned_again(fake_cuda, hits, monkeypatch):  # noqa: F811
    """After a miss on a replaced weight, the full path's replays of the new weight are learned, and
    the calls after that take the fast path again."""
    g = load("tiny")
    layer = pg.compile(rgcn, g, IN, out_dim=4)
    x = torch.randn(g.num_nodes, IN)
    _warm(layer, x)
    name, w = next(iter(layer.weights.items()))
    layer.weights[name] = torch.nn.Parameter(w.detach().clone() + 1.0)
    _warm(layer, x)                                    # miss, plain (new key), capture, learned again
    _call_counts(layer, x, hits, "hit", monkeypatch)


def test_an_evicted_replay_is_not_used(fake_cuda, hits, monkeypatch):  # noqa: F811
    g = load("tiny")
    layer = pg.compile(rgcn, g, IN, out_dim=4)
    x = torch.randn(g.num_nodes, IN)
    _warm(layer, x)
    lp = ops.get_layer(layer.layer_id)
    replay.replays_of(lp.backend(x.device), lp.forward).replays.clear()
    _call_counts(layer, x, hits, "miss", monkeypatch)


def test_modes_grad_and_other_shapes_take_the_full_path(fake_cuda, hits, monkeypatch):  # noqa: F811
    g = load("tiny")
    layer = pg.compile(rgcn, g, IN, out_dim=4)
    x = torch.randn(g.num_nodes, IN)
    _warm(layer, x)
    for env, val in ((replay.ENV, "0"), ("PIGEON_EAGER_FASTPATH", "0"), ("PIGEON_SYNC_LAUNCH", "1"),
                     ("PIGEON_POISON", "1")):
        monkeypatch.setenv(env, val)
        h0 = hits["hit"]
        with torch.no_grad():
            layer(x)
        assert hits["hit"] == h0, env
        monkeypatch.delenv(env) if env != replay.ENV else monkeypatch.setenv(env, "1")
    xg = x.clone().requires_grad_(True)
    h0 = hits["hit"]
    out = layer(xg)                                    # autograd must record this call
    assert hits["hit"] == h0 and out.grad_fn is not None
    with torch.no_grad():
        h0 = hits["hit"]
        layer(x.t().contiguous().t())                  # non-contiguous: cast/contiguous on the full path
        layer(x.double().float())                      # same shape: hits
    assert hits["hit"] == h0 + 1


def test_bad_inputs_still_raise_one_line_errors_after_learning(fake_cuda, hits):  # noqa: F811
    g = load("tiny")
    layer = pg.compile(rgcn, g, IN, out_dim=4)
    x = torch.randn(g.num_nodes, IN)
    _warm(layer, x)
    with torch.no_grad():
        with pytest.raises(InputError, match="shape"):
            layer(torch.randn(g.num_nodes + 1, IN))
        with pytest.raises(InputError, match="float64"):
            layer(x.double())
        with pytest.raises(InputError, match="floating-point"):
            layer(torch.ones(g.num_nodes, IN, dtype=torch.int32))
        with pytest.raises(InputError):
            layer([1, 2, 3])


def test_nothing_is_learned_on_a_cpu_executor(hits):
    g = load("tiny")
    layer = pg.compile(rgcn, g, IN, out_dim=4)
    x = torch.randn(g.num_nodes, IN)
    _warm(layer, x)
    assert hits["hit"] == 0
    lp = ops.get_layer(layer.layer_id)
    assert all(not isinstance(v, fast_replay._Entry) for v in lp.fast_replays.values())
