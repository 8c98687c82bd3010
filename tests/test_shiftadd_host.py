"""ShiftLinear's host path: the weights are quantized (and packed, converted) once per weight
state, a second call re-quantizes nothing, an in-place update of the weights (an optimizer step)
is picked up; the GPU paths checked on a CPU with their launches mocked the way
benchmarks/profile_shiftadd_host.py mocks them (devinfo.on_gpu, shiftadd_kernel.set_loader)."""
import pytest
import torch

from pigeon.runtime import shiftadd_kernel as sk
from pigeon.shiftadd import devinfo, layers
from pigeon.shiftadd.packed import pad_words
from pigeon.shiftadd.quant import dequantize_shift, pack_shift, quantize_shift


@pytest.fixture
def quantize_calls(monkeypatch):
    calls = []
    real = layers.quantize_shift

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(layers, "quantize_shift", counting)
    return calls


def _want(lin, x):
    sign, p = quantize_shift(lin.weight.detach(), lin.p_min, lin.p_max)
    return x.double() @ dequantize_shift(sign, p, torch.float64).T + lin.bias.detach().double()


def test_cpu_inference_quantizes_once_and_sees_updates(quantize_calls):
    torch.manual_seed(0)
    lin = layers.ShiftLinear(24, 8)
    x = torch.randn(5, 24, dtype=torch.float64)
    with torch.no_grad():
        lin.double()
        lin.bias.uniform_(-1, 1)
        y1 = lin(x)
        assert len(quantize_calls) == 1
        assert torch.equal(lin(x), y1) and lin(x[:2]).shape == (2, 8)
        assert len(quantize_calls) == 1                         # no re-quantization
        torch.testing.assert_close(y1, _want(lin, x))
        lin.weight.mul_(-3.0)                                   # in place: _version changes
        y2 = lin(x)
        assert len(quantize_calls) == 2
        torch.testing.assert_close(y2, _want(lin, x))
        lin.weight.data = torch.randn(8, 24, dtype=torch.float64) * 0.1    # new storage
        torch.testing.assert_close(lin(x), _want(lin, x))
        assert len(quantize_calls) == 3


def test_cpu_training_quantizes_once_per_step(quantize_calls):
    torch.manual_seed(1)
    lin = layers.ShiftLinear(16, 8)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    x = torch.randn(4, 16)
    for step in range(3):
        for _ in range(2):                                      # two forwards/backwards on the same weights
            lin(x).square().sum().backward()
        assert len(quantize_calls) == step + 1
        w0 = lin.weight.detach().clone()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(w0, lin.weight.detach())
    torch.testing.assert_close(lin(x).detach().double(), _want(lin, x.double()), rtol=1e-5, atol=1e-5)   # float32


class _Recorder:
    def __init__(self):
        self.launches = []

    def __call__(self, rk, device, emulate):
        rec = self

        class Fn:
            def launch(self, grid, block, args, types=None, **kw):
                rec.launches.append((rk.name, args))
        return Fn()


@pytest.fixture
def mocked_gpu(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(devinfo, "on_gpu", lambda t: True)
    devinfo.set_props(torch.device("cpu"), (9, 0), "mocked H200", "sm_90")
    prev = sk.set_loader(rec)
    yield rec
    sk.set_loader(prev)
    devinfo.clear()


def test_mocked_gpu_packed_path_prepares_once(mocked_gpu, quantize_calls):
    torch.manual_seed(2)
    lin = layers.ShiftLinear(64, 32, path="packed").eval()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            lin(x)
        assert len(quantize_calls) == 1 and len(mocked_gpu.launches) == 3 and lin.last_path == "packed"
        name, args = mocked_gpu.launches[-1]
        sign, p = quantize_shift(lin.weight, -15, 0)
        assert torch.equal(args[2], pad_words(pack_shift(sign, p, -15, 0, 6), 64, 6))
        assert args[3] is lin.bias and args[4:7] == [3, 32, 64]     # the bias is added in the kernel
        lin.weight.mul_(0.5)
        lin(x)
        assert len(quantize_calls) == 2
        sign, p = quantize_shift(lin.weight, -15, 0)
        assert torch.equal(mocked_gpu.launches[-1][1][2], pad_words(pack_shift(sign, p, -15, 0, 6), 64, 6))
