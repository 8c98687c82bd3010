"""Training calls through pigeon/runtime/train_replay.py on the CPU, with the stand-in for CUDA
graphs (tests/fake_cuda.py: a replay re-runs the captured program on the static tensors, so a
backward reading its forward's statics sees whatever they hold when it replays, as a real graph
would). Every result is compared bit for bit with the plain executor (PIGEON_CUDA_GRAPHS=0)."""
import warnings

import pytest
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.models import hgt, rgat, rgcn
from pigeon.runtime import ops, replay, train_replay

from fake_cuda import install_for_layers  # noqa: E402

IN = 8
SPECS = [(rgcn, {"out_dim": 4}), (rgat, {"out_dim": 3, "heads": 2}), (hgt, {"heads": 2})]
IDS = ["rgcn", "rgat", "hgt"]


@pytest.fixture
def fake_cuda(monkeypatch):
    yield install_for_layers(monkeypatch)
    replay._SETS.clear()
    # layers of equal content share one registry entry: entries made under the stand-in must not
    # reach a later test's CPU layer (whose torch may have no CUDA to ask about capture)
    for lp in list(ops._REGISTRY.values()):
        lp.fast_replays.clear()
        lp.train_replays.clear()
        lp.fast_trains.clear()


def _step(layer, x, up):
    """Output and gradients (input, then weights) of one training call."""
    xx = x.detach().clone().requires_grad_(True)
    out = layer(xx)
    grads = torch.autograd.grad((out * up).sum(), [xx] + list(layer.weights.values()))
    return out.detach(), grads


def _plain(monkeypatch, layer, xs, ups):
    monkeypatch.setenv(replay.ENV, "0")
    want = [_step(layer, x, up) for x, up in zip(xs, ups)]
    monkeypatch.setenv(replay.ENV, "1")
    return want


def _same(got, want):
    (go, gg), (wo, wg) = got, want
    torch.testing.assert_close(go, wo, rtol=0, atol=0)
    assert len(gg) == len(wg)
    for a, b in zip(gg, wg):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _trains(layer):
    """This layer's TrainReplays (layers of equal content share one registry entry: the keys of
    each hold its own weights' addresses)."""
    lp = ops.get_layer(layer.layer_id)
    mine = {id(w) for w in layer.weights.values()}
    return [v for v in lp.train_replays.values() if isinstance(v, train_replay.TrainReplay)
            and any(id(p) in mine for p in v.fwd.in_place_params)]


def _setup(spec, hp, n=3, seed=0):
    g = load("tiny")
    layer = pg.compile(spec, g, IN, **hp)
    torch.manual_seed(seed)
    xs = [torch.randn(g.num_nodes, IN) for _ in range(n)]
    with torch.no_grad():
        width = layer(xs[0]).shape[1]
    ups = [torch.randn(g.num_nodes, width) for _ in range(n)]
    return layer, xs, ups


@pytest.mark.parametrize("spec,hp", SPECS, ids=IDS)
def test_training_calls_replay_and_equal_plain(fake_cuda, monkeypatch, spec, hp):
    layer, xs, ups = _setup(spec, hp)
    want = _plain(monkeypatch, layer, xs, ups)
    assert _trains(layer) == []
    first = _step(layer, xs[0], ups[0])               # the key's first training call: plain
    _same(first, want[0])
    assert _trains(layer) == []
    before = fake_cuda.captures       # (the plain forward's own ReplaySet may have captured: the
    for rnd in range(2):              # no-grad call in _setup was that key's first call)                              # captured on the second, replayed after
        for x, up, w in zip(xs, ups, want):
            _same(_step(layer, x, up), w)
    (tr,) = _trains(layer)
    assert tr.bwd is not None and tr.replays == 6 and tr.bwd.replays == 6
    assert fake_cuda.captures - before == 2           # one forward graph, one backward graph
    # nothing was parked: each backward ran before the next forward and found its values in place
    assert tr.current is None or tr.current() is None


@pytest.mark.parametrize("spec,hp", SPECS, ids=IDS)
def test_interleaved_forwards_keep_their_own_saved_values(fake_cuda, monkeypatch, spec, hp):
    layer, xs, ups = _setup(spec, hp)
    want = _plain(monkeypatch, layer, xs, ups)
    for _ in range(2):
        _step(layer, xs[0], ups[0])
    params = list(layer.weights.values())
    leaves = [x.clone().requires_grad_(True) for x in xs]
    outs = [layer(x) for x in leaves]                 # three forwards, then their backwards
    with torch.no_grad():
        layer(xs[1] * 2)                              # a no-grad call between: its own replay
    for order in ([2, 0, 1],):
        for i in order:
            got = torch.autograd.grad((outs[i] * ups[i]).sum(), [leaves[i]] + params, retain_graph=True)
            _same((outs[i].detach(), got), want[i])
        for i in order:                               # a retained graph's second backward too
            got = torch.autograd.grad((outs[i] * ups[i]).sum(), [leaves[i]] + params)
            _same((outs[i].detach(), got), want[i])
    assert len(_trains(layer)) == 1


def test_sgd_loop_equals_plain(fake_cuda, monkeypatch):
    """Weights updated in place by an optimizer between steps are what the next replay reads."""
    def run(mode):
        monkeypatch.setenv(replay.ENV, mode)
        replay._SETS.clear()
        g = load("tiny")
        layer = pg.compile(rgat, g, IN, out_dim=3, heads=2, seed=1)
        torch.manual_seed(3)
        x = torch.randn(g.num_nodes, IN, requires_grad=True)
        opt = torch.optim.SGD(list(layer.parameters()) + [x], lr=0.1)
        losses = []
        for _ in range(6):
            opt.zero_grad(set_to_none=True)
            loss = layer(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses), [p.detach().clone() for p in layer.parameters()], x.detach()
    want, got = run("0"), run("1")
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


def test_in_place_change_before_backward_raises(fake_cuda):
    layer, xs, ups = _setup(rgcn, {"out_dim": 4})
    for _ in range(2):
        _step(layer, xs[0], ups[0])
    x = xs[0].clone().requires_grad_(True)
    y = x * 1.0                                       # a non-leaf input that can change in place
    out = layer(y)
    assert len(_trains(layer)) == 1
    with torch.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation: 'x' of pigeon layer"):
        out.sum().backward()


def test_double_backward_takes_the_op_as_the_plain_path_does(fake_cuda, monkeypatch):
    layer, xs, ups = _setup(rgcn, {"out_dim": 4})

    def second_order():
        x = xs[0].clone().requires_grad_(True)
        out = layer(x)
        try:
            (gx,) = torch.autograd.grad((out * ups[0]).sum(), [x], create_graph=True)
        except Exception as e:                        # noqa: BLE001  (the plain path's outcome, whatever it is)
            return type(e), str(e).splitlines()[0]
        return gx.detach(), gx.requires_grad
    monkeypatch.setenv(replay.ENV, "0")
    want = second_order()
    monkeypatch.setenv(replay.ENV, "1")
    for _ in range(2):
        _step(layer, xs[0], ups[0])
    got = second_order()
    assert len(_trains(layer)) == 1
    if isinstance(want[0], torch.Tensor):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        assert got[1] == want[1]
    else:
        assert got == want


def test_backward_capture_failure_warns_once_and_stays_plain(fake_cuda, monkeypatch):
    layer, xs, ups = _setup(rgat, {"out_dim": 3, "heads": 2})
    want = _plain(monkeypatch, layer, xs, ups)
    _step(layer, xs[0], ups[0])                       # plain; the forward graph is captured next
    real = fake_cuda.capture
    calls = []

    def capture(fn, device):                          # the forward's capture works, the backward's fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return real(fn, device)
    monkeypatch.setattr(fake_cuda, "capture", capture)
    with pytest.warns(RuntimeWarning, match=r"capture of the training call of .* failed"):
        _same(_step(layer, xs[1], ups[1]), want[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same(_step(layer, xs[2], ups[2]), want[2])
    assert _trains(layer) == []
    lp = ops.get_layer(layer.layer_id)
    assert train_replay._FAILED in lp.train_replays.values()


def test_bf16_layer_trains_through_the_replay(fake_cuda, monkeypatch):
    g = load("tiny")
    layer = pg.compile(rgcn, g, IN, out_dim=4, dtype="bfloat16")
    torch.manual_seed(0)
    xs = [torch.randn(g.num_nodes, IN) for _ in range(3)]
    ups = [torch.randn(g.num_nodes, 4) for _ in range(3)]
    want = _plain(monkeypatch, layer, xs, ups)
    for _ in range(2):
        for x, up, w in zip(xs, ups, want):
            _same(_step(layer, x, up), w)
    # its float32 master weights are read in place and cast inside the forward graph; the backward
    # reads those casts from the forward's statics
    lp = ops.get_layer(layer.layer_id)
    trs = [v for v in lp.train_replays.values() if isinstance(v, train_replay.TrainReplay)]
    masters = {id(w) for w in layer.weights.values()}
    assert trs and all({id(p) for p in tr.fwd.in_place_params} == masters for tr in trs)
    assert all(set(tr.casts) == set(layer.weights) for tr in trs)
    assert any(tr.bwd is not None and tr.bwd.replays >= 3 for tr in trs)


def _bf16_setup(n=3):
    g = load("tiny")
    layer = pg.compile(rgat, g, IN, out_dim=3, heads=2, dtype="bfloat16")
    torch.manual_seed(1)
    xs = [torch.randn(g.num_nodes, IN).bfloat16() for _ in range(n)]
    ups = [torch.randn(g.num_nodes, 6).bfloat16() for _ in range(n)]
    return layer, xs, ups


def test_bf16_masters_equal_casts_outside_the_layer(fake_cuda, monkeypatch):
    """Master weights cast inside the layer (plain and replayed, the one-step call included) give
    bit for bit what one differentiable .to() per weight outside it gave (the op path still casts
    outside), gradients in float32 like the masters', with no cast node per weight in autograd."""
    layer, xs, ups = _bf16_setup()
    monkeypatch.setenv(ops.FASTPATH_ENV, "0")
    want = _plain(monkeypatch, layer, xs, ups)
    monkeypatch.delenv(ops.FASTPATH_ENV)
    monkeypatch.setenv(ops.MASTERS_ENV, "0")          # the A/B switch: casts outside the layer again
    for x, up, w in zip(xs, ups, want):
        _same(_step(layer, x, up), w)
    out = layer(xs[0].clone().requires_grad_(True))
    assert "ToCopy" in type(out.grad_fn.next_functions[-1][0]).__name__ or any(
        "ToCopy" in type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None)
    monkeypatch.delenv(ops.MASTERS_ENV)
    for mode in ("0", "1"):
        monkeypatch.setenv(replay.ENV, mode)
        for _ in range(3):
            for x, up, w in zip(xs, ups, want):
                got = _step(layer, x, up)
                _same(got, w)
                assert [g.dtype for g in got[1][1:]] == [torch.float32] * len(layer.weights)
    lp = ops.get_layer(layer.layer_id)
    assert any(isinstance(v, train_replay.TrainReplay) and v.bwd is not None and v.bwd.replays >= 3
               for v in lp.train_replays.values())
    assert lp.fast_trains                             # the one-step call took the masters too
    out = layer(xs[0].clone().requires_grad_(True))
    nodes, todo = set(), [out.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in nodes:
            nodes.add(f)
            todo.extend(n for n, _ in f.next_functions)
    assert not [f for f in nodes if "ToCopy" in type(f).__name__]


def test_bf16_master_changed_before_backward_uses_the_forwards_cast(fake_cuda, monkeypatch):
    """As with a saved .to(): an optimizer step between a forward and its backward does not reach
    that backward, which computes with the weights its forward used (on both paths)."""
    layer, xs, ups = _bf16_setup(n=1)

    def run():
        x = xs[0].clone().requires_grad_(True)
        out = layer(x)
        with torch.no_grad():
            before = [w.clone() for w in layer.weights.values()]
            for w in layer.weights.values():
                w.add_(0.5)
        grads = torch.autograd.grad((out * ups[0]).sum(), [x] + list(layer.weights.values()))
        with torch.no_grad():
            for w, b in zip(layer.weights.values(), before):
                w.copy_(b)
        return out.detach(), grads
    monkeypatch.setenv(ops.FASTPATH_ENV, "0")
    monkeypatch.setenv(replay.ENV, "0")
    want = run()
    monkeypatch.delenv(ops.FASTPATH_ENV)
    for mode in ("0", "1"):
        monkeypatch.setenv(replay.ENV, mode)
        for _ in range(3):
            _same(run(), want)


def test_eligibility(fake_cuda, monkeypatch):
    layer, xs, ups = _setup(rgcn, {"out_dim": 4})
    for mode in ("0",):
        monkeypatch.setenv(replay.ENV, mode)
        for _ in range(3):
            _step(layer, xs[0], ups[0])
        assert _trains(layer) == []
    monkeypatch.setenv(replay.ENV, "1")
    monkeypatch.setenv("PIGEON_SYNC_LAUNCH", "1")     # debugging: every launch checked on the host
    for _ in range(3):
        _step(layer, xs[0], ups[0])
    assert _trains(layer) == []
    monkeypatch.delenv("PIGEON_SYNC_LAUNCH")
    for _ in range(3):
        _step(layer, xs[0], ups[0])
    assert len(_trains(layer)) == 1


def test_lru_bound(fake_cuda, monkeypatch):
    monkeypatch.setattr(train_replay, "MAX_TRAIN_REPLAYS", 2)
    g = load("tiny")
    layer = pg.compile(rgcn, g, IN, out_dim=7)            # a width no other test uses: its own entry
    x = torch.randn(g.num_nodes, IN)
    # keys differ by the weights' addresses: a replaced weight is a new key
    for k in range(4):
        with torch.no_grad():
            for name, p in list(layer.weights.items()):
                layer.weights[name] = torch.nn.Parameter(p.detach().clone())
        for _ in range(2):
            _step(layer, x, torch.ones(g.num_nodes, 7))
    lp = ops.get_layer(layer.layer_id)
    assert sum(isinstance(v, train_replay.TrainReplay) for v in lp.train_replays.values()) == 2
    assert len(_trains(layer)) == 1                       # the newest weights' key is kept


# ---------------------------------------------------------------- the one-step training call

def _count_lookups(monkeypatch):
    calls = []
    real = train_replay.lookup
    monkeypatch.setattr(train_replay, "lookup", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("spec,hp", SPECS[:2], ids=IDS[:2])
def test_one_step_training_calls_equal_plain(fake_cuda, monkeypatch, spec, hp):
    layer, xs, ups = _setup(spec, hp)
    want = _plain(monkeypatch, layer, xs, ups)
    for x, up in zip(xs, ups):                        # plain, capture, then learned
        _step(layer, x, up)
    _step(layer, xs[0], ups[0])
    lp = ops.get_layer(layer.layer_id)
    assert len(lp.fast_trains) == 1
    calls = _count_lookups(monkeypatch)
    for _ in range(2):
        for x, up, w in zip(xs, ups, want):
            _same(_step(layer, x, up), w)
    assert calls == []                                # every call took the one-step entry
    (tr,) = _trains(layer)
    assert tr.replays >= 8


def test_one_step_training_call_misses_when_anything_changes(fake_cuda, monkeypatch):
    layer, xs, ups = _setup(rgcn, {"out_dim": 4})
    for _ in range(3):
        _step(layer, xs[0], ups[0])
    calls = _count_lookups(monkeypatch)
    _step(layer, xs[0], ups[0])
    assert calls == []
    # a replaced weight: a new key, the full path (and its own capture later)
    name = next(iter(layer.weights))
    with torch.no_grad():
        layer.weights[name] = torch.nn.Parameter(layer.weights[name].detach() * 2)
    monkeypatch.setenv(replay.ENV, "0")
    want = _step(layer, xs[1], ups[1])
    monkeypatch.setenv(replay.ENV, "1")
    calls.clear()
    _same(_step(layer, xs[1], ups[1]), want)
    assert calls == [1]
    # the switch off: the full path, the separate replays
    monkeypatch.setenv(train_replay.ENV, "0")
    _same(_step(layer, xs[1], ups[1]), want)
    assert calls == [1, 1]
    monkeypatch.delenv(train_replay.ENV)
    # frozen weights, an input that needs its gradient: still a training call
    for p in layer.weights.values():
        p.requires_grad_(False)
    x = xs[1].clone().requires_grad_(True)
    out = layer(x)
    (gx,) = torch.autograd.grad((out * ups[1]).sum(), [x])
    torch.testing.assert_close(gx, want[1][0], rtol=0, atol=0)
    # nothing needs a gradient: not a training call (fast_replay.py's no-grad entry or the full path)
    x2 = xs[1].clone()
    assert not layer(x2).requires_grad
