"""CUDA traversal templates (pigeon/codegen/traversal.py) checked without a GPU.

(a) every rendered kernel compiles with nvcc for sm_90 (sm_80 under -m slow; ptxas -v: no spills);
(b) the same kernel text, compiled as C++ against pigeon/templates/cuda_emulate.h and run block by
    block on the CPU, equals ``run_traversal_reference`` (outputs NaN-poisoned first, fresh random
    inputs and graphs every run; the seed is in the failure message), for the shared hand-built
    cases (tests/traversal_cases.py), extra cases for wide rows / long dots / hoisting, float32,
    bfloat16 and float16 storage, and every traversal instance of the lowered models.
"""
from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch

from pigeon.runtime import emulate as cuda_emulate
from pigeon.runtime.emulate import EmulatedModule, EmulationError
from pigeon.codegen.expr_c import idx_div, idx_mod, unravel, var_idx, c_float, idx_add, idx_mul
from pigeon.graph.kernel_graph import kernel_graph
from pigeon.codegen.traversal import TraversalCodegenError, TraversalLaunchError, render_traversal
from pigeon.runtime.family_traversal import run_traversal_cuda
from pigeon.runtime.family_traversal import run_traversal_reference
from pigeon.ir.traversal import Buffer, Expr, RowRef, TraversalInstance, load
from pigeon.runtime.build import compile_cuda, nvcc_available

from graphs import random_graph
from traversal_cases import (D, H, bin_, case_graphs, const, dot, ebuf, gbuf, nbuf, ntbuf, poisoned_output,
                             random_inputs, reshape, sum_to, tbuf, traversal_cases, un, _inst)

needs_cxx = pytest.mark.skipif(not cuda_emulate.available(), reason="no g++ to emulate kernels")


def _extra_cases():
    """Shapes and structures the shared cases do not reach."""
    x8 = nbuf("x8", 8, 8)                       # W = 64: lanes loop twice per node
    a8 = ebuf("a8", 8)
    xs8 = load(x8, RowRef.SRC)
    x, fe, ae = nbuf("x", H, D), load(ebuf("f_e", H, D), RowRef.SELF), load(ebuf("a_e", H), RowRef.SELF)
    xs, xd = load(x, RowRef.SRC), load(x, RowRef.DST)
    g_hd = load(gbuf("g_hd", H, D), RowRef.NONE)
    long_a, long_b = nbuf("la", 2, 40), gbuf("lb", 40)   # K = 40: a loop, not unrolled
    cases = [
        ("wide_aggregate_sum_dst", _inst("aggregate", bin_("mul", xs8, load(a8, RowRef.SELF)), side="dst")),
        ("wide_aggregate_mean_src", _inst("aggregate", un("relu", xs8), side="src", reduce="mean")),
        ("wide_edge_softmax", _inst("edge_softmax", bin_("add", xs8, load(x8, RowRef.DST)))),
        ("wide_type_reduce_etype", _inst("type_reduce", bin_("mul", xs8, load(a8, RowRef.SELF)), rows="edge",
                                         per="etype")),
        ("long_dot", _inst("node_map", dot(load(long_a, RowRef.SELF), load(long_b, RowRef.NONE)))),
        # an inner dot broadcast over D inside an outer dot: the inner one is hoisted out of the k loop
        ("dot_in_dot", _inst("edge_map", dot(bin_("mul", fe, reshape(dot(xs, xd), (H, 1))), g_hd))),
        # values that do not depend on the edge: hoisted out of the edge loops
        ("aggregate_dst_only", _inst("aggregate", load(x, RowRef.DST), side="dst", reduce="sum")),
        ("aggregate_src_only_mean", _inst("aggregate", load(x, RowRef.SRC), side="src", reduce="mean")),
        ("edge_softmax_dst_only", _inst("edge_softmax", load(nbuf("er", H), RowRef.DST))),
        ("edge_softmax_gat", _inst("edge_softmax", un("leaky_relu", bin_(
            "add", load(nbuf("el", H), RowRef.SRC), load(nbuf("er", H), RowRef.DST)), 0.2))),
        ("aggregate_max_scalar_dst", _inst("aggregate", un("neg", load(ebuf("s_e"), RowRef.SELF)), reduce="max")),
        ("const_only_edge_map", _inst("edge_map", const(2.5))),
        ("const_only_node_map", _inst("node_map", bin_("mul", const(-1.25), const(3.0)))),
        ("const_only_aggregate_mean", _inst("aggregate", const(0.75), reduce="mean")),
        ("type_reduce_etype_uses_etype", _inst("type_reduce", bin_("mul", fe, load(tbuf("w_t", H, D), RowRef.ETYPE)),
                                               rows="edge", per="etype")),
        ("type_reduce_ntype_uses_ntype", _inst("type_reduce", bin_("mul", load(x, RowRef.SELF),
                                                                    load(ntbuf("b_nt", H, D), RowRef.NTYPE)),
                                               rows="node", per="ntype")),
        ("type_reduce_none_edge_etype", _inst("type_reduce", sum_to(bin_("mul", fe, load(tbuf("w_t", H, D), RowRef.ETYPE)),
                                                                    (H,)), rows="edge", per="none")),
        # the gradient of a per-relation weight read by compact rows: a sum per compact_etype
        ("type_reduce_compact_etype", _inst("type_reduce", bin_("mul", load(Buffer("c_hd", "compact", (H, D)), RowRef.SELF),
                                                                 load(tbuf("w_t", H, D), RowRef.ETYPE)),
                                            rows="compact", per="etype")),
        # destination-side compact rows: edges summed into their (dst, etype) pair, pairs into their node
        ("aggregate_dcompact", TraversalInstance("aggregate", bin_("mul", fe, load(tbuf("w_t", H, D), RowRef.ETYPE)),
                                                 Buffer("out0", "compact_dst", (H, D)), side="dcompact")),
        ("aggregate_compact_dst", _inst("aggregate", bin_("mul", load(Buffer("cd_hd", "compact_dst", (H, D)), RowRef.SELF),
                                                          load(x, RowRef.DST)), side="compact_dst")),
        ("aggregate_dcompact_edge_chunks", TraversalInstance(
            "aggregate", bin_("mul", fe, load(tbuf("w_t", H, D), RowRef.ETYPE)), Buffer("out0", "compact_dst", (H, D)),
            side="dcompact", schedule="edge_chunks")),
        ("aggregate_compact_dst_edge_chunks", _inst("aggregate", load(Buffer("cd_hd", "compact_dst", (H, D)), RowRef.SELF),
                                                    side="compact_dst", schedule="edge_chunks")),
        ("edge_map_reads_compact_dst", _inst("edge_map", bin_("add", load(Buffer("cd_h", "compact_dst", (H,)),
                                                                          RowRef.COMPACT_DST), ae))),
        ("sum_to_lead_and_trailing", _inst("edge_map", sum_to(reshape(fe, (2, H // 2, D)), (2, 1)))),
        ("reshape_of_sum_to", _inst("node_map", reshape(sum_to(load(x, RowRef.SELF), (1, D)), (2, D // 2)))),
        ("dot_broadcast_both", _inst("edge_map", dot(reshape(xs, (H, 1, D)), reshape(fe, (1, H, D))))),
    ]
    return [(n, i) for n, i in cases]


CASES = [(n, i) for n, i, _ in traversal_cases()] + _extra_cases()
CASE_IDS = [n for n, _ in CASES]
INSTS = dict(CASES)


def _graphs(seed: int):
    """The shared corner-case graphs plus two fresh random ones (tests/graphs.py)."""
    return case_graphs() + [("fresh", kernel_graph(random_graph(seed))),
                            ("fresh_small", kernel_graph(random_graph(seed + 1, num_nodes=6, num_edges=40,
                                                                      num_etypes=3, empty_etype=False)))]


def with_dtype(inst: TraversalInstance, dtype: str) -> TraversalInstance:
    """``inst`` with every buffer (inputs and output) stored as ``dtype``."""
    def buf(b):
        return dataclasses.replace(b, dtype=dtype)

    def ex(e: Expr) -> Expr:
        return e.replace(args=tuple(ex(a) for a in e.args),
                                   buffer=buf(e.buffer) if e.buffer is not None else None)
    return dataclasses.replace(inst, expr=ex(inst.expr), out=buf(inst.out), dtype=dtype)


_modules: dict = {}


def _module(insts) -> EmulatedModule:
    """One emulated library for a set of kernels (each kernel's text as rendered)."""
    rks = tuple(sorted({render_traversal(i).name: render_traversal(i) for i in insts}.values(), key=lambda r: r.name))
    key = tuple(r.name for r in rks)
    if key not in _modules:
        _modules[key] = EmulatedModule(list(rks))
    return _modules[key]


TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_case(name, inst, module, kg, seed, dtype="float32", gname="", atol=None):
    tdt = TORCH[dtype]
    bufs = random_inputs(inst, kg, seed=seed, dtype=tdt)
    out = poisoned_output(inst, kg, dtype=tdt)
    ptr = out.data_ptr()
    ret = run_traversal_cuda(inst, kg, bufs, out, module)
    assert ret is out and out.data_ptr() == ptr
    ref = run_traversal_reference(inst, kg, bufs).reshape(out.shape)
    where = f"{name} on graph {gname} ({dtype}), seed {seed}"
    assert not torch.isnan(out).any(), f"{where}: output left unwritten (NaN poison survived)"
    if dtype == "float32":
        # a global sum over every edge or node: float32 rounding of the summation order grows like
        # sqrt(terms) ulps of the partial sums, which a result near 0 does not cover (a rare flake)
        atol_ = 1e-5 * max(1.0, (kg.num_edges if inst.rows == "edge" else kg.num_nodes) ** 0.5 / 4) \
            if inst.loop == "type_reduce" and inst.per == "none" else 1e-5
        atol = atol or atol_
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol, msg=lambda m: f"{where}: {m}")
    else:  # the same float32 value rounded to the storage type: at most one unit in the last place apart
        ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
        torch.testing.assert_close(out.float(), ref.to(tdt).float(), rtol=ulp, atol=1e-5,
                                   msg=lambda m: f"{where}: {m}")


# ------------------------------------------------------------------------------ (b) emulation

@needs_cxx
@pytest.mark.parametrize("name", CASE_IDS)
def test_emulated_kernel_matches_reference(name):
    seed = random.randrange(1 << 30)
    inst = INSTS[name]
    module = _module([i for _, i in CASES])
    for gi, (gname, kg) in enumerate(_graphs(seed)):
        check_case(name, inst, module, kg, seed + gi, gname=gname)


LOW_PRECISION = ["edge_map_message", "aggregate_sum_dst", "aggregate_mean_src", "aggregate_max_dst",
                 "edge_softmax_dot", "edge_softmax_gat", "type_reduce_etype_edge", "type_reduce_none_node",
                 "type_reduce_ntype_node", "node_map_ntype", "dot_per_head", "sum_to_h", "unary_gelu",
                 "wide_aggregate_sum_dst", "wide_type_reduce_etype"]


@needs_cxx
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_emulated_low_precision_storage(dtype):
    seed = random.randrange(1 << 30)
    insts = {n: with_dtype(INSTS[n], dtype) for n in LOW_PRECISION}
    module = _module(insts.values())
    for name, inst in insts.items():
        src = render_traversal(inst).source
        storage = ("__nv_bfloat16" if dtype == "bfloat16" else "__half") + "* __restrict__ b_out0"
        assert (storage in src) != (inst.loop == "type_reduce")   # type_reduce: float accumulator
        for gi, (gname, kg) in enumerate(_graphs(seed)):
            check_case(name, inst, module, kg, seed + gi, dtype=dtype, gname=gname)


def _lowered_instances():
    from pigeon.passes.lower import lower
    from pigeon.ir.program import TraversalLaunch
    from pigeon.passes.autodiff import autodiff
    from test_models_reference import IN, MODELS
    found = {}
    for model, (spec, hp, _) in sorted(MODELS.items()):
        res = autodiff(spec.trace(IN, **hp))
        for direction, prog in (("fwd", lower(res.forward)), ("bwd", lower(res.backward))):
            for i, launch in enumerate(prog.launches):
                if isinstance(launch, TraversalLaunch):
                    found.setdefault(launch.inst, f"{model}.{direction}[{i}].{launch.inst.loop}")
    return [(n, i) for i, n in found.items()]


@needs_cxx
def test_emulated_lowered_model_instances():
    """Every traversal instance the lowering produces for the models (forward and backward)."""
    seed = random.randrange(1 << 30)
    cases = _lowered_instances()
    assert len(cases) >= 10
    module = _module([i for _, i in cases])
    graphs = _graphs(seed)
    for name, inst in cases:
        for gi, (gname, kg) in enumerate(graphs):
            check_case(name, inst, module, kg, seed + gi, gname=gname)


@needs_cxx
def test_each_template_variant_compiles_standalone():
    """One library per kernel source (no help from other kernels in the same translation unit)."""
    for name in ("edge_map_message", "node_map_ntype", "aggregate_max_src", "edge_softmax_dot",
                 "type_reduce_ntype_node", "type_reduce_none_edge"):
        inst = INSTS[name]
        module = EmulatedModule(render_traversal(inst))
        kg = case_graphs()[0][1]
        check_case(name, inst, module, kg, seed=7, gname="random")


# ------------------------------------------------------------------------------ (a) nvcc

RESOURCES: dict = {}


@pytest.mark.skipif(not nvcc_available(), reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_90", pytest.param("sm_80", marks=pytest.mark.slow)])   # sm_80: -m slow
def test_nvcc_compiles_without_spills(arch):
    insts = [i for _, i in CASES] + [with_dtype(INSTS[n], "bfloat16") for n in LOW_PRECISION]
    try:
        insts += [i for _, i in _lowered_instances()]
    except pytest.skip.Exception:
        pass
    rks = {render_traversal(i).name: render_traversal(i) for i in insts}
    res = compile_cuda("\n".join(rk.source for rk in rks.values()), arch=arch, name="traversal_all",
                       builder="nvcc")
    lines, spills = [], []
    for kname, rk in rks.items():
        r = res.resources.get(kname)
        assert r is not None and r["entry"], f"{kname}: no entry in the ptxas report"
        if r["spill_stores"] or r["spill_loads"] or r["stack"]:
            spills.append(f"{kname} ({rk.meta['loop']}): stack {r['stack']} spills {r['spill_stores']}/{r['spill_loads']}")
        lines.append(r["registers"])
    RESOURCES[arch] = {"kernels": len(rks), "max_registers": max(lines), "spilling": spills}
    print(f"\n{arch}: {len(rks)} traversal kernels, registers <= {max(lines)}, spilling: {spills or 'none'}")
    assert not spills, f"{arch}: kernels spill: {spills}"


# ------------------------------------------------------------------------------ structure and errors

def test_rendered_kernel_structure():
    inst = INSTS["edge_softmax_gat"]
    rk = render_traversal(inst)
    assert rk.name == f"pigeon_trav_{inst.key()}"
    assert rk is render_traversal(inst)                                   # cached
    assert f'extern "C" __global__ void __launch_bounds__(256, 4) {rk.name}({rk.signature()})' in rk.source
    assert [p.role for p in rk.params] == ["out:out0", "buffer:el", "buffer:er", "graph:src", "graph:csc_ptr",
                                           "graph:csc_eid", "size:num_nodes"]
    assert rk.ctypes == ["ptr"] * 6 + ["int32"]
    for bad in ("__syncthreads", "__shared__", "__shfl"):
        assert bad not in rk.source
    # the destination-node term is read once per (node, element), before the two edge passes
    body = rk.source[rk.source.index("for (int j = lane"):]
    er_load = body.index("b_er[")
    assert er_load < body.index("for (int i = beg")
    assert body.count("b_er[") == 1 and body.count("b_el[") == 2
    # grid from graph sizes: groups of 4 lanes per node (W = 4)
    kg = case_graphs()[0][1]
    assert rk.grid(kg) == (-(-kg.num_nodes * 4 // 256), 1, 1)
    assert rk.meta["group"] == 4


def test_inner_dot_hoisted_out_of_outer_loop():
    src = render_traversal(INSTS["dot_in_dot"]).source
    loops = [m.start() for m in re.finditer(r"for \(int k\d+", src)]
    assert len(loops) == 2
    outer_acc_decl = src.index("float t", loops[0])  # the inner dot is finished before the outer starts
    assert src.index("}", loops[0]) < loops[1], "inner dot loop should close before the outer dot loop opens"
    assert outer_acc_decl > 0


def test_templates_open_with_parameter_comment():
    from importlib import resources
    for t in ("traversal.edge.cu.jinja", "traversal.node.cu.jinja"):
        text = (resources.files("pigeon") / "templates" / t).read_text()
        assert text.startswith("{#-") and "Parameters" in text.split("#}")[0]


def test_index_folding():
    j, k = var_idx("j", 4), var_idx("k", 8)
    x = idx_add(idx_mul(j, 8), k)
    assert idx_div(x, 8).code == "j" and idx_mod(x, 8).code == "k"
    assert [u.code for u in unravel(var_idx("j", 24), (2, 3, 4))] == ["(j / 12)", "((j / 4) % 3)", "(j % 4)"]
    assert idx_div(idx_div(var_idx("j", 64), 4), 2).code == "(j / 8)"
    assert c_float(0.2) == "0.200000003f" and c_float(-2) == "(-2.f)" and "0x7f800000" in c_float(float("inf"))


def test_codegen_errors():
    x = nbuf("x", H, D)
    with pytest.raises(TraversalCodegenError, match="row reference 'src'"):
        render_traversal(_inst("node_map", load(x, RowRef.SRC)))
    with pytest.raises(TraversalCodegenError, match="rows 'node'"):
        render_traversal(TraversalInstance("edge_map", load(x, RowRef.SRC), Buffer("o", "node", (H, D))))
    with pytest.raises(TraversalCodegenError, match="both read and written"):
        render_traversal(TraversalInstance("node_map", load(x, RowRef.SELF), Buffer("x", "node", (H, D))))
    with pytest.raises(TraversalCodegenError, match="cannot reduce per"):
        render_traversal(TraversalInstance("type_reduce", load(x, RowRef.SELF), Buffer("o", "etype", (H, D)),
                                           rows="node", per="etype"))
    with pytest.raises(ValueError, match="not a C identifier"):
        render_traversal(_inst("node_map", load(Buffer("x; int y", "node", (H,)), RowRef.SELF)))


@needs_cxx
def test_launch_errors():
    inst = INSTS["aggregate_sum_dst"]
    kg = case_graphs()[0][1]
    module = _module([i for _, i in CASES])
    bufs = random_inputs(inst, kg, seed=0)
    out = poisoned_output(inst, kg)
    with pytest.raises(TraversalLaunchError, match="input buffer 'a_e' is missing"):
        run_traversal_cuda(inst, kg, {k: v for k, v in bufs.items() if k != "a_e"}, out, module)
    with pytest.raises(TraversalLaunchError, match=r"input x: shape \[3, 4, 8\]"):
        run_traversal_cuda(inst, kg, bufs | {"x": bufs["x"][:3]}, out, module)
    with pytest.raises(TraversalLaunchError, match="dtype torch.float64"):
        run_traversal_cuda(inst, kg, bufs | {"x": bufs["x"].double()}, out, module)
    with pytest.raises(TraversalLaunchError, match="output out0: shape"):
        run_traversal_cuda(inst, kg, bufs, out[:-1], module)
    with pytest.raises(TraversalLaunchError, match="contiguous"):
        run_traversal_cuda(inst, kg, bufs, out.transpose(1, 2).contiguous().transpose(1, 2), module)
    # a non-contiguous input is copied, not misread
    xt = bufs["x"].transpose(1, 2).contiguous().transpose(1, 2)
    run_traversal_cuda(inst, kg, bufs | {"x": xt}, out, module)
    torch.testing.assert_close(out, run_traversal_reference(inst, kg, bufs), rtol=1e-5, atol=1e-5)


@needs_cxx
def test_emulator_errors(tmp_path, monkeypatch):
    rk = render_traversal(INSTS["load_src"])
    module = EmulatedModule(rk)
    fn = module.function(rk.name)
    with pytest.raises(TypeError, match="takes 4 parameters"):
        fn.launch(1, 32, [None])
    with pytest.raises(KeyError):
        module.function("nope")
    bad = dataclasses.replace(rk, name="pigeon_trav_broken", source=rk.source.replace("pg_st(", "pg_nope("))
    monkeypatch.setenv("PIGEON_EMULATE_CACHE", str(tmp_path))
    with pytest.raises(EmulationError, match="emulation build failed"):
        EmulatedModule(bad)


# ------------------------------------------------------------------------------ shared runs of edge chunks

def _chunk_edge_graph():
    """Node 3 has 200 incoming edges (positions 10-209: 4 chunks of 64, begun mid-chunk), node 7
    exactly 64 (across a chunk boundary), nodes 0, 2, 4-6, 9-20 and the last 5 none, the others a few;
    node 44 is the source of 120 edges (the CSR side)."""
    from pigeon.graph import HeteroGraph
    gen = torch.Generator().manual_seed(7)
    dst = [1] * 10 + [3] * 200 + [7] * 64 + [8] * 2 + list(range(21, 40)) + [30] * 3
    src = torch.randint(0, 45, (len(dst),), generator=gen)
    src[:120] = 44                                   # a source hub too (CSR side)
    return HeteroGraph(src, torch.tensor(dst), torch.randint(0, 3, (len(dst),), generator=gen), num_nodes=45,
                       num_etypes=3, num_ntypes=1)


def test_chunk_fixups_list_the_shared_and_the_empty_rows():
    kg = kernel_graph(_chunk_edge_graph())
    for ptr in ("csc_ptr", "csr_ptr"):
        p = getattr(kg, ptr).tolist()
        rows, slots, nchunks = kg.chunk_fixups(ptr, 64)
        want = {}
        for v in range(len(p) - 1):
            b, e = p[v], p[v + 1]
            if b == e:
                want[v] = -1
            elif b // 64 != (e - 1) // 64:
                want[v] = b // 64
        assert dict(zip(rows.tolist(), slots.tolist())) == want and rows.dtype == slots.dtype == torch.int32
        assert nchunks == -(-p[-1] // 64)
        assert kg.chunk_fixups(ptr, 64)[0] is rows            # once per array and chunk


@needs_cxx
@pytest.mark.parametrize("dtype,form", [("float32", "0"), ("float32", "1"), ("bfloat16", "auto")])
def test_emulated_edge_chunks_with_hubs_over_many_chunks_and_empty_rows(dtype, form, monkeypatch):
    """Runs that span 2-4 chunks (scratch rows, the fix-up), chunks wholly inside one run, rows
    without members before, between and after the others: sum and max, both sides; float32 in
    both forms (whole runs stored + fix-up, and every run atomic into the zeroed output)."""
    from pigeon.runtime import family_traversal as ft
    monkeypatch.setenv(ft.ALL_ATOMIC_ENV, form)
    kg = kernel_graph(_chunk_edge_graph())
    names = ["aggregate_sum_dst_edge_chunks", "aggregate_sum_src_edge_chunks", "aggregate_max_dst_edge_chunks",
             "aggregate_max_src_edge_chunks", "aggregate_sum_dot_edge_chunks"]
    insts = {n: with_dtype(INSTS[n], dtype) for n in names}
    module = _module(insts.values())
    seed = random.randrange(1 << 30)
    # float32: a 200-member sum of products (|term| ~ 3) is summed in another order than the
    # reference's; its rounding grows like sqrt(members) ulps of the partial sums (~40)
    most = int(max(kg.in_degree.max(), kg.out_degree.max()))
    for name, inst in insts.items():
        check_case(name, inst, module, kg, seed, dtype=dtype, gname="chunk_edges", atol=2e-5 * most ** 0.5)


def test_float32_edge_chunks_take_the_every_run_atomic_form_on_small_graphs(monkeypatch):
    from pigeon.runtime import family_traversal as ft
    kg = kernel_graph(_chunk_edge_graph())
    f32, b16 = INSTS["aggregate_sum_dst_edge_chunks"], with_dtype(INSTS["aggregate_sum_dst_edge_chunks"], "bfloat16")
    assert "pg_all_atomic" in render_traversal(f32).source and "pg_all_atomic" not in render_traversal(b16).source
    assert ft.all_atomic(render_traversal(f32), f32, kg) and not ft.all_atomic(render_traversal(b16), b16, kg)
    monkeypatch.setattr(ft, "ALL_ATOMIC_BELOW", 10)          # as on a graph past the size rule
    assert not ft.all_atomic(render_traversal(f32), f32, kg)
    monkeypatch.setenv(ft.ALL_ATOMIC_ENV, "1")
    assert ft.all_atomic(render_traversal(f32), f32, kg) and not ft.all_atomic(render_traversal(b16), b16, kg)
    monkeypatch.setenv(ft.ALL_ATOMIC_ENV, "yes")
    with pytest.raises(TraversalLaunchError, match="PIGEON_AGG_ALL_ATOMIC='yes'"):
        ft.all_atomic(render_traversal(f32), f32, kg)
