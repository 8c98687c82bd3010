"""MoE routing, token dispatch and combine (pigeon/shiftadd/moe.py; layers.moe_route / moe_dispatch /
moe_combine; shiftadd.moe.cu.jinja): the routing layout against a Python loop; the generated kernels'
CUDA text run by the CPU emulator on NaN-poisoned outputs (the plan: moe.route's layout exactly;
dispatch / combine bit-exact against the torch reference: bf16/fp16/fp32, vector and scalar rows,
k = 1..3, dropped slots), forward and backward; float64 gradchecks of the torch path; MoEMLP with
capacity dropping against a dense reference; the steady-state MoEMLP forward free of host reads
(it runs on the meta device, where any read raises); plan, dispatch and combine one launch each;
one-line errors; three nvcc sm_90 compiles (dispatch, combine, plan; the rest under -m slow).
The compact layout: its rows the capacity layout's packed (drops, empty experts), the compact plan
kernel emulated exactly, dispatch / combine bit-exact on it, MoEMLP compact == capacity (float64
reference path; float32 grouped path through _grouped_mm's CPU kernel), forward and gradients, and
the grouped path free of host reads on the meta device."""
import random

import pytest
import torch

from pigeon.codegen.shiftadd_moe import MoeConfig, MoeConfigError, config_for, plan_config, prebuild_configs, render_moe
from pigeon.runtime import emulate, shiftadd_kernel as sk
from pigeon.runtime.build import compile_cuda, nvcc_available
from pigeon.shiftadd import moe
from pigeon.shiftadd.layers import MoEMLP, moe_combine, moe_dispatch, moe_route

from fake_cuda import FakeCuda  # noqa: E402
from fake_launch import recorded_launches  # noqa: E402

needs_cxx = pytest.mark.skipif(not emulate.available(), reason="needs a C++ compiler to emulate CUDA kernels")
D64 = torch.float64


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("PIGEON_POISON", "1")


def _ids(g, t, k, e):
    """top-k style ids: k distinct experts per token."""
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)


def _loop_route(ids, e, c):
    t, k = ids.shape
    slot = torch.full((t, k), -1, dtype=torch.int32)
    src = torch.full((e * c,), -1, dtype=torch.int32)
    fill = [0] * e
    for i in range(t):
        for j in range(k):
            x = int(ids[i, j])
            if fill[x] < c:
                slot[i, j] = x * c + fill[x]
                src[x * c + fill[x]] = i * k + j
            fill[x] += 1
    return slot, src, torch.tensor(fill)


@pytest.mark.parametrize("t,k,e,c", [(1, 1, 2, None), (23, 1, 2, None), (23, 2, 2, None), (40, 2, 3, 9),
                                     (17, 3, 4, 5), (30, 1, 2, 0)])
def test_route_vs_loop(t, k, e, c):
    g = torch.Generator().manual_seed(t * 7 + k)
    ids = _ids(g, t, k, e)
    for dt in (torch.int64, torch.int32):
        r = moe.route(ids.to(dt), e, c)
        slot, src, counts = _loop_route(ids, e, t if c is None else c)
        assert torch.equal(r.slot, slot) and torch.equal(r.src, src) and torch.equal(r.counts.cpu(), counts)
        assert r.slot.dtype == r.src.dtype == torch.int32 and r.capacity == (t if c is None else c)


# (each case compiles and runs the emulated plan kernel, ~3 s on the CPU machine: the default run keeps
# one token, dropping with k=3, and zero capacity; the rest under -m slow)
_SLOW = pytest.mark.slow


@needs_cxx
@pytest.mark.parametrize("t,k,e,c", [(1, 1, 2, None), pytest.param(23, 1, 2, None, marks=_SLOW),
                                     pytest.param(300, 2, 2, None, marks=_SLOW),
                                     pytest.param(600, 2, 3, 170, marks=_SLOW), (257, 3, 4, 50), (30, 1, 2, 0),
                                     pytest.param(1000, 1, 2, 600, marks=_SLOW)])
def test_plan_kernel_emulated_vs_route(t, k, e, c):
    """The plan kernel's text (one block, chunked counts and scan) gives moe.route's layout exactly."""
    g = torch.Generator().manual_seed(t + k + e)
    ids = _ids(g, t, k, e)
    if t == 1000:
        ids[:700] = 1                                 # an unbalanced split: expert 1 overflows
    for dt in (torch.int64, torch.int32):
        want = moe.route(ids.to(dt), e, c)
        got = moe_route(ids.to(dt), e, c, backend="emulate")
        assert torch.equal(got.slot, want.slot) and torch.equal(got.src, want.src), (t, k, e, c, dt)
        assert torch.equal(got.counts, want.counts) and got.capacity == want.capacity and got.k == k


def _refs_loop(x, src, k, scale=None):
    out = torch.zeros(src.shape[0], x.shape[1], dtype=x.dtype)
    for r, s in enumerate(src.tolist()):
        if s >= 0:
            out[r] = x[s // k] if scale is None else (scale.reshape(-1)[s].double() * x[s // k].double()).to(x.dtype)
    return out


def test_refs_vs_loop():
    g = torch.Generator().manual_seed(3)
    ids = _ids(g, 13, 2, 3)
    r = moe.route(ids, 3, 6)
    x = torch.randn(13, 5, generator=g, dtype=D64)
    gate = torch.rand(13, 2, generator=g, dtype=D64)
    assert torch.equal(moe.dispatch_ref(x, r.src, 2), _refs_loop(x, r.src, 2))
    assert torch.equal(moe.dispatch_ref(x, r.src, 2, gate), _refs_loop(x, r.src, 2, gate))
    ys = list(torch.randn(3, 6, 5, generator=g, dtype=D64).unbind(0))
    y = torch.cat(ys)
    want = torch.zeros(13, 5, dtype=D64)
    for t in range(13):
        for j in range(2):
            s = int(r.slot[t, j])
            if s >= 0:
                want[t] = want[t] + gate[t, j] * y[s]
    torch.testing.assert_close(moe.combine_ref(ys, r.slot, gate), want, rtol=1e-15, atol=1e-15)


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _case(g, t, k, e, c, d, dtype):
    ids = _ids(g, t, k, e)
    r = moe.route(ids, e, c)
    x = (torch.randn(t, d, generator=g) * 3).to(dtype)
    gate = torch.rand(t, k, generator=g)
    ys = [(torch.randn(r.capacity, d, generator=g) * 3).to(dtype) for _ in range(e)]
    return r, x, gate, ys


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=_SLOW),
                                   pytest.param(torch.float32, marks=_SLOW)], ids=str)
def test_kernels_emulated_bit_exact(dtype):
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    for t, k, e, c, d in [(1, 1, 2, None, 8), (29, 1, 2, None, 64), (29, 2, 2, 11, 24), (37, 3, 3, 20, 7),
                          (9, 2, 2, 3, 1), (8, 1, 2, None, 40)]:
        r, x, gate, ys = _case(g, t, k, e, c, d, dtype)
        for scale in (None, gate):
            got = sk.moe_dispatch(x, r.src, k, scale, emulate=True)
            assert torch.equal(_bits(got), _bits(moe.dispatch_ref(x, r.src, k, scale))), (t, k, e, c, d, seed)
            got = sk.moe_combine(ys, r.slot, scale, emulate=True)
            assert torch.equal(_bits(got), _bits(moe.combine_ref(ys, r.slot, scale))), (t, k, e, c, d, seed)
    # a row start off the 16-byte grid takes the scalar kernel
    r, x, gate, ys = _case(g, 10, 1, 2, None, 16, dtype)
    xs = torch.randn(10 * 16 + 1, generator=g).to(dtype)[1:].view(10, 16)
    assert torch.equal(_bits(sk.moe_dispatch(xs, r.src, 1, emulate=True)), _bits(moe.dispatch_ref(xs, r.src, 1)))


def _pipeline(x, gate, r, ws, backend):
    buf = moe_dispatch(x, r, backend)
    c = r.capacity
    ys = [torch.tanh(buf[i * c:(i + 1) * c] @ w) for i, w in enumerate(ws)]
    return moe_combine(ys, r, gate, backend)


@needs_cxx
@pytest.mark.parametrize("k,c", [(1, None), (2, None), (2, 7)])
def test_autograd_emulated_vs_torch(k, c):
    g = torch.Generator().manual_seed(11 + k)
    r, x, gate, _ = _case(g, 21, k, 2, c, 16, torch.float32)
    ws = [torch.randn(16, 16, generator=g) * 0.3 for _ in range(2)]
    grads = {}
    for backend in ("emulate", "torch"):
        xx, gg = x.clone().requires_grad_(), gate.clone().requires_grad_()
        wws = [w.clone().requires_grad_() for w in ws]
        y = _pipeline(xx, gg, r, wws, backend)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        grads[backend] = [y.detach(), xx.grad, gg.grad] + [w.grad for w in wws]
    for a, b in zip(grads["emulate"], grads["torch"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("k,c", [(1, None), (2, None), (2, 5)])
def test_gradcheck_float64(k, c):
    g = torch.Generator().manual_seed(5 + k)
    r, x, gate, _ = _case(g, 9, k, 2, c, 4, D64)
    ws = [torch.randn(4, 4, generator=g, dtype=D64) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda x, gate, *ws: _pipeline(x, gate, r, ws, "torch"),
                                    (x.requires_grad_(), gate.double().requires_grad_(),
                                     *[w.requires_grad_() for w in ws]))


def test_moe_mlp_capacity_vs_dense_reference():
    """Dropped tokens get nothing from the expert they overflowed; the rest is the dense reference."""
    torch.manual_seed(2)
    m = MoEMLP(8, 16, k=2, latencies=[6.0, 4.0], capacity_factor=0.5).double()
    x = torch.randn(40, 8, dtype=D64)
    c = m.capacity(40)
    assert c == 24
    y, _ = m(x)
    gates = m.gates(x)
    idx = gates.topk(2, dim=1).indices
    slot, _, _ = _loop_route(idx, 2, c)
    want = torch.zeros_like(x)
    for e, ex in enumerate(m.experts):
        kept = ((idx == e) & (slot >= 0)).any(1, keepdim=True).to(D64)
        want = want + kept * gates[:, e:e + 1] * ex(x)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert MoEMLP(8, 16, latencies=[1.0, 1.0], capacity_factor=1.25).capacity(100) == 64


@pytest.mark.parametrize("k", [1, 2])
def test_moe_mlp_forward_has_no_host_read(k):
    """On the meta device every host read (.item(), nonzero, a tensor in an `if`) raises: the whole
    forward (router, routing, dispatch, both experts, combine, balance loss) runs there."""
    torch.manual_seed(0)
    m = MoEMLP(16, 32, k=k, latencies=[6.0, 4.0], backend="torch").to("meta")
    y, loss = m(torch.empty(24, 16, device="meta"))
    assert y.shape == (24, 16) and y.device.type == "meta" and loss.shape == ()
    m.train()
    y, loss = m(torch.empty(24, 16, device="meta", requires_grad=True))
    (y.sum() + loss).backward()


def test_dispatch_combine_one_launch_each(monkeypatch):
    """With the GPU mocked: moe_route, moe_dispatch and moe_combine are one kernel launch each
    (arguments in the kernel's order)."""
    with recorded_launches(monkeypatch) as launches:
        g = torch.Generator().manual_seed(0)
        r, x, gate, ys = _case(g, 20, 1, 2, None, 64, torch.bfloat16)
        ids = torch.zeros(20, 1, dtype=torch.long)
        rp = moe_route(ids, 2, 20)
        (grid, block, args), = launches
        assert grid == (1, 1, 1) and block == (256, 1, 1) and args[:3] == [rp.slot, rp.src, rp.counts]
        assert args[3] is ids and args[4:] == [20, 1, 20]
        launches.clear()
        buf = moe_dispatch(x, r)
        (grid, block, args), = launches
        assert grid == (5, 1, 1) and block == (256, 1, 1) and args[0] is buf and args[1] is x
        assert args[2] is r.src and args[3] is None and args[4:] == [40, 64, 1]
        launches.clear()
        out = moe_combine(ys, r, gate)
        (grid, block, args), = launches
        assert grid == (3, 1, 1) and args[0] is out and args[1] is ys[0] and args[2] is ys[1] and args[3] is r.slot
        assert args[4].dtype == torch.float32 and args[5:] == [20, 64, 20, 1]


def test_errors():
    with pytest.raises(ValueError, match=r"expert_ids must be an int32/int64 \[T=3, k\] tensor with 1 <= k <= 2, "
                                         r"got torch.float32 \(3, 1\)"):
        moe.route(torch.zeros(3, 1), 2)
    with pytest.raises(ValueError, match=r"expert_ids must be an int32/int64 .* got torch.int64 \(3, 3\)"):
        moe.route(torch.zeros(3, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, 2\), got 0..2"):
        moe.route(torch.tensor([[0], [2]]), 2)
    r = moe.route(torch.tensor([[0], [1], [1]]), 2)
    with pytest.raises(ValueError, match=r"gates must be a floating-point \[T, k\] = \(3, 1\) tensor on cpu, "
                                         r"got torch.int64 \(3, 1\)"):
        moe_combine([torch.zeros(3, 4)] * 2, r, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"gates must be .* got torch.float32 \(3, 2\)"):
        moe_combine([torch.zeros(3, 4)] * 2, r, torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"combine: ys must be 2 expert outputs \[C=3, D\]"):
        moe_combine([torch.zeros(2, 4)] * 2, r, torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"dispatch: x must be \[T=3, D\], got torch.float32 \(4, 2\)"):
        moe_dispatch(torch.zeros(4, 2), r)
    with pytest.raises(sk.ShiftAddKernelError, match="src must be a 1-d torch.int32 tensor"):
        sk.moe_dispatch(torch.zeros(3, 8), r.src.long(), 1, emulate=True)
    with pytest.raises(sk.ShiftAddKernelError, match="MoE combine: gate must be float32"):
        sk.moe_combine([torch.zeros(3, 8)] * 2, r.slot, torch.zeros(3, 1, dtype=D64), emulate=True)
    with pytest.raises(sk.ShiftAddKernelError, match="the MoE dispatch kernel runs on CUDA tensors, got cpu"):
        sk.moe_dispatch(torch.zeros(3, 8), r.src, 1)
    with pytest.raises(MoeConfigError, match="vec is 1 or 8 for bfloat16"):
        MoeConfig("dispatch", "bfloat16", 4, False)
    with pytest.raises(ValueError, match="capacity_factor is None or > 0"):
        MoEMLP(8, 16, latencies=[1.0, 1.0], capacity_factor=0)
    assert config_for("combine", 7, "float32", True, 2).vec == 1 and config_for("combine", 8, "float32", True, 2).vec == 4
    assert len({c.name for c in prebuild_configs()}) == len(prebuild_configs()) == 22
    with pytest.raises(MoeConfigError, match="index is one of"):
        MoeConfig("plan", "float32", 1, False, 2, "int16")
    with pytest.raises(sk.ShiftAddKernelError, match="MoE plan: expert_ids must be a 2-d int32/int64 tensor"):
        sk.moe_plan(torch.zeros(3, 1), 2, 3, emulate=True)


def _compile(cfg):
    rk = render_moe(cfg)
    res = compile_cuda(rk.source, arch="sm_90", name=rk.name).resources[rk.name]
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0 and res["stack"] == 0, res


DEFAULT_COMPILES = [MoeConfig("dispatch", "bfloat16", 8, False), MoeConfig("combine", "bfloat16", 8, True, 2),
                    plan_config(2)]


@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
@pytest.mark.parametrize("cfg", DEFAULT_COMPILES, ids=lambda c: c.name)
def test_moe_kernels_compile_sm90(cfg):
    _compile(cfg)


@pytest.mark.slow
@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
@pytest.mark.parametrize("cfg", [c for c in prebuild_configs() + [config_for("combine", 7, "float16", False, 3),
                                                                  config_for("dispatch", 7, "float32", True)]
                                 if c not in DEFAULT_COMPILES], ids=lambda c: c.name)
def test_moe_kernels_compile_sm90_all(cfg):
    _compile(cfg)


def test_template_header_lists_every_field():
    import dataclasses
    import re
    from pigeon.codegen import jinja as pj
    from pigeon.codegen.shiftadd_moe import TEMPLATE
    src, header = pj.template_source(TEMPLATE), pj.template_header(TEMPLATE)
    fields = {f.name for f in dataclasses.fields(MoeConfig)}
    assert set(re.findall(r"\bc\.([a-z_]+)", src[src.index("-#}"):])) <= fields
    assert all(f"c.{f}" in header for f in fields)


# ---------------------------------------------------------------- CUDA-graph replay of the no-grad forward

@pytest.fixture
def fake_cuda(monkeypatch):
    """MoEMLP's replay path on the CPU: CPU tensors may be captured, CUDA graphs are FakeGraphs (tests/fake_cuda.py)."""
    from pigeon.runtime import replay
    fake = FakeCuda()
    monkeypatch.setattr(replay, "CUDA", fake)
    monkeypatch.setattr(replay, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(MoEMLP, "_REPLAY_DEVICES", ("cuda", "cpu"))
    monkeypatch.setenv(replay.ENV, "1")
    for name in replay.DEBUG_ENVS:
        monkeypatch.delenv(name, raising=False)
    return fake


def _moe(k=1, factor=None, seed=0):
    torch.manual_seed(seed)
    return MoEMLP(16, 32, k=k, latencies=[6.0, 4.0], capacity_factor=factor, backend="torch").eval()


def _plain(m, x, monkeypatch):
    from pigeon.runtime import replay
    monkeypatch.setenv(replay.ENV, "0")
    try:
        with torch.no_grad():
            return m(x)
    finally:
        monkeypatch.setenv(replay.ENV, "1")


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("k,factor", [(1, None), (2, None), (1, 1.25)])
def test_moe_mlp_replay_captured_once_equals_plain(fake_cuda, monkeypatch, k, factor):
    m = _moe(k, factor)
    xs = [torch.randn(40, 16) * (i + 1) for i in range(5)]
    want = [_plain(m, x, monkeypatch) for x in xs]
    with torch.no_grad():
        got = [m(x) for x in xs]                       # plain, capture, replays
    rs = m._replays
    assert fake_cuda.captures == 1 and fake_cuda.warmups == 1 and len(rs) == 1 and not rs.failed
    rep = next(iter(rs.replays.values()))
    assert rep.replays == 4                            # the capturing call and three more
    for (y, loss), (wy, wloss) in zip(got, want):      # results held across later replays kept their values
        _same(y, wy)
        _same(loss, wloss)
        assert y.data_ptr() != rep.out_static[0].data_ptr()
    assert loss.shape == () and not loss.requires_grad
    with torch.no_grad():                              # a new shape is a new key: plain, then captured
        m(torch.randn(24, 16))
        y, _ = m(xs[0][:24].contiguous())
    _same(y, _plain(m, xs[0][:24].contiguous(), monkeypatch)[0])
    assert fake_cuda.captures == 2 and len(rs) == 2


def test_moe_mlp_replay_sees_weights_updated_in_place(fake_cuda, monkeypatch):
    m = _moe()
    x = torch.randn(40, 16)
    with torch.no_grad():
        m(x), m(x)
        before = m(x)[0]
        assert fake_cuda.captures == 1
        m.experts[0].fc1.weight.mul_(-1.5)             # the dense expert: read in place by the replay
        m.gate.weight.add_(0.3)
        y = m(x)[0]
    assert fake_cuda.captures == 1 and not torch.equal(y, before)
    _same(y, _plain(m, x, monkeypatch)[0])
    with torch.no_grad():
        m.experts[1].fc2.weight.mul_(0.5)              # a shift layer: its cached weight forms change,
        y1 = m(x)[0]                                   # so a new key (plain), captured on its next call
        y2 = m(x)[0]
    want = _plain(m, x, monkeypatch)[0]
    _same(y1, want)
    _same(y2, want)
    assert fake_cuda.captures == 2
    with torch.no_grad():                              # a replaced Parameter: a new address, a new key
        m.experts[0].fc2.weight = torch.nn.Parameter(m.experts[0].fc2.weight * 2)
        ys = [m(x)[0] for _ in range(3)]
    want = _plain(m, x, monkeypatch)[0]
    for y in ys:
        _same(y, want)
    assert fake_cuda.captures == 3


def test_moe_mlp_training_never_replays(fake_cuda, monkeypatch):
    m = _moe().train()
    x = torch.randn(40, 16)
    want = _plain(m, x, monkeypatch)
    for _ in range(3):                                 # weights require grad: autograd records the plain ops
        y, loss = m(x)
        assert y.requires_grad and loss.requires_grad
        _same(y.detach(), want[0])
        (y.sum() + loss).backward()
    assert fake_cuda.captures == 0 and "_replays" not in m.__dict__
    assert m.experts[1].fc1.weight.grad is not None
    xg = x.clone().requires_grad_()
    for p in m.parameters():
        p.requires_grad_(False)
    for _ in range(3):                                 # only x requires grad: still plain
        assert m(xg)[0].requires_grad
    assert fake_cuda.captures == 0
    for _ in range(3):                                 # grad enabled, nothing requires it: replayed
        y, _ = m(x)
        assert not y.requires_grad
        _same(y, want[0])
    assert fake_cuda.captures == 1


def test_moe_mlp_replay_switched_off(fake_cuda, monkeypatch):
    from pigeon.runtime import replay
    m = _moe()
    x = torch.randn(40, 16)
    monkeypatch.setenv(replay.ENV, "0")
    with torch.no_grad():
        for _ in range(4):
            m(x)
    assert fake_cuda.captures == 0 and "_replays" not in m.__dict__
    monkeypatch.setenv(replay.ENV, "1")
    for name in replay.DEBUG_ENVS:                     # host checks at every launch: never captured
        monkeypatch.setenv(name, "1")
        with torch.no_grad():
            for _ in range(3):
                m(x)
        monkeypatch.delenv(name)
    assert fake_cuda.captures == 0
    with torch.no_grad():                              # non-contiguous x: plain
        xt = torch.randn(16, 40).T
        for _ in range(3):
            _same(m(xt)[0], _plain(m, xt, monkeypatch)[0])
    assert fake_cuda.captures == 0


def test_moe_mlp_capture_failure_falls_back(fake_cuda, monkeypatch):
    import copy
    import warnings
    fake_cuda.fail = RuntimeError("operation not permitted when stream is capturing")
    m = _moe()
    x = torch.randn(40, 16)
    want = _plain(m, x, monkeypatch)[0]
    with torch.no_grad():
        _same(m(x)[0], want)
        with pytest.warns(RuntimeWarning, match=r"CUDA-graph capture of kernel program 'MoEMLP.*' failed"):
            _same(m(x)[0], want)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _same(m(x)[0], want)
    assert len(m._replays) == 0 and len(m._replays.failed) == 1
    m2 = copy.deepcopy(m)                              # the replays (graphs, a lock) are not copied
    assert "_replays" not in m2.__dict__ and "_replays" in m.__dict__


@needs_cxx
def test_plan_kernel_drops_out_of_range_ids_without_writing_and_the_check_names_them(monkeypatch):
    """An expert id outside [0, E) is never an index in the plan kernel (no out-of-bounds shared-memory
    write): its choice is dropped (slot -2); PIGEON_CHECK_INDICES=1 raises naming the first one."""
    monkeypatch.delenv("PIGEON_CHECK_INDICES", raising=False)
    ids = torch.tensor([[0], [5], [1], [-1], [0]], dtype=torch.int64)
    slot, src, counts = sk.moe_plan(ids, 2, 5, emulate=True)
    assert slot.flatten().tolist() == [0, sk.INVALID_SLOT, 5, sk.INVALID_SLOT, 1]
    assert counts.tolist() == [2, 1] and src.tolist() == [0, 4, -1, -1, -1, 2, -1, -1, -1, -1]
    monkeypatch.setenv("PIGEON_CHECK_INDICES", "1")
    with pytest.raises(sk.ShiftAddKernelError, match=r"expert_ids\[1, 0\] = 5 is outside \[0, 2\) \(2 such ids\)"):
        sk.moe_plan(ids, 2, 5, emulate=True)


# ---------------------------------------------------------------- the compact layout (no padding rows)

def _compact_from_capacity(ids, e, c):
    """The compact layout derived from the capacity one: expert e's kept rows e*C + q -> base[e] + q."""
    r = moe.route(ids, e, c)
    used = r.counts.clamp_max(r.capacity)
    ends = used.cumsum(0)
    base = ends - used
    t, k = ids.shape
    rows = min(t * k, e * r.capacity)
    src = torch.full((rows,), -1, dtype=torch.int32)
    for x in range(e):
        n = int(used[x])
        src[int(base[x]):int(base[x]) + n] = r.src[x * r.capacity:x * r.capacity + n]
    s = r.slot.long()
    cap = max(r.capacity, 1)
    slot = torch.where(s >= 0, base[s.clamp_min(0) // cap] + s.clamp_min(0) % cap, -1).to(torch.int32)
    return slot, src, r.counts, ends.to(torch.int32)


_COMPACT_CASES = [(1, 1, 2, None), (23, 2, 2, None), (40, 2, 3, 9), (17, 3, 4, 5), (30, 1, 2, 0), (50, 1, 4, 20),
                  (64, 2, 4, 7)]


def _routed(t, k, e, empty=False):
    g = torch.Generator().manual_seed(t * 13 + k + e)
    ids = _ids(g, t, k, e)
    if empty and e >= 3 and k < e - 1:                 # expert e-1 gets nothing
        ids = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(t)])
    return ids


@pytest.mark.parametrize("t,k,e,c", _COMPACT_CASES)
def test_compact_route_is_the_capacity_layout_packed(t, k, e, c):
    """Same kept / dropped choices, same order; rows packed by expert, group ends on the device."""
    for empty in (False, True):
        ids = _routed(t, k, e, empty)
        for dt in (torch.int64, torch.int32):
            r = moe.route(ids.to(dt), e, c, layout="compact")
            slot, src, counts, ends = _compact_from_capacity(ids, e, t if c is None else c)
            assert torch.equal(r.slot, slot) and torch.equal(r.src, src), (t, k, e, c, empty)
            assert torch.equal(r.counts, counts) and torch.equal(r.ends, ends) and r.ends.dtype == torch.int32
            assert r.groups() == (1, r.rows) and r.rows == min(t * k, e * r.capacity)
            grp = moe.row_groups(r.ends, r.rows)
            kept = r.slot >= 0
            assert torch.equal(grp[r.slot[kept].long()], ids.to(dt)[kept].long())     # each row in its expert's group


@needs_cxx
@pytest.mark.parametrize("t,k,e,c,empty", [(257, 3, 4, 50, False), pytest.param(64, 1, 4, 7, True, marks=_SLOW),
                                           pytest.param(600, 2, 3, 170, False, marks=_SLOW),
                                           pytest.param(30, 1, 2, 0, False, marks=_SLOW)])
def test_plan_kernel_emulated_compact_vs_route(t, k, e, c, empty):
    ids = _routed(t, k, e, empty)
    for dt in (torch.int64,) if not empty else (torch.int64, torch.int32):
        want = moe.route(ids.to(dt), e, c, layout="compact")
        got = moe_route(ids.to(dt), e, c, backend="emulate", layout="compact")
        assert got.layout == "compact" and got.rows == want.rows
        for a in ("slot", "src", "counts", "ends"):
            assert torch.equal(getattr(got, a), getattr(want, a)), (a, t, k, e, c, dt)


@needs_cxx
def test_kernels_emulated_bit_exact_compact():
    """The dispatch / combine kernels (layout-agnostic) on compact src / slot: combine over one [R, D] output."""
    g = torch.Generator().manual_seed(7)
    for t, k, e, c, d in [(29, 2, 3, 11, 24), (40, 1, 2, None, 64)]:
        r = moe.route(_ids(g, t, k, e), e, c, layout="compact")
        x = (torch.randn(t, d, generator=g) * 3).to(torch.bfloat16)
        gate = torch.rand(t, k, generator=g)
        y = (torch.randn(r.rows, d, generator=g) * 3).to(torch.bfloat16)
        for scale in (None, gate):
            got = sk.moe_dispatch(x, r.src, k, scale, emulate=True)
            assert torch.equal(_bits(got), _bits(moe.dispatch_ref(x, r.src, k, scale)))
            got = sk.moe_combine([y], r.slot, scale, emulate=True)
            assert torch.equal(_bits(got), _bits(moe.combine_ref([y], r.slot, scale)))


def _mlp_pair(k, factor, dtype, seed=4, dim=16, hidden=32):
    torch.manual_seed(seed)
    m = MoEMLP(dim, hidden, k=k, latencies=[6.0, 4.0], capacity_factor=factor, backend="torch").to(dtype)
    mc = MoEMLP(dim, hidden, k=k, latencies=[6.0, 4.0], capacity_factor=factor, backend="torch",
                layout="capacity").to(dtype)
    mc.load_state_dict(m.state_dict())
    return m, mc


def _fwd_bwd(m, x, gy):
    xx = x.clone().requires_grad_()
    y, loss = m(xx)
    ((y * gy).sum() + loss).backward()
    return [y.detach(), loss.detach(), xx.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("k,factor", [(1, None), (2, None), (2, 0.5), (1, 0.6)])
def test_moe_mlp_compact_equals_capacity_float64(k, factor):
    """The CPU reference of the compact layout: outputs and every gradient as the capacity layout's."""
    m, mc = _mlp_pair(k, factor, D64)
    x = torch.randn(40, 16, dtype=D64)
    gy = torch.randn(40, 16, dtype=D64)
    assert m.compact_plan(x, m.capacity(40)) == "reference"
    for a, b in zip(_fwd_bwd(m, x, gy), _fwd_bwd(mc, x, gy)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,factor", [(1, None), (2, None), (2, 0.5), (1, 0.6)])
def test_moe_mlp_grouped_equals_capacity_float32(monkeypatch, k, factor):
    """The grouped path (torch._grouped_mm over the compact rows, stacked weights, the shift
    weights' STE) through _grouped_mm's CPU kernel, float32: outputs and gradients as the capacity
    layout's (per-expert F.linear) to within float32 rounding."""
    monkeypatch.setattr(MoEMLP, "_GROUPED_DEVICES", ("cuda", "cpu"))
    m, mc = _mlp_pair(k, factor, torch.float32)
    x = torch.randn(40, 16)
    gy = torch.randn(40, 16)
    assert m.compact_plan(x, m.capacity(40)) == "grouped"
    m.__dict__.pop("_gemms")
    got, want = _fwd_bwd(m, x, gy), _fwd_bwd(mc, x, gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], mc(x)[0], rtol=1e-5, atol=1e-5)
    mc.experts[0].fc1.register_forward_hook(lambda *a: None)     # a hook: the module calls (capacity layout)
    assert mc.compact_plan(x, 40) is None


@pytest.mark.parametrize("layout", ["compact", "capacity"])
def test_moe_mlp_grouped_forward_has_no_host_read(monkeypatch, layout):
    """The grouped path (bf16 on the meta device, where _grouped_mm has a meta kernel) forward and
    backward with no host read."""
    monkeypatch.setattr(MoEMLP, "_GROUPED_DEVICES", ("cuda", "meta"))
    m = MoEMLP(16, 32, k=2, latencies=[6.0, 4.0], backend="torch", layout=layout).to("meta", torch.bfloat16)
    x = torch.empty(24, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    if layout == "compact":
        assert m.compact_plan(x, 24) == "grouped"
        m.__dict__.pop("_gemms")
    y, loss = m(x)
    (y.sum() + loss).backward()
    assert y.shape == (24, 16) and x.grad.shape == (24, 16)


def test_compact_errors():
    with pytest.raises(ValueError, match="layout is one of"):
        MoEMLP(8, 16, latencies=[1.0, 1.0], layout="sorted")
    with pytest.raises(ValueError, match="layout is one of"):
        moe.route(torch.zeros(3, 1, dtype=torch.long), 2, layout="x")
    r = moe.route(torch.tensor([[0], [1], [1]]), 2, layout="compact")
    with pytest.raises(ValueError, match=r"combine: ys must be one output \[R=3, D\] \(the compact layout\)"):
        moe_combine([torch.zeros(3, 4)] * 2, r, torch.zeros(3, 1))
    with pytest.raises(MoeConfigError, match="layout is one of"):
        MoeConfig("combine", "bfloat16", 8, False, 1, layout="compact")
