"""CUDA-graph replay of compiled layers on the GPU (pigeon/runtime/replay.py): results with
PIGEON_CUDA_GRAPHS=1 equal the plain executor's (=0), forward and backward; successive calls keep
their results; two forwards then two backwards give each its own gradients; poisoned buffers;
another stream; no capture falls back (a fallback warning is an error here)."""
import sys
import warnings
from pathlib import Path

import pytest
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.models import rgat, rgcn
from pigeon.runtime import ops, replay, train_replay

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from graphs import random_graph  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
IN = 8
SPECS = {"rgcn": (rgcn, {"out_dim": 5}), "rgat": (rgat, {"out_dim": 3, "heads": 2})}
GRAPHS = {"tiny": lambda: load("tiny"),
          "random": lambda: random_graph(7, num_nodes=300, num_edges=3000, num_etypes=5, num_ntypes=3)}
TOL = dict(rtol=1e-5, atol=1e-6)      # float atomics (sums over edges) may reorder between runs


@pytest.fixture(autouse=True)
def _no_fallback(monkeypatch):
    for name in replay.DEBUG_ENVS:
        monkeypatch.delenv(name, raising=False)
    replay._SETS.clear()       # layers of equal content share one registry entry (and its replays)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*CUDA-graph capture.*")
        yield
    replay._SETS.clear()


def _layer(model, graph, dtype="float32"):
    spec, hp = SPECS[model]
    g = GRAPHS[graph]()
    return g, pg.compile(spec, g, IN, backend="kernels", dtype=dtype, seed=0, **hp).to(DEV)


def _fwd_bwd(layer, x, up):
    xx = x.detach().clone().requires_grad_(True)
    out = layer(xx)
    grads = torch.autograd.grad((out * up).sum(), [xx] + list(layer.weights.values()))
    return out.detach(), [g.detach() for g in grads]


def _replays(layer):
    lp = ops.get_layer(layer.layer_id)
    backend = lp.backend(DEV)
    return replay.replays_of(backend, lp.forward), replay.replays_of(backend, lp.backward)


def _close(a, b, what):
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def _trains(layer):
    """This layer's pigeon/runtime/train_replay.py entries (by its weights' addresses in their keys)."""
    lp = ops.get_layer(layer.layer_id)
    mine = {id(w) for w in layer.weights.values()}
    return [v for v in lp.train_replays.values() if isinstance(v, train_replay.TrainReplay)
            and any(id(p) in mine for p in v.fwd.in_place_params)]


def _check_captured(layer, shared: str):
    """Training calls replayed: through one TrainReplay (``shared`` "1"), else through the forward
    and backward programs' own ReplaySets."""
    fwd, bwd = _replays(layer)
    if shared == "1":
        (tr,) = _trains(layer)
        assert tr.bwd is not None and tr.replays >= 3 and tr.bwd.replays >= 3
        assert bwd is None or bwd.captures == 0
    else:
        assert _trains(layer) == []
        assert fwd is not None and fwd.captures == 1 and len(fwd.failed) == 0
        assert bwd is not None and bwd.captures == 1 and len(bwd.failed) == 0
        assert next(iter(fwd.replays.values())).replays >= 4


@pytest.mark.parametrize("graph", sorted(GRAPHS))
@pytest.mark.parametrize("model", sorted(SPECS))
@pytest.mark.parametrize("poison", ["0", "1"])
@pytest.mark.parametrize("shared", ["1", "0"])
def test_replay_equals_plain_forward_and_backward(model, graph, poison, shared, monkeypatch):
    monkeypatch.setenv("PIGEON_POISON", poison)
    monkeypatch.setenv(train_replay.ENV, shared)
    g, layer = _layer(model, graph)
    torch.manual_seed(1)
    xs = [torch.randn(g.num_nodes, IN, device=DEV) for _ in range(3)]
    width = layer(xs[0]).shape[1]
    ups = [torch.randn(g.num_nodes, width, device=DEV) for _ in range(3)]
    monkeypatch.setenv(replay.ENV, "0")
    want = [_fwd_bwd(layer, x, up) for x, up in zip(xs, ups)]
    monkeypatch.setenv(replay.ENV, "1")
    got = [_fwd_bwd(layer, x, up) for _ in range(2) for x, up in zip(xs, ups)]   # plain, capture, replays
    _check_captured(layer, shared)
    for i, (out, grads) in enumerate(got):
        w_out, w_grads = want[i % 3]
        assert torch.isfinite(out).all()
        _close(out, w_out, f"{model}/{graph} call {i} output")
        for name, a, b in zip(["x"] + list(layer.weights), grads, w_grads):
            _close(a, b, f"{model}/{graph} call {i} grad {name}")


@pytest.mark.parametrize("model", sorted(SPECS))
def test_successive_results_stay_correct(model, monkeypatch):
    monkeypatch.setenv(replay.ENV, "1")
    g, layer = _layer(model, "random")
    torch.manual_seed(2)
    xs = [torch.randn(g.num_nodes, IN, device=DEV) for _ in range(6)]
    with torch.no_grad():
        outs = [layer(x) for x in xs]              # held while later replays overwrite the statics
        torch.cuda.synchronize()
        monkeypatch.setenv(replay.ENV, "0")
        for i, (x, out) in enumerate(zip(xs, outs)):
            _close(out, layer(x), f"{model} result {i}")
    assert len({o.data_ptr() for o in outs}) == len(outs)


@pytest.mark.parametrize("model", sorted(SPECS))
@pytest.mark.parametrize("shared", ["1", "0"])
def test_two_forwards_then_two_backwards(model, shared, monkeypatch):
    monkeypatch.setenv(train_replay.ENV, shared)
    g, layer = _layer(model, "random")
    torch.manual_seed(3)
    xs = [torch.randn(g.num_nodes, IN, device=DEV) for _ in range(2)]
    width = layer(xs[0]).shape[1]
    ups = [torch.randn(g.num_nodes, width, device=DEV) for _ in range(2)]
    monkeypatch.setenv(replay.ENV, "0")
    want = [_fwd_bwd(layer, x, up) for x, up in zip(xs, ups)]
    monkeypatch.setenv(replay.ENV, "1")
    for _ in range(2):                             # the programs' first (plain) and capturing calls
        _fwd_bwd(layer, xs[0], ups[0])
    leaves = [x.clone().requires_grad_(True) for x in xs]
    outs = [layer(x) for x in leaves]              # both forwards before either backward
    with torch.no_grad():
        layer(xs[1] * 2)                           # a no-grad call between: its own replay
    for i in (1, 0, 1):                            # backwards in the other order, one retained twice
        grads = torch.autograd.grad((outs[i] * ups[i]).sum(), [leaves[i]] + list(layer.weights.values()),
                                    retain_graph=True)
        _close(outs[i].detach(), want[i][0], f"{model} forward {i}")
        for name, a, b in zip(["x"] + list(layer.weights), grads, want[i][1]):
            _close(a, b, f"{model} backward {i} grad {name}")
    if shared == "1":
        (tr,) = _trains(layer)
        assert tr.bwd is not None
    else:
        fwd, bwd = _replays(layer)
        assert fwd.captures == 1 and bwd.captures == 1


@pytest.mark.parametrize("shared", ["1", "0"])
def test_training_loop_equals_plain(shared, monkeypatch):
    monkeypatch.setenv(train_replay.ENV, shared)
    g = GRAPHS["random"]()
    torch.manual_seed(4)
    x = torch.randn(g.num_nodes, IN, device=DEV)
    target = torch.randn(g.num_nodes, 6, device=DEV)
    curves = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(replay.ENV, mode)
        layer = pg.compile(rgat, g, IN, backend="kernels", seed=0, out_dim=3, heads=2).to(DEV)
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        curve = []
        for _ in range(10):
            opt.zero_grad()
            loss = (layer(x) - target).square().mean()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[mode] = curve
    torch.testing.assert_close(torch.tensor(curves["1"]), torch.tensor(curves["0"]), rtol=1e-4, atol=1e-6)


def test_bf16_layer_replays(monkeypatch):
    g, layer = _layer("rgat", "random", dtype="bfloat16")
    x = torch.randn(g.num_nodes, IN, device=DEV)
    monkeypatch.setenv(replay.ENV, "0")
    want = layer(x)
    monkeypatch.setenv(replay.ENV, "1")
    outs = [layer(x) for _ in range(4)]            # grad mode (its weights need grads): training calls
    with torch.no_grad():
        outs += [layer(x) for _ in range(3)]       # no-grad calls: the forward program's own replay
    for out in outs:
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert _replays(layer)[0].captures == 1
    lp = ops.get_layer(layer.layer_id)             # its float32 masters: read in place, cast in the graph
    trs = [v for v in lp.train_replays.values() if isinstance(v, train_replay.TrainReplay)]
    assert len(trs) == 1 and trs[0].replays >= 2 and set(trs[0].casts) == set(layer.weights)


@pytest.mark.parametrize("model", sorted(SPECS))
def test_bf16_masters_cast_in_the_graphs_equal_casts_outside(model, monkeypatch):
    """A bf16 layer's training steps with its float32 masters cast inside the CUDA graphs (the
    one-step call) equal those with one .to() per weight outside the layer (the op path), and the
    masters' gradients are float32."""
    g, layer = _layer(model, "random", dtype="bfloat16")
    torch.manual_seed(0)
    xs = [torch.randn(g.num_nodes, IN, device=DEV).bfloat16() for _ in range(3)]
    with torch.no_grad():
        width = layer(xs[0]).shape[1]
    ups = [torch.randn(g.num_nodes, width, device=DEV).bfloat16() for _ in range(3)]
    monkeypatch.setenv(ops.FASTPATH_ENV, "0")
    want = [_fwd_bwd(layer, x, up) for x, up in zip(xs, ups)]
    monkeypatch.delenv(ops.FASTPATH_ENV)
    for _ in range(3):
        for x, up, (wo, wg) in zip(xs, ups, want):
            out, grads = _fwd_bwd(layer, x, up)
            torch.testing.assert_close(out.float(), wo.float(), rtol=1e-2, atol=1e-2)
            assert [t.dtype for t in grads[1:]] == [torch.float32] * len(layer.weights)
            for a, b in zip(grads, wg):
                torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * float(b.abs().max()))
    (tr,) = _trains(layer)
    assert set(tr.casts) == set(layer.weights) and tr.bwd is not None and tr.bwd.replays >= 6
    assert ops.get_layer(layer.layer_id).fast_trains


def test_another_stream(monkeypatch):
    monkeypatch.setenv(replay.ENV, "1")
    g, layer = _layer("rgcn", "random")
    xs = [torch.randn(g.num_nodes, IN, device=DEV) for _ in range(4)]
    with torch.no_grad():
        outs = [layer(xs[0]), layer(xs[1])]        # plain, then captured on the default stream
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outs += [layer(xs[2]), layer(xs[3])]
        torch.cuda.current_stream().wait_stream(side)
        outs.append(layer(xs[0]))
        torch.cuda.synchronize()
        monkeypatch.setenv(replay.ENV, "0")
        for i, x in enumerate(xs + [xs[0]]):
            _close(outs[i], layer(x), f"result {i}")


def test_auto_mode_captures_small_programs(monkeypatch):
    monkeypatch.delenv(replay.ENV, raising=False)
    g, layer = _layer("rgat", "tiny")
    x = torch.randn(g.num_nodes, IN, device=DEV)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
    assert _replays(layer)[0].captures == 1


def test_size_rule_keeps_big_programs_plain(monkeypatch):
    monkeypatch.delenv(replay.ENV, raising=False)
    monkeypatch.setattr(replay, "MAX_BUFFER_BYTES", 1)
    g, layer = _layer("rgcn", "tiny")
    x = torch.randn(g.num_nodes, IN, device=DEV)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
    fwd, _ = _replays(layer)
    assert fwd is None or fwd.captures == 0


def test_inside_a_callers_capture_runs_plain(monkeypatch):
    """A caller's own CUDA graph around a layer call records pigeon's kernels into it (no nested
    capture)."""
    monkeypatch.setenv(replay.ENV, "1")
    g, layer = _layer("rgcn", "random")
    x = torch.randn(g.num_nodes, IN, device=DEV)
    with torch.no_grad():
        want = layer(x).clone()
        layer(x)                                       # warm: kernels built, caches filled
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(x)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = layer(x)
        graph.replay()
        torch.cuda.synchronize()
    _close(out, want, "caller-captured output")
