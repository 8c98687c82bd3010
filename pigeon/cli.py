"""Command line: ``pigeon compile | inspect``.

Every mistake of the user's (a bad flag, a spec that fails to import or trace, sizes that do not fit
in memory, an unwritable output directory, a full disk) is one line ``error: ...`` on stderr and exit
code 2; ``--check`` failing is exit code 1.  Flags are checked before any work is done.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from .dsl.layer import Layer
from .dsl.trace import SpecError

# sm_XY / sm_XYZ with an optional arch-specific (a) or family (f) suffix: sm_80, sm_90a, sm_100f
ARCH_RE = re.compile(r"^sm_\d{2,3}[af]?$")
ARCH_EXAMPLES = "sm_80, sm_86, sm_89, sm_90, sm_90a, sm_100"
# --check: a kernel output is ok when max|kernel - reference| <= ATOL + RTOL * max|reference|
CHECK_TOLERANCE = {"float32": (1e-4, 1e-5), "bfloat16": (2e-2, 1e-3)}   # dtype -> (rtol, atol)


class CliError(Exception):
    pass


class CheckFailed(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one ``error:`` line (exit 2), not usage + error."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


# ---------------------------------------------------------------------------------------- the spec

def _spec_frame(exc: BaseException, path: str) -> str | None:
    """file:line of the deepest traceback frame in ``path``."""
    target = os.path.abspath(path)
    where = None
    for fs in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(fs.filename) == target:
            where = f"{path}:{fs.lineno}"
    return where


def load_spec(target: str) -> Layer:
    """``rgcn`` (a built-in model), ``path/spec.py`` (its only layer) or ``path/spec.py:name``."""
    from .models import MODELS
    if target in MODELS:
        return MODELS[target]
    path, _, name = target.partition(":") if not os.path.exists(target) else (target, "", "")
    if not path.endswith(".py") or not os.path.exists(path):
        raise CliError(f"no spec {target!r}: give a built-in model ({', '.join(MODELS)}) or a .py file")
    if not os.path.isfile(path):
        raise CliError(f"spec {path} is not a file")
    mod_name = f"pigeon_spec_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        where = f"{e.filename}:{e.lineno}" if e.filename else path
        raise CliError(f"{where}: syntax error: {e.msg}") from None
    except SpecError as e:
        raise CliError(f"{e} (while importing the spec {path})") from None
    except (Exception, SystemExit) as e:   # NameError, ImportError, ZeroDivisionError, sys.exit() ...
        where = _spec_frame(e, path) or path
        raise CliError(f"{where}: {type(e).__name__} while importing the spec: {_one_line(e)}") from None
    layers = {k: v for k, v in vars(module).items() if isinstance(v, Layer)}
    if name:
        if name not in layers:
            raise CliError(f"{path} has no @pigeon.layer named {name!r}; it has {sorted(layers)}")
        return layers[name]
    if len(layers) != 1:
        raise CliError(f"{path} defines {len(layers)} layers {sorted(layers)}: pick one with {path}:NAME")
    return next(iter(layers.values()))


def _user_frame(exc: BaseException, spec: Layer) -> str:
    """file:line of the deepest frame in the spec's own file, for errors raised by user code."""
    return _spec_frame(exc, spec.fn.__code__.co_filename) or "?"


# ---------------------------------------------------------------------------------------- flags

def check_arch(arch: str) -> str:
    if ARCH_RE.match(arch):
        return arch
    m = re.fullmatch(r"(?:compute|sm|arch)_?(\d{2,3}[af]?)", arch)
    if arch.startswith("compute_") and m:
        hint = f"{arch} is a virtual (PTX) architecture; artifacts hold cubins for a real one: --arch sm_{m.group(1)}"
    elif m:
        hint = f"did you mean --arch sm_{m.group(1)}?"
    else:
        hint = f"give sm_XY, such as {ARCH_EXAMPLES}"
    raise CliError(f"--arch {arch}: not a GPU architecture; {hint}")


def _convert(key: str, raw: str, default, annotation):
    """A --set value converted to the type of the hyperparameter's default (or annotation)."""
    kind = type(default) if default is not None and default is not inspect.Parameter.empty else None
    if kind is None and annotation is not inspect.Parameter.empty:
        ann = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        kind = {"int": int, "float": float, "bool": bool, "str": str}.get(ann)
    low = raw.strip().lower()
    if kind is bool:
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise CliError(f"--set {key}={raw}: {key} is a bool; give true or false")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise CliError(f"--set {key}={raw}: {key} is an int") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise CliError(f"--set {key}={raw}: {key} is a float") from None
    if kind is str:
        return raw
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(low, raw)


def parse_sets(items: list[str], spec: Layer) -> dict:
    """``--set KEY=VALUE`` items checked against the spec's keyword hyperparameters."""
    params = inspect.signature(spec.fn).parameters
    known = sorted(spec.hparams)
    out = {}
    for item in items:
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise CliError(f"--set takes KEY=VALUE, got {item!r}")
        if key not in spec.hparams:
            has = f"it has {known}" if known else "it takes none"
            raise CliError(f"--set {item}: spec {spec.name} has no hyperparameter {key!r}; {has}")
        p = params.get(key)
        out[key] = _convert(key, val, spec.hparams[key], p.annotation if p is not None else inspect.Parameter.empty)
    return out


def check_out_dir(out: str) -> Path:
    """Fail before any work when ``--out`` cannot be created (a file in the way, no permission)."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise CliError(f"--out {out}: a file is in the way")
    parent = path.parent if not path.exists() else path
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CliError(f"--out {out}: {probe} is not a directory")
    try:
        tempfile.TemporaryDirectory(prefix=".pigeon-probe-", dir=probe).cleanup()
    except OSError as e:
        raise CliError(f"--out {out}: cannot write in {probe}: {e.strerror or e}") from None
    return path


def pick_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(name)


def device_name(device) -> str:
    if device.type == "cuda":
        import torch
        return f"cuda {torch.cuda.get_device_name(device)}"
    return device.type


# ---------------------------------------------------------------------------------------- running

def executor_backend(layer, device) -> str | None:
    """The executor backend the layer's kernel programs ran with on ``device`` ("cuda", "torch",
    "emulate", ...), as registered in pigeon.runtime.ops; None when it cannot be told."""
    try:
        from .runtime.ops import get_layer
        b = get_layer(layer.layer_id).backends.get(device.type)
        return getattr(b, "name", None) if b is not None else None
    except Exception:   # the registry's shape is another module's business: report, don't fail
        return None


def planned_backend(device) -> str | None:
    try:
        from .runtime.program import default_backend
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return default_backend(device)
    except Exception:
        return None


BACKEND_WORDS = {"cuda": "pigeon's CUDA kernels",
                 "torch": "the plain-torch semantics of each kernel instance"}


def backend_words(name: str | None) -> str:
    """What an executor backend is, in words: a known phrase, else its class's docstring."""
    if name in BACKEND_WORDS:
        return BACKEND_WORDS[name]
    try:
        from .runtime.program import BACKENDS
        doc = (BACKENDS[name].__doc__ or "").strip().splitlines()
        if doc:
            return f"the {name!r} executor ({doc[0].rstrip('.')})"
    except Exception:
        pass
    return f"the {name!r} executor"


def _use_torch_executor(layer, device) -> bool:
    try:
        from .runtime.ops import get_layer
        from .runtime.program import BACKENDS
        get_layer(layer.layer_id).backends[device.type] = BACKENDS["torch"]()
        return True
    except Exception:
        return False


def _first_call(layer, inputs, args, device):
    """The first call (which builds the kernels). On a CPU, a kernel executor that refuses the
    storage dtype (NotImplementedError) is replaced by the
    plain-torch semantics of the same kernel instances, and the user is told so."""
    try:
        return layer(*inputs)
    except NotImplementedError as e:
        used = executor_backend(layer, device)
        if not (layer.backend == "kernels" and device.type == "cpu" and args.dtype != "float32"
                and used not in (None, "torch") and _use_torch_executor(layer, device)):
            raise
        print(f"[pigeon] the {used} executor refused {args.dtype} ({_one_line(e)}); running "
              f"{backend_words('torch')} (executor 'torch') instead", file=sys.stderr)
        return layer(*inputs)


def check_memory(ir, graph, args, device, backend: str) -> None:
    from .sizes import SizeError, estimate, format_bytes, memory_limit
    dtype = args.dtype if backend == "kernels" else "float32"
    try:
        est = estimate(ir, graph, dtype, copies=2 if args.check else 1)
        limit, why = memory_limit(device)
    except SizeError as e:
        raise CliError(str(e)) from None
    if est.total > limit:
        raise CliError(f"{ir.name} on {graph.name} would need ~{format_bytes(est.total)} "
                       f"(largest: {est.largest}); limit is {format_bytes(limit)} ({why})")


def _outputs(out) -> dict:
    return out if isinstance(out, dict) else {"out": out}


def run_check(spec, ir, graph, layer, inputs, outs, dtype: str) -> bool:
    """Run the reference interpreter on the same inputs and weights; print one line per output."""
    import torch

    from .module import CompiledLayer
    ref = CompiledLayer(spec, ir, graph, backend="reference", seed=0)
    ref.weights.load_state_dict({k: v.detach().float() for k, v in layer.weights.state_dict().items()})
    dev = next(iter(inputs)).device if inputs else torch.device("cpu")
    ref = ref.to(dev)
    with torch.no_grad():
        expect = _outputs(ref(*[x.float() for x in inputs]))
    rtol, atol = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE["bfloat16"])
    print(f"# check vs reference ({dtype}; ok when max_abs <= {atol:g} + {rtol:g} * max|ref|, "
          f"max_rel = max_abs / max|ref|)")
    ok_all = True
    for name, want in expect.items():
        got = outs[name].detach().float()
        want = want.detach().float()
        if got.shape != want.shape:
            print(f"# check vs reference: {name} shape {list(got.shape)} != reference {list(want.shape)} FAIL")
            ok_all = False
            continue
        diff = (got - want).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(want.abs().max()) if want.numel() else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        finite = bool(torch.isfinite(got).all()) == bool(torch.isfinite(want).all())
        ok = finite and max_abs <= atol + rtol * scale
        ok_all &= ok
        print(f"# check vs reference: {name} max_abs={max_abs:.3e} max_rel={max_rel:.3e} "
              f"{'ok' if ok else 'FAIL'} (tolerance rtol={rtol:g} atol={atol:g})")
    return ok_all


def cmd_compile(args) -> int:
    # flags first: nothing below runs for a command line that cannot work
    check_arch(args.arch)
    if args.in_dim <= 0:
        raise CliError(f"--in-dim {args.in_dim}: the feature size must be a positive integer")
    spec = load_spec(args.spec)
    hparams = parse_sets(args.set, spec)
    if args.out:
        check_out_dir(args.out)
        if args.backend == "reference":
            raise CliError("--out writes kernel artifacts: it needs --backend kernels")
    if args.tune and args.backend == "reference" and not args.out:
        raise CliError("--tune measures kernel configurations: it needs --backend kernels")
    if args.tune_reps is not None and args.tune_reps < 1:
        raise CliError(f"--tune-reps {args.tune_reps}: give a positive number of timed calls")

    import torch

    from .graph import load
    from .ir.printer import format_ir
    from .module import CompiledLayer
    from .passes.pipeline import graph_stats_for, run_pipeline

    device = pick_device(args.device)
    graph = load(args.graph)
    if args.reverse:
        graph = graph.with_reverse_edges()
    backend = "kernels" if args.out else args.backend
    # what is compiled, on what: the report (stdout); stderr is kept for diagnostics
    print(f"# spec {spec.name} from {spec.fn.__code__.co_filename}")
    print(f"# graph {graph!r}" + (" (reverse relations added)" if args.reverse else ""))
    if backend == "kernels" and device.type == "cpu" and args.dtype != "float32":
        planned = planned_backend(device)
        words = backend_words(planned)
        why = "--device cpu" if torch.cuda.is_available() else "no CUDA device"
        print(f"[pigeon] {why}: {args.dtype} kernel programs run on the CPU through {words} "
              f"(executor {planned!r}), not through pigeon's CUDA {args.dtype} kernels", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        ir = spec.trace(args.in_dim, **hparams)
    except SpecError:
        raise
    except Exception as e:  # a bug in the user's spec: point at its line
        raise CliError(f"{_user_frame(e, spec)}: {type(e).__name__}: {_one_line(e)}") from None
    if args.dump:
        print(f"# traced IR ({len(ir)} ops)")
        print(format_ir(ir))
    choices = None
    if args.tune:
        from .module import tune_layer
        from .tune import TuneError
        try:
            tuned = tune_layer(spec, graph, args.in_dim, ir=ir, dtype=args.dtype, seed=0, hparams=hparams,
                               mode=args.tune_mode, device=device, reps=args.tune_reps,
                               progress=lambda m: print(m, file=sys.stderr, flush=True))
        except TuneError as e:
            raise CliError(f"--tune: {e}") from None
        for line in tuned.table():
            print(f"# {line}")
        choices = tuned.choices
    compilation, records = run_pipeline(ir, graph_stats=graph_stats_for(graph), choices=choices)
    ir = compilation.ir
    t_compile = time.perf_counter() - t0
    for r in records:
        print(f"# {r.summary()}")
        if args.dump:
            for gname, ch in r.changes:
                print(f"#   [{gname}] {ch.rule}: {ch.before}  ->  {ch.after}")
    print(f"# IR after passes ({len(ir)} ops)")
    print(format_ir(ir, locs=args.dump))
    if args.dump and compilation.backward is not None:
        print(f"# backward IR after passes ({len(compilation.backward)} ops)")
        print(format_ir(compilation.backward, locs=False))
    check_memory(ir, graph, args, device, backend)      # before any weight or input is allocated

    t1 = time.perf_counter()
    layer = CompiledLayer(spec, compilation, graph, backend=backend, seed=0, dtype=args.dtype)
    layer.hparams = hparams
    t_lower = time.perf_counter() - t1
    if backend == "kernels":
        if layer.backward_program is None and layer.backward_error:
            print(f"# autodiff: {layer.backward_error} (forward kernels only)")
        print(f"# autodiff: saved {len(layer.autodiff.saved)} forward values, recomputes "
              f"{len(layer.autodiff.recomputed)} ops in backward")
        print(layer.forward_program.describe())
        if layer.backward_program is not None:
            print(layer.backward_program.describe())
        if args.explain:
            from .passes.explain import explain
            stats = {**graph_stats_for(graph), "num_nodes": graph.num_nodes, **layer.kgraph.degree_stats,
                     **layer.kgraph.compact_stats}
            for line in explain(ir, records, {"forward": layer.forward_program, "backward": layer.backward_program},
                                stats, args.dtype):
                print(f"# explain: {line}")
            from .runtime.program import program_buffer_bytes
            from .runtime.replay import ENV as GRAPHS_ENV, MAX_BUFFER_BYTES, cost_rule, graphs_mode
            mode = graphs_mode()
            for name, prog in (("forward", layer.forward_program), ("backward", layer.backward_program)):
                if prog is None:
                    continue
                nbytes = program_buffer_bytes(prog, layer.kgraph)
                on = cost_rule(mode, len(prog.launches), nbytes)
                print(f"# explain: cuda graphs: {name} program, {len(prog.launches)} launches, {nbytes:,} B of buffers: "
                      f"{'replayed' if on else 'launched one by one'} on a GPU ({GRAPHS_ENV}={mode}; auto replays "
                      f"more than one launch and at most {MAX_BUFFER_BYTES:,} B)")
    if args.out:
        from .runtime.artifact import ArtifactError, save
        try:
            path = save(layer, args.out, arch=args.arch, progress=lambda m: print(m, file=sys.stderr))
        except (ArtifactError, OSError) as e:
            raise CliError(f"--out {args.out}: cannot write the artifact: {_one_line(e)}") from None
        print(f"# wrote artifact {path} ({len(list((path / 'kernels').glob('*.cubin')))} kernels for {args.arch})")

    gen = torch.Generator().manual_seed(0)
    inputs = []
    from .reference import expected_shape
    for op in ir.inputs():
        inputs.append(torch.randn(expected_shape(op, graph), generator=gen).to(device))
    layer = layer.to(device)
    with torch.no_grad():
        t2 = time.perf_counter()
        out = _first_call(layer, inputs, args, device)
        _sync(device)
        t_first = time.perf_counter() - t2
        t3 = time.perf_counter()
        out = layer(*inputs)
        _sync(device)
        t_steady = time.perf_counter() - t3
    outs = _outputs(out)
    if layer.backend == "kernels":
        used = executor_backend(layer, device) or planned_backend(device) or "?"
        where, first = f"kernels via {used}", "build+first call"
    else:
        where, first = "reference", "first call"
    print(f"# summary: spec={spec.name} ops={len(ir)} params={sum(p.numel() for p in layer.parameters())} "
          f"compile={t_compile * 1e3:.1f} ms lower={t_lower * 1e3:.1f} ms backend={layer.backend} "
          f"dtype={args.dtype}")
    print(f"# ran on {graph.name} ({device_name(device)}, {where}): {first} {t_first * 1e3:.1f} ms, "
          f"steady call {t_steady * 1e3:.1f} ms")
    for name, val in outs.items():
        print(f"# {name} shape={list(val.shape)} dtype={str(val.dtype).replace('torch.', '')} "
              f"mean={val.float().mean():.6f} std={val.float().std():.6f} "
              f"finite={bool(torch.isfinite(val).all())}")
    if args.check:
        if not run_check(spec, ir, graph, layer, inputs, outs, args.dtype if backend == "kernels" else "float32"):
            raise CheckFailed(f"{spec.name}: outputs differ from the reference interpreter beyond the tolerance")
    return 0


def _sync(device) -> None:
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


def cmd_inspect(args) -> int:
    from .graph import load
    g = load(args.graph)
    if args.reverse:
        g = g.with_reverse_edges()
    print(repr(g))
    for k, v in g.stats().items():
        print(f"  {k}: {v}")
    return 0


def cmd_bench(args) -> int:
    """``pigeon bench rgnn``: progress on stderr, the per-case table on stdout, files in --out."""
    import types
    from .bench import report, rgnn    # lazy: nothing else in pigeon imports pigeon.bench
    out = check_out_dir(args.out)
    device = pick_device(args.device)
    try:
        cfg = rgnn.make_config(graphs=args.graphs, models=args.models, dims=args.dims, dtypes=args.dtypes,
                               modes=args.modes, peers=args.peers, device=device, reps=args.reps,
                               peer_timeout=args.peer_timeout, quick=args.quick, out=args.out, resume=args.resume,
                               tune_check=args.tune_check)
    except (rgnn.BenchError, ValueError) as e:
        raise CliError(str(e)) from None
    # the rgnn benchmark's pieces under the names the shared driver calls
    bench = types.SimpleNamespace(run=rgnn.run, BenchError=rgnn.BenchError, write_results=report.write_results,
                                  cases_table=report.cases_table, summary_markdown=report.summary_markdown)
    return _run_bench(args, "rgnn", bench, cfg, out, "speedup.png")


def _run_bench(args, name: str, bench, cfg, out: Path, plot_name: str) -> int:
    """The rest of ``pigeon bench attention | gemm`` once ``cfg`` is made: --resume, progress on
    stderr, the files after every case, the table and the summary on stdout."""
    from .bench import report
    try:
        previous = report.read_results(out, name) if args.resume else None
    except ValueError as e:
        raise CliError(str(e)) from None

    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

    def write(result, plot=False):
        try:
            return bench.write_results(out, result, plot=plot)
        except OSError as e:
            raise CliError(f"--out {args.out}: cannot write the results: {_one_line(e)}") from None

    progress(f"# {cfg.command()}")
    try:
        result = bench.run(cfg, progress, on_case=write, previous=previous)
    except bench.BenchError as e:
        raise CliError(str(e)) from None
    plot = write(result, plot=True)
    if plot and plot.startswith("skipped"):
        print(f"warning: {plot_name} {plot}", file=sys.stderr)
    print("\n".join(bench.cases_table(result["cases"])))
    print()
    print(bench.summary_markdown(result), end="")
    progress(f"# wrote {', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))} to {out}")
    return 0


def cmd_bench_attention(args) -> int:
    """``pigeon bench attention``: pigeon's attention kernels against SDPA and FlexAttention."""
    from .bench import attention    # lazy: nothing else in pigeon imports pigeon.bench
    out = check_out_dir(args.out)
    device = pick_device(args.device)
    try:
        cfg = attention.make_config(variants=args.variants, seq_lens=args.seq_lens, batch=args.batch, heads=args.heads,
                                    head_dims=args.head_dims, dtypes=args.dtypes, modes=args.modes, peers=args.peers,
                                    device=device, reps=args.reps, timeout=args.timeout, budget=args.budget,
                                    window=args.window, quick=args.quick, out=args.out, resume=args.resume,
                                    gemm_summary=args.gemm_summary)
    except attention.BenchError as e:
        raise CliError(str(e)) from None
    return _run_bench(args, "attention", attention, cfg, out, "tflops.png")


def cmd_bench_gemm(args) -> int:
    """``pigeon bench gemm``: pigeon.gemm / grouped_gemm against cuBLAS and torch's grouped GEMM."""
    from .bench import gemm
    out = check_out_dir(args.out)
    device = pick_device(args.device)
    try:
        cfg = gemm.make_config(cases=args.cases, dtypes=args.dtypes, peers=args.peers, device=device, reps=args.reps,
                               timeout=args.timeout, budget=args.budget, quick=args.quick, out=args.out,
                               resume=args.resume)
    except gemm.BenchError as e:
        raise CliError(str(e)) from None
    return _run_bench(args, "gemm", gemm, cfg, out, "tflops.png")


def cmd_bench_shiftadd(args) -> int:
    """``pigeon bench shiftadd``: the ShiftAdd primitives against cuBLAS fp32/bf16, torch._scaled_mm, SDPA, a dense MLP."""
    from .bench import shiftadd
    out = check_out_dir(args.out)
    device = pick_device(args.device)
    try:
        cfg = shiftadd.make_config(kinds=args.kinds, device=device, reps=args.reps, timeout=args.timeout,
                                   budget=args.budget, quick=args.quick, out=args.out, resume=args.resume)
    except shiftadd.BenchError as e:
        raise CliError(str(e)) from None
    return _run_bench(args, "shiftadd", shiftadd, cfg, out, "speedup.png")


def _common_bench_flags(r, default_out: str) -> None:
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where everything runs (default: cuda when there is a GPU, else cpu)")
    r.add_argument("--out", default=default_out, metavar="DIR",
                   help="where cases.json/.md, summary.json/.md and tflops.png go (default: %(default)s)")
    r.add_argument("--reps", type=int, help="timed repetitions per implementation (default 20; --quick 3)")
    r.add_argument("--timeout", type=float, metavar="S", help="an implementation whose build and first call take "
                   "longer is 'timeout' (default 300)")
    r.add_argument("--budget", type=float, metavar="S", help="seconds of timing per implementation: it stops "
                   "after at least one timed call (default 60 attention, 30 gemm; --quick 10)")
    r.add_argument("--resume", action="store_true", help="keep the cases already in DIR/cases.json and run "
                   "only the others (without it, DIR's files are replaced)")


def _version() -> str:
    from . import __version__
    return f"pigeon {__version__}"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pigeon", description="compile relational GNN specs to fused kernels")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    c = sub.add_parser("compile", help="trace a spec, run the passes, print the IR and run it on a graph")
    c.add_argument("spec", help="built-in model (rgcn, rgat, hgt), SPEC.py or SPEC.py:NAME")
    c.add_argument("--graph", default="tiny", help="dataset name, synthetic:PRESET, or a saved graph path "
                   "(default: the bundled tiny graph)")
    c.add_argument("--reverse", action="store_true",
                   help="add a reverse relation rev_<r> for every relation r (the R-GCN convention)")
    c.add_argument("--in-dim", type=int, default=16, help="feature size of the spec's inputs (default 16)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec hyperparameter")
    c.add_argument("--dump", action="store_true", help="also print the traced IR and source locations")
    c.add_argument("--explain", action="store_true",
                   help="print every graph-dependent decision (reordering, compaction, schedules) with its estimated costs")
    c.add_argument("--backend", choices=["reference", "kernels"], default="kernels",
                   help="run pigeon's kernel programs (default; CUDA on a GPU, on a CPU the executor "
                        "pigeon.runtime.program picks) or the reference interpreter")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the layer runs (default: cuda when there is a GPU, else cpu)")
    c.add_argument("--check", action="store_true",
                   help="also run the reference interpreter with the same inputs and weights and compare "
                        "(exit 1 beyond the tolerance)")
    c.add_argument("--tune", action="store_true",
                   help="measure the configurations the cost rules choose between (reordering, compaction, "
                        "aggregation schedules) on --device, each checked against the reference first, and use "
                        "the fastest; the winner is recorded in the kernel cache and reused without measuring")
    c.add_argument("--tune-mode", choices=["inference", "training"],
                   help="what --tune times: a no-grad forward, or forward + backward (default: training when the "
                        "spec has a backward)")
    c.add_argument("--tune-reps", type=int, metavar="N", help="timed calls per candidate (default 20 on a GPU, 5 on a CPU)")
    c.add_argument("--out", metavar="DIR", help="write an AOT artifact (kernel programs + cubins) to DIR")
    c.add_argument("--arch", default="sm_90", help=f"GPU architecture of the artifact's cubins "
                   f"(sm_XY: {ARCH_EXAMPLES}; default sm_90)")
    c.set_defaults(func=cmd_compile)
    i = sub.add_parser("inspect", help="print a graph's statistics")
    i.add_argument("--graph", default="tiny")
    i.add_argument("--reverse", action="store_true", help="add reverse relations first")
    i.set_defaults(func=cmd_inspect)
    b = sub.add_parser("bench", help="benchmark pigeon's layers against their peers")
    bsub = b.add_subparsers(dest="benchmark", required=True, parser_class=_Parser)
    r = bsub.add_parser("rgnn", help="RGCN, RGAT and HGT against PyG, the reference and torch.compile of it")
    r.add_argument("--graphs", help="comma-separated graphs: dataset names ($PIGEON_DATA), synthetic:PRESET, "
                   "tiny or graph files; NAME+rev adds reverse relations (default: the issue's list)")
    r.add_argument("--models", help="comma-separated among rgcn, rgat, hgt (default: all)")
    r.add_argument("--dims", help="comma-separated hidden sizes (default: 64, and 128 too on the AM- and "
                   "ogbn-mag-sized graphs)")
    r.add_argument("--dtypes", help="comma-separated among float32, bfloat16 (default: both)")
    r.add_argument("--modes", help="comma-separated among inference, training (default: both)")
    r.add_argument("--peers", help="comma-separated among pyg, reference, compile, or none (default: all on "
                   "cuda; pyg,reference on cpu)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where everything runs (default: cuda when there is a GPU, else cpu)")
    r.add_argument("--out", default="benchmarks/results/rgnn", metavar="DIR",
                   help="where cases.json/.md, summary.json/.md and speedup.png go (default: %(default)s)")
    r.add_argument("--reps", type=int, help="timed repetitions per implementation (default 20; --quick 3)")
    r.add_argument("--peer-timeout", type=float, metavar="S",
                   help="a peer whose build and first call take longer is 'timeout' (default 300)")
    r.add_argument("--quick", action="store_true", help="smoke test: tiny graph, dim 16, 3 reps "
                   "(unless given)")
    r.add_argument("--resume", action="store_true", help="keep the cases already in DIR/cases.json and run "
                   "only the others (without it, DIR's files are replaced)")
    r.add_argument("--tune-check", action="store_true", help="per case, also time every candidate of "
                   "`pigeon compile --tune` (each checked first) and report the cost model's pick against the best "
                   "(cost_model_within_10pct)")
    r.set_defaults(func=cmd_bench)
    a = bsub.add_parser("attention", help="attention variants against SDPA and FlexAttention")
    a.add_argument("--variants", help="comma-separated among dense, causal, window, s2, alibi, softcap, document, "
                   "topk-g2, topk-g4 (default: all)")
    a.add_argument("--seq-lens", help="comma-separated sequence lengths, multiples of 128 (default: 1024 to 16384 "
                   "by powers of 2, and 32768 for causal and s2; --quick 256)")
    a.add_argument("--batch", help="batch size B (default 4; --quick 1)")
    a.add_argument("--heads", help="query heads H (default 32; --quick 4)")
    a.add_argument("--head-dims", help="comma-separated among 64, 128 (default: 128,64; --quick 64)")
    a.add_argument("--dtypes", help="comma-separated among bfloat16, float16 (default bfloat16)")
    a.add_argument("--modes", help="comma-separated among forward, forward+backward (default: both)")
    a.add_argument("--peers", help="comma-separated among sdpa, flex, flex-eager, or none (default sdpa,flex; "
                   "on a CPU compiled flex is listed n/a unless named)")
    a.add_argument("--window", help="the sliding window (default 1024; --quick 128)")
    a.add_argument("--gemm-summary", metavar="FILE", help="pigeon bench gemm's summary.json whose GEMM keys the "
                   "summary copies (default: DIR/../gemm/summary.json)")
    a.add_argument("--quick", action="store_true", help="smoke test: B 1, H 4, S 256, D 64, 3 reps (unless given)")
    _common_bench_flags(a, "benchmarks/results/attention")
    a.set_defaults(func=cmd_bench_attention)
    g = bsub.add_parser("gemm", help="pigeon.gemm and grouped_gemm against cuBLAS and torch's grouped GEMM")
    g.add_argument("--cases", help="comma-separated among gemm-4096, gemm-8192, gemm-gelu, grouped (default: all)")
    g.add_argument("--dtypes", help="comma-separated among bfloat16, float16 (default bfloat16)")
    g.add_argument("--peers", help="comma-separated among matmul, grouped_mm, bmm, loop, or none (default: all)")
    g.add_argument("--quick", action="store_true", help="smoke test: the same cases at small sizes, 3 reps")
    _common_bench_flags(g, "benchmarks/results/gemm")
    g.set_defaults(func=cmd_bench_gemm)
    sa = bsub.add_parser("shiftadd", help="ShiftAdd shift linear, add attention and mixture MLP against cuBLAS, "
                         "torch._scaled_mm, SDPA and a dense MLP")
    sa.add_argument("--kinds", help="comma-separated among linear, attention, moe (default: all)")
    sa.add_argument("--quick", action="store_true", help="smoke test: tiny shapes, 3 reps (unless given)")
    _common_bench_flags(sa, "benchmarks/results/shiftadd")
    sa.set_defaults(func=cmd_bench_shiftadd)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {_one_line(message)}", file=sys.stderr)


def _error(msg: str) -> int:
    print(f"error: {_one_line(msg)}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    old_show = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except CheckFailed as e:
        print(f"check failed: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:                          # `pigeon inspect | head`: the reader left
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (SpecError, CliError) as e:
        return _error(str(e))
    except (ValueError, NotImplementedError) as e:  # graph / dataset / input / lowering errors
        return _error(f"{type(e).__name__}: {e}")
    except OSError as e:                             # a full disk, a permission, a missing file
        where = f" ({e.filename})" if getattr(e, "filename", None) and str(e.filename) not in str(e) else ""
        return _error(f"{type(e).__name__}: {e}{where}")
    except MemoryError as e:
        return _error(f"out of memory: {e or 'MemoryError'}")
    except RuntimeError as e:
        text = str(e)
        if "out of memory" in text.lower() or "can't allocate memory" in text:
            return _error(f"out of memory: {text}")
        raise
    finally:
        warnings.showwarning = old_show


if __name__ == "__main__":
    sys.exit(main())
