"""The MoE dispatch / combine kernels (shiftadd.moe.cu.jinja) on the GPU with NaN-poisoned outputs
(PIGEON_POISON=1): the plan kernel giving moe.route's layout exactly; dispatch / combine bit-exact against the torch reference (pigeon/shiftadd/moe.py dispatch_ref /
combine_ref, run on the same GPU) for bf16/fp16/fp32, vector and scalar rows, k = 1..3, dropped
slots; forward and backward of dispatch -> experts -> combine against the torch path; MoEMLP on
CUDA (bf16, both experts on their paths, exact and capacity-limited) against the float64 CPU torch
forms, forward and backward; and the steady-state MoEMLP forward with no host sync
(torch.cuda.set_sync_debug_mode("error"))."""
import random

import pytest
import torch

from pigeon.runtime import shiftadd_kernel as sk
from pigeon.shiftadd import moe
from pigeon.shiftadd.layers import MoEMLP, moe_combine, moe_dispatch, moe_route

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("PIGEON_POISON", "1")


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _ids(g, t, k, e):
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])


@pytest.mark.parametrize("t,k,e,c", [(1, 1, 2, None), (300, 2, 2, None), (6272, 1, 2, 3920), (6272, 2, 4, 2000),
                                     (100000, 1, 2, None)])
def test_plan_kernel_vs_route(t, k, e, c):
    g = torch.Generator().manual_seed(t + k)
    ids = _ids(g, t, k, e).to(DEV)
    for dt in (torch.int64, torch.int32):
        want = moe.route(ids.to(dt), e, c)
        got = moe_route(ids.to(dt), e, c)
        assert torch.equal(got.slot, want.slot) and torch.equal(got.src, want.src) and torch.equal(got.counts, want.counts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_kernels_bit_exact(dtype):
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    for t, k, e, c, d in [(1, 1, 2, None, 8), (300, 1, 2, None, 320), (301, 2, 2, 170, 64), (77, 3, 4, 40, 7),
                          (6272, 1, 2, None, 320), (50, 2, 2, 30, 1)]:
        r = moe.route(_ids(g, t, k, e).to(DEV), e, c)
        x = (torch.randn(t, d, generator=g) * 3).to(dtype).to(DEV)
        gate = torch.rand(t, k, generator=g).to(DEV)
        ys = [(torch.randn(r.capacity, d, generator=g) * 3).to(dtype).to(DEV) for _ in range(e)]
        for scale in (None, gate):
            got = sk.moe_dispatch(x, r.src, k, scale)
            assert torch.equal(_bits(got), _bits(moe.dispatch_ref(x, r.src, k, scale))), (t, k, e, c, d, seed)
            got = sk.moe_combine(ys, r.slot, scale)
            assert torch.equal(_bits(got), _bits(moe.combine_ref(ys, r.slot, scale))), (t, k, e, c, d, seed)


@pytest.mark.parametrize("k,c", [(1, None), (2, None), (2, 100)])
def test_pipeline_forward_backward(k, c):
    g = torch.Generator().manual_seed(k)
    t, d = 257, 64
    r = moe.route(_ids(g, t, k, 2).to(DEV), 2, c)
    x0 = torch.randn(t, d, generator=g).to(DEV)
    gate0 = torch.rand(t, k, generator=g).to(DEV)
    ws0 = [(torch.randn(d, d, generator=g) * 0.2).to(DEV) for _ in range(2)]
    gy = torch.randn(t, d, generator=g).to(DEV)
    res = {}
    for backend in ("kernels", "torch"):
        x, gate = x0.clone().requires_grad_(), gate0.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in ws0]
        buf = moe_dispatch(x, r, backend)
        cap = r.capacity
        y = moe_combine([torch.tanh(buf[i * cap:(i + 1) * cap] @ w) for i, w in enumerate(ws)], r, gate, backend)
        y.backward(gy)
        res[backend] = [y.detach(), x.grad, gate.grad] + [w.grad for w in ws]
    for a, b in zip(res["kernels"], res["torch"]):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,factor", [(1, None), (2, None), (1, 1.25)])
def test_moe_mlp_cuda_vs_float64(k, factor):
    torch.manual_seed(3)
    m = MoEMLP(64, 128, k=k, latencies=[6.0, 4.0], capacity_factor=factor)
    m64 = MoEMLP(64, 128, k=k, latencies=[6.0, 4.0], capacity_factor=factor, backend="torch").double()
    m64.load_state_dict({n: p.double() for n, p in m.state_dict().items()})
    m = m.to(DEV, torch.bfloat16)
    x = torch.randn(300, 64, dtype=torch.float64)
    xg = x.to(DEV, torch.bfloat16).requires_grad_()
    y, bal = m(xg)
    x64 = x.to(torch.bfloat16).double().requires_grad_()
    y64, _ = m64(x64)
    same = (m.gates(xg.detach()).float().cpu() > 0).eq(m64.gates(x64.detach()) > 0).all(1)   # tokens routed alike
    assert same.float().mean() > 0.95 and not y.isnan().any()
    err = (y.float().cpu().double() - y64)[same].norm() / y64[same].norm()
    assert err < 5e-2, err
    g = torch.randn(300, 64, dtype=torch.float64)
    (y.float() * g.to(DEV)).sum().backward()
    (y64 * g).sum().backward()
    gerr = (xg.grad.float().cpu().double() - x64.grad)[same].norm() / x64.grad[same].norm()
    assert gerr < 1e-1 and not xg.grad.isnan().any(), gerr


def _without_host_sync(m, x):
    """``m(x)[0]`` with torch's sync debug mode raising on any device-to-host synchronization."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        return m(x)[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("factor", [None, 1.25])
def test_moe_mlp_forward_no_host_sync(factor):
    m = MoEMLP(320, 1280, k=1, latencies=[6.0, 4.0], capacity_factor=factor).to(DEV, torch.bfloat16).eval()
    x = torch.randn(6272, 320, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        m(x)                                          # first call: path decisions, kernel loads
        torch.cuda.synchronize()
        y = _without_host_sync(m, x)
    assert not y.isnan().any()


@pytest.mark.parametrize("factor", [None, 1.25])
def test_moe_mlp_replay_equals_plain(factor, monkeypatch):
    """The no-grad forward at the bench's shape through a CUDA-graph replay (layers.MoEMLP._replayed):
    one capture, replays equal to the plain forward bit for bit for 3 different inputs (the same
    kernels and cuBLAS calls on the same data), results held across later replays unchanged."""
    from pigeon.runtime import replay
    for name in replay.DEBUG_ENVS:
        monkeypatch.delenv(name, raising=False)
    torch.manual_seed(5)
    m = MoEMLP(320, 1280, k=1, latencies=[6.0, 4.0], capacity_factor=factor).to(DEV, torch.bfloat16).eval()
    xs = [torch.randn(6272, 320, device=DEV, dtype=torch.bfloat16) * (i + 1) for i in range(3)]
    monkeypatch.setenv(replay.ENV, "0")
    with torch.no_grad():
        want = [m(x) for x in xs]
    monkeypatch.setenv(replay.ENV, "1")
    with torch.no_grad():
        got = [m(x) for _ in range(2) for x in xs]     # plain, capture, then replays
    torch.cuda.synchronize()
    rs = m._replays
    assert rs.captures == 1 and len(rs) == 1 and not rs.failed, rs.failed
    assert next(iter(rs.replays.values())).replays == 5
    for i, (y, loss) in enumerate(got):
        wy, wloss = want[i % 3]
        assert not y.isnan().any()
        assert torch.equal(y, wy), (i, (y.float() - wy.float()).abs().max().item())
        assert torch.equal(loss, wloss), (i, loss.item(), wloss.item())
    with torch.no_grad():                              # an in-place weight update is read by the replay
        m.experts[0].fc1.weight.mul_(0.5)
        y = m(xs[0])[0]
        monkeypatch.setenv(replay.ENV, "0")
        wy = m(xs[0])[0]
    assert rs.captures == 1 and torch.equal(y, wy)


# ---------------------------------------------------------------- the compact layout (grouped expert GEMMs)

@pytest.mark.parametrize("t,k,e,c", [(6272, 1, 2, None), (6272, 2, 4, 2000), (300, 3, 4, 60)])
def test_plan_kernel_compact_vs_route(t, k, e, c):
    g = torch.Generator().manual_seed(t + 3 * k)
    ids = _ids(g, t, k, e).to(DEV)
    want = moe.route(ids, e, c, layout="compact")
    got = moe_route(ids, e, c, layout="compact")
    for a in ("slot", "src", "counts", "ends"):
        assert torch.equal(getattr(got, a), getattr(want, a)), a


def _pair(k, factor, path="dense"):
    torch.manual_seed(7)
    m = MoEMLP(320, 1280, k=k, latencies=[6.0, 4.0], capacity_factor=factor)
    mc = MoEMLP(320, 1280, k=k, latencies=[6.0, 4.0], capacity_factor=factor, layout="capacity")
    mc.load_state_dict(m.state_dict())
    for mm in (m, mc):
        for lin in (mm.experts[1].fc1, mm.experts[1].fc2):
            lin.path = path
    return m.to(DEV, torch.bfloat16), mc.to(DEV, torch.bfloat16)


@pytest.mark.parametrize("k,factor", [(1, None), (2, None), (1, 1.25)])
def test_moe_mlp_compact_vs_capacity_bf16(k, factor):
    """At the bench's shape: the compact layout through torch._grouped_mm (the shift expert on its
    dense path) against the capacity layout (per-expert cuBLAS over C rows), forward and backward,
    bf16 (rounding differs: _grouped_mm vs cuBLAS, the bias added after the GEMM)."""
    m, mc = _pair(k, factor)
    x0 = torch.randn(6272, 320, device=DEV, dtype=torch.bfloat16)
    assert m.compact_plan(x0, m.capacity(6272)) == "grouped"
    m.__dict__.pop("_gemms")
    gy = torch.randn(6272, 320, device=DEV, dtype=torch.bfloat16)
    res = []
    for mm in (m, mc):
        x = x0.clone().requires_grad_()
        y, loss = mm(x)
        ((y.float() * gy.float()).sum() + loss.float()).backward()
        res.append([y.detach(), x.grad] + [p.grad for p in mm.parameters()])
    for i, (a, b) in enumerate(zip(*res)):
        assert not a.isnan().any(), i
        err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)
        assert err < 2e-2, (i, err.item())


def test_moe_mlp_compact_shift_kernel_path_falls_back_to_capacity():
    """A shift linear on its shift kernel path: the compact layout runs the capacity forward."""
    m, mc = _pair(1, None, path="shift")
    x = torch.randn(6272, 320, device=DEV, dtype=torch.bfloat16)
    assert m.compact_plan(x, 6272) is None
    with torch.no_grad():
        assert torch.equal(m(x)[0], mc(x)[0])


@pytest.mark.parametrize("factor", [None, 1.25])
def test_moe_mlp_compact_forward_no_host_sync(factor):
    m, _ = _pair(1, factor)
    m.eval()
    x = torch.randn(6272, 320, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        m(x)
        torch.cuda.synchronize()
        assert m.compact_plan(x, m.capacity(6272)) == "grouped"
        m.__dict__.pop("_gemms")
        y = _without_host_sync(m, x)
    assert not y.isnan().any()
