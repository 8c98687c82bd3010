"""``pigeon bench attention``: pigeon's attention kernels against SDPA and FlexAttention.

A case is (variant, B, H, S, D, dtype, mode); the variants are
:mod:`pigeon.bench.attn_variants`' (dense, causal, sliding window, S2 shards, ALiBi, soft-capping,
packed documents, top-k blocks with GQA group 2 and 4).  In each case, on the same seeded inputs
in one process (:mod:`pigeon.bench.attn_peers`):

- ``pigeon``: ``pigeon.attention.attention(q, k, v, ..., backend="kernels")`` (on a GPU its SIMT
  kernels, forward and backward; on a CPU the reference semantics unless
  ``PIGEON_CPU_BACKEND=emulate``: the case record's ``pigeon_runs`` says which);
- ``sdpa:<backend>``: ``F.scaled_dot_product_attention`` under ``sdpa_kernel([backend])``, one row
  per backend: flash and cuDNN for dense and causal, the memory-efficient backend with a dense
  ``attn_mask`` for the masked variants (the mask, and K/V expanded for GQA, built outside the
  timed region); n/a for soft-capping; on a CPU torch's own choice;
- ``flex``: ``torch.compile(flex_attention, dynamic=False)`` with the same semantics written as
  Flex score_mod / mask_mod; its BlockMask is built by ``create_block_mask`` before it, timed apart
  (``block_mask_first_s``, ``block_mask_s``), and its compile time is its first call
  (``compile_s``).  On a CPU it is n/a unless ``--peers`` names it (each compile takes ~13 s there);
  ``flex-eager`` (uncompiled) checks the Flex semantics on any device.

Every implementation's first call is checked against the float64 reference on a slice
(:mod:`pigeon.bench.attn_check` says which slice and why it is exact); ``check`` is pigeon's, each
row has its own.  Then it is timed: the median of ``--reps`` calls after warm-up (CUDA events on a
GPU; timing stops after ``--budget`` seconds, after at least one timed call), and on a GPU the peak
memory of one call beyond what was allocated before it.  A first call (build + run) longer than
``--timeout`` is ``timeout``, running out of memory ``OOM``, any other failure ``error: ...``; an
implementation that timed out or ran out of memory is ``skipped: ...`` at the longer sequences of
the same (variant, B, H, D, dtype, mode).

FLOPs: ``4 B H S^2 D`` times the variant's kept fraction of (query, key) pairs forward, 3.5 times
that forward+backward (the backward counts 2.5 times the forward), the same count for every
implementation; TFLOP/s = FLOPs / median time; ``vs <peer>`` = the peer's time / pigeon's (= pigeon's
TFLOP/s / the peer's; above 1 pigeon is faster).  Files in ``--out`` (rewritten after every case;
``--resume`` keeps the cases already there): cases.json/.md, summary.json/.md, tflops.png
(:mod:`pigeon.bench.attn_report`).  The summary has the keys of issue 8's summary file; the GEMM
keys are copied from ``pigeon bench gemm``'s summary.json (``--gemm-summary``, default
``<out>/../gemm/summary.json``) when there is one.

    pigeon bench attention --quick --device cpu --out /tmp/attn
    pigeon bench attention --variants dense,causal --seq-lens 1024,4096 --head-dims 128 --modes forward
"""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import attn_report as R
from . import attn_variants as V
from .attn_check import Reference
from .attn_peers import MODES, PEER_KINDS, peers_for, pigeon_runs, pigeon_step
from .common import (BenchError, choose, environment, identity, positive_ints, ratio, resume, run_cases, split,
                     tflops, worst)
from .timing import failure, measure, sync, time_limit

__all__ = ["BenchError", "Config", "make_config", "run", "run_case", "finish_case", "build_summary", "case_line",
           "write_results", "cases_table", "summary_markdown", "ISSUE_KEYS", "GEMM_KEYS", "VARIANTS", "MODES"]

VARIANTS = V.VARIANTS
DTYPES = ("bfloat16", "float16")
DEFAULT_SEQ = (1024, 2048, 4096, 8192, 16384)
EXTRA_SEQ = {"causal": (32768,), "s2": (32768,)}       # S2's target is at 32k, against dense causal
DEFAULTS = dict(batch=4, heads=32, head_dims=(128, 64), window=1024, reps=20)
QUICK = dict(batch=1, heads=4, seq_lens=(256,), head_dims=(64,), window=128, reps=3, budget=10.0)
HEAD_DIMS = (64, 128)                                  # pigeon's kernels
DEFAULT_TIMEOUT, DEFAULT_BUDGET = 300.0, 60.0
GEMM_KEYS = ("gemm_vs_cublas_min", "gemm_epilogue_vs_cublas_min", "grouped_vs_best_peer", "fp8_vs_scaled_mm",
             "fp8_blockscaled_vs_bf16")
ISSUE_KEYS = ("gpu", "commit", "date", "command", "dense_fwd_vs_sdpa", "dense_fwdbwd_vs_sdpa",
              "masked_fwd_vs_flex_min", "masked_fwdbwd_vs_flex_min", "s2_speedup_vs_dense",
              "topk_gqa_vs_flex_min") + GEMM_KEYS


@dataclass
class Config:
    variants: tuple[str, ...]
    seq_lens: tuple[int, ...] | None        # None: DEFAULT_SEQ (+ EXTRA_SEQ)
    batch: int
    heads: int
    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    peers: tuple[str, ...]
    peers_given: bool
    device: torch.device
    reps: int
    warmup: int
    timeout: float
    budget: float
    window: int
    out: str
    resume: bool = False
    gemm_summary: str | None = None

    def seqs(self, variant: str) -> tuple[int, ...]:
        return self.seq_lens or DEFAULT_SEQ + EXTRA_SEQ.get(variant, ())

    def specs(self) -> list[tuple]:
        """(variant, B, H, S, D, dtype, mode) of every case, in run order."""
        return [(v, self.batch, self.heads, s, d, t, m) for v in self.variants for d in self.head_dims
                for t in self.dtypes for s in self.seqs(v) for m in self.modes]

    def command(self) -> str:
        argv = ["pigeon", "bench", "attention", "--variants", ",".join(self.variants)]
        if self.seq_lens is not None:
            argv += ["--seq-lens", ",".join(map(str, self.seq_lens))]
        argv += ["--batch", str(self.batch), "--heads", str(self.heads), "--head-dims", ",".join(map(str, self.head_dims)),
                 "--dtypes", ",".join(self.dtypes), "--modes", ",".join(self.modes)]
        if self.peers_given:         # (without it, compiled Flex on a CPU is n/a: keep that when repeated)
            argv += ["--peers", ",".join(self.peers) or "none"]
        argv += ["--window", str(self.window), "--device", self.device.type,
                 "--reps", str(self.reps), "--timeout", f"{self.timeout:g}", "--budget", f"{self.budget:g}",
                 "--out", self.out]
        if self.gemm_summary:
            argv += ["--gemm-summary", self.gemm_summary]
        return shlex.join(argv + (["--resume"] if self.resume else []))


def _one_int(flag: str, value, default: int) -> int:
    if value is None:
        return default
    try:
        v = int(str(value))
    except ValueError:
        v = 0
    if v <= 0:
        raise BenchError(f"{flag} {value}: give a positive integer")
    return v


def _positive(flag: str, value, default: float) -> float:
    v = default if value is None else float(value)
    if not v > 0:
        raise BenchError(f"{flag} {value}: give a positive number of seconds")
    return v


def make_config(*, variants=None, seq_lens=None, batch=None, heads=None, head_dims=None, dtypes=None, modes=None,
                peers=None, device="cpu", reps=None, timeout=None, budget=None, window=None, quick=False,
                out="benchmarks/results/attention", resume=False, gemm_summary=None) -> Config:
    """Check every choice before any work (BenchError, one line, naming the flag); ``--quick``
    changes only the defaults (B 1, H 4, S 256, D 64, window 128, 3 reps, 10 s budget)."""
    device = torch.device(device)
    d = {**DEFAULTS, **(QUICK if quick else {})}
    var = choose("--variants", split(variants) or VARIANTS, VARIANTS)
    seqs = positive_ints("--seq-lens", seq_lens, d.get("seq_lens")) if (seq_lens is not None or quick) else None
    for s in seqs or ():
        if s % V.SEQ_MULTIPLE:
            raise BenchError(f"--seq-lens {s}: give multiples of {V.SEQ_MULTIPLE} (top-k and S2 blocks, documents)")
    B = _one_int("--batch", batch, d["batch"])
    H = _one_int("--heads", heads, d["heads"])
    for v in var:
        if H % V.group_of(v):
            raise BenchError(f"--heads {H}: {v} has GQA group {V.group_of(v)}, so the heads must be a multiple of it")
    dims = positive_ints("--head-dims", head_dims, d["head_dims"])
    bad = [x for x in dims if x not in HEAD_DIMS]
    if bad:
        raise BenchError(f"--head-dims {head_dims}: pigeon's attention kernels take head dims {HEAD_DIMS}, not {bad}")
    peer_arg = split(peers)
    peer_list = () if peer_arg == ("none",) else choose("--peers", peer_arg or ("sdpa", "flex"), PEER_KINDS)
    reps = _one_int("--reps", reps, d["reps"])
    return Config(var, seqs, B, H, dims, choose("--dtypes", split(dtypes) or ("bfloat16",), DTYPES),
                  choose("--modes", split(modes) or MODES, MODES), peer_list, peer_arg is not None, device, reps,
                  max(1, min(3, reps // 5)), _positive("--timeout", timeout, DEFAULT_TIMEOUT),
                  _positive("--budget", budget, d.get("budget", DEFAULT_BUDGET)),
                  _one_int("--window", window, d["window"]), str(out), bool(resume), gemm_summary)


# ---------------------------------------------------------------------------------------- one case

def case_key(c) -> tuple:
    if isinstance(c, dict):
        return (c["variant"], c["B"], c["H"], c["S"], c["D"], c["dtype"], c["mode"])
    return tuple(c)


def _gave_up(earlier: list[dict], spec: tuple, impl: str) -> str | None:
    """"skipped: ..." when ``impl`` timed out or ran out of memory on a shorter sequence of the
    same (variant, B, H, D, dtype, mode) (it would again, and take the time: a 10-minute command
    does not wait for it)."""
    variant, B, H, S, D, dtype, mode = spec
    for c in earlier:
        if (c["variant"], c["B"], c["H"], c["D"], c["dtype"], c["mode"]) != (variant, B, H, D, dtype, mode) or c["S"] >= S:
            continue
        for r in c["impls"]:
            if r["impl"] == impl and r["status"] in ("timeout", "OOM"):
                return f"skipped: {r['status']} at S {c['S']}"
            if r["impl"] == impl and r["status"].startswith("skipped:"):
                return r["status"]
    return None


def run_case(spec: tuple, cfg: Config, earlier: list[dict] = ()) -> dict:
    """One case: pigeon, then every peer, each built, checked on its first call, timed (an
    implementation that timed out or ran out of memory on a shorter sequence of ``earlier`` cases
    is skipped)."""
    variant, B, H, S, D, dtype, mode = spec
    device = cfg.device
    case = {"variant": variant, "pattern": V.describe(variant, cfg.window), "B": B, "H": H,
            "H_kv": H // V.group_of(variant), "S": S, "D": D, "dtype": dtype, "mode": mode, "device": str(device),
            "kept_fraction": V.kept_fraction(variant, H, S, cfg.window),
            "flops": V.flops(variant, B, H, S, D, mode, cfg.window), "pigeon_runs": pigeon_runs(device)}
    try:
        p = V.make_problem(variant, B, H, S, D, getattr(torch, dtype), device, cfg.window)
        case["pigeon_runs"] = pigeon_runs(device, p)
        ref = Reference(p, mode)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        case["impls"] = [{"impl": "pigeon", "kind": "pigeon", "status": f"not run: inputs {failure(e)}",
                          "median_ms": None}]
        case["check"] = "not run: no inputs"
        return finish_case(case)
    case["check_what"] = ref.what
    timing = dict(warmup=cfg.warmup, reps=cfg.reps, timeout=cfg.timeout, budget_s=cfg.budget, step_of=identity)
    checks = {}

    def checker(name):
        def after_first(step):
            try:
                checks[name] = ref.compare(step.results())
            except Exception as e:     # the reference itself failed: the check did not happen
                checks[name] = f"not run: reference {failure(e)}"
            step.first = None
        return after_first

    def timed(name, kind, make):
        gave_up = _gave_up(earlier, spec, name)
        if gave_up:
            return {"impl": name, "kind": kind, "status": gave_up, "median_ms": None}
        row = measure(name, kind, make, None, mode, device, after_first=checker(name), **timing)
        try:
            sync(device)                   # a timed-out implementation's queued work ends here
        except Exception:
            pass
        return row

    rows = [timed("pigeon", "pigeon", lambda: pigeon_step(p, mode, ref.grad_out))]
    for peer in peers_for(p, mode, ref.grad_out, device, cfg.peers, cfg.peers_given):
        if peer.na is not None:
            rows.append({"impl": peer.name, "kind": peer.kind, "status": f"n/a: {peer.na}", "median_ms": None})
            continue
        extra = {}
        if peer.prepare is not None and not _gave_up(earlier, spec, peer.name):
            t0 = time.perf_counter()
            try:
                with time_limit(cfg.timeout):
                    extra = peer.prepare()
            except BaseException as e:
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                rows.append({"impl": peer.name, "kind": peer.kind, "status": failure(e), "median_ms": None,
                             "note": f"building the block mask failed after {time.perf_counter() - t0:.1f} s"})
                continue
        row = timed(peer.name, peer.kind, peer.make)
        row.update(extra)
        for k in ("note", "backend"):
            if getattr(peer, k):
                row[k] = getattr(peer, k)
        rows.append(row)
    for r in rows:
        if r["impl"] in checks:
            r["check"] = checks[r["impl"]]
    case["impls"] = rows
    case["check"] = checks.get("pigeon", "n/a: pigeon did not run")
    return finish_case(case)


def _ok(r) -> bool:
    return r["status"] == "ok" and bool(r.get("median_ms"))


def finish_case(case: dict) -> dict:
    """The derived numbers of a case from its rows: TFLOP/s of each, pigeon's ratio to each peer,
    to the best SDPA backend (vs_sdpa), to compiled Flex (vs_flex) and to the best peer."""
    rows = case["impls"]
    for r in rows:
        r["tflops"] = tflops(case["flops"], r.get("median_ms")) if _ok(r) else None
    pig = next((r for r in rows if r["kind"] == "pigeon"), None)
    t = pig["median_ms"] if pig is not None and _ok(pig) else None
    case["pigeon_status"] = pig["status"] if pig is not None else "missing"
    case["pigeon_ms"], case["pigeon_tflops"] = t, pig.get("tflops") if pig is not None else None
    case["pigeon_peak_mib"] = pig.get("peak_mib") if pig is not None else None
    peers = [r for r in rows if r["kind"] != "pigeon" and _ok(r)]
    case["vs"] = {r["impl"]: ratio(r["median_ms"], t) for r in peers}
    sdpa = [r for r in peers if r["kind"] == "sdpa"]
    best_sdpa = min(sdpa, key=lambda r: r["median_ms"]) if sdpa else None
    case["sdpa_best"] = best_sdpa["impl"] if best_sdpa else None
    case["sdpa_ms"] = best_sdpa["median_ms"] if best_sdpa else None
    case["vs_sdpa"] = ratio(case["sdpa_ms"], t)
    flex = next((r for r in peers if r["impl"] == "flex"), None)
    case["flex_ms"] = flex["median_ms"] if flex else None
    case["vs_flex"] = ratio(case["flex_ms"], t)
    timed = [r for r in peers if r["kind"] != "flex-eager"]          # flex-eager: semantics only
    best = min(timed, key=lambda r: r["median_ms"]) if timed else None
    case["best_peer"] = best["impl"] if best else None
    case["best_peer_ms"] = best["median_ms"] if best else None
    case["speedup_best"] = ratio(case["best_peer_ms"], t)
    return case


# ---------------------------------------------------------------------------------------- summary

def label(c: dict) -> str:
    return f"{c['variant']} B{c['B']} H{c['H']} S{c['S']} D{c['D']} {c['dtype']} {c['mode']}"


def _statuses(cases: list[dict], impl_kind: str) -> str:
    seen = {}
    for c in cases:
        for r in c["impls"]:
            if (r["kind"] == impl_kind or r["impl"].startswith(impl_kind + ":")) and r["status"] != "ok":
                seen[r["status"]] = seen.get(r["status"], 0) + 1
    return "; ".join(f"{s} (x{n})" for s, n in seen.items())


def _worst_key(s: dict, key: str, cases: list[dict], field: str, what: str, peer: str, target: str) -> None:
    v, where = worst(cases, field, label)
    s[key] = v
    if v is None:
        why = _statuses(cases, "sdpa" if peer == "SDPA" else "compile") if cases else ""
        pig = _statuses(cases, "pigeon")
        missing = f"no {what} case was run" if not cases else f"no {what} case has both pigeon and {peer} timed"
        s[f"{key}_note"] = (f"not measurable: {missing}" + (f"; {peer}: {why}" if why else "")
                            + (f"; pigeon: {pig}" if pig else ""))
    else:
        s[f"{key}_case"] = where
        s[f"{key}_note"] = (f"{peer} time / pigeon time (= pigeon's TFLOP/s / {peer}'s), the worst of "
                            f"{sum(1 for c in cases if c.get(field) is not None)} {what} cases; target {target}")


def _by(cases, *, variants, mode=None):
    return [c for c in cases if c["variant"] in variants and (mode is None or c["mode"] == mode)]


def _same_shape(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("B", "H", "S", "D", "dtype", "mode"))


def _s2_speedup(s: dict, cases: list[dict]) -> None:
    pairs = [(c, d) for c in _by(cases, variants=("s2",), mode="forward") for d in _by(cases, variants=("causal",))
             if _same_shape(c, d) and c["pigeon_ms"] and d["pigeon_ms"]]
    if not pairs:
        s["s2_speedup_vs_dense"] = None
        s["s2_speedup_vs_dense_note"] = ("not measurable: needs pigeon's s2 and causal forward timed at the same "
                                         "shape (run both variants)")
        return
    c, d = max(pairs, key=lambda t: (t[0]["S"], t[0]["D"]))
    s["s2_speedup_vs_dense"] = d["pigeon_ms"] / c["pigeon_ms"]
    s["s2_speedup_vs_dense_case"] = label(c)
    s["s2_speedup_vs_dense_note"] = (f"pigeon's dense causal time / its S2 time (stride {V.S2_STRIDE}), forward, at "
                                     f"the longest sequence measured (S {c['S']}); target >= 5x at 32k"
                                     + ("" if c["S"] >= 32768 else " (not reached: S < 32k here)"))


def _window_vs_dense(s: dict, cases: list[dict]) -> None:
    vals = [(c["pigeon_ms"] / (d["pigeon_ms"] * c["kept_fraction"]), label(c))
            for c in _by(cases, variants=("window",)) for d in _by(cases, variants=("dense",))
            if _same_shape(c, d) and c["pigeon_ms"] and d["pigeon_ms"]]
    s["window_vs_scaled_dense_max"] = max(vals)[0] if vals else None
    s["window_vs_scaled_dense_max_note"] = (
        f"pigeon's window time / (its dense time x the window's kept fraction), the largest of {len(vals)} shapes"
        f" ({max(vals)[1]}); target <= 1.3" if vals else "not measurable: needs pigeon's window and dense variants "
        "timed at the same shapes")


def _compile_times(cases: list[dict]) -> dict:
    out = {}
    for c in sorted(cases, key=lambda c: c["S"]):
        v = f"{c['variant']} {c['mode']}"
        if v in out:
            continue
        rows = {r["impl"]: r for r in c["impls"]}
        pig, flex = rows.get("pigeon", {}), rows.get("flex", {})
        out[v] = {"S": c["S"], "pigeon_first_call_s": pig.get("first_call_s"), "flex_compile_s": flex.get("compile_s"),
                  "flex_block_mask_first_s": flex.get("block_mask_first_s"), "flex_block_mask_s": flex.get("block_mask_s")}
    return out


def gemm_keys(cfg: Config) -> dict:
    path = Path(cfg.gemm_summary) if cfg.gemm_summary else Path(cfg.out).parent / "gemm" / "summary.json"
    try:
        g = json.loads(path.read_text())
    except (OSError, ValueError):
        g = None
    out = {}
    for k in GEMM_KEYS:
        if g is not None and k in g:
            out[k] = g[k]
            if g.get(f"{k}_case"):
                out[f"{k}_case"] = g[f"{k}_case"]
            out[f"{k}_note"] = (f"from {path} (commit {g.get('commit')}, {g.get('date')})"
                                + (f": {g[k + '_note']}" if g.get(k + "_note") else ""))
        else:
            out[k] = None
            out[f"{k}_note"] = f"measured by `pigeon bench gemm`: {path} " + ("has no such key" if g else "was not found")
    return out


def build_summary(result: dict, cfg: Config, plot: str | None = None) -> dict:
    cases, meta = result["cases"], result["meta"]
    s = {k: meta[k] for k in ("gpu", "commit", "date", "command", "device", "torch")}
    if meta.get("commands"):
        s["commands"] = meta["commands"]
        s["commits"] = sorted({c.get("commit", "unknown") for c in cases})
    _worst_key(s, "dense_fwd_vs_sdpa", _by(cases, variants=V.DENSE, mode="forward"), "vs_sdpa",
               "dense / causal forward", "SDPA", ">= 0.9")
    _worst_key(s, "dense_fwdbwd_vs_sdpa", _by(cases, variants=V.DENSE, mode="forward+backward"), "vs_sdpa",
               "dense / causal forward+backward", "SDPA", ">= 0.8")
    _worst_key(s, "masked_fwd_vs_flex_min", _by(cases, variants=V.MASKED, mode="forward"), "vs_flex",
               f"masked / modified ({', '.join(V.MASKED)}) forward", "Flex", ">= 1.3")
    _worst_key(s, "masked_fwdbwd_vs_flex_min", _by(cases, variants=V.MASKED, mode="forward+backward"), "vs_flex",
               f"masked / modified ({', '.join(V.MASKED)}) forward+backward", "Flex", ">= 1.2")
    _s2_speedup(s, cases)
    _worst_key(s, "topk_gqa_vs_flex_min", _by(cases, variants=V.TOPK), "vs_flex", "top-k GQA (group 2 and 4, both "
               "modes)", "Flex", ">= 1.5")
    s.update(gemm_keys(cfg))
    _window_vs_dense(s, cases)
    s["cases_total"] = len(cases)
    s["cases_check_failed"] = [label(c) for c in cases if str(c.get("check", "")).startswith("FAILED")]
    s["peer_checks_failed"] = [f"{label(c)}: {r['impl']}" for c in cases for r in c["impls"]
                               if r["kind"] != "pigeon" and str(r.get("check", "")).startswith("FAILED")]
    fails = {}
    for c in cases:
        for r in c["impls"]:
            if r["status"] != "ok":
                kind = r["status"].split(":")[0]
                fails.setdefault(r["impl"], {}).setdefault(kind, 0)
                fails[r["impl"]][kind] += 1
    s["failures_by_impl"] = fails
    s["compile_time"] = _compile_times(cases)
    s["compile_time_note"] = ("per variant and mode at its shortest sequence: pigeon's first call (kernel build: "
                              "nvcc when its disk cache is cold, a load when warm; cold and warm are not told apart "
                              "here) next to Flex's compile and block-mask times")
    s["pigeon_runs"] = sorted({c.get("pigeon_runs", "") for c in cases})
    s["flops_note"] = ("FLOPs = 4 B H S^2 D x kept fraction (forward), x 3.5 forward+backward (backward = 2.5 x "
                       "forward); the same count for every implementation")
    s["plot"] = plot or "pending: written at the end of the run"
    return s


def case_line(c: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.3f} ms"
    pig = (f"pigeon {ms(c['pigeon_ms'])} ({c['pigeon_tflops']:.3g} TFLOP/s)" if c["pigeon_ms"]
           else f"pigeon {c['pigeon_status']}")
    parts = [pig]
    if c.get("sdpa_ms"):
        parts.append(f"{c['sdpa_best']} {ms(c['sdpa_ms'])}" + (f" ({c['vs_sdpa']:.2f}x)" if c["vs_sdpa"] else ""))
    if c.get("flex_ms"):
        parts.append(f"flex {ms(c['flex_ms'])}" + (f" ({c['vs_flex']:.2f}x)" if c["vs_flex"] else ""))
    return f"{label(c)}: " + "; ".join(parts) + f"; check {c['check']}"


COLD_BUILD_LIMIT_S = 400.0


def run(cfg: Config, progress: Callable[[str], None] = lambda m: None, on_case: Callable[[dict], None] | None = None,
        previous: dict | None = None) -> dict:
    """Every case of ``cfg`` (those not already in ``previous``, --resume); ``on_case(result)``
    after each. Returns {"meta", "cases", "summary"}."""
    device = cfg.device
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    meta = environment(device, cfg.command(), reps=cfg.reps, warmup=cfg.warmup, timeout_s=cfg.timeout,
                       budget_s=cfg.budget, window=cfg.window, pigeon_runs=pigeon_runs(device))
    result = {"meta": meta, "cases": resume(previous, meta, device, cfg.out)}
    result = run_cases(cfg.specs(), case_key, lambda spec: run_case(spec, cfg, result["cases"]), case_line, result,
                       lambda r: build_summary(r, cfg), progress, on_case, cfg.out, device)
    if device.type == "cuda" and cfg.variants:
        from .attn_compile import cold_warm
        v = "causal" if "causal" in cfg.variants else cfg.variants[0]
        progress(f"# compile time of {v} from a cold and a warm kernel cache (fresh processes)")
        # a cold cache builds CUTLASS's forward library (1-2 minutes of nvcc) and the backward: not
        # bounded by the per-case limit, which it exceeds
        result["summary"]["compile_cold_warm"] = cold_warm(v, max(cfg.head_dims), cfg.dtypes[0],
                                                           max(cfg.timeout, COLD_BUILD_LIMIT_S))
    else:
        result["summary"]["compile_cold_warm"] = None
    result["summary"]["compile_cold_warm_note"] = (
        "first forward and backward call of one variant (B1 H4 S256) in a fresh process with an empty kernel "
        "cache (cold: nvcc) and again with it filled (warm: a load); on a CPU no kernel is built")
    return result


# ---------------------------------------------------------------------------------------- files

def write_results(out, result: dict, plot: bool = True) -> str | None:
    return R.write_results(out, result, ISSUE_KEYS, plot)


def cases_table(cases: list[dict]) -> list[str]:
    return R.cases_table(cases)


def summary_markdown(result: dict) -> str:
    return R.summary_markdown(result, ISSUE_KEYS)
