"""GEMM tile configurations as --tune decision points (pigeon/passes/gemm_tiles.py): one point per
template GEMM shape, the default tile first (the rule's pick), alternatives only where the template
builds them; a choice changes the launch's instance (another kernel) and nothing of the results."""
import dataclasses

import pytest
import torch

import pigeon as pg
from pigeon.codegen.gemm import render_gemm, tile_buildable
from pigeon.graph import tiny_graph
from pigeon.ir.kernel import TileConfig
from pigeon.ir.program import GemmLaunch
from pigeon.models import MODELS
from pigeon.module import tune_stats
from pigeon.passes.choices import candidates, pipeline_points, schedule_points
from pigeon.passes.gemm_tiles import (ALTERNATIVES, GemmTileError, choose_gemm_tiles, parse_tile, tile_label,
                                      tile_point, tile_points)
from pigeon.passes.lower import lower
from pigeon.passes.pipeline import run_pipeline


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_points_cover_the_template_gemms_and_start_with_the_default(dtype):
    layer = pg.compile(MODELS["rgcn"], tiny_graph(), 16, out_dim=8, dtype=dtype)
    pts = tile_points(layer.lowered, tile_buildable)
    template = [la for p in layer.lowered for la in p.launches
                if isinstance(la, GemmLaunch) and tile_point(la) is not None]
    assert pts and {n for n, _, _ in pts} == {tile_point(la) for la in template}
    for name, opts, why in pts:
        assert opts[0] == tile_label(TileConfig()) and len(opts) == len(set(opts)) >= 2 and "default" in why
        for label in opts:                       # every option renders for every launch of its point
            for la in template:
                if tile_point(la) == name:
                    render_gemm(dataclasses.replace(la.inst, tile=parse_tile(label)))
    # dense GEMMs (cuBLAS by the rule) have a backend point, not a tile point
    assert not [la for p in layer.lowered for la in p.launches if isinstance(la, GemmLaunch)
                and la.inst.not_dense() is None and tile_point(la) is not None]


def test_an_alternative_the_template_cannot_build_is_left_out(monkeypatch):
    import pigeon.passes.gemm_tiles as T
    monkeypatch.setattr(T, "ALTERNATIVES", ALTERNATIVES + (TileConfig(64, 64, 8, 4),))   # bk 8: no mma
    layer = pg.compile(MODELS["rgcn"], tiny_graph(), 16, out_dim=8, dtype="bfloat16")
    assert all("64x64x8w4" not in opts for _, opts, _ in T.tile_points(layer.lowered, tile_buildable))
    assert all("64x64x8w4" in opts for _, opts, _ in T.tile_points(layer.lowered))     # no predicate: all
    f32 = pg.compile(MODELS["rgcn"], tiny_graph(), 16, out_dim=8)
    assert all("64x64x8w4" in opts for _, opts, _ in T.tile_points(f32.lowered, tile_buildable))  # SIMT can


def test_choices_change_the_kernel_not_the_results():
    g = tiny_graph()
    ir = MODELS["rgcn"].trace(16, out_dim=8)
    gs, _ = tune_stats(g)
    base = pg.CompiledLayer(MODELS["rgcn"], run_pipeline(ir, graph_stats=gs)[0], g)
    (name, opts, _), *_ = tile_points(base.lowered)
    choice = {name: opts[-1]}
    other = pg.CompiledLayer(MODELS["rgcn"], run_pipeline(ir, graph_stats=gs, choices=choice)[0], g)
    tiles = {tile_point(la): la.inst.tile for p in (other.forward_program, other.backward_program)
             for la in p.launches if isinstance(la, GemmLaunch) and tile_point(la)}
    assert tiles[name] == parse_tile(opts[-1]) and all(t == TileConfig() for n, t in tiles.items() if n != name)
    other.weights.load_state_dict(base.weights.state_dict())
    x = torch.randn(g.num_nodes, 16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = base(xa), other(xb)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    assert choose_gemm_tiles(base.forward_program, {}) is base.forward_program
    from pigeon.ir.serialize import from_json, to_json
    assert from_json(to_json(other.forward_program)) == other.forward_program        # artifacts keep the tile
    with pytest.raises(GemmTileError, match="expected <block_m>x<block_n>x<block_k>w<warps>"):
        choose_gemm_tiles(base.lowered[0], {name: "big"})
    with pytest.raises(GemmTileError, match="cannot be built"):
        choose_gemm_tiles(base.lowered[0], {name: "512x512x64w4"}, tile_buildable)


def test_tile_points_are_tune_candidates_on_a_gpu_only():
    g = tiny_graph()
    ir = MODELS["rgcn"].trace(16, out_dim=8)
    gs, ks = tune_stats(g)

    def sched_of(dense):
        def f(choices):
            comp, _ = run_pipeline(ir, graph_stats=gs, choices=choices)
            return schedule_points([lower(comp.forward), lower(comp.backward)], ks, dense_gemms=dense,
                                   tile_ok=tile_buildable)
        return f
    assert not [p for p in sched_of(False)({}) if p.name.startswith("tile:")]
    pts = [p for p in sched_of(True)({}) if p.name.startswith("tile:")]
    assert pts and all(p.pick == tile_label(TileConfig()) for p in pts)
    cands = candidates(pipeline_points(ir, gs), sched_of(True), max_full=4)
    assert all(c.as_dict()[pts[0].name] == pts[0].pick for c in cands[:1])
    assert {c.as_dict().get(pts[0].name) for c in cands} >= set(pts[0].options)


def test_explain_names_the_tile_of_each_template_gemm():
    from pigeon.passes.explain import explain
    g = tiny_graph()
    layer = pg.compile(MODELS["rgcn"], g, 16, out_dim=8)
    gs, ks = tune_stats(g)
    progs = {"forward": layer.forward_program, "backward": layer.backward_program}
    lines = [ln for ln in explain(layer.ir, [], progs, {**gs, **ks, "num_nodes": g.num_nodes}, "float32")
             if ln.startswith("gemm tile")]
    template = [la for p in progs.values() for la in p.launches if tile_point(la)]
    assert len(lines) == len(template) >= 2
    assert all(": 64x64x16w4 (rule: the default tile" in ln for ln in lines)
    assert any(f"{tile_point(template[0])} -> {template[0].writes()[0]}:" in ln for ln in lines)


def test_prebuild_renders_every_tile_alternative():
    """scripts/prebuild_kernels.py --tune-tiles yes: the kernels --tune would build on the GPU."""
    import importlib.util
    from pathlib import Path
    from pigeon.runtime.artifact import kernels_of
    spec = importlib.util.spec_from_file_location("prebuild_kernels",
                                                  Path(__file__).parents[1] / "scripts" / "prebuild_kernels.py")
    pre = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pre)
    layer = pg.compile(MODELS["rgcn"], tiny_graph(), 16, out_dim=8, dtype="bfloat16")
    alts, base = pre.tile_kernels(layer), kernels_of(layer)
    progs = [layer.forward_program, layer.backward_program]
    want = {render_gemm(dataclasses.replace(la.inst, tile=parse_tile(o))).name
            for name, opts, _ in tile_points(progs, tile_buildable) for p in progs for la in p.launches
            if tile_point(la) == name for o in opts[1:]}
    assert set(alts) == want and want and not set(alts) & set(base)
