"""The latency-aware balancing loss (pigeon/shiftadd/router.py) against a plain computation, and
its gradients in float64."""
import pytest
import torch

from pigeon.shiftadd.router import moe_balance_loss, noisy_top_k_load


def _top_k_gates(logits, k):
    v, i = logits.topk(k, dim=1)
    return torch.zeros_like(logits).scatter(1, i, torch.softmax(v, dim=1))


def _by_hand(gates, lat, load=None):
    t, e = len(gates), len(gates[0])
    w = [lat[j] / (sum(lat) / e) for j in range(e)]
    imp = [sum(gates[i][j] for i in range(t)) for j in range(e)]
    ld = load if load is not None else [sum(1.0 for i in range(t) if gates[i][j] > 0) for j in range(e)]

    def cv2(v):
        m = sum(v) / len(v)
        return sum((x - m) ** 2 for x in v) / (len(v) - 1) / (m * m + 1e-10)
    return cv2([a * b for a, b in zip(w, imp)]) + cv2([a * b for a, b in zip(w, ld)])


@pytest.mark.parametrize("e,k", [(2, 1), (4, 2), (5, 3)])
def test_loss_equals_plain_computation(e, k):
    g = torch.Generator().manual_seed(e * 10 + k)
    gates = _top_k_gates(torch.randn(23, e, generator=g, dtype=torch.float64), k)
    lat = torch.rand(e, generator=g, dtype=torch.float64) + 0.5
    got = moe_balance_loss(gates, lat)
    assert abs(got.item() - _by_hand(gates.tolist(), lat.tolist())) < 1e-12
    # the paper's hard-coded 6:4 weighting is latencies in that ratio
    if e == 2:
        imp, load = gates.sum(0) * torch.tensor([6.0, 4.0], dtype=torch.float64), (gates > 0).sum(0) * torch.tensor([6.0, 4.0], dtype=torch.float64)
        paper = imp.var() / (imp.mean() ** 2 + 1e-10) + load.double().var() / (load.double().mean() ** 2 + 1e-10)
        assert abs(moe_balance_loss(gates, torch.tensor([6.0, 4.0], dtype=torch.float64)).item() - paper.item()) < 1e-9


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(7)
    t, e, k = 12, 4, 2
    clean = torch.randn(t, e, generator=g, dtype=torch.float64, requires_grad=True)
    noise_std = torch.rand(t, e, generator=g, dtype=torch.float64) + 0.3
    noise = torch.randn(t, e, generator=g, dtype=torch.float64)
    lat = torch.tensor([3.0, 1.0, 2.0, 1.5], dtype=torch.float64)

    def f(clean):
        noisy = clean + noise * noise_std
        gates = _top_k_gates(noisy, k)
        return moe_balance_loss(gates, lat, load=noisy_top_k_load(clean, noisy, noise_std, k))
    assert torch.autograd.gradcheck(f, (clean,))
    # the counted load has no gradient; the importance term still does (perturb only the routed
    # gates: moving a zero gate off zero would change the count)
    gates = _top_k_gates(clean.detach(), k)
    mask = gates > 0
    vals = gates[mask].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: moe_balance_loss(torch.zeros_like(gates).masked_scatter(mask, v), lat), (vals,))


def test_errors():
    with pytest.raises(ValueError, match=r"latencies has shape \(3,\), expected \[4\]"):
        moe_balance_loss(torch.rand(5, 4), torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        moe_balance_loss(torch.rand(5, 2), torch.tensor([1.0, 0.0]))
