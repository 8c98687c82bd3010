"""The GPU mocked for the ShiftAdd kernels' launch tests: ``devinfo.on_gpu`` answers yes and the
kernel loader (pigeon/runtime/shiftadd_kernel.py) hands out a function that records each launch's
(grid, block, args) instead of running it (tests/test_shiftadd_moe.py, test_shiftadd_quant_kernel.py)."""
from contextlib import contextmanager

from pigeon.runtime import shiftadd_kernel as sk
from pigeon.shiftadd import devinfo


@contextmanager
def recorded_launches(monkeypatch):
    launches = []

    class Fn:
        def launch(self, grid, block, args, types=None, **kw):
            launches.append((grid, block, args))
    monkeypatch.setattr(devinfo, "on_gpu", lambda t: True)
    prev = sk.set_loader(lambda rk, device, emulate: Fn())
    try:
        yield launches
    finally:
        sk.set_loader(prev)
