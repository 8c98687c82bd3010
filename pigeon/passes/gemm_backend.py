"""Which code generator runs each dense GEMM launch: pigeon's GEMM template or TVM's dlight Matmul
rule (pigeon/codegen/tvm_gemm.py).  One decision point per dense GEMM shape of a program pair:
``gemm:<rows>/k<K>n<N>/<N|T>`` (``T``: the transposed weight of a data gradient), options
``template`` and ``tvm``.

A GEMM is dense when ``GemmInstance.not_dense()`` is None: untyped rows form without gather,
scatter, heads, epilogue or accumulation (RGCN's root weight ``x @ W_self`` and its gradient
``dy @ W_self^T``).  The rule keeps the template: pigeon has no cost model of TVM's generated
kernel, so the TVM kernel is a candidate ``--tune`` measures on the GPU (each candidate checked
against the reference first), never a guess.  ``choose_gemm_backends`` applies given choices.
"""
from __future__ import annotations

import dataclasses

from ..ir.program import GemmLaunch, KernelProgram

BACKENDS = ("template", "tvm")
RULE_WHY = "rule: pigeon's template (no cost model of TVM's kernel: --tune on a GPU measures it)"


class GemmBackendError(ValueError):
    pass


def gemm_point(launch) -> str | None:
    """The decision point of a launch, or None when no other backend can run it."""
    if not isinstance(launch, GemmLaunch) or launch.inst.not_dense() is not None:
        return None
    i = launch.inst
    return f"gemm:{launch.rows}/k{i.k}n{i.n}/{'T' if i.transpose_w else 'N'}"


def gemm_points(programs) -> list[tuple[str, str]]:
    """``(point, why)`` of the dense GEMM launches of ``programs`` (None entries skipped), in order."""
    seen: dict[str, str] = {}
    for prog in programs:
        for launch in (prog.launches if prog is not None else ()):
            name = gemm_point(launch)
            if name is not None and name not in seen:
                seen[name] = RULE_WHY
    return list(seen.items())


def choose_gemm_backends(program: KernelProgram | None, choices: dict | None = None) -> KernelProgram | None:
    """The program with each dense GEMM launch given the backend ``choices`` names for its point
    (default: the template)."""
    if program is None or not choices:
        return program
    launches, changed = [], False
    for launch in program.launches:
        name = gemm_point(launch)
        if name is not None and name in choices:
            b = choices[name]
            if b not in BACKENDS:
                raise GemmBackendError(f"{name}: backend {b!r}: expected one of {', '.join(BACKENDS)}")
            if b != launch.backend:
                launch = dataclasses.replace(launch, backend=b)
                changed = True
        launches.append(launch)
    return dataclasses.replace(program, launches=tuple(launches)) if changed else program
