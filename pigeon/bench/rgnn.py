"""``pigeon bench rgnn``: pigeon's compiled RGCN / RGAT / HGT layers against their peers.

A case is (graph, model, hidden size, dtype, mode).  In each case, on the same graph and the same
seeded inputs, in one process:

- pigeon's layer (``pigeon.compile(MODELS[model], graph, dim, backend="kernels", dtype=...)``) is
  built and called once (``first_call_s`` includes building its kernels), then its output is checked
  against the reference interpreter in float32 with the same weights (in training, the gradients of
  the input and of every weight too), then it is timed;
- each peer of :mod:`pigeon.bench.peers` is built and timed the same way (PyG's convs, the
  reference interpreter, ``torch.compile`` of it).  A peer that runs out of memory is ``OOM``, one
  whose build and first call take longer than ``--peer-timeout`` is ``timeout``, one that cannot be
  expressed on the graph is ``n/a: why``, any other failure ``error: message``.

Modes: ``inference`` is one forward under ``torch.no_grad()``; ``training`` is one step: forward,
``loss = out.float().pow(2).mean()``, backward, ``torch.optim.SGD`` over the module's parameters
and the input (which needs its gradient), the same step for every implementation.

Numbers per implementation: the median time of ``--reps`` steps after warm-up (CUDA events on a
GPU, ``time.perf_counter`` around a synchronized step on a CPU; a peer stops early after
``--peer-timeout`` seconds of timing), and on a GPU the peak memory of one step
(``torch.cuda.max_memory_allocated`` minus what was allocated before it: weights, inputs and graph
are not counted).  Per case: pigeon's speedup over each peer and over the best peer that ran, the
physical floor (:func:`pigeon.bench.floors.case_floor`) and pigeon's ratio to it.

Per kernel (:mod:`pigeon.bench.kernels`): each aggregation / edge-softmax kernel of pigeon's step,
its time per launch from torch.profiler (CUDA kernel events by kernel name on a GPU), its minimum
bytes (:func:`pigeon.bench.floors.kernel_min_bytes`) and achieved TB/s (``kernels`` in each case;
the minimum over cases is ``aggregate_tbps_min``).  Per graph, dim and dtype: the sum of x[src]
over incoming edges by pigeon's kernel, ``index_add_`` and cuSPARSE SpMM on the same x
(``aggregations`` in cases.json; ``aggregate_slower_than_peer`` counts where pigeon lost).

``--tune-check``: per case the candidates of ``pigeon compile --tune`` (pigeon/tune.py) are each
checked against the reference and timed in the case's mode (inference: no-grad forward; training:
forward + backward, no optimizer step), no tuning record read or written; the case gets the cost
model's pick, the best candidate and their ratio, and ``cost_model_within_10pct`` is the fraction of
tuned cases whose pick is within 10% of the best.

The files written to ``--out`` (:mod:`pigeon.bench.report`): ``cases.json`` and ``cases.md`` (one
record / row per case), ``summary.json`` and ``summary.md`` (the aggregate, :func:`pigeon.bench.summary.summarize`),
``speedup.png`` (needs matplotlib: ``pip install -e '.[bench]'``).  They are rewritten after
every case, so an interrupted run leaves the cases it finished; ``--resume`` keeps the cases
already in ``--out/cases.json`` and runs only the others (a long benchmark in several commands).
While an implementation runs, ``--out/running.json`` names it: a process that dies there (a C++ abort
inside torch.compile, a kill) leaves the file, and ``--resume`` records that implementation of that
case as ``error: the process died while this ran ...`` instead of running it again.
The floor's peak numbers (:mod:`pigeon.bench.floors`) are the H200's on every device.

    pigeon bench rgnn --graphs fb15k-237+rev,aifb --models rgcn,rgat --dims 64 --out benchmarks/results/rgnn
    pigeon bench rgnn --quick --device cpu --out /tmp/rgnn       # the tiny graph, dim 16, 3 reps
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import statistics
import sys
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import pigeon as pg
from pigeon.atomic_io import write_atomic
from pigeon.graph import load
from pigeon.graph.datasets import DATASETS, DatasetError, data_root
from pigeon.graph.synthetic import PRESETS, tiny_graph
from pigeon.models import MODELS

from . import peers as P
from .floors import (HEADS, PEAK_BYTES_PER_S, PEAK_FLOPS, case_floor, forward_flops, hparams, min_bytes,
                     param_count)
from .check import check
from .kernels import SOURCE as KERNEL_SOURCE, aggregate_peers, profile_kernels
from .summary import MODES, summarize
from .timing import PeerTimeout, Step, failure, free, measure, median_ms, one_line

__all__ = ["BenchError", "Config", "make_config", "run", "run_case", "finish_case", "summarize", "check",
           "build_summary", "host_overhead", "case_floor", "forward_flops", "param_count", "min_bytes", "hparams",
           "median_ms", "failure", "PeerTimeout", "PEAK_FLOPS", "PEAK_BYTES_PER_S"]

# ---------------------------------------------------------------------------------------- constants

MODEL_NAMES = tuple(MODELS)                  # rgcn, rgat, hgt
DTYPES = ("float32", "bfloat16")
# the benchmark: hidden 64 everywhere, 128 on the AM- and ogbn-mag-sized graphs
DEFAULT_GRAPHS = ("fb15k-237+rev", "aifb", "mutag", "acm", "dblp", "synthetic:bgs", "synthetic:am",
                  "synthetic:ogbn-mag", "synthetic:ogbl-biokg")
DEFAULT_DIMS = (64,)
WIDE_DIMS = {"synthetic:am": (64, 128), "synthetic:ogbn-mag": (64, 128)}
# graphs of the list that this benchmark cannot build yet
NOT_AVAILABLE: dict[str, str] = {}
QUICK = {"graphs": ("tiny",), "dims": (16,), "reps": 3}
DEFAULT_REPS = 20
DEFAULT_PEER_TIMEOUT = 300.0
PIGEON = "pigeon"


class BenchError(ValueError):
    """A benchmark request that cannot run (an unknown graph or model, a missing dataset)."""


# ---------------------------------------------------------------------------------------- config

def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(p.strip() for p in str(text).split(",") if p.strip())


def _base(name: str) -> tuple[str, bool]:
    return (name[:-4], True) if name.lower().endswith("+rev") else (name, False)


def load_graph_name(name: str):
    """The graph a bench name names: ``pigeon.graph.load`` of its base, with reverse relations for
    a ``+rev`` suffix (the benchmark's graphs and the debugging scripts beside it)."""
    base, rev = _base(name)
    g = load(base)
    return g.with_reverse_edges() if rev else g


def graph_source(name: str) -> tuple[str, bool]:
    """(where the graph comes from, whether it is synthetic)."""
    key = _base(name)[0].lower()
    if key == "tiny":
        return "built-in tiny test graph", True
    if key.startswith("synthetic:"):
        return f"synthetic, with the published statistics of {key.split(':', 1)[1]}", True
    if key in DATASETS or key == "fb15k237":
        return "dataset ($PIGEON_DATA)", False
    return "graph file", False


def check_graph(name: str) -> None:
    """Raise BenchError (one line, naming the problem) unless ``pigeon.graph.load`` can read ``name``
    (a ``+rev`` suffix adds reverse relations)."""
    base, _ = _base(name)
    key = base.lower()
    if not base:
        raise BenchError(f"graph {name!r}: no graph name before +rev")
    if key == "tiny":
        return
    if key in DATASETS or key == "fb15k237":
        try:
            root = data_root()
        except DatasetError as e:
            raise BenchError(f"graph {name}: {e}") from None
        folder = root / ("fb15k-237" if key.startswith("fb15k") else key)
        if not folder.is_dir():
            raise BenchError(f"graph {name}: dataset folder {folder} does not exist (PIGEON_DATA={root})")
        return
    if key.startswith("synthetic:"):
        preset = key.split(":", 1)[1]
        if preset not in PRESETS:
            why = NOT_AVAILABLE.get(key, f"no synthetic preset {preset!r}")
            raise BenchError(f"graph {name}: {why}; presets: {', '.join(PRESETS)}")
        return
    if Path(base).is_file():
        return
    raise BenchError(f"unknown graph {name!r}: give one of {', '.join(DATASETS)}, synthetic:<{'|'.join(PRESETS)}> "
                     f"or a graph file from pigeon.graph.save_graph, optionally with +rev")


@dataclass
class Config:
    plan: tuple[tuple[str, tuple[int, ...]], ...]   # (graph, its hidden sizes), in run order
    models: tuple[str, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    peers: tuple[str, ...]
    device: torch.device
    reps: int
    warmup: int
    peer_timeout: float
    out: str
    dims_given: tuple[int, ...] | None = None
    skipped_graphs: dict = field(default_factory=dict)
    resume: bool = False
    tune_check: bool = False

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(g for g, _ in self.plan)

    def command(self) -> str:
        """The command line that repeats this run (every choice spelled out)."""
        argv = ["pigeon", "bench", "rgnn", "--graphs", ",".join(self.graphs), "--models", ",".join(self.models)]
        if self.dims_given is not None:
            argv += ["--dims", ",".join(map(str, self.dims_given))]
        argv += ["--dtypes", ",".join(self.dtypes), "--modes", ",".join(self.modes) or "none",
                 "--peers", ",".join(self.peers) or "none", "--device", self.device.type,
                 "--reps", str(self.reps), "--peer-timeout", f"{self.peer_timeout:g}", "--out", self.out]
        return shlex.join(argv + (["--tune-check"] if self.tune_check else []) + (["--resume"] if self.resume else []))


def _choose(flag: str, given, known) -> tuple[str, ...]:
    bad = [v for v in given if v not in known]
    if bad:
        raise BenchError(f"{flag} {','.join(given)}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(known)}")
    if not given:
        raise BenchError(f"{flag}: give at least one of {', '.join(known)}")
    return tuple(dict.fromkeys(given))


def make_config(*, graphs=None, models=None, dims=None, dtypes=None, modes=None, peers=None, device="cpu",
                reps=None, peer_timeout=None, quick=False, out="benchmarks/results/rgnn", resume=False,
                tune_check=False) -> Config:
    """Check every choice before any work (BenchError, one line, on the first bad one). ``graphs``,
    ``models``, ... are comma-separated strings (or None for the defaults); ``--quick`` changes only
    the defaults of graphs (tiny), dims (16) and reps (3)."""
    device = torch.device(device)
    graph_list = _split(graphs) or (QUICK["graphs"] if quick else DEFAULT_GRAPHS)
    for g in graph_list:
        check_graph(g)
    model_list = _choose("--models", _split(models) or MODEL_NAMES, MODEL_NAMES)
    dim_list = None
    if dims is not None:
        try:
            dim_list = tuple(int(d) for d in _split(dims))
        except ValueError:
            raise BenchError(f"--dims {dims}: give comma-separated positive integers") from None
        if not dim_list or any(d <= 0 for d in dim_list):
            raise BenchError(f"--dims {dims}: give comma-separated positive integers")
    elif quick:
        dim_list = QUICK["dims"]
    for d in dim_list or (64, 128):
        for m in model_list:
            if m in ("rgat", "hgt") and d % HEADS:
                raise BenchError(f"--dims {d}: {m} has {HEADS} heads, so the hidden size must be a multiple of {HEADS}")
    plan = tuple((g, dim_list or WIDE_DIMS.get(g.lower(), DEFAULT_DIMS)) for g in dict.fromkeys(graph_list))
    default_peers = ("pyg", "reference") + (("compile",) if device.type == "cuda" else ())
    peer_arg = _split(peers)
    peer_list = () if peer_arg == ("none",) else _choose("--peers", peer_arg or default_peers, P.PEER_KINDS)
    reps = QUICK["reps"] if reps is None and quick else DEFAULT_REPS if reps is None else int(reps)
    if reps < 1:
        raise BenchError(f"--reps {reps}: give a positive number of timed repetitions")
    timeout = DEFAULT_PEER_TIMEOUT if peer_timeout is None else float(peer_timeout)
    if not timeout > 0:
        raise BenchError(f"--peer-timeout {peer_timeout}: give a positive number of seconds")
    skipped = {g: why for g, why in NOT_AVAILABLE.items() if graphs is None and not quick}
    # --modes none: no cases, only the sum-aggregation comparisons and the host overhead (to refresh
    # those after a kernel change without rerunning every layer; merge_rgnn.py merges them)
    mode_arg = _split(modes)
    mode_list = () if mode_arg == ("none",) else _choose("--modes", mode_arg or MODES, MODES)
    return Config(plan, model_list, _choose("--dtypes", _split(dtypes) or DTYPES, DTYPES),
                  mode_list, peer_list, device, reps,
                  max(1, min(3, reps // 5)), timeout, str(out), dim_list, skipped, bool(resume), bool(tune_check))


# ---------------------------------------------------------------------------------------- one case

def graph_info(name: str, g) -> dict:
    source, synthetic = graph_source(name)
    return {"graph": name, "name": g.name, "nodes": g.num_nodes, "edges": g.num_edges, "relations": g.num_etypes,
            "node_types": g.num_ntypes, "source": source, "synthetic": synthetic}


# What the bench is measuring right now, in --out: a process that dies inside an implementation (a C++
# abort in torch.compile took down an AM-sized RGAT d128 training case on the H200, 2026-12-02) leaves
# it behind, and --resume records that implementation as an error instead of running it into the same
# death again.
RUNNING = "running.json"


def _running_path(cfg: Config) -> Path | None:
    return Path(cfg.out) / RUNNING if cfg.out else None


def _mark_running(cfg: Config, key: tuple, impl: str) -> None:
    path = _running_path(cfg)
    if path is not None and path.parent.is_dir():
        write_atomic(path, json.dumps({"case": list(key), "impl": impl,
                                       "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                           timespec="seconds")}))


def _clear_running(cfg: Config) -> None:
    path = _running_path(cfg)
    if path is not None:
        path.unlink(missing_ok=True)


def died_before(cfg: Config) -> dict:
    """{(case key, impl): status} for the implementation an earlier process of this --out died in
    (its ``running.json``), or {}. Only --resume reads it; a fresh run removes it."""
    path = _running_path(cfg)
    if path is None or not path.is_file():
        return {}
    if not cfg.resume:
        path.unlink(missing_ok=True)
        return {}
    try:
        d = json.loads(path.read_text())
        key, impl, since = tuple(d["case"]), str(d["impl"]), str(d.get("since", "?"))
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {(key, impl): f"error: the process died while this ran (an earlier run of this --out, since {since}); "
                         f"--resume skipped it"}


def run_case(g, gd, info: dict, model: str, dim: int, dtype: str, mode: str, cfg: Config,
             progress: Callable[[str], None] = lambda m: None, died: dict | None = None) -> dict:
    """One case: pigeon (built, checked, profiled per kernel, timed; with --tune-check its tuning
    candidates too) and every selected peer, on the same inputs.  ``g`` is the graph on the CPU
    (pigeon's kernels take it there), ``gd`` the same graph on the device (the peers use it)."""
    device = cfg.device
    hp = hparams(model, dim)
    tdt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(g.num_nodes, dim, generator=gen).to(device=device, dtype=tdt)
    case = {"graph": info["graph"], "synthetic": info["synthetic"], "model": model, "hparams": hp, "dim": dim,
            "dtype": dtype, "mode": mode, "device": str(device),
            "nodes": g.num_nodes, "edges": g.num_edges, "relations": g.num_etypes, "node_types": g.num_ntypes,
            "floor": case_floor(model, dim, dtype, mode, g.num_nodes, g.num_edges, g.num_etypes, g.num_ntypes,
                                *g.relation_pairs()),
            "check": "n/a: pigeon did not run"}

    def after_first(layer):
        try:
            case["check"] = check(layer, model, gd, dim, x, mode, dtype)
        except Exception as e:       # the reference itself failed: the check did not happen
            case["check"] = f"not run: reference {failure(e)}"
            free(device)
        try:
            rows, case["kernels_source"], case["gpu_ms_per_step"] = profile_kernels(
                layer, Step(layer, x, mode), mode, device, reps=max(1, min(cfg.reps, 5)))
            case["kernels"] = rows
            tb = [r["tbps"] for r in rows if r.get("tbps")]
            case["aggregate_tbps_min"] = min(tb) if tb else None
        except Exception as e:
            case["kernels_error"] = failure(e)
            free(device)

    def build_pigeon():
        return pg.compile(MODELS[model], g, dim, backend="kernels", dtype=dtype, **hp).to(device)

    key = (info["graph"], model, dim, dtype, mode)
    died = died or {}

    def timed(name, kind, build, **kw):
        if (key, name) in died:
            return {"impl": name, "kind": kind, "status": died[(key, name)], "median_ms": None}
        _mark_running(cfg, key, name)
        try:
            return measure(name, kind, build, x, mode, device, warmup=cfg.warmup, reps=cfg.reps, **kw)
        finally:                  # Ctrl-C too; only a process that dies (abort, kill) leaves the mark
            _clear_running(cfg)

    rows = [timed(PIGEON, "pigeon", build_pigeon, timeout=None, after_first=after_first)]
    for peer in P.peers_for(model, gd, dim, hp, device, dtype, cfg.peers):
        if peer.na is not None:
            rows.append({"impl": peer.name, "kind": peer.kind, "status": f"n/a: {peer.na}", "median_ms": None})
            continue
        row = timed(peer.name, peer.kind, peer.build, timeout=cfg.peer_timeout)
        if peer.note:
            row["note"] = peer.note
        rows.append(row)
    case["impls"] = rows
    if cfg.tune_check:
        case["tune"] = tune_check(g, model, dim, dtype, mode, cfg, progress)
    return finish_case(case)


def tune_check(g, model: str, dim: int, dtype: str, mode: str, cfg: Config, progress) -> dict:
    """The tuning candidates of the case measured (no record read or written): the cost model's pick,
    the best candidate, their ratio and whether the pick is within 10% of the best."""
    from pigeon.module import tune_layer
    try:
        res = tune_layer(MODELS[model], g, dim, dtype=dtype, hparams=hparams(model, dim), mode=mode,
                         device=cfg.device, reps=cfg.reps, cache=False, progress=lambda m: progress(f"  {m}"))
    except Exception as e:
        free(cfg.device)
        return {"status": failure(e)}
    pick, best, ratio = res.pick, res.winner, res.pick_ratio()
    free(cfg.device)
    return {"status": "ok", "candidates": len(res.rows), "timer": res.timer,
            "excluded": sum(1 for r in res.rows if r.status != "ok"),
            "pick_ms": pick.median_ms if pick else None, "pick_status": pick.status if pick else "missing",
            "best": best.label if best else None, "best_ms": best.median_ms if best else None,
            "ratio": ratio, "within_10pct": (ratio <= 1.1) if ratio is not None else None,
            "rows": [r.as_dict() for r in res.rows]}


def finish_case(case: dict) -> dict:
    """Fill in the derived numbers of a case record from its ``impls`` rows: pigeon's time, speedup
    over each peer that ran and over the best of them, ratio to the floor."""
    rows = case["impls"]
    pig = next((r for r in rows if r["kind"] == "pigeon"), None)
    ok_peers = [r for r in rows if r["kind"] != "pigeon" and r["status"] == "ok" and r.get("median_ms")]
    t = pig["median_ms"] if pig is not None and pig["status"] == "ok" else None
    case["pigeon_status"] = pig["status"] if pig is not None else "missing"
    case["pigeon_ms"] = t
    case["pigeon_peak_mib"] = pig.get("peak_mib") if pig is not None else None
    case["speedup"] = {r["impl"]: (r["median_ms"] / t if t else None) for r in ok_peers}
    best = min(ok_peers, key=lambda r: r["median_ms"]) if ok_peers else None
    case["best_peer"] = best["impl"] if best else None
    case["best_peer_ms"] = best["median_ms"] if best else None
    case["speedup_best"] = best["median_ms"] / t if best and t else None
    floor = case.get("floor", {}).get("floor_ms")
    case["floor_ratio"] = t / floor if t and floor else None
    # the share of pigeon's wall time the GPU was not running its kernels (host work, launch latency);
    # profiled with CUDA-graph replay off, so a replayed step's share is an upper bound
    gpu = case.get("gpu_ms_per_step")
    case["host_share"] = max(0.0, 1.0 - gpu / t) if t and gpu is not None else None
    return case


# ---------------------------------------------------------------------------------------- host overhead

def host_overhead(models, dim: int, device, calls: int = 100, batches: int = 5) -> tuple[dict | None, str]:
    """Per model: wall time per steady-state float32 inference call of pigeon's layer on the tiny
    graph (the median over ``batches`` batches of ``calls`` back-to-back calls, one synchronize each)
    minus its GPU time per call (CUDA kernels, memcpys and memsets from torch.profiler).  GPU only.
    One batch of 200 calls gave 10.5-57 us for the same RGCN layer in six runs of one day on the
    H200: the median of batches keeps one slow stretch of the host from deciding."""
    if device.type != "cuda":
        return None, "measured on a CUDA device only (on a CPU the kernels run on the host)"
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    g = tiny_graph()
    res = {}
    try:
        for m in models:
            layer = pg.compile(MODELS[m], g, dim, backend="kernels", **hparams(m, dim)).to(device)
            x = torch.randn(g.num_nodes, dim, device=device)
            with torch.no_grad():
                for _ in range(20):
                    layer(x)
                torch.cuda.synchronize(device)
                walls = []
                for _ in range(batches):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        layer(x)
                    torch.cuda.synchronize(device)
                    walls.append((time.perf_counter() - t0) / calls * 1e6)
                wall = statistics.median(walls)
                n = 50
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(n):
                        layer(x)
                    torch.cuda.synchronize(device)
            gpu = sum(e.device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA) / n
            res[m] = {"wall_us": wall, "gpu_us": gpu, "host_overhead_us": wall - gpu,
                      "wall_us_batches": [round(w, 2) for w in walls]}
    except Exception as e:
        return None, f"could not be measured: {failure(e)}"
    return res, (f"pigeon float32 inference on the tiny graph at dim {dim}: wall time per call (median of "
                 f"{batches} batches of {calls} back-to-back calls) minus GPU time per call from torch.profiler; "
                 f"the largest over the models")


def host_overhead_fresh(models, dim: int, device, timeout: float = 600) -> tuple[dict | None, str]:
    """:func:`host_overhead` in a fresh Python process (pigeon/bench/host_probe.py says why)."""
    if device.type != "cuda":
        return None, "measured on a CUDA device only (on a CPU the kernels run on the host)"
    cmd = [sys.executable, "-m", "pigeon.bench.host_probe", ",".join(models), str(dim), str(device)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        got = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else None
    except (subprocess.TimeoutExpired, OSError, ValueError) as e:
        return None, f"could not be measured in a fresh process: {failure(e)}"
    if got is None:
        why = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"could not be measured in a fresh process (exit {out.returncode}): {why[:300]}"
    return got["result"], got["note"]


def combine_host(fresh, fresh_note: str, in_run, in_run_note: str) -> tuple[dict | None, str]:
    """The run's host overhead: the fresh process's per model (what a user's steady-state call
    costs), each with the same measurement in the bench's own process after its cases beside it
    (``in_run_us``); the in-run one alone where the fresh one failed, and the note says so."""
    if not fresh:
        return in_run, in_run_note + (f" (in the bench's process after its cases; the fresh-process "
                                      f"measurement failed: {fresh_note})" if in_run else "")
    res = {m: dict(v, **({"in_run_us": in_run[m]["host_overhead_us"]} if in_run and m in in_run else {}))
           for m, v in fresh.items()}
    inr = ", ".join(f"{m} {v['in_run_us']:.1f}" for m, v in res.items() if "in_run_us" in v)
    return res, (f"{fresh_note}; measured in a fresh process before the cases (pigeon/bench/host_probe.py); "
                 f"the same in the bench's process after its cases: {inr or 'not measured: ' + in_run_note} us")


# ---------------------------------------------------------------------------------------- the run

def _git_commit() -> str:
    env = os.environ.get("PIGEON_COMMIT")
    if env:
        return env
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        if out.returncode or not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment(cfg: Config) -> dict:
    device = cfg.device
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"none (--device {device.type})"
    try:
        import torch_geometric
        pyg = torch_geometric.__version__
    except Exception:
        pyg = None
    return {"gpu": gpu, "device": str(device), "torch": torch.__version__, "torch_geometric": pyg,
            "pigeon": pg.__version__, "commit": _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": cfg.command(), "reps": cfg.reps, "warmup": cfg.warmup, "peer_timeout_s": cfg.peer_timeout,
            "peak_flops": PEAK_FLOPS, "peak_bytes_per_s": PEAK_BYTES_PER_S}


def kernel_summary(cases: list[dict], aggregations: list[dict], device) -> dict:
    """``aggregate_tbps_min``, ``aggregate_slower_than_peer`` and ``cost_model_within_10pct`` with notes."""
    s = {}
    tb = [(c["aggregate_tbps_min"], c) for c in cases if c.get("aggregate_tbps_min")]
    if tb:
        v, c = min(tb, key=lambda t: t[0])
        k = min((r for r in c["kernels"] if r.get("tbps")), key=lambda r: r["tbps"])
        s["aggregate_tbps_min"] = v
        s["aggregate_tbps_min_note"] = (
            f"min over {len(tb)} cases of each aggregation / edge-softmax kernel's min bytes / its time; lowest: "
            f"{c['graph']} {c['model']} d{c['dim']} {c['dtype']} {c['mode']}, {k['role']} {k['side']} "
            f"{k['schedule']} w{k['width']} ({k['program']}); times: {c.get('kernels_source', KERNEL_SOURCE['cpu'])}")
    else:
        s["aggregate_tbps_min"] = None
        s["aggregate_tbps_min_note"] = "no case has a profiled aggregation kernel"
    ran = [a for a in aggregations if a["impls"].get("pigeon", {}).get("ms")]
    s["aggregate_slower_than_peer"] = sum(1 for a in ran if a["pigeon_slower_than_peer"]) if ran else None
    s["aggregate_slower_than_peer_note"] = (
        f"of {len(ran)} (graph, dim, dtype) sum aggregations of x[src]: pigeon's kernel slower than index_add_ or "
        f"{'cuSPARSE SpMM' if device.type == 'cuda' else 'torch.sparse.mm (CSR)'} "
        f"({ran[0]['timer'] if ran else 'not run'})")
    tuned = [c for c in cases if (c.get("tune") or {}).get("within_10pct") is not None]
    if tuned:
        n = sum(1 for c in tuned if c["tune"]["within_10pct"])
        s["cost_model_within_10pct"] = n / len(tuned)
        s["cost_model_within_10pct_note"] = (f"{n}/{len(tuned)} cases: the cost model's pick within 10% of the best "
                                             f"measured candidate ({tuned[0]['tune']['timer']})")
    else:
        failed = [c for c in cases if c.get("tune")]
        s["cost_model_within_10pct"] = None
        s["cost_model_within_10pct_note"] = (f"{len(failed)} cases tried, none measured: "
                                             f"{failed[0]['tune'].get('status')}" if failed else
                                             "not measured: run with --tune-check (times every tuning candidate "
                                             "per case)")
    return s


def build_summary(cases: list[dict], meta: dict, graphs: list[dict], cfg: Config, host=None,
                  host_note: str | None = None, plot: str | None = None, aggregations=None) -> dict:
    s = {k: meta[k] for k in ("gpu", "commit", "date", "command", "torch", "torch_geometric", "device")}
    if meta.get("commands"):                  # --resume: the runs that made these cases
        s["commands"] = meta["commands"]
        s["commits"] = sorted({c.get("commit", "unknown") for c in cases})
    s.update(summarize(cases))
    per_model = host or None
    s["host_overhead_us"] = max(v["host_overhead_us"] for v in per_model.values()) if per_model else None
    if per_model:
        s["host_overhead_us_by_model"] = {m: v["host_overhead_us"] for m, v in per_model.items()}
        # the wall time per call of each batch and the GPU time it is reduced by: the spread between
        # batches says how much one number can be trusted (it swings several-fold between runs)
        s["host_overhead_detail"] = {m: {k: v[k] for k in ("wall_us", "gpu_us", "wall_us_batches", "in_run_us") if k in v}
                                     for m, v in per_model.items()}
    s["host_overhead_us_note"] = host_note or "measured at the end of the run"
    s.update(kernel_summary(cases, aggregations or [], cfg.device))
    s["graphs"] = graphs
    s["synthetic_graphs"] = [g["graph"] for g in graphs if g["synthetic"]]
    if cfg.skipped_graphs:
        s["graphs_not_run"] = cfg.skipped_graphs
    s["plot"] = plot or "pending: written at the end of the run"
    s["floor_note"] = (f"floor = max(FLOPs of the typed linears in their cheapest form (rows per unique (node, relation) "
                       f"pair, floors.forward_flops) / {PEAK_FLOPS['float32']:.3g} FLOP/s fp32 or "
                       f"{PEAK_FLOPS['bfloat16']:.3g} bf16, min bytes / {PEAK_BYTES_PER_S:.3g} B/s): the H200's "
                       f"calibration numbers, whatever the device")
    return s


def case_key(c: dict) -> tuple:
    return (c["graph"], c["model"], c["dim"], c["dtype"], c["mode"])


def run(cfg: Config, progress: Callable[[str], None] = lambda m: None,
        on_case: Callable[[dict], None] | None = None, previous: dict | None = None) -> dict:
    """Run every case of ``cfg``; ``progress`` gets one line per graph and per case, ``on_case`` the
    result so far after each case (to write it). ``previous`` (``--resume``: what cases.json of an
    earlier run holds) keeps its cases, and those are not run again. Returns {"meta", "graphs",
    "cases", "summary", "host_overhead"}."""
    device = cfg.device
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    meta = environment(cfg)
    cases, graphs = [], []
    if previous:
        was = previous.get("meta", {}).get("device")
        if was is not None and torch.device(was).type != device.type:
            raise BenchError(f"--resume: {cfg.out} holds cases run on {was}, this run is on {device}")
        cases = list(previous.get("cases", []))
        graphs = list(previous.get("graphs", []))
        was = previous.get("meta", {})
        before = was.get("commands") or ([was["command"]] if was.get("command") else [])
        meta["commands"] = list(dict.fromkeys(before + [meta["command"]]))
    died = died_before(cfg)
    done = {case_key(c) for c in cases}
    todo = {gname: [(m, d, t, mode) for m in cfg.models for d in dims for t in cfg.dtypes for mode in cfg.modes
                    if (gname, m, d, t, mode) not in done] for gname, dims in cfg.plan}
    total, k = sum(map(len, todo.values())), 0
    if done:
        progress(f"# --resume: {len(cases)} cases from {cfg.out}/cases.json kept, {total} to run")
    aggregations = list(previous.get("aggregations", [])) if previous else []
    result = {"meta": meta, "graphs": graphs, "cases": cases, "aggregations": aggregations}
    dim = min(d for _, dims in cfg.plan for d in dims)
    fresh, fresh_note = host_overhead_fresh(cfg.models, dim, device)
    for gname, dims in cfg.plan:
        aggs_todo = [(d, t) for d in dims for t in cfg.dtypes
                     if not any(a["graph"] == gname and a["dim"] == d and a["dtype"] == t for a in aggregations)]
        if not todo[gname] and not (aggs_todo and not cfg.modes):
            continue
        try:
            g = load_graph_name(gname)
        except (OSError, ValueError) as e:
            raise BenchError(f"graph {gname}: {one_line(e)}") from None
        gd = g.to(device)
        info = graph_info(gname, g)
        graphs[:] = [x for x in graphs if x["graph"] != gname] + [info]
        progress(f"# graph {gname}: {g.num_nodes} nodes, {g.num_edges} edges, {g.num_etypes} relations, "
                 f"{g.num_ntypes} node types ({info['source']})")
        for dim, dtype in aggs_todo:
            try:
                agg = aggregate_peers(g, gd, dim, dtype, device, cfg.reps)
            except Exception as e:
                agg = {"dim": dim, "dtype": dtype, "impls": {"pigeon": {"status": failure(e)}},
                       "pigeon_slower_than_peer": False}
            agg["graph"] = gname
            aggregations.append(agg)
            progress(f"# aggregation {gname} d{dim} {dtype}: " + "; ".join(
                f"{k_} {v['ms']:.4f} ms" if v.get("ms") else f"{k_} {v['status']}" for k_, v in agg["impls"].items()))
            free(device)
        for model, dim, dtype, mode in todo[gname]:
            k += 1
            case = run_case(g, gd, info, model, dim, dtype, mode, cfg, progress, died)
            case["commit"], case["date"] = meta["commit"], meta["date"]
            cases.append(case)
            progress(f"[{k}/{total}] {case_line(case)}")
            if on_case is not None:
                result["summary"] = build_summary(cases, meta, graphs, cfg, aggregations=aggregations)
                on_case(result)
        del g, gd
        free(device)
    host, note = combine_host(fresh, fresh_note, *host_overhead(cfg.models, dim, device))
    result["host_overhead"] = host
    result["summary"] = build_summary(cases, meta, graphs, cfg, host, note, aggregations=aggregations)
    return result


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def case_line(c: dict) -> str:
    """One progress line for a finished case."""
    head = f"{c['graph']} {c['model']} d{c['dim']} {c['dtype']} {c['mode']}: "
    pig = f"pigeon {_ms(c['pigeon_ms'])}" if c["pigeon_status"] == "ok" else f"pigeon {c['pigeon_status']}"
    best = (f"best peer {c['best_peer']} {_ms(c['best_peer_ms'])}"
            + (f" ({c['speedup_best']:.2f}x)" if c["speedup_best"] else "")) if c["best_peer"] else "no peer ran"
    floor = f"floor {c['floor']['floor_ms'] * 1e3:.3g} us" + (f" (pigeon {c['floor_ratio']:.3g}x)" if c["floor_ratio"] else "")
    extra = ""
    if c.get("host_share") is not None:
        extra += f"; GPU {c['gpu_ms_per_step']:.3f} ms/step (host {c['host_share']:.0%} of pigeon's time)"
    if c.get("aggregate_tbps_min"):
        extra += f"; min aggregation {c['aggregate_tbps_min']:.3g} TB/s"
    t = c.get("tune")
    if t:
        extra += (f"; tune: pick/best {t['ratio']:.3f} ({t['candidates']} candidates)" if t.get("ratio") is not None
                  else f"; tune: {t.get('status')}")
    return f"{head}{pig}; {best}; {floor}; check {c['check']}{extra}"
