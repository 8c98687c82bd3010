"""One translation unit from many rendered kernels.

Each kernel's source goes into its own namespace (its helpers cannot clash with another's; the
``extern "C"`` kernel names are unique anyway, being keyed by instance), includes are hoisted to
the top, and macros a source defines are undefined after it.  nvcc's fixed cost per invocation
dominates small kernels, so building a layer's kernels as one unit is many times faster.
"""
from __future__ import annotations

import re
from typing import Iterable

from .kernel_source import RenderedKernel

_DEFINE = re.compile(r"^\s*#\s*define\s+(\w+)")


def bundle_sources(kernels: Iterable[RenderedKernel]) -> str:
    includes: list[str] = []
    bodies: list[str] = []
    for rk in sorted(kernels, key=lambda k: k.name):
        lines = rk.source.splitlines()
        for line in lines:
            if line.lstrip().startswith("#include") and line not in includes:
                includes.append(line)
        rest = [line for line in lines if not line.lstrip().startswith("#include")]
        macros = [m.group(1) for line in rest for m in [_DEFINE.match(line)] if m]
        bodies.append(f"namespace pk_{rk.name} {{\n" + "\n".join(rest) + f"\n}}  // namespace pk_{rk.name}\n"
                      + "".join(f"#undef {name}\n" for name in dict.fromkeys(macros)))
    return "\n".join(includes) + "\n\n" + "\n".join(bodies)
