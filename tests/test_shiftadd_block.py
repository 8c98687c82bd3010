"""The ShiftAdd layers and block (pigeon/shiftadd/layers.py, block.py) against plain-torch
reimplementations written here from the formulas (forward and gradients, float64), gradchecks where
the straight-through estimators allow, the integer inference path bit-exact against
shift_linear_ref, the input errors, and a 50-step training run in lockstep with the reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from pigeon.shiftadd.block import ShiftAddViTBlock
from pigeon.shiftadd.fixed import shift_linear_ref, to_fixed
from pigeon.shiftadd.layers import (AddAttention, MoEMLP, ShiftLinear, masked_accumulate,
                                    measure_expert_latencies)
from pigeon.shiftadd.quant import ShiftFormatError, pack_shift, quantize_shift

D64 = torch.float64


# ---------------------------------------------------------------- plain-torch references

def ref_shift_weight(w, p_min=-15, p_max=0):
    """sign * 2^round(log2|w|) (0 below 2^(p_min-1)), clipped STE: the gradient where |w| <= 2^p_max."""
    a = w.detach().abs()
    p = torch.floor(torch.log2(a.clamp_min(1e-300)) + 0.5).clamp(p_min, p_max)
    wq = torch.where(a < 2.0 ** (p_min - 1), torch.zeros_like(a), torch.sign(w.detach()) * 2.0 ** p)
    mask = (a <= 2.0 ** p_max).to(w.dtype)
    return wq + (w - w.detach()) * mask


def ref_linear(P, name, x, shift):
    w = P[f"{name}.weight"]
    y = x @ (ref_shift_weight(w) if shift else w).T
    return y + P[f"{name}.bias"] if f"{name}.bias" in P else y


def ref_binarize(q):                 # ShiftAddViT pvt_v2.py, LinAngularAttention_binary
    b = torch.gt(q - q.mean(), 0).to(q.dtype)
    c = torch.clamp(q, 0, 1.0)
    return b.detach() - c.detach() + c


def ref_attention(P, pre, x, heads, binary=True, shift=False):
    b, n, c = x.shape
    qkv = ref_linear(P, f"{pre}.qkv", x, shift).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    if binary:
        q, k = ref_binarize(q), ref_binarize(k)
    w = P[f"{pre}.dconv.weight"]
    dconv_v = F.conv2d(v, w, padding=(w.shape[2] // 2, 0), groups=heads)
    y = 0.5 * v + 1.0 / math.pi * (q @ (k.transpose(-2, -1) @ v))
    y = y / y.norm(dim=-1, keepdim=True) + dconv_v
    return ref_linear(P, f"{pre}.proj", y.transpose(1, 2).reshape(b, n, c), shift)


def ref_moe(P, pre, x, k, lat, kinds=("dense", "shift")):
    prob = torch.softmax(x @ P[f"{pre}.gate.weight"].T, dim=1)
    top, idx = prob.topk(k, dim=1)
    gates = torch.zeros_like(prob).scatter(1, idx, top)
    y = 0
    for e, kind in enumerate(kinds):          # every expert on every token, weighted by its gate (0 if not routed)
        h = F.gelu(ref_linear(P, f"{pre}.experts.{e}.fc1", x, kind == "shift"))
        y = y + gates[:, e:e + 1] * ref_linear(P, f"{pre}.experts.{e}.fc2", h, kind == "shift")
    w = lat / lat.mean()

    def cv2(v):
        return v.var() / (v.mean() ** 2 + 1e-10)
    return y, cv2(w * gates.sum(0)) + cv2(w * (gates > 0).sum(0).to(x.dtype))


def ref_block(P, x, heads, k, lat):
    c = x.shape[-1]
    x = x + ref_attention(P, "attn", F.layer_norm(x, (c,), P["norm1.weight"], P["norm1.bias"]), heads)
    b, n, _ = x.shape
    m, bal = ref_moe(P, "mlp", F.layer_norm(x, (c,), P["norm2.weight"], P["norm2.bias"]).reshape(b * n, c), k, lat)
    return x + m.reshape(b, n, c), bal


def params_of(mod):
    return {n: p.detach().clone().requires_grad_() for n, p in mod.named_parameters()}


def assert_grads(mod, P, tol=1e-10):
    for n, p in mod.named_parameters():
        torch.testing.assert_close(p.grad, P[n].grad, rtol=tol, atol=tol, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------- ShiftLinear

def test_shift_linear_vs_reference_and_gradcheck():
    torch.manual_seed(0)
    lin = ShiftLinear(13, 7).double()
    with torch.no_grad():
        lin.weight[0, :3] = torch.tensor([3.0, -1e-6, 0.7])      # saturated (no grad), rounds to 0, in range
        lin.bias.normal_()
    x = torch.randn(2, 5, 13, dtype=D64, requires_grad=True)
    P = params_of(lin)
    y = lin(x)
    xr = x.detach().clone().requires_grad_()
    yr = xr @ ref_shift_weight(P["weight"]).T + P["bias"]
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    assert_grads(lin, P)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    assert lin.weight.grad[0, 0] == 0 and lin.weight.grad[0, 1] != 0      # clipped STE; a zero weight still learns
    # linear in x for fixed weights: gradcheck through the STE forward
    assert torch.autograd.gradcheck(lambda x: lin(x), (x.detach().clone().requires_grad_(),))
    # quantization disabled: the float path, gradchecked in all its inputs
    lin.quantize = False
    assert torch.autograd.gradcheck(
        lambda x, w, b: torch.func.functional_call(lin, {"weight": w, "bias": b}, (x,)),
        (x.detach().clone().requires_grad_(), lin.weight.detach().clone().requires_grad_(),
         lin.bias.detach().clone().requires_grad_()))


@pytest.mark.parametrize("rng", [(-15, 0, 6), (-14, 0, 5), (-8, -3, 5)])
def test_shift_linear_integer_path_bit_exact(rng):
    pytest.importorskip("tvm")
    p_min, p_max, bits = rng
    g = torch.Generator().manual_seed(3)
    for m, n, k in [(1, 1, 1), (5, 9, 31), (17, 12, 64)]:
        lin = ShiftLinear(k, n, bias=False, p_min=p_min, p_max=p_max, bits=bits)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) * 0.25)
        xq = to_fixed(torch.randn(m, k, generator=g, dtype=D64) * 8)
        got = lin.int_forward(xq)
        assert torch.equal(got, shift_linear_ref(xq, *quantize_shift(lin.weight.detach(), p_min, p_max)))
        # the same packed codes loaded back give the same result
        lin2 = ShiftLinear(k, n, bias=False, p_min=p_min, p_max=p_max, bits=bits)
        lin2.load_packed(lin.pack())
        assert torch.equal(lin2.int_forward(xq), got)
    # float in/out through Q16.16: close to the float path (each term floors: error <= K * 2^-16)
    lin = ShiftLinear(20, 6)
    with torch.no_grad():
        lin.bias.normal_()
    x = torch.randn(3, 4, 20)
    assert (lin.forward_fixed(x) - lin(x)).abs().max() <= 20 * 2.0 ** -16 + 1e-5


def test_shift_linear_errors():
    lin = ShiftLinear(20, 4)                                    # 6-bit codes, 5 per word: [4, 4]
    with pytest.raises(ShiftFormatError, match=r"packed weights have shape \(4, 3\) torch.int32, expected int32 "
                                               r"\[4, 4\] \(20 6-bit codes, 5 per word\)"):
        lin.load_packed(torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(ShiftFormatError, match=r"exponent fields up to 31, past the range -15\.\.0"):
        lin.load_packed(torch.full((4, 4), 31, dtype=torch.int32))
    with pytest.raises(ShiftFormatError, match="21 exponents; 5-bit codes hold at most 15"):
        ShiftLinear(8, 4, p_min=-20, p_max=0, bits=5)
    with pytest.raises(ShiftFormatError, match="int_forward: x must be an int32 Q16.16 tensor .* got torch.float32"):
        lin.int_forward(torch.zeros(2, 20))
    with pytest.raises(ShiftFormatError, match=r"int_forward: x has shape \(2, 19\), expected \[M, 20\]"):
        lin.int_forward(torch.zeros(2, 19, dtype=torch.int32))
    with pytest.raises(ShiftFormatError, match=r"ShiftLinear: x has shape \(3, 7\), expected \[\.\.\., 20\]"):
        lin(torch.zeros(3, 7))
    assert lin._packed is None                                 # nothing was packed or computed


# ---------------------------------------------------------------- AddAttention

@pytest.mark.parametrize("binary", [True, False])
def test_add_attention_vs_reference(binary):
    torch.manual_seed(1)
    att = AddAttention(8, heads=2, res_kernel=3, binary=binary).double()
    P = params_of(att)
    x = torch.randn(2, 11, 8, dtype=D64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y = att(x)
    yr = ref_attention({f".{k}": v for k, v in P.items()}, "", xr, 2, binary)
    torch.testing.assert_close(y, yr, rtol=1e-11, atol=1e-11)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    assert_grads(att, P)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    if not binary:
        assert torch.autograd.gradcheck(att, (torch.randn(1, 5, 8, dtype=D64, requires_grad=True),))


def test_masked_accumulate_gradcheck():
    g = torch.Generator().manual_seed(2)
    b = (torch.rand(9, 37, generator=g) > 0.5).to(D64)
    v = torch.randn(9, 4, generator=g, dtype=D64, requires_grad=True)
    torch.testing.assert_close(masked_accumulate(b, v), b.T @ v)
    assert torch.autograd.gradcheck(lambda v: masked_accumulate(b, v), (v,))


def test_add_attention_shift_linears():
    torch.manual_seed(4)
    att = AddAttention(8, heads=2, res_kernel=3, linear="shift").double()
    P = {f".{k}": v for k, v in params_of(att).items()}
    x = torch.randn(1, 6, 8, dtype=D64)
    torch.testing.assert_close(att(x), ref_attention(P, "", x, 2, True, shift=True), rtol=1e-11, atol=1e-11)


# ---------------------------------------------------------------- MoEMLP

@pytest.mark.parametrize("k", [1, 2])
def test_moe_vs_reference(k):
    torch.manual_seed(5)
    lat = torch.tensor([6.0, 4.0], dtype=D64)
    moe = MoEMLP(8, 16, k=k, latencies=lat).double()
    P = {f".{n}": p for n, p in params_of(moe).items()}
    x = torch.randn(23, 8, dtype=D64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, bal = moe(x)
    yr, balr = ref_moe(P, "", xr, k, lat)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bal, balr, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    ((y * g).sum() + 0.3 * bal).backward()
    ((yr * g).sum() + 0.3 * balr).backward()
    assert_grads(moe, {n[1:]: p for n, p in P.items()})
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    assert moe.gate.weight.grad.abs().sum() > 0
    # piecewise smooth in x (routing fixed under a small perturbation; the shift weights are fixed)
    assert torch.autograd.gradcheck(lambda x: moe(x), (x.detach()[:6].clone().requires_grad_(),))


def test_moe_latencies_and_errors():
    moe = MoEMLP(8, 16)                                       # measured on this device
    assert moe.latencies.shape == (2,) and (moe.latencies > 0).all()
    lat = measure_expert_latencies(moe.experts, 8, tokens=16, reps=2)
    assert lat.shape == (2,) and (lat > 0).all()
    with pytest.raises(ValueError, match=r"MoEMLP: x has shape \(2, 3, 8\), expected \[T, 8\]"):
        moe(torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="latencies must be 2 positive numbers"):
        MoEMLP(8, 16, latencies=[1.0, 0.0])
    with pytest.raises(ValueError, match=r"AddAttention: x has shape \(4, 8\), expected \[B, N, 8\]"):
        AddAttention(8)(torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"ShiftAddViTBlock: x has shape \(2, 5, 7\), expected \[B, N, 8\]"):
        ShiftAddViTBlock(8, latencies=[6.0, 4.0])(torch.zeros(2, 5, 7))


# ---------------------------------------------------------------- the block, trained

def test_block_trains_in_lockstep_with_reference():
    torch.manual_seed(0)
    dim, heads, k, coef, steps = 8, 2, 1, 0.05, 50
    lat = torch.tensor([6.0, 4.0], dtype=D64)
    blk = ShiftAddViTBlock(dim, heads, mlp_ratio=2, k=k, latencies=lat, res_kernel=3).double()
    P = params_of(blk)
    x = torch.randn(4, 9, dim, dtype=D64)
    teacher = torch.randn(dim, dim, dtype=D64) / math.sqrt(dim)
    target = x + torch.tanh(x @ teacher)                      # regression to a random teacher
    opt = torch.optim.Adam(blk.parameters(), lr=3e-3)
    opt_r = torch.optim.Adam(P.values(), lr=3e-3)
    losses, losses_r = [], []
    for _ in range(steps):
        y, bal = blk(x)
        loss = F.mse_loss(y, target) + coef * bal
        opt.zero_grad()
        loss.backward()
        opt.step()
        yr, balr = ref_block(P, x, heads, k, lat)
        loss_r = F.mse_loss(yr, target) + coef * balr
        opt_r.zero_grad()
        loss_r.backward()
        opt_r.step()
        losses.append(loss.item())
        losses_r.append(loss_r.item())
    for i, (a, b) in enumerate(zip(losses, losses_r)):
        assert abs(a - b) <= 1e-9 * max(1.0, abs(b)), (i, a, b)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
