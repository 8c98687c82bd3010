"""``pigeon bench shiftadd``: the ShiftAdd primitives against the multiply kernels they replace.

Cases (``--quick``: the same kinds at tiny sizes):

- ``linear``: the shift linear ``[M, K] x [K, N]`` (N = K = dim), ``M`` = tokens: small token counts
  (1, 4, 16 tokens x dims 1024, 4096, 8192) and the PVTv2 stages at batch 32 (3136 tokens x 64,
  784 x 128, 196 x 320, 49 x 512).  pigeon's paths (paths.py): ``shift`` (the TVM float32 shift
  kernel), ``packed`` (weight-only packed, <= 16 tokens), ``fp8`` (e5m2 weights), and ``auto``
  (ShiftLinear's per-shape choice, which is "pigeon" in the ratios); weights prepared once
  (inference).  Peers: ``fp32`` (cuBLAS float32, the paper's baseline), ``bf16`` (cuBLAS bf16 tensor
  cores), ``scaled_mm`` (torch._scaled_mm e4m3 x e4m3, per-tensor scales, bf16 out).
- ``attention``: the add attention core of AddAttention (binarized q, k; Bk^T V and Bq (Bk^T V) by the
  masked-accumulation kernel, packing the bits included) at 3136 and 784 tokens, batch 32, one head
  of dim 64; peer ``sdpa`` (F.scaled_dot_product_attention, bf16, same [B, 1, T, 64]).
- ``moe``: MoEMLP (dense bf16 expert + shift expert, top-1 router; routing, the generated dispatch
  and combine kernels, no host sync) against the dense bf16 MLP (fc - GELU - fc) of the same size,
  forward, bf16, 196 tokens x batch 32, dim 320, hidden 1280: ``moe`` exact (capacity T per expert:
  nothing dropped; MoEMLP's default compact layout, each expert over its routed rows -- one
  torch._grouped_mm per linear when the shift expert takes its dense path) and ``moe_cap`` (``capacity_factor`` MOE_CAPACITY:
  ceil(1.25 T / 2) rows per expert, overflow tokens dropped Switch-style; its oracle is the float64
  MoEMLP with the same capacity).

Every implementation's first output is checked against a float64 oracle (relative Frobenius error;
tolerances per path: shift 1e-4, packed/dense 2e-2, fp8 6e-2), then timed with
pigeon.bench.timing.measure (CUDA events, median).  On a GPU the linear cases' path latencies are
written to the kernel cache's measured table (paths.save_table) so ShiftLinear(path="auto")
decides from them.  Without CUDA only the torch forms run (``kind`` says so): the quick CPU run
checks the pipeline, not the kernels.  Summary keys of issue 9: ``shift_linear_small_batch_vs_bf16``,
``shift_linear_vit_vs_bf16`` (worst case over the shapes), ``shift_linear_vs_fp32`` (the shift
kernel against cuBLAS fp32, worst case), ``add_attention_vs_sdpa``, ``moe_mlp_vs_dense_bf16`` (and
``moe_mlp_capacity_vs_dense_bf16``, the ``moe_cap`` row's).
Files in ``--out``: cases.json/.md, summary.json/.md, speedup.png.

    pigeon bench shiftadd --quick --device cpu --out /tmp/shiftadd
    pigeon bench shiftadd --out benchmarks/results/shiftadd
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .common import BenchError, FnStep, choose, environment, identity, ratio, resume, run_cases, split, worst
from .report import NO_MATPLOTLIB, keyed_summary, meta_lines, pyplot, save_figure, write_files
from .timing import failure, measure

__all__ = ["BenchError", "ShiftAddConfig", "make_config", "run", "write_results", "cases_table", "summary_markdown",
           "KEYS", "KINDS"]

KINDS = ("linear", "attention", "moe")
SMALL = [(m, d) for d in (1024, 4096, 8192) for m in (1, 4, 16)]
VIT = [(32 * 3136, 64), (32 * 784, 128), (32 * 196, 320), (32 * 49, 512)]
CASES = {"linear": [("small", m, d) for m, d in SMALL] + [("vit", m, d) for m, d in VIT],
         "attention": [("vit", 32, 3136, 64), ("vit", 32, 784, 64)],
         "moe": [("vit", 32 * 196, 320, 1280)]}
QUICK = {"linear": [("small", 2, 64), ("vit", 96, 32)], "attention": [("vit", 2, 40, 16)],
         "moe": [("vit", 48, 32, 64)]}
KEYS = ("gpu", "commit", "date", "command", "shift_linear_small_batch_vs_bf16", "shift_linear_vit_vs_bf16",
        "shift_linear_vs_fp32", "add_attention_vs_sdpa", "moe_mlp_vs_dense_bf16")
META = ("gpu", "device", "torch", "pigeon", "commit", "date", "command")
TOL = {"shift": 1e-4, "packed": 2e-2, "fp8": 6e-2, "auto": 6e-2, "dense": 2e-2, "fp32": 1e-4, "bf16": 2e-2,
       "scaled_mm": 1e-1, "sdpa": None, "moe": 1e-1, "moe_cap": 1e-1, "dense_mlp": None, "add": 1e-4}
MOE_CAPACITY = 1.25
# moe: bf16 routing may send a near-tie token to the other expert than the float64 oracle does


@dataclass
class ShiftAddConfig:
    kinds: tuple[str, ...]
    device: torch.device
    reps: int
    warmup: int
    timeout: float
    budget: float
    quick: bool
    out: str
    resume: bool = False

    def specs(self) -> list[tuple]:
        table = QUICK if self.quick else CASES
        return [(kind,) + tuple(c) for kind in self.kinds for c in table[kind]]

    def command(self) -> str:
        argv = ["pigeon", "bench", "shiftadd", "--kinds", ",".join(self.kinds), "--device", self.device.type,
                "--reps", str(self.reps), "--timeout", f"{self.timeout:g}", "--budget", f"{self.budget:g}",
                "--out", self.out]
        return shlex.join(argv + (["--quick"] if self.quick else []) + (["--resume"] if self.resume else []))


def make_config(*, kinds=None, device="cpu", reps=None, timeout=None, budget=None, quick=False,
                out="benchmarks/results/shiftadd", resume=False) -> ShiftAddConfig:
    device = torch.device(device)
    names = choose("--kinds", split(kinds) or KINDS, KINDS)
    reps = (3 if quick else 20) if reps is None else int(reps)
    if reps < 1:
        raise BenchError(f"--reps {reps}: give a positive number of timed repetitions")
    t = 300.0 if timeout is None else float(timeout)
    b = (10.0 if quick else 20.0) if budget is None else float(budget)
    for flag, v in (("--timeout", t), ("--budget", b)):
        if not v > 0:
            raise BenchError(f"{flag} {v:g}: give a positive number of seconds")
    return ShiftAddConfig(names, device, reps, max(1, min(3, reps // 5)), t, b, bool(quick), str(out), bool(resume))


def case_key(c) -> tuple:
    if isinstance(c, dict):
        return tuple(c["spec"])
    return tuple(c)


def _rel(got, want) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------- the impls

def _linear_impls(m, d, device, gen):
    from ..shiftadd.layers import ShiftLinear
    from ..shiftadd.quant import dequantize_shift, quantize_shift
    cuda = device.type == "cuda"
    x = torch.randn(m, d, generator=gen, device=device)
    lin = ShiftLinear(d, d, bias=False, backend="kernels" if cuda else "torch").to(device)
    sign, p = quantize_shift(lin.weight.detach())
    wq = dequantize_shift(sign, p, torch.float32)
    oracle = lambda: x.double() @ wq.double().T             # noqa: E731
    xb = x.to(torch.bfloat16)
    rows = []
    if cuda:
        from ..shiftadd.layers import kernel_ops
        sk = kernel_ops()
        from ..shiftadd.fp8 import shift_linear_fp8, weights_e5m2
        from ..shiftadd.packed import pad_words
        from ..shiftadd.paths import applicable
        from ..shiftadd.quant import pack_shift
        packed = pack_shift(sign, p, lin.p_min, lin.p_max, lin.bits)
        why = applicable(m, d, d, "bfloat16", lin.p_min, lin.p_max, torch.cuda.get_device_capability(device) >= (8, 9))
        rows.append(("shift", "pigeon path", lambda x: sk.shift_linear(x, packed, lin.p_min, lin.p_max, lin.bits), x))
        if "packed" in why:
            rows.append(("packed", f"n/a: {why['packed']}", None, None))
        else:
            wpad = pad_words(packed, d, lin.bits)
            rows.append(("packed", "pigeon path", lambda x: sk.packed_linear(x, wpad, d, lin.p_min, lin.p_max, lin.bits),
                         xb))
        if "fp8" in why:
            rows.append(("fp8", f"n/a: {why['fp8']}", None, None))
        else:
            w8 = weights_e5m2(sign, p)
            rows.append(("fp8", "pigeon path", lambda x: shift_linear_fp8(x, w8), xb))
        lin.eval()
        rows.append(("auto", "pigeon", lambda x: lin(x), xb))
        wb = wq.to(torch.bfloat16)
        rows.append(("fp32", "cublas", lambda x: x @ wq.T, x))
        rows.append(("bf16", "cublas", lambda x: x @ wb.T, xb))
        if "fp8" not in why:
            w4 = wq.to(torch.float8_e4m3fn)                 # 2^-15 .. 1: e4m3fn subnormals lose the smallest
            one = torch.ones((), device=device)
            x4 = xb.to(torch.float8_e4m3fn)
            rows.append(("scaled_mm", "cublas", lambda x: torch._scaled_mm(x4, w4.t(), scale_a=one, scale_b=one,
                                                                            out_dtype=torch.bfloat16), xb))
        else:
            rows.append(("scaled_mm", f"n/a: {why['fp8']}", None, None))
    else:
        rows.append(("auto", "pigeon (torch forms on cpu)", lambda x: lin(x), x))
        rows.append(("fp32", "torch matmul", lambda x: x @ wq.T, x))
        rows.append(("bf16", "torch matmul", lambda x: x @ wq.to(torch.bfloat16).T, xb))
    return rows, oracle, {"lin": lin}


def _attention_impls(b, t, d, device, gen):
    from ..shiftadd.layers import masked_accumulate
    cuda = device.type == "cuda"
    q, k, v = (torch.randn(b, t, d, generator=gen, device=device) for _ in range(3))
    bq, bk = (q > q.mean()).float(), (k > k.mean()).float()

    def add_core(bq, bk, v):
        a = masked_accumulate(bk, v, "kernels" if cuda else "torch")
        return masked_accumulate(bq.transpose(1, 2).contiguous(), a, "kernels" if cuda else "torch")
    oracle = lambda: bq.double() @ (bk.double().transpose(1, 2) @ v.double())   # noqa: E731
    qs, ks, vs = (z.to(torch.bfloat16).unsqueeze(1) for z in (q, k, v))
    rows = [("add", "pigeon" if cuda else "pigeon (torch forms on cpu)", lambda: add_core(bq, bk, v), None),
            ("sdpa", "peer", lambda: F.scaled_dot_product_attention(qs, ks, vs), None)]
    return rows, oracle, {}


def _moe_impls(tokens, dim, hidden, device, gen):
    from ..shiftadd.layers import MoEMLP
    cuda = device.type == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    moe = MoEMLP(dim, hidden, k=1, latencies=[6.0, 4.0]).to(device, dt).eval()
    for mod in moe.modules():
        if hasattr(mod, "backend") and not cuda:
            mod.backend = "torch"
    cap = MoEMLP(dim, hidden, k=1, latencies=[6.0, 4.0], capacity_factor=MOE_CAPACITY).to(device, dt).eval()
    cap.load_state_dict(moe.state_dict())
    for mod in cap.modules():
        if hasattr(mod, "backend") and not cuda:
            mod.backend = "torch"
    dense = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, dim)).to(device, dt)
    x = torch.randn(tokens, dim, generator=gen, device=device).to(dt)
    ref = {}

    def oracle(factor=None):
        if factor not in ref:
            m64 = MoEMLP(dim, hidden, k=1, latencies=[6.0, 4.0], capacity_factor=factor).double()
            m64.load_state_dict({n: p.double() for n, p in moe.state_dict().items()})
            for mod in m64.modules():
                if hasattr(mod, "backend"):
                    mod.backend = "torch"
            ref[factor] = m64(x.double().cpu())[0]
        return ref[factor]
    kind = "pigeon" if cuda else "pigeon (torch forms on cpu)"
    rows = [("moe", kind, lambda: moe(x)[0], None),
            ("moe_cap", f"{kind}, capacity_factor={MOE_CAPACITY}", lambda: cap(x)[0], None),
            ("dense_mlp", "peer", lambda: dense(x), None)]
    return rows, oracle, {"oracles": {"moe_cap": lambda: oracle(MOE_CAPACITY)}}


def run_case(spec: tuple, cfg: ShiftAddConfig) -> dict:
    kind = spec[0]
    device = cfg.device
    gen = torch.Generator(device=device).manual_seed(0)
    case = {"spec": list(spec), "kind": kind, "group": spec[1], "device": str(device)}
    if kind == "linear":
        _, _, m, d = spec
        case.update(M=m, K=d, N=d, flops=2.0 * m * d * d, label=f"linear {spec[1]} M={m} K=N={d}")
        rows, oracle, extra = _linear_impls(m, d, device, gen)
    elif kind == "attention":
        _, _, b, t, d = spec
        case.update(B=b, T=t, d=d, label=f"attention B={b} T={t} d={d}")
        rows, oracle, extra = _attention_impls(b, t, d, device, gen)
    else:
        _, _, tokens, dim, hidden = spec
        case.update(T=tokens, dim=dim, hidden=hidden, label=f"moe T={tokens} dim={dim} hidden={hidden}")
        rows, oracle, extra = _moe_impls(tokens, dim, hidden, device, gen)
    checks, out = {}, []
    want = {}

    def checker(impl):
        def after_first(step):
            tol = TOL.get(impl)
            if tol is None:
                checks[impl] = "n/a: another computation (no oracle)"
            else:
                try:
                    own = extra.get("oracles", {}).get(impl)
                    key = impl if own is not None else "w"
                    if key not in want:
                        want[key] = (own or oracle)()
                    e = _rel(step.first, want[key])
                    checks[impl] = "ok" if e <= tol else f"FAILED: relative error {e:.3g} > {tol:g}"
                except Exception as ex:
                    checks[impl] = f"not run: {failure(ex)}"
            step.first = None
        return after_first
    for impl, ikind, fn, inp in rows:
        if fn is None:
            out.append({"impl": impl, "kind": "n/a", "status": ikind, "median_ms": None})
            continue
        inputs = (inp,) if inp is not None else ()
        r = measure(impl, ikind, lambda fn=fn, inputs=inputs: FnStep(fn, inputs, "forward"), None, "forward", device,
                    warmup=cfg.warmup, reps=cfg.reps, timeout=cfg.timeout, budget_s=cfg.budget,
                    after_first=checker(impl), step_of=identity)
        r["check"] = checks.get(impl, "not run")
        out.append(r)
    if kind == "linear" and "lin" in extra and device.type == "cuda":
        d = extra["lin"].last_decision
        case["auto_decision"] = d.describe() if d is not None else None
    case["impls"] = out
    return finish_case(case)


def _ms(case, impl):
    r = next((r for r in case["impls"] if r["impl"] == impl), None)
    return r["median_ms"] if r and r["status"] == "ok" and str(r.get("check", "")).startswith(("ok", "n/a")) else None


def finish_case(case: dict) -> dict:
    pig = {"linear": "auto", "attention": "add", "moe": "moe"}[case["kind"]]
    t = _ms(case, pig)
    case["pigeon_ms"] = t
    case["vs"] = {r["impl"]: ratio(r["median_ms"], t) for r in case["impls"]
                  if r["impl"] != pig and r.get("median_ms")}
    if case["kind"] == "linear":
        case["shift_vs_fp32"] = ratio(_ms(case, "fp32"), _ms(case, "shift"))
    if case["kind"] == "moe":
        case["cap_vs_peer"] = ratio(_ms(case, "dense_mlp"), _ms(case, "moe_cap"))
    return case


# ---------------------------------------------------------------------------------------- summary

def _label(c):
    return c["label"]


def _key(s, key, cases, field, what, target):
    v, where = worst(cases, field, _label)
    s[key] = v
    if v is None:
        s[f"{key}_note"] = f"not measurable: no {what} case has pigeon and the peer timed and checked"
    else:
        s[f"{key}_case"] = where
        s[f"{key}_note"] = f"peer time / pigeon time, the worst of the {what} cases; target {target}"


def build_summary(result: dict) -> dict:
    cases, meta = result["cases"], result["meta"]
    s = {k: meta[k] for k in ("gpu", "commit", "date", "command", "device", "torch")}
    lin = [c for c in cases if c["kind"] == "linear"]
    for c in lin:
        c["vs_bf16"] = c["vs"].get("bf16")
    _key(s, "shift_linear_small_batch_vs_bf16", [c for c in lin if c["group"] == "small"], "vs_bf16",
         "small-token shift linear (auto path vs cuBLAS bf16)", ">= 2")
    _key(s, "shift_linear_vit_vs_bf16", [c for c in lin if c["group"] == "vit"], "vs_bf16",
         "ViT-stage shift linear (auto path vs cuBLAS bf16)", ">= 1.3")
    _key(s, "shift_linear_vs_fp32", lin, "shift_vs_fp32", "shift linear (the shift kernel vs cuBLAS fp32, the paper's "
         "comparison)", "> 1 (the paper's)")
    for c in cases:
        c["vs_peer"] = c["vs"].get({"attention": "sdpa", "moe": "dense_mlp"}.get(c["kind"], ""))
    _key(s, "add_attention_vs_sdpa", [c for c in cases if c["kind"] == "attention"], "vs_peer",
         "add attention core (vs SDPA bf16)", ">= 2")
    _key(s, "moe_mlp_vs_dense_bf16", [c for c in cases if c["kind"] == "moe"], "vs_peer",
         "mixture MLP (vs the dense bf16 MLP; routing quality not compared)", ">= 1.3")
    _key(s, "moe_mlp_capacity_vs_dense_bf16", [c for c in cases if c["kind"] == "moe"], "cap_vs_peer",
         f"mixture MLP with capacity_factor={MOE_CAPACITY} (tokens past capacity dropped; vs the dense bf16 MLP)",
         ">= 1.3")
    s["cases_total"] = len(cases)
    s["cases_check_failed"] = [f"{_label(c)}: {r['impl']} {r['check']}" for c in cases for r in c["impls"]
                               if str(r.get("check", "")).startswith("FAILED")]
    s["failures"] = [f"{_label(c)}: {r['impl']} {r['status']}" for c in cases for r in c["impls"]
                     if r["status"] != "ok" and not r["status"].startswith("n/a")]
    s["auto_decisions"] = [c["auto_decision"] for c in lin if c.get("auto_decision")]
    s["plot"] = "pending: written at the end of the run"
    return s


def case_line(c: dict) -> str:
    parts = []
    for r in c["impls"]:
        parts.append(f"{r['impl']} {r['median_ms']:.4f} ms" if r.get("median_ms") else f"{r['impl']} {r['status']}")
        if str(r.get("check", "")).startswith("FAILED"):
            parts[-1] += " (check FAILED)"
    return f"{c['label']}: " + "; ".join(parts)


def _save_latencies(result: dict, device) -> None:
    from ..shiftadd.paths import save_table
    entries = []
    for c in result["cases"]:
        if c["kind"] != "linear":
            continue
        for impl, path in (("shift", "shift"), ("packed", "packed"), ("fp8", "fp8"), ("bf16", "dense")):
            ms = _ms(c, impl)
            if ms:
                entries.append({"path": path, "M": c["M"], "N": c["N"], "K": c["K"], "dtype": "bfloat16",
                                "us": ms * 1e3})
    if entries:
        p = save_table(torch.cuda.get_device_name(device), entries)
        result["meta"]["latency_table"] = str(p)


def run(cfg: ShiftAddConfig, progress: Callable[[str], None] = lambda m: None,
        on_case: Callable[[dict], None] | None = None, previous: dict | None = None) -> dict:
    device = cfg.device
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    meta = environment(device, cfg.command(), reps=cfg.reps, warmup=cfg.warmup, timeout_s=cfg.timeout,
                       budget_s=cfg.budget)
    result = {"meta": meta, "cases": resume(previous, meta, device, cfg.out)}
    result = run_cases(cfg.specs(), case_key, lambda spec: run_case(spec, cfg), case_line, result, build_summary,
                       progress, on_case, cfg.out, device)
    if device.type == "cuda":
        _save_latencies(result, device)
        progress(f"# measured path latencies written to {result['meta'].get('latency_table')}")
    return result


# ---------------------------------------------------------------------------------------- files

def cases_table(cases: list[dict]) -> list[str]:
    lines = ["| case | pigeon ms | vs peers | impls: ms (check) |", "|---|---|---|---|"]
    for c in cases:
        vs = "; ".join(f"{k} {v:.2f}x" for k, v in c["vs"].items() if v)
        impls = "; ".join((f"{r['impl']} {r['median_ms']:.4f}" if r.get("median_ms") else f"{r['impl']} {r['status']}")
                          + f" ({r.get('check', '')})" for r in c["impls"])
        pig = "" if c["pigeon_ms"] is None else f"{c['pigeon_ms']:.4f}"
        lines.append(f"| {c['label']} | {pig} | {vs} | {impls} |".replace("\n", " "))
    return lines


def cases_markdown(result: dict) -> str:
    lines = ["# pigeon bench shiftadd: cases", "", *meta_lines(result["meta"], META), "", *cases_table(result["cases"]),
             "", "Times are medians in ms (CUDA events on a GPU); vs = the peer's time / pigeon's (above 1: pigeon "
             "faster); pigeon = the auto path (linear), the masked-accumulation core (attention), MoEMLP (moe). "
             "Each output is checked against a float64 oracle first."]
    return "\n".join(lines) + "\n"


def summary_markdown(result: dict) -> str:
    return keyed_summary("pigeon bench shiftadd", result, META, KEYS)


def plot_speedup(cases: list[dict], path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    peers = list(dict.fromkeys(k for c in cases for k, v in c["vs"].items() if v))
    if not peers:
        return "skipped: no case has pigeon and a peer timed"
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cases) + 2), 4.5))
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        xs = [j + (i - (len(peers) - 1) / 2) * width for j, c in enumerate(cases) if c["vs"].get(peer)]
        ys = [c["vs"][peer] for c in cases if c["vs"].get(peer)]
        ax.bar(xs, ys, width, label=f"vs {peer}")
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c["label"] for c in cases], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("peer time / pigeon time (x)")
    ax.set_title("pigeon ShiftAdd vs its peers (above 1: pigeon faster)")
    ax.legend(fontsize=7)
    return save_figure(plt, fig, path)


def write_results(out, result: dict, plot: bool = True) -> str | None:
    return write_files(out, result, plot=plot, plot_fn=plot_speedup, plot_name="speedup.png", cases_md=cases_markdown,
                       summary_md=summary_markdown)
