"""Host work in kernel programs: summing a weight's gradient contributions (``HostAdd``), a
weight-sized torch op, not graph work."""
from __future__ import annotations

import torch

from ..ir.program import HostAdd
from .family import KernelFamily, register_family


def _host_add(launch: HostAdd, kg, bufs) -> None:
    torch.add(bufs[launch.a], bufs[launch.b], out=bufs[launch.out])


HOST_ADD = register_family(KernelFamily("host_add", HostAdd, (), semantics=_host_add,
                                        doc="out = a + b on weights (torch)"))
