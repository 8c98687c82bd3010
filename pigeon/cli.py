"""Command line: ``pigeon compile | inspect``."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path

from .dsl.layer import Layer
from .dsl.trace import SpecError


class CliError(Exception):
    pass


def load_spec(target: str) -> Layer:
    """``rgcn`` (a built-in model), ``path/spec.py`` (its only layer) or ``path/spec.py:name``."""
    from .models import MODELS
    if target in MODELS:
        return MODELS[target]
    path, _, name = target.partition(":") if not os.path.exists(target) else (target, "", "")
    if not path.endswith(".py") or not os.path.exists(path):
        raise CliError(f"no spec {target!r}: give a built-in model ({', '.join(MODELS)}) or a .py file")
    mod_name = f"pigeon_spec_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise CliError(f"{e.filename}:{e.lineno}: syntax error: {e.msg}") from None
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
    spec_file = os.path.abspath(spec.fn.__code__.co_filename)
    where = None
    for fs in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(fs.filename) == spec_file:
            where = f"{fs.filename}:{fs.lineno}"
    return where or "?"


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, eq, val = item.partition("=")
        if not eq:
            raise CliError(f"--set takes KEY=VALUE, got {item!r}")
        for conv in (int, float):
            try:
                out[key] = conv(val)
                break
            except ValueError:
                pass
        else:
            out[key] = {"true": True, "false": False}.get(val.lower(), val)
    return out


def cmd_compile(args) -> int:
    import torch

    from .graph import load
    from .ir.printer import format_ir
    from .module import CompiledLayer
    from .passes.manager import run_pipeline

    spec = load_spec(args.spec)
    graph = load(args.graph)
    hparams = _parse_sets(args.set)
    print(f"[pigeon] spec {spec.name} from {spec.fn.__code__.co_filename}", file=sys.stderr)
    print(f"[pigeon] graph {graph!r}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        ir = spec.trace(args.in_dim, **hparams)
    except SpecError:
        raise
    except Exception as e:  # a bug in the user's spec: point at its line
        raise CliError(f"{_user_frame(e, spec)}: {type(e).__name__}: {e}") from None
    if args.dump:
        print(f"# traced IR ({len(ir)} ops)")
        print(format_ir(ir))
    ir, records = run_pipeline(ir)
    t_compile = time.perf_counter() - t0
    print(f"# IR after passes ({len(ir)} ops)")
    print(format_ir(ir, locs=args.dump))
    for r in records:
        print(f"# pass {r.name}: {'changed' if r.changed else 'no change'} ({r.ops_before} -> {r.ops_after} ops)")
    backend = "kernels" if args.out else args.backend
    layer = CompiledLayer(spec, ir, graph, backend=backend, seed=0, dtype=args.dtype)
    layer.hparams = hparams
    if backend == "kernels":
        if layer.backward_program is None and layer.backward_error:
            print(f"# autodiff: {layer.backward_error} (forward kernels only)")
        print(f"# autodiff: saved {len(layer.autodiff.saved)} forward values, recomputes "
              f"{len(layer.autodiff.recomputed)} ops in backward")
        print(layer.forward_program.describe())
        if layer.backward_program is not None:
            print(layer.backward_program.describe())
    if args.out:
        from .runtime.artifact import save
        path = save(layer, args.out, arch=args.arch, progress=lambda m: print(m, file=sys.stderr))
        print(f"# wrote artifact {path} ({len(list((path / 'kernels').glob('*.cubin')))} kernels for {args.arch})")
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for op in ir.inputs():
        rows = graph.num_nodes if op.type.domain.value == "node" else graph.num_edges
        inputs.append(torch.randn((rows,) + op.type.shape, generator=gen))
    t1 = time.perf_counter()
    out = layer(*inputs)
    t_run = time.perf_counter() - t1
    outs = out if isinstance(out, dict) else {"out": out}
    print(f"# summary: spec={spec.name} ops={len(ir)} params={sum(p.numel() for p in layer.parameters())} "
          f"compile={t_compile * 1e3:.1f} ms backend={layer.backend}")
    for name, val in outs.items():
        print(f"# ran on {graph.name}: {name} shape={list(val.shape)} mean={val.float().mean():.6f} "
              f"std={val.float().std():.6f} finite={bool(torch.isfinite(val).all())} ({t_run * 1e3:.1f} ms)")
    return 0


def cmd_inspect(args) -> int:
    from .graph import load
    g = load(args.graph)
    print(repr(g))
    for k, v in g.stats().items():
        print(f"  {k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pigeon", description="compile relational GNN specs to fused kernels")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="trace a spec, run the passes, print the IR and run it on a graph")
    c.add_argument("spec", help="built-in model (rgcn, rgat, hgt), SPEC.py or SPEC.py:NAME")
    c.add_argument("--graph", default="tiny", help="dataset name, synthetic:PRESET, or a saved graph path "
                   "(default: the bundled tiny graph)")
    c.add_argument("--in-dim", type=int, default=16, help="feature size of the spec's inputs (default 16)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec hyperparameter")
    c.add_argument("--dump", action="store_true", help="also print the traced IR and source locations")
    c.add_argument("--backend", choices=["reference", "kernels"], default="kernels",
                   help="run pigeon's kernels (default; TVM llvm builds on a CPU, CUDA on a GPU) "
                        "or the reference interpreter")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    c.add_argument("--out", metavar="DIR", help="write an AOT artifact (kernel programs + cubins) to DIR")
    c.add_argument("--arch", default="sm_90", help="GPU architecture of the artifact's cubins (default sm_90)")
    c.set_defaults(func=cmd_compile)
    i = sub.add_parser("inspect", help="print a graph's statistics")
    i.add_argument("--graph", default="tiny")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, NotImplementedError) as e:  # graph / dataset / input / lowering errors
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
