"""The tile configuration of each GEMM that pigeon's template runs: a ``--tune`` decision point per
template GEMM shape of a program pair, ``tile:<rows>/k<K>n<N>h<H>/<N|T|dW>``, whose options are tile
labels ``<block_m>x<block_n>x<block_k>w<warps>``.

The rule keeps the default tile (``TileConfig()``, 64x64x16 with 4 warps) for every instance: nothing
measured yet says another tile wins from graph statistics alone, so the alternatives are candidates
that only a measurement on the GPU can choose. The alternatives are the tiles the GPU tests run the
templates with (tests/gpu/test_gemm_gpu.py ``test_other_tiles``: a bigger row tile for long
segments, a small tile for many short ones), each kept only where the template can
build it for every launch of the point. What the template can build is codegen's to say
(``pigeon.codegen.gemm.tile_buildable``: shared memory, warp layout, ``block_k`` a multiple of 16 for
the tensor-core template); passes import only the IR, so the callers (pigeon/tune.py,
pigeon/module.py) hand that predicate in as ``buildable``. Dense GEMMs (cuBLAS by the rule,
pigeon/passes/gemm_backend.py) have no tile point. ``choose_gemm_tiles`` applies the given choices;
without one a launch keeps its tile. A different tile is a different kernel (its key covers the
tile), built and cached like any other.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..ir.kernel import GemmInstance, TileConfig
from ..ir.program import GemmLaunch, KernelProgram
from .gemm_backend import gemm_form, gemm_point

__all__ = ["DEFAULT", "ALTERNATIVES", "Buildable", "GemmTileError", "RULE_WHY", "tile_label", "parse_tile",
           "tile_point", "tile_points", "choose_gemm_tiles"]

DEFAULT = TileConfig()
# each is one more candidate per point in --tune (a kernel to build and time)
ALTERNATIVES = (TileConfig(128, 64, 32, 8), TileConfig(128, 128, 16, 8), TileConfig(32, 32, 16, 2))
RULE_WHY = "rule: the default tile (alternatives are --tune candidates, measured on the GPU only)"


class GemmTileError(ValueError):
    pass


def tile_label(t: TileConfig) -> str:
    return f"{t.block_m}x{t.block_n}x{t.block_k}w{t.warps}"


def parse_tile(label: str) -> TileConfig:
    try:
        mnk, w = label.split("w")
        m, n, k = (int(v) for v in mnk.split("x"))
        return TileConfig(m, n, k, int(w))
    except (ValueError, AttributeError):
        raise GemmTileError(f"tile {label!r}: expected <block_m>x<block_n>x<block_k>w<warps>, e.g. "
                            f"{tile_label(DEFAULT)}") from None


def tile_point(launch) -> str | None:
    """The decision point of a launch the template runs, or None (dense GEMMs, other launches)."""
    if not isinstance(launch, GemmLaunch) or launch.backend != "template" or gemm_point(launch) is not None:
        return None
    i = launch.inst
    return f"tile:{launch.rows}/k{i.k}n{i.n}h{i.heads}/{gemm_form(i)}"


Buildable = Callable[[GemmInstance, TileConfig], bool]


def _any(inst: GemmInstance, t: TileConfig) -> bool:
    return True


def tile_points(programs, buildable: Buildable | None = None) -> list[tuple[str, tuple[str, ...], str]]:
    """``(point, options, why)`` of the template GEMM launches of ``programs`` (None skipped), in
    order; options start with the launches' current tile (the default) and hold the alternatives
    ``buildable`` accepts for every launch of the point (None: all of them)."""
    buildable = buildable or _any
    launches: dict[str, list] = {}
    for prog in programs:
        for launch in (prog.launches if prog is not None else ()):
            name = tile_point(launch)
            if name is not None:
                launches.setdefault(name, []).append(launch)
    out = []
    for name, ls in launches.items():
        current = ls[0].inst.tile
        opts = [current] + [t for t in ALTERNATIVES if t != current and all(buildable(la.inst, t) for la in ls)]
        out.append((name, tuple(tile_label(t) for t in opts), RULE_WHY))
    return out


def choose_gemm_tiles(program: KernelProgram | None, choices: dict | None = None,
                      buildable: Buildable | None = None) -> KernelProgram | None:
    """The program with each template GEMM launch given the tile ``choices`` names for its point;
    a launch whose point is not named keeps its tile. A tile ``buildable`` refuses raises."""
    buildable = buildable or _any
    if program is None or not choices:
        return program
    launches, changed = [], False
    for launch in program.launches:
        name = tile_point(launch)
        label = choices.get(name) if name is not None else None
        if label is not None:
            t = parse_tile(label)
            if not buildable(launch.inst, t):
                raise GemmTileError(f"{name}: tile {label} cannot be built by the template for {launch.inst}")
            if t != launch.inst.tile:
                launch = dataclasses.replace(launch, inst=dataclasses.replace(launch.inst, tile=t))
                changed = True
        launches.append(launch)
    return dataclasses.replace(program, launches=tuple(launches)) if changed else program
