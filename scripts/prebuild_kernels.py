"""Build every CUDA kernel that a set of compiled layers uses into the kernel cache, in parallel.

Used before a GPU session: kernels are built here (nvcc, no GPU needed) and the cache directory
travels with the run, so the GPU machine spends its time running, not compiling.

    PIGEON_CACHE_DIR=.gpu/cache python scripts/prebuild_kernels.py --dims 8,64 --dtypes float32,bfloat16
    PIGEON_CACHE_DIR=.gpu/cache python scripts/prebuild_kernels.py --shiftadd only --arch sm_90   # needs TVM here
    PIGEON_CACHE_DIR=.gpu/cache python scripts/prebuild_kernels.py --gemm-sm90 no --shiftadd no \
        --tune-attention "|q_smem,minb3|default|bm128,q_smem|bm128,mt1,q_smem,minb1"   # + the knob A/B's forwards
    PIGEON_CACHE_DIR=.gpu/cache python scripts/prebuild_kernels.py --base no --gemm-sm90 no --shiftadd no \
        --tune-attention "default|default,walk_list" --tune-head-dims 128 --tune-variants document,causal
        # only the A/B's forwards (packed documents with cu_seqlens, and causal)
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _variants():
    """Graph-dependent choices, all of them: compaction off / on, node / edge-chunk aggregation
    (which one a graph gets depends on its statistics; the tiny graph stands for every graph)."""
    import os
    for compact in ("0", "1"):
        for schedule in ("node", "edge_chunks"):
            os.environ["PIGEON_COMPACT"], os.environ["PIGEON_AGGREGATE_SCHEDULE"] = compact, schedule
            yield f"compact={compact} {schedule}"
    os.environ.pop("PIGEON_COMPACT")
    os.environ.pop("PIGEON_AGGREGATE_SCHEDULE")


def layer_configs(dims, dtypes):
    import pigeon as pg
    from pigeon.graph import tiny_graph
    from pigeon.models import MODELS
    from test_models_reference import MODELS as TEST_MODELS
    g = tiny_graph()
    for variant in _variants():
        for dtype in dtypes:
            for name, (spec, hp, _) in TEST_MODELS.items():           # the GPU tests' layers (in_dim 8)
                yield f"test {name} {dtype} {variant}", pg.compile(spec, g, 8, backend="kernels", dtype=dtype, **hp)
            for dim in dims:                                            # the benchmark's layers
                hps = {"rgcn": {"out_dim": dim}, "rgat": {"out_dim": dim // 4, "heads": 4}, "hgt": {"heads": 4}}
                for name, hp in hps.items():
                    yield f"bench {name} d{dim} {dtype} {variant}", pg.compile(
                        MODELS[name], g, dim, backend="kernels", dtype=dtype, **hp)


def tile_kernels(layer) -> dict:
    """name -> RenderedKernel of every --tune tile alternative (pigeon/passes/gemm_tiles.py) of the
    layer's template GEMMs, so that tuning on the GPU machine builds none of them."""
    import dataclasses
    from pigeon.codegen.gemm import render_gemm, tile_buildable
    from pigeon.passes.gemm_tiles import parse_tile, tile_point, tile_points
    progs = [p for p in (layer.forward_program, layer.backward_program) if p is not None]
    opts = {name: o for name, o, _ in tile_points(progs, tile_buildable)}
    out = {}
    for prog in progs:
        for launch in prog.launches:
            for label in opts.get(tile_point(launch), ())[1:]:
                rk = render_gemm(dataclasses.replace(launch.inst, tile=parse_tile(label)))
                out.setdefault(rk.name, rk)
    return out


def _key(rk) -> str:
    """A dict key per distinct kernel source (one kernel name can have several schedules)."""
    import hashlib
    return f"{rk.name}/{hashlib.sha256(rk.source.encode()).hexdigest()[:12]}"


def _mma_forwards(inst, knobs):
    """The tensor-core forward of ``inst`` under its default schedule (pigeon/codegen/attention_mma.py
    DEFAULTS: at D=128 the 128-row tiles) and under each knob string of ``knobs``."""
    from pigeon.codegen.attention_mma import render_attention_mma
    return [render_attention_mma(inst, k) for k in ("default", *knobs)]


def attention_kernels(knobs=()):
    """The attention kernels (forward and backward, SIMT and, where they apply, tensor-core) of
    tests/gpu/test_attention_gpu.py: every variant, head dims 64 and 128, bf16 and fp16, GQA
    group 4, and the packed causal case; the tensor-core forwards under the default schedule and
    the forward schedules ``knobs`` (PIGEON_ATTN_MMA_TUNE strings: the GPU tests' knob
    parametrization, tests/test_attention_mma.py GPU_KNOBS)."""
    import torch
    import pigeon.attention as pa
    from pigeon.attention.api import _plan
    from pigeon.codegen.attention import render_attention, render_attention_backward
    from pigeon.codegen.attention_mma import unsupported
    from pigeon.codegen.attention_mma_bwd import render_attention_mma_backward
    from test_attention_kernel import VARIANTS
    out = {}

    def add(inst):
        kernels = [render_attention(inst), render_attention_backward(inst)]
        if unsupported(inst) is None:
            kernels += _mma_forwards(inst, knobs) + [render_attention_mma_backward(inst)]
        for rk in kernels:
            out[_key(rk)] = rk
    for kw in VARIANTS.values():
        smod = pa.trace_score_mod(kw["score_mod"]) if "score_mod" in kw else None
        mmod = pa.trace_mask_mod(kw["mask_mod"]) if "mask_mod" in kw else None
        for d in (64, 128):
            for dt in (torch.bfloat16, torch.float16):
                q = torch.empty(1, 8, 64, d, dtype=dt)
                k = torch.empty(1, 2, 64, d, dtype=dt)
                inst, _, _ = _plan(q, k, k, smod, mmod, kw.get("pattern"), None)
                add(inst)
    q, k = torch.empty(10, 8, 128, dtype=torch.bfloat16), torch.empty(10, 2, 128, dtype=torch.bfloat16)
    inst, _, _ = _plan(q, k, k, None, None, pa.Causal(), torch.tensor([0, 10]))
    add(inst)
    return out


def bench_attention_kernels(variants, head_dims, heads: int, window: int):
    """The kernels `pigeon bench attention` runs for ``variants`` (its names) at ``heads`` query
    heads and the sliding ``window`` (the instances depend on those, on the head dim, the dtype
    and the GQA group, not on the sequence length): bf16, forward and backward, SIMT and tensor-core
    (mma.sync and, for sm_90, the wgmma forward)."""
    import torch
    from pigeon.attention.api import _plan
    from pigeon.bench.attn_variants import make_problem
    from pigeon.codegen.attention import render_attention, render_attention_backward
    from pigeon.codegen.attention_mma import unsupported
    from pigeon.codegen.attention_mma_bwd import render_attention_mma_backward
    from pigeon.codegen import attention_wgmma
    import pigeon.attention as pa
    out = {}
    for variant in variants:
        for d in head_dims:
            p = make_problem(variant, 1, heads, 256, d, torch.bfloat16, "cpu", window)
            kw = p.pigeon_kwargs()
            smod = pa.trace_score_mod(kw["score_mod"]) if kw.get("score_mod") is not None else None
            inst, _, _ = _plan(p.q, p.k, p.v, smod, None, kw.get("pattern"), kw.get("cu_seqlens"))
            kernels = [render_attention(inst), render_attention_backward(inst)]
            if unsupported(inst) is None:
                kernels += _mma_forwards(inst, ()) + [render_attention_mma_backward(inst)]
                if attention_wgmma.unsupported(inst) is None:       # the Hopper forward of what CUTLASS's does not take
                    kernels.append(attention_wgmma.render_attention_wgmma(inst))
            out.update({_key(rk): rk for rk in kernels})
    return out


def tune_attention_kernels(settings, head_dims, variants):
    """The tensor-core forwards benchmarks/tune_attention_mma.py runs for ``settings`` (its
    '|'-separated knob strings), ``head_dims`` and ``variants`` (dense, causal, window<N>, document:
    the packed causal documents with cu_seqlens): bf16, no GQA (the instances do not depend on the
    shape, nor on the documents' lengths)."""
    import torch
    import pigeon.attention as pa
    from pigeon.attention.api import _plan
    from pigeon.codegen.attention_mma import render_attention_mma
    out = {}
    for d in head_dims:
        q = torch.empty(1, 1, 64, d, dtype=torch.bfloat16)
        packed = torch.empty(64, 1, d, dtype=torch.bfloat16)
        for name in variants:
            if name == "document":
                inst, _, _ = _plan(packed, packed, packed, None, None, pa.Causal(),
                                   torch.tensor([0, 32, 64], dtype=torch.int32))
            elif name in ("dense", "causal") or (name.startswith("window") and name[6:].isdigit()):
                pat = None if name == "dense" else pa.Causal() if name == "causal" else pa.SlidingWindow(int(name[6:]))
                inst, _, _ = _plan(q, q, q, None, None, pat, None)
            else:
                raise SystemExit(f"--tune-variants: unknown variant {name!r} (dense, causal, window<N>, document)")
            for setting in settings:
                rk = render_attention_mma(inst, setting)
                out[_key(rk)] = rk
    return out


def sm90_libraries():
    """The CUTLASS sm90 GEMM libraries (host shared objects for sm_90a, pigeon/runtime/hostlib.py) of
    tests/gpu/test_gemm_gpu.py and `pigeon bench gemm`: pigeon.gemm_api.prebuild_instances
    (about 70-90 s of nvcc each on one core; the GPU machine has no CUTLASS wheel)."""
    from pigeon.codegen.gemm_sm90 import render_sm90
    from pigeon.gemm_api import prebuild_instances
    return {g.name: render_sm90(g) for g in prebuild_instances()}


def attention_sm90_libraries(which: str, tunes=()):
    """The CUTLASS sm90 attention forward libraries (pigeon/codegen/attention_sm90.py; ~2 minutes of
    nvcc each on one core): ``tests`` those of tests/gpu/test_attention_sm90_gpu.py; ``bench`` those
    `pigeon bench attention` and benchmarks/profile_attention.py run (dense, causal, ALiBi, softcap at
    head dims 64 and 128; sliding window, S2, top-k GQA 2 and 4 at 128; bf16, the default scale) under the default schedule and each of ``tunes``
    (PIGEON_ATTN_SM90_TUNE strings), and the backward libraries of those CUTLASS's backward takes."""
    out = {}
    if which in ("tests", "both"):
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "gpu"))
        from test_attention_sm90_gpu import backward_specs, specs
        out.update({s.name: s for s in specs() + backward_specs()})
    if which in ("bench", "both"):
        import torch
        from pigeon.attention.api import _plan
        from pigeon.bench.attn_variants import make_problem
        import pigeon.attention as pa
        from pigeon.codegen import attention_sm90
        # dense / causal at both head dims (benchmarks/profile_attention.py), the masked variants
        # CUTLASS's forward takes at 128 (the bench's default); top-k's instance holds its GQA group
        for variant, dims in (("dense", (64, 128)), ("causal", (64, 128)), ("alibi", (64, 128)),
                              ("softcap", (64, 128)), ("window", (128,)), ("s2", (128,)), ("topk-g2", (128,)),
                              ("topk-g4", (128,))):
            for d in dims:
                p = make_problem(variant, 1, 32, 256, d, torch.bfloat16, "cpu", 1024)
                kw = p.pigeon_kwargs()
                smod = pa.trace_score_mod(kw["score_mod"]) if kw.get("score_mod") is not None else None
                inst, _, _ = _plan(p.q, p.k, p.v, smod, None, kw.get("pattern"), kw.get("cu_seqlens"))
                if attention_sm90.unsupported(inst) is not None:
                    continue
                # a closed-form listed pattern runs 64- or 128-key tiles by their areas
                # (pigeon/runtime/attention_sm90.py block_n_for): both
                both = attention_sm90.listed(inst) and inst.pattern_kind in ("SlidingWindow", "S2")
                for tune in ("",) + tuple(tunes) + (("bn64",) if both else ()):
                    s = attention_sm90.spec_for(inst, d ** -0.5, tune)
                    out[s.name] = s
                if attention_sm90.backward_unsupported(inst) is None:
                    s = attention_sm90.backward_spec_for(inst)
                    out[s.name] = s
    from pigeon.codegen.attention_sm90 import render_attention_sm90
    return {name: render_attention_sm90(s) for name, s in out.items()}


def shiftadd_jobs(arch):
    """The ShiftAdd family's TVM-generated kernels (pigeon/runtime/shiftadd_kernel.py prebuild_set):
    each one's CUDA source generated by TVM and recorded in the cache, then its cubin built.  Where
    TVM is missing (the GPU machine) a recorded source is built (a cache hit when the compiler is
    the same); a kernel with no record there is reported and skipped.  The Jinja2 packed
    weight-only kernels of the GPU tests and the bench come with them (pigeon/codegen/shiftadd_packed.py),
    and the fp8 path's fused e4m3 row quantization (pigeon/codegen/shiftadd_quant.py)."""
    from pigeon.runtime import shiftadd_kernel as sk
    jobs = {k.kernel_name: (lambda k=k: sk.prebuild(k, arch)) for k in sk.prebuild_set()}
    try:
        from pigeon.codegen.shiftadd_packed import prebuild_configs, render_packed
    except ImportError:
        return jobs
    from pigeon.runtime.build import build_kernel
    from pigeon.codegen import shiftadd_quant
    rks = [render_packed(cfg) for cfg in prebuild_configs()]
    rks += [shiftadd_quant.render_quant(cfg) for cfg in shiftadd_quant.prebuild_configs()]
    for rk in rks:
        jobs[rk.name] = lambda rk=rk: build_kernel(rk.source, arch, name=rk.name)
    return jobs


def tvm_gemm_jobs(dims, dtypes, arch):
    """The TVM candidates of the dense GEMMs ``pigeon compile --tune`` measures on a GPU
    (pigeon/runtime/tvm_gemm_kernel.py): k = n = each of ``dims``, each dtype, the weight as is and
    transposed (a data gradient); source recorded where TVM is, cubin built; no record and no TVM
    (the GPU machine): reported and skipped."""
    from pigeon.ir.kernel import GemmInstance
    from pigeon.runtime import tvm_gemm_kernel as tg
    from pigeon.runtime.build import build_kernel
    jobs = {}
    for d in dims:
        for dt in dtypes:
            for t in (False, True):
                inst = GemmInstance("rows", d, d, typed=False, transpose_w=t, dtype=dt)

                def job(inst=inst):
                    rk = tg.rendered_for(inst, arch)
                    return build_kernel(rk.source, arch, name=rk.name)
                jobs[tg.kernel_of(inst).kernel_name] = job
    return jobs


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--prune", action="store_true",
                    help="then delete every cache entry this run neither built nor hit (keeps a carried cache small)")
    ap.add_argument("--gemm-sm90", choices=("yes", "no", "only"), default="yes",
                    help="also (or only) the CUTLASS sm90 GEMM libraries, built for sm_90a")
    ap.add_argument("--shiftadd", choices=("yes", "no", "only"), default="yes",
                    help="also (or only) the ShiftAdd kernels: TVM-generated (their CUDA source recorded in the "
                         "cache, which needs TVM here) and the packed weight-only template")
    ap.add_argument("--tvm-gemm", choices=("yes", "no", "only"), default="yes",
                    help="also (or only) the TVM dlight candidates of dense GEMMs that --tune measures, for k = n = "
                         "each of --dims and each of --dtypes (their CUDA source recorded in the cache: needs TVM "
                         "here)")
    ap.add_argument("--bench-attention", default="",
                    help="also the kernels of `pigeon bench attention` for these comma-separated variants "
                         "(with --bench-heads, --bench-window, the head dims of --bench-head-dims)")
    ap.add_argument("--bench-heads", type=int, default=32)
    ap.add_argument("--bench-window", type=int, default=1024)
    ap.add_argument("--bench-head-dims", default="128")
    ap.add_argument("--attention-knobs", default="",
                    help="'|'-separated forward schedules (PIGEON_ATTN_MMA_TUNE strings) to build the GPU tests' "
                         "tensor-core forwards under besides the default; 'gpu-tests': tests/test_attention_mma.py "
                         "GPU_KNOBS, the schedules of test_tensor_core_forward_schedules (~0.45 MB per cubin: "
                         "mind the carry limit)")
    ap.add_argument("--tune-attention", default="",
                    help="also the forwards of benchmarks/tune_attention_mma.py for these '|'-separated settings "
                         "(head dims of --tune-head-dims, variants of --tune-variants)")
    ap.add_argument("--tune-head-dims", default="64,128")
    ap.add_argument("--tune-variants", default="dense,causal", help="dense, causal, window<N>, document")
    ap.add_argument("--tune-tiles", choices=("yes", "no"), default="no",
                    help="also the GEMM kernels of every --tune tile alternative of the compiled layers "
                         "(pigeon/passes/gemm_tiles.py)")
    ap.add_argument("--attention-sm90", choices=("no", "tests", "bench", "both"), default="no",
                    help="the CUTLASS sm90 attention libraries of the GPU tests and/or the attention bench")
    ap.add_argument("--attention-sm90-tunes", default="",
                    help="'|'-separated PIGEON_ATTN_SM90_TUNE strings built beside the default for --attention-sm90 bench")
    ap.add_argument("--base", choices=("yes", "no"), default="yes",
                    help="the compiled layers' kernels and the GPU tests' attention kernels (no: only what the other "
                         "options ask for, e.g. --tune-attention's forwards)")
    args = ap.parse_args(argv)
    if args.prune and "only" in (args.shiftadd, args.gemm_sm90, args.tvm_gemm) or args.prune and args.base == "no":
        ap.error("--prune with an 'only' option or --base no would delete every other kernel's entry; "
                 "prune with the full set")
    from pigeon.runtime.artifact import kernels_of
    from pigeon.runtime.build import build_kernel
    from pigeon.runtime.hostlib import build_library
    kernels = {}
    shiftadd = shiftadd_jobs(args.arch) if args.shiftadd != "no" else {}
    dims = [int(d) for d in args.dims.split(",")]
    tvm_gemm = tvm_gemm_jobs(dims, args.dtypes.split(","), args.arch) if args.tvm_gemm != "no" else {}
    if args.tvm_gemm == "only":
        args.gemm_sm90, shiftadd, args.base = "no", {}, "no"
    if args.shiftadd == "only":
        args.gemm_sm90, tvm_gemm = "no", {}
    jobs = {**shiftadd, **tvm_gemm}             # kernels whose jobs record TVM sources (or build recorded ones)
    if args.gemm_sm90 != "only" and args.shiftadd != "only" and args.base == "yes":
        for what, layer in layer_configs(dims, args.dtypes.split(",")):
            ks = kernels_of(layer)
            kernels.update(ks)
            if args.tune_tiles == "yes":
                kernels.update(tile_kernels(layer))
        if args.attention_knobs == "gpu-tests":
            from test_attention_mma import GPU_KNOBS
            knobs = GPU_KNOBS
        else:
            knobs = tuple(k for k in args.attention_knobs.split("|") if k)
        kernels.update(attention_kernels(knobs))
    if args.bench_attention:
        kernels.update(bench_attention_kernels(args.bench_attention.split(","),
                                               [int(d) for d in args.bench_head_dims.split(",")],
                                               args.bench_heads, args.bench_window))
    if args.tune_attention:
        kernels.update(tune_attention_kernels(args.tune_attention.split("|"),
                                              [int(d) for d in args.tune_head_dims.split(",")],
                                              args.tune_variants.split(",")))
    libs = sm90_libraries() if args.gemm_sm90 != "no" else {}
    if args.attention_sm90 != "no":
        libs.update(attention_sm90_libraries(args.attention_sm90,
                                             tuple(t for t in args.attention_sm90_tunes.split("|") if t)))
    print(f"{len(kernels)} distinct kernels", flush=True)
    print(f"building {len(kernels)} distinct kernels for {args.arch}, {len(jobs)} ShiftAdd and TVM GEMM kernels for "
          f"{args.arch} "
          f"and {len(libs)} sm90 (CUTLASS GEMM / attention) libraries for sm_90a with {args.jobs} jobs", flush=True)
    t0 = time.time()
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futs = {pool.submit(build_library, src, "sm_90a", name=name): name for name, src in libs.items()}
        futs.update({pool.submit(build_kernel, rk.source, args.arch, name=rk.name): name for name, rk in kernels.items()})
        futs.update({pool.submit(job): name for name, job in jobs.items()})
        keep = set()
        from pigeon.runtime.shiftadd_kernel import ShiftAddKernelMissing
        from pigeon.runtime.tvm_gemm_kernel import TvmGemmMissing
        for i, f in enumerate(cf.as_completed(futs)):
            try:
                keep.add(f.result().key)
            except (ShiftAddKernelMissing, TvmGemmMissing) as e:
                print(f"  skipped {futs[f]}: {e}", flush=True)
            if (i + 1) % 10 == 0 or i + 1 == len(futs):
                print(f"  {i + 1}/{len(futs)} built ({time.time() - t0:.0f} s)", flush=True)
    if args.prune:
        import shutil
        from pigeon.runtime.cache import KernelCache
        stale = [p for p in KernelCache().entries() if p.name not in keep]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        print(f"pruned {len(stale)} cache entries no kernel of this run uses", flush=True)


if __name__ == "__main__":
    main()
