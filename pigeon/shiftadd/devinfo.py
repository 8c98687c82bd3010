"""What the ShiftAdd hot paths ask about a device, asked once per device.

``on_gpu(t)``: whether tensor ``t`` takes the generated-kernel paths (``t.is_cuda``).  Every hot
path of the family (layers.py, fp8.py, pigeon/runtime/shiftadd_kernel.py) asks through this one
function, so benchmarks/profile_shiftadd_host.py can time the host work of a GPU call on a CPU by
replacing it (and the launch, see shiftadd_kernel.set_loader) without touching the code it times.

``props(device)``: ``(capability, name, arch)`` of a CUDA device, queried once and kept (the
queries cost microseconds each, a per-call cost before).  ``("cpu", None, None)`` for a CPU device."""
from __future__ import annotations

_PROPS: dict = {}


def on_gpu(t) -> bool:
    return t.is_cuda


def props(device) -> tuple:
    got = _PROPS.get(device)
    if got is None:
        import torch
        dev = torch.device(device)
        if dev.type == "cuda":
            cap = tuple(torch.cuda.get_device_capability(dev))
            got = (cap, torch.cuda.get_device_name(dev), f"sm_{cap[0]}{cap[1]}")
        else:
            got = ((0, 0), None, None)
        _PROPS[device] = got
    return got


def set_props(device, capability, name, arch) -> None:
    """Record a device's properties (the host-path profile on a CPU pretends to be an H200)."""
    _PROPS[device] = (tuple(capability), name, arch)


def clear() -> None:
    _PROPS.clear()
