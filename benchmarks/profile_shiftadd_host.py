"""Host time per call of ShiftLinear's GPU paths (packed, fp8, shift, dense, auto) and of the
launchers the bench calls directly (runtime shift_linear / packed_linear, fp8.shift_linear_fp8).

On a CPU (the default) the GPU calls run with their launches mocked: pigeon/shiftadd/devinfo.py's
``on_gpu`` says yes for CPU tensors and the device reads as an H200 (sm_90), the runtime's loader
(``shiftadd_kernel.set_loader``) hands out functions whose launch does nothing, and
``torch._scaled_mm`` returns an empty output of the right shape.  Everything else -- checks, cache
lookups, weight-form lookups, the torch ops of the call (on tiny CPU tensors) -- runs for real, so
the time is the Python + dispatch cost of a call.  With ``--device cuda`` nothing is mocked: the
host time of a call is the wall time of many back-to-back calls without a sync (the GPU work of
these shapes is a few microseconds, below the host cost), and the synced time per call is
reported next to it.

    python benchmarks/profile_shiftadd_host.py                       # CPU, mocked launches
    python benchmarks/profile_shiftadd_host.py --device cuda         # the GPU
    python benchmarks/profile_shiftadd_host.py --profile packed      # cProfile of one case
    python benchmarks/profile_shiftadd_host.py --json out.json

Per case: median microseconds per call over ``--rounds`` rounds of ``--reps`` calls, and the aten
ops one call dispatches (a TorchDispatchMode count), and the quantize_shift calls after the first
(0: the weights are quantized once).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pigeon.runtime import shiftadd_kernel as sk  # noqa: E402
from pigeon.shiftadd import devinfo, layers  # noqa: E402
from pigeon.shiftadd.fp8 import shift_linear_fp8  # noqa: E402


class _NoLaunch:
    def launch(self, grid, block, args, types=None, **kw):
        return None


def mock_gpu(device: torch.device) -> None:
    """Make CPU tensors take the GPU paths with launches that do nothing (module doc)."""
    devinfo.on_gpu = lambda t: True
    devinfo.set_props(device, (9, 0), "NVIDIA H200 (mocked)", "sm_90")
    sk.set_loader(lambda rk, dev, emulate: _NoLaunch())

    def scaled_mm(a, b, scale_a=None, scale_b=None, bias=None, out_dtype=None, **kw):
        return torch.empty(a.shape[0], b.shape[1], dtype=out_dtype or torch.bfloat16, device=a.device)
    torch._scaled_mm = scaled_mm


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def cases(device, dtype):
    out = []
    for m, d in ((1, 1024), (4, 1024), (16, 1024), (1, 4096)):
        for path in ("packed", "fp8", "shift", "auto") + (("dense",) if device.type == "cuda" else ()):
            lin = layers.ShiftLinear(d, d, bias=True, path=path).to(device).eval()
            out.append((f"ShiftLinear path={path} M={m} K=N={d} bias", lin, torch.randn(m, d, device=device, dtype=dtype)))
    m, d = 16, 1024
    lin = layers.ShiftLinear(d, d, bias=False).to(device)
    with torch.no_grad():
        forms = lin._forms()
        wpad, w8, packed = lin._form(forms, "packed"), lin._form(forms, "fp8"), lin._form(forms, "shift")
    x = torch.randn(m, d, device=device, dtype=dtype)
    xf = x.float()
    out.append((f"runtime packed_linear M={m} K=N={d}", lambda x: sk.packed_linear(x, wpad, d, -15, 0, 6), x))
    out.append((f"fp8.shift_linear_fp8 M={m} K=N={d}", lambda x: shift_linear_fp8(x, w8), x))
    out.append((f"runtime shift_linear (f32) M={m} K=N={d}", lambda x: sk.shift_linear(x, packed, -15, 0, 6), xf))
    return out


def time_call(fn, x, reps: int, rounds: int, device) -> tuple[float, float | None]:
    with torch.no_grad():
        for _ in range(10):
            fn(x)
        host, synced = [], []
        for _ in range(rounds):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(x)
            t1 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.synchronize()
                synced.append((time.perf_counter() - t0) / reps * 1e6)
            host.append((t1 - t0) / reps * 1e6)
    return statistics.median(host), (statistics.median(synced) if synced else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", default=None, help="cProfile the first case whose name contains this")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        mock_gpu(device)
    torch.manual_seed(0)
    rows = []
    calls = {"n": 0}
    real_quantize = layers.quantize_shift

    def counting(*a, **k):
        calls["n"] += 1
        return real_quantize(*a, **k)
    layers.quantize_shift = counting
    for name, fn, x in cases(device, dtype):
        with torch.no_grad():
            fn(x)                                   # first call: quantize, pack, build, decide
            calls["n"] = 0
            with OpCount() as oc:
                fn(x)
        host, synced = time_call(fn, x, args.reps, args.rounds, device)
        path = getattr(fn, "last_path", None)
        rows.append({"case": name, "host_us": round(host, 2), "synced_us": None if synced is None else round(synced, 2),
                     "aten_ops": len(oc.ops), "ops": oc.ops, "requantized": calls["n"], "path": path})
        print(f"{name:48s} {host:8.2f} us/call" + (f"  (synced {synced:8.2f})" if synced is not None else "")
              + f"  {len(oc.ops):2d} aten ops" + (f"  path {path}" if path else "") + f"  [{' '.join(oc.ops)}]")
        if args.profile and args.profile in name:
            pr = cProfile.Profile()
            with torch.no_grad():
                pr.enable()
                for _ in range(2000):
                    fn(x)
                pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(15)
            args.profile = None
    layers.quantize_shift = real_quantize
    if args.json:
        meta = {"device": "cpu (GPU calls with mocked launches)" if device.type == "cpu"
                else torch.cuda.get_device_name(device), "dtype": args.dtype, "torch": torch.__version__,
                "reps": args.reps, "rounds": args.rounds}
        Path(args.json).write_text(json.dumps({"meta": meta, "cases": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
