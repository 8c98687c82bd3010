"""``pigeon bench gemm``: pigeon's GEMM family against cuBLAS (``torch.matmul``) and torch's grouped GEMM.

Cases (``--quick``: the same cases at small sizes):

- ``gemm-4096``, ``gemm-8192``: ``pigeon.gemm(a, b)`` against ``torch.matmul`` (``matmul``), M = K = N;
- ``gemm-gelu``: the transformer-MLP shape M 16384, K 1024, N 4096 with a GELU epilogue (erf form; no
  bias: pigeon's epilogues cannot load operands yet): ``pigeon.gemm(a, b, epilogue=pigeon.gelu)``,
  fused, against ``torch.matmul`` followed by a separate ``F.gelu`` (``matmul+gelu``);
- ``gemm-bias-gelu``: the same shape with a bias: ``pigeon.gemm(a, b, bias=c, epilogue=gelu(acc + bias))``
  against ``F.gelu(torch.matmul(a, b) + c)`` (``matmul+bias+gelu``);
- ``fp8-8192``: ``pigeon.fp8_gemm`` of float8_e4m3fn operands with per-tensor scales, 8192^3,
  against ``torch._scaled_mm`` (``scaled_mm``; ``b`` column-major as both take it);
- ``fp8-block-4096``: ``pigeon.fp8_gemm`` with 1x128 / 128x128 block scales (DeepSeek-V3 style),
  4096^3, against cuBLAS bf16 (``matmul`` of the operands in bfloat16).
  (the fp8 cases' dtype is the output dtype);
- ``grouped``: 64 problems of 256 x 1024 x 1024, rows of ``a [64*256, 1024]`` by segment offsets and
  ``b [64, 1024, 1024]``: ``pigeon.grouped_gemm(a, b, offsets)`` against ``torch._grouped_mm``
  (``grouped_mm``, where this torch has it), ``torch.bmm`` (the problems are equal-sized, so one
  batched GEMM does them: ``bmm``) and a loop of ``torch.mm`` into one output (``loop``).

Each implementation's first output is checked against the float32 product of the same (rounded)
operands with the epilogue applied in float32 (bfloat16 tolerance of pigeon.bench.check, float16
too), then timed as the attention benchmark is (:func:`pigeon.bench.timing.measure`: median of
``--reps`` calls, CUDA events, ``--timeout`` on the first call, ``--budget`` on the timing, OOM and
errors as statuses, peak memory on a GPU).  FLOPs = 2 M N K per problem (the epilogue's are not
counted); ``vs <peer>`` = the peer's time / pigeon's.  Summary keys of issue 8:
``gemm_vs_cublas_min``, ``gemm_epilogue_vs_cublas_min``, ``grouped_vs_best_peer``, and
``fp8_vs_scaled_mm`` (fp8-8192), ``fp8_blockscaled_vs_bf16`` (fp8-block-4096).  Files in
``--out``: cases.json/.md, summary.json/.md, tflops.png.

    pigeon bench gemm --quick --device cpu --out /tmp/gemm
    pigeon bench gemm --cases gemm-4096,gemm-8192,gemm-gelu,grouped --out benchmarks/results/gemm
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import pigeon as pg

from .check import _close
from .common import (BenchError, FnStep, choose, environment, identity, ratio, resume, run_cases, split, tflops,
                     worst)
from .report import NO_MATPLOTLIB, keyed_summary, meta_lines, pyplot, save_figure, write_files
from .timing import failure, measure

__all__ = ["BenchError", "GemmConfig", "make_config", "run", "run_case", "finish_case", "build_summary",
           "write_results", "cases_table", "summary_markdown", "CASES", "KEYS"]

# name -> (kind, G, M, K, N): G problems of M x K @ K x N
CASES = {"gemm-4096": ("gemm", 1, 4096, 4096, 4096), "gemm-8192": ("gemm", 1, 8192, 8192, 8192),
         "gemm-gelu": ("gelu", 1, 16384, 1024, 4096), "gemm-bias-gelu": ("bias_gelu", 1, 16384, 1024, 4096),
         "grouped": ("grouped", 64, 256, 1024, 1024), "fp8-8192": ("fp8", 1, 8192, 8192, 8192),
         "fp8-block-4096": ("fp8_block", 1, 4096, 4096, 4096)}
QUICK = {"gemm-4096": ("gemm", 1, 128, 128, 128), "gemm-8192": ("gemm", 1, 256, 256, 256),
         "gemm-gelu": ("gelu", 1, 256, 64, 128), "gemm-bias-gelu": ("bias_gelu", 1, 256, 64, 128),
         "grouped": ("grouped", 8, 32, 64, 64), "fp8-8192": ("fp8", 1, 128, 256, 128),
         "fp8-block-4096": ("fp8_block", 1, 128, 256, 256)}
PEERS = ("matmul", "grouped_mm", "bmm", "loop", "scaled_mm")
DTYPES = ("bfloat16", "float16")
KEYS = ("gpu", "commit", "date", "command", "gemm_vs_cublas_min", "gemm_epilogue_vs_cublas_min",
        "grouped_vs_best_peer", "fp8_vs_scaled_mm", "fp8_blockscaled_vs_bf16")
META = ("gpu", "device", "torch", "pigeon", "commit", "date", "command")


@dataclass
class GemmConfig:
    cases: tuple[str, ...]
    dtypes: tuple[str, ...]
    peers: tuple[str, ...]
    device: torch.device
    reps: int
    warmup: int
    timeout: float
    budget: float
    quick: bool
    out: str
    resume: bool = False

    def shape(self, name: str) -> tuple:
        return (QUICK if self.quick else CASES)[name]

    def specs(self) -> list[tuple]:
        return [(name, dtype) + self.shape(name) for name in self.cases for dtype in self.dtypes]

    def command(self) -> str:
        argv = ["pigeon", "bench", "gemm", "--cases", ",".join(self.cases), "--dtypes", ",".join(self.dtypes),
                "--peers", ",".join(self.peers) or "none", "--device", self.device.type, "--reps", str(self.reps),
                "--timeout", f"{self.timeout:g}", "--budget", f"{self.budget:g}", "--out", self.out]
        return shlex.join(argv + (["--quick"] if self.quick else []) + (["--resume"] if self.resume else []))


def make_config(*, cases=None, dtypes=None, peers=None, device="cpu", reps=None, timeout=None, budget=None,
                quick=False, out="benchmarks/results/gemm", resume=False) -> GemmConfig:
    """Check every choice first (BenchError, one line); ``--quick``: the same cases at small sizes, 3 reps."""
    device = torch.device(device)
    names = choose("--cases", split(cases) or tuple(CASES), tuple(CASES))
    peer_arg = split(peers)
    peer_list = () if peer_arg == ("none",) else choose("--peers", peer_arg or PEERS, PEERS)
    reps = (3 if quick else 20) if reps is None else int(reps)
    if reps < 1:
        raise BenchError(f"--reps {reps}: give a positive number of timed repetitions")
    t = 300.0 if timeout is None else float(timeout)
    b = (10.0 if quick else 30.0) if budget is None else float(budget)
    for flag, v in (("--timeout", t), ("--budget", b)):
        if not v > 0:
            raise BenchError(f"{flag} {v:g}: give a positive number of seconds")
    return GemmConfig(names, choose("--dtypes", split(dtypes) or ("bfloat16",), DTYPES), peer_list, device, reps,
                      max(1, min(3, reps // 5)), t, b, bool(quick), str(out), bool(resume))


# ---------------------------------------------------------------------------------------- one case

def case_key(c) -> tuple:
    if isinstance(c, dict):
        return (c["case"], c["dtype"], c["kind"], c["G"], c["M"], c["K"], c["N"])
    return tuple(c)


def _gelu(acc):
    return pg.gelu(acc)


def _impls(kind: str, G: int, a, b, offsets, peers, extra=None) -> list[tuple[str, str, Callable | None]]:
    """(name, kind, fn(a, b) or None with the reason in the kind's place) of pigeon and the peers."""
    rows = []
    extra = extra or {}
    if kind in ("fp8", "fp8_block"):
        sa, sb, odt = extra["scale_a"], extra["scale_b"], extra["out_dtype"]
        rows.append(("pigeon", "pigeon", lambda a, b: pg.fp8_gemm(a, b, sa, sb, out_dtype=odt)))
        if kind == "fp8" and "scaled_mm" in peers:
            if hasattr(torch, "_scaled_mm") and a.is_cuda:
                rows.append(("scaled_mm", "cublas", lambda a, b: torch._scaled_mm(a, b, sa, sb, out_dtype=odt)))
            else:
                rows.append(("scaled_mm", "n/a: torch._scaled_mm needs a CUDA device", None))
        if kind == "fp8_block" and "matmul" in peers:
            from ..fp8_scales import BLOCK, dequantize      # the dequantized operands, in bf16
            a16 = dequantize(a, sa, 1, BLOCK).to(torch.bfloat16)
            b16 = dequantize(b, sb, BLOCK, BLOCK).to(torch.bfloat16)
            rows.append(("matmul bf16", "cublas", lambda a, b: torch.matmul(a16, b16)))
    elif kind == "bias_gelu":
        c = extra["bias"]
        rows.append(("pigeon", "pigeon", lambda a, b: pg.gemm(a, b, bias=c, epilogue=lambda acc, bias: pg.gelu(acc + bias))))
        if "matmul" in peers:
            rows.append(("matmul+bias+gelu", "cublas", lambda a, b: F.gelu(torch.matmul(a, b) + c)))
    elif kind == "gemm":
        rows.append(("pigeon", "pigeon", lambda a, b: pg.gemm(a, b)))
        if "matmul" in peers:
            rows.append(("matmul", "cublas", torch.matmul))
    elif kind == "gelu":
        rows.append(("pigeon", "pigeon", lambda a, b: pg.gemm(a, b, epilogue=_gelu)))
        if "matmul" in peers:
            rows.append(("matmul+gelu", "cublas", lambda a, b: F.gelu(torch.matmul(a, b))))
    else:
        M = a.shape[0] // G
        rows.append(("pigeon", "pigeon", lambda a, b: pg.grouped_gemm(a, b, offsets)))
        if "grouped_mm" in peers:
            if hasattr(torch, "_grouped_mm"):
                ends = offsets[1:].contiguous()
                rows.append(("grouped_mm", "grouped_mm", lambda a, b: torch._grouped_mm(a, b, offs=ends)))
            else:
                rows.append(("grouped_mm", "n/a: this torch has no torch._grouped_mm", None))
        if "bmm" in peers:
            rows.append(("bmm", "bmm", lambda a, b: torch.bmm(a.view(G, M, -1), b).view(G * M, -1)))
        if "loop" in peers:
            def loop(a, b):
                out = torch.empty(a.shape[0], b.shape[2], dtype=a.dtype, device=a.device)
                for g in range(G):
                    torch.mm(a[g * M:(g + 1) * M], b[g], out=out[g * M:(g + 1) * M])
                return out
            rows.append(("loop", "loop", loop))
    return rows


def run_case(spec: tuple, cfg: GemmConfig) -> dict:
    name, dtype, kind, G, M, K, N = spec
    device = cfg.device
    case = {"case": name, "dtype": dtype, "kind": kind, "G": G, "M": M, "K": K, "N": N, "device": str(device),
            "flops": 2.0 * G * M * N * K, "check_what": "the whole output against the float32 product of the same "
            "operands" + (", GELU in float32" if kind == "gelu" else "")}
    gen = torch.Generator(device=device).manual_seed(0)
    tdt = getattr(torch, dtype)
    extra = {}
    if kind in ("fp8", "fp8_block"):
        fp8 = torch.float8_e4m3fn
        a = torch.randn(M, K, generator=gen, device=device).to(fp8)
        b = torch.randn(N, K, generator=gen, device=device).to(fp8).t()      # column-major [K, N]
        if kind == "fp8":
            sa, sb = torch.tensor(1.0, device=device), torch.tensor(K ** -0.5, device=device)
        else:
            sa = torch.ones(M, -(-K // 128), device=device)
            sb = torch.full((-(-K // 128), -(-N // 128)), K ** -0.5, device=device)
        extra = {"scale_a": sa, "scale_b": sb, "out_dtype": tdt}
        case["check_what"] = "the whole output against the float32 product of the dequantized operands"
    else:
        a = torch.randn(G * M, K, generator=gen, device=device).to(tdt)
        b = (torch.randn(G, K, N, generator=gen, device=device) if kind == "grouped"
             else torch.randn(K, N, generator=gen, device=device)).to(tdt) / K ** 0.5
        if kind == "bias_gelu":
            extra["bias"] = torch.randn(N, generator=gen, device=device).to(tdt)
    offsets = torch.arange(G + 1, dtype=torch.int32, device=device) * M
    want = {}

    def reference():
        if "out" not in want:
            if kind in ("fp8", "fp8_block"):
                from ..fp8_scales import BLOCK, dequantize
                blk = BLOCK if kind == "fp8_block" else 1
                want["out"] = dequantize(a, extra["scale_a"], 1, blk) @ dequantize(b, extra["scale_b"], blk, blk)
                return want["out"]
            af, bf = a.float(), b.float()
            w = torch.bmm(af.view(G, M, K), bf).view(G * M, N) if kind == "grouped" else af @ bf
            if kind == "bias_gelu":
                w = w + extra["bias"].float()
            want["out"] = F.gelu(w) if kind in ("gelu", "bias_gelu") else w
        return want["out"]
    checks = {}

    def checker(impl):
        def after_first(step):
            try:
                checks[impl] = _close("out", step.first, reference(), "bfloat16") or "ok"
                if checks[impl] != "ok":
                    checks[impl] = "FAILED: " + checks[impl]
            except Exception as e:
                checks[impl] = f"not run: reference {failure(e)}"
            step.first = None
        return after_first
    rows = []
    for impl, ikind, fn in _impls(kind, G, a, b, offsets, cfg.peers, extra):
        if fn is None:
            rows.append({"impl": impl, "kind": "peer", "status": ikind, "median_ms": None})
            continue
        row = measure(impl, ikind, lambda fn=fn: FnStep(fn, (a, b), "forward"), None, "forward", device,
                      warmup=cfg.warmup, reps=cfg.reps, timeout=cfg.timeout, budget_s=cfg.budget,
                      after_first=checker(impl), step_of=identity)
        if impl in checks:
            row["check"] = checks[impl]
        rows.append(row)
    case["impls"] = rows
    case["check"] = checks.get("pigeon", "n/a: pigeon did not run")
    return finish_case(case)


def finish_case(case: dict) -> dict:
    rows = case["impls"]
    ok = [r for r in rows if r["status"] == "ok" and r.get("median_ms")]
    for r in rows:
        r["tflops"] = tflops(case["flops"], r["median_ms"]) if r in ok else None
    pig = next((r for r in ok if r["kind"] == "pigeon"), None)
    t = pig["median_ms"] if pig else None
    prow = next((r for r in rows if r["kind"] == "pigeon"), {})
    case.update(pigeon_status=prow.get("status", "missing"), pigeon_ms=t, pigeon_tflops=pig["tflops"] if pig else None,
                pigeon_peak_mib=prow.get("peak_mib"))
    peers = [r for r in ok if r["kind"] != "pigeon"]
    case["vs"] = {r["impl"]: ratio(r["median_ms"], t) for r in peers}
    best = min(peers, key=lambda r: r["median_ms"]) if peers else None
    case["best_peer"] = best["impl"] if best else None
    case["best_peer_ms"] = best["median_ms"] if best else None
    case["speedup_best"] = ratio(case["best_peer_ms"], t)
    return case


# ---------------------------------------------------------------------------------------- summary

def label(c: dict) -> str:
    shape = f"{c['G']} x " if c["G"] > 1 else ""
    return f"{c['case']} {shape}{c['M']}x{c['K']}x{c['N']} {c['dtype']}"


def _key(s: dict, key: str, cases: list[dict], what: str, target: str) -> None:
    v, where = worst(cases, "speedup_best", label)
    s[key] = v
    if v is None:
        fails = "; ".join(sorted({f"{r['impl']} {r['status']}" for c in cases for r in c["impls"] if r["status"] != "ok"}))
        s[f"{key}_note"] = ("not measurable: " + (f"no {what} case was run" if not cases else
                            f"no {what} case has pigeon and a peer timed") + (f" ({fails})" if fails else ""))
    else:
        s[f"{key}_case"] = where
        s[f"{key}_note"] = (f"best peer's time / pigeon's (= pigeon's TFLOP/s / the peer's), the worst of "
                            f"{sum(1 for c in cases if c['speedup_best'])} {what} cases; target {target}")


def build_summary(result: dict) -> dict:
    cases, meta = result["cases"], result["meta"]
    s = {k: meta[k] for k in ("gpu", "commit", "date", "command", "device", "torch")}
    if meta.get("commands"):
        s["commands"] = meta["commands"]
    _key(s, "gemm_vs_cublas_min", [c for c in cases if c["kind"] == "gemm"], "plain GEMM (vs torch.matmul)", ">= 0.85")
    _key(s, "gemm_epilogue_vs_cublas_min", [c for c in cases if c["kind"] in ("gelu", "bias_gelu")],
         "GELU-epilogue (vs torch.matmul (+ bias) + F.gelu)", ">= 1.2")
    _key(s, "grouped_vs_best_peer", [c for c in cases if c["kind"] == "grouped"],
         "grouped GEMM (vs the best of torch._grouped_mm, bmm, a loop)", ">= 1.5")
    _key(s, "fp8_vs_scaled_mm", [c for c in cases if c["kind"] == "fp8"],
         "fp8 per-tensor (vs torch._scaled_mm)", ">= 0.9")
    _key(s, "fp8_blockscaled_vs_bf16", [c for c in cases if c["kind"] == "fp8_block"],
         "fp8 1x128/128x128 block-scaled (vs cuBLAS bf16)", ">= 1.2")
    s["cases_total"] = len(cases)
    s["cases_check_failed"] = [f"{label(c)}: {r['impl']}" for c in cases for r in c["impls"]
                               if str(r.get("check", "")).startswith("FAILED")]
    s["failures"] = [f"{label(c)}: {r['impl']} {r['status']}" for c in cases for r in c["impls"] if r["status"] != "ok"]
    s["pigeon_first_call_s"] = {label(c): r.get("first_call_s") for c in cases for r in c["impls"] if r["kind"] == "pigeon"}
    s["plot"] = "pending: written at the end of the run"
    return s


def case_line(c: dict) -> str:
    pig = (f"pigeon {c['pigeon_ms']:.3f} ms ({c['pigeon_tflops']:.3g} TFLOP/s)" if c["pigeon_ms"]
           else f"pigeon {c['pigeon_status']}")
    best = (f"best peer {c['best_peer']} {c['best_peer_ms']:.3f} ms" + (f" ({c['speedup_best']:.2f}x)" if c["speedup_best"] else "")
            if c["best_peer"] else "no peer ran")
    return f"{label(c)}: {pig}; {best}; check {c['check']}"


def run(cfg: GemmConfig, progress: Callable[[str], None] = lambda m: None,
        on_case: Callable[[dict], None] | None = None, previous: dict | None = None) -> dict:
    device = cfg.device
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    meta = environment(device, cfg.command(), reps=cfg.reps, warmup=cfg.warmup, timeout_s=cfg.timeout,
                       budget_s=cfg.budget)
    result = {"meta": meta, "cases": resume(previous, meta, device, cfg.out)}
    return run_cases(cfg.specs(), case_key, lambda spec: run_case(spec, cfg), case_line, result, build_summary,
                     progress, on_case, cfg.out, device)


# ---------------------------------------------------------------------------------------- files

def _n(v, spec=".3f") -> str:
    return "" if v is None else format(v, spec)


def cases_table(cases: list[dict]) -> list[str]:
    lines = ["| case | G | M x K x N | dtype | pigeon ms | pigeon TFLOP/s | best peer | best peer ms | best peer TFLOP/s "
             "| vs best | pigeon peak MiB | check | peers: ms (TFLOP/s, vs) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        best = next((r for r in c["impls"] if r["impl"] == c["best_peer"]), {})
        peers = "; ".join(f"{r['impl']} {r['median_ms']:.3f} ({_n(r['tflops'], '.3g')}, {_n(c['vs'].get(r['impl']), '.2f')}x)"
                          if r["status"] == "ok" and r.get("median_ms") else f"{r['impl']} {r['status']}"
                          for r in c["impls"] if r["kind"] != "pigeon")
        pig = _n(c["pigeon_ms"]) if c["pigeon_ms"] else c["pigeon_status"]
        vs = "" if c["speedup_best"] is None else f"{c['speedup_best']:.2f}x"
        lines.append(f"| {c['case']} | {c['G']} | {c['M']}x{c['K']}x{c['N']} | {c['dtype']} | {pig} "
                     f"| {_n(c['pigeon_tflops'], '.3g')} | {c['best_peer'] or ''} | {_n(c['best_peer_ms'])} "
                     f"| {_n(best.get('tflops'), '.3g')} | {vs} | {_n(c['pigeon_peak_mib'], '.1f')} | {c['check']} "
                     f"| {peers} |".replace("\n", " "))
    return lines


def cases_markdown(result: dict) -> str:
    lines = ["# pigeon bench gemm: cases", "", *meta_lines(result["meta"], META), "", *cases_table(result["cases"]), "",
             "Times are medians in ms (CUDA events on a GPU); TFLOP/s = 2 G M N K / time; vs = the peer's time / "
             "pigeon's (above 1: pigeon faster). Each output is checked against the float32 product first."]
    return "\n".join(lines) + "\n"


def summary_markdown(result: dict) -> str:
    return keyed_summary("pigeon bench gemm", result, META, KEYS, skip=("commands",))


def plot_tflops(cases: list[dict], path: Path) -> str:
    """tflops.png: TFLOP/s of pigeon and of each peer per case, side by side."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    impls = list(dict.fromkeys(r["impl"] for c in cases for r in c["impls"]))
    if not any(r.get("tflops") for c in cases for r in c["impls"]):
        return "skipped: no case was timed"
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cases) + 2), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, c in enumerate(cases):
            r = next((r for r in c["impls"] if r["impl"] == impl), None)
            if r is not None and r.get("tflops"):
                xs.append(j + (i - (len(impls) - 1) / 2) * width)
                ys.append(r["tflops"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([label(c) for c in cases], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("TFLOP/s")
    ax.set_title("pigeon GEMM vs its peers")
    ax.legend(fontsize=8)
    return save_figure(plt, fig, path)


def write_results(out, result: dict, plot: bool = True) -> str | None:
    return write_files(out, result, plot=plot, plot_fn=plot_tflops, plot_name="tflops.png", cases_md=cases_markdown,
                       summary_md=summary_markdown)
