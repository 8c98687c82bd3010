"""Host work in kernel programs: summing a weight's gradient contributions (``HostAdd``) and
the type -> group gathers and scatters of shared weights (``HostIndex``): weight-sized torch ops,
not graph work."""
from __future__ import annotations

import torch

from ..ir.program import HostAdd, HostIndex
from .family import KernelFamily, register_family


def _host_add(launch: HostAdd, kg, bufs) -> None:
    torch.add(bufs[launch.a], bufs[launch.b], out=bufs[launch.out])


HOST_ADD = register_family(KernelFamily("host_add", HostAdd, (), semantics=_host_add,
                                        doc="out = a + b on weights (torch)"))

# index tensors per (map, device), made on a launch's first (uncaptured) call: a host-to-device
# copy must not happen inside a CUDA-graph capture
_INDEX: dict = {}


def _index(index: tuple[int, ...], device) -> torch.Tensor:
    key = (index, str(device))
    t = _INDEX.get(key)
    if t is None:
        t = _INDEX[key] = torch.tensor(index, dtype=torch.long, device=device)
    return t


def _host_index(launch: HostIndex, kg, bufs) -> None:
    x, out = bufs[launch.x], bufs[launch.out]
    idx = _index(launch.index, x.device)
    if launch.mode == "gather":
        torch.index_select(x, 0, idx, out=out)
    else:
        out.zero_()
        out.index_add_(0, idx, x)


HOST_INDEX = register_family(KernelFamily("host_index", HostIndex, (), semantics=_host_index,
                                          doc="shared weights: type -> group gather / scatter (torch)"))
