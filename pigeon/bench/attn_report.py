"""The files of ``pigeon bench attention``: cases.json/.md, summary.json/.md and tflops.png (TFLOP/s
over the sequence length per variant, pigeon against its peers), each written atomically by
:mod:`pigeon.bench.report`'s helpers."""
from __future__ import annotations

from pathlib import Path

from .report import NO_MATPLOTLIB, fmt, keyed_summary, meta_lines, pyplot, save_figure, write_files

__all__ = ["cases_table", "cases_markdown", "summary_markdown", "plot_tflops", "write_results", "PLOT"]

PLOT = "tflops.png"
META = ("gpu", "device", "torch", "pigeon", "commit", "date", "command")


def _n(v, spec=".3f") -> str:
    return "" if v is None else format(v, spec)


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def _cell(text) -> str:
    return str(text).replace("|", "/")


def _peer_cell(c: dict) -> str:
    parts = []
    for r in c["impls"]:
        if r["kind"] == "pigeon":
            continue
        if r["status"] == "ok" and r.get("median_ms"):
            extra = f", compile {r['compile_s']:.1f} s" if r.get("compile_s") is not None else ""
            chk = "" if r.get("check", "ok") == "ok" else f", check {r['check']}"
            parts.append(f"{r['impl']} {r['median_ms']:.3f} ms ({_n(r.get('tflops'), '.3g')} TFLOP/s, "
                         f"{_x(c['vs'].get(r['impl']))}{extra}{chk})")
        else:
            parts.append(f"{r['impl']} {r['status']}")
    return _cell("; ".join(parts))


def cases_table(cases: list[dict]) -> list[str]:
    """One row per case; vs X = X's time / pigeon's time (= pigeon's TFLOP/s / X's)."""
    lines = ["| variant | B | H/Hkv | S | D | dtype | mode | kept | pigeon ms | pigeon TFLOP/s | SDPA | SDPA ms "
             "| vs SDPA | Flex ms | vs Flex | Flex compile s | block mask s | pigeon peak MiB | check | peers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        flex = next((r for r in c["impls"] if r["impl"] == "flex"), {})
        pig = _n(c["pigeon_ms"]) if c["pigeon_ms"] else c["pigeon_status"]
        lines.append(
            f"| {c['variant']} | {c['B']} | {c['H']}/{c['H_kv']} | {c['S']} | {c['D']} | {c['dtype']} | {c['mode']} "
            f"| {c['kept_fraction']:.3g} | {_cell(pig)} | {_n(c['pigeon_tflops'], '.3g')} | {c['sdpa_best'] or ''} "
            f"| {_n(c['sdpa_ms'])} | {_x(c['vs_sdpa'])} | {_n(c['flex_ms'])} | {_x(c['vs_flex'])} "
            f"| {_n(flex.get('compile_s'), '.1f')} | {_n(flex.get('block_mask_s'), '.3g')} "
            f"| {_n(c.get('pigeon_peak_mib'), '.1f')} | {_cell(c['check'])} | {_peer_cell(c)} |")
    return lines


def cases_markdown(result: dict) -> str:
    cases = result["cases"]
    what = sorted({c.get("check_what", "") for c in cases if c.get("check_what")})
    lines = ["# pigeon bench attention: cases", "", *meta_lines(result["meta"], META), "",
             *cases_table(cases), "",
             "Times are medians in ms (CUDA events on a GPU, perf_counter on a CPU). TFLOP/s = 4 B H S^2 D x kept "
             "fraction / time (x 3.5 forward+backward), the same FLOP count for every implementation; vs X = X's "
             "time / pigeon's (above 1: pigeon faster). SDPA = its fastest backend that ran. Flex = "
             "torch.compile(flex_attention); its compile time is its first call, its block mask is built before "
             "it (block mask s: a second build). Peak MiB: GPU only.",
             "", "Checked (each implementation's first call, against the float64 reference):",
             *[f"- {w}" for w in what]]
    return "\n".join(lines) + "\n"


def _compact(v) -> str:
    """A summary value for the markdown table: nested dicts without their null entries."""
    if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
        return "; ".join(f"{k}: " + ", ".join(f"{a} {fmt(b)}" for a, b in x.items() if b is not None)
                         for k, x in v.items())
    if isinstance(v, list):
        return "; ".join(map(str, v)) if v else "none"
    return fmt(v)


def summary_markdown(result: dict, keys: tuple[str, ...]) -> str:
    return keyed_summary("pigeon bench attention", result, META, keys, skip=("commands", "commits"),
                         value=lambda v: _cell(_compact(v)), note=_cell,
                         footer=("", "The per-case table is in cases.md, every number in cases.json."))


STYLE = {"forward": "-", "forward+backward": "--"}
LABEL = {"pigeon": "pigeon", "sdpa": "SDPA (fastest backend)", "flex": "Flex (compiled)"}


def plot_tflops(cases: list[dict], path: Path) -> str:
    """tflops.png: one panel per variant, TFLOP/s (log) over S (log 2) of pigeon, the best SDPA
    backend and Flex, forward solid and forward+backward dashed, per (B, H, D, dtype)."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    variants = list(dict.fromkeys(c["variant"] for c in cases))
    series = {}
    for c in cases:
        shape = f"B{c['B']} H{c['H']} D{c['D']} {c['dtype']}"
        for who, ms in (("pigeon", c["pigeon_ms"]), ("sdpa", c.get("sdpa_ms")), ("flex", c.get("flex_ms"))):
            if ms:
                series.setdefault((c["variant"], who, c["mode"], shape), []).append((c["S"], c["flops"] / ms / 1e9))
    if not series:
        return "skipped: no case was timed"
    shapes = sorted({k[3] for k in series})
    cols = min(3, len(variants))
    rows = -(-len(variants) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    colors = {"pigeon": "tab:blue", "sdpa": "tab:orange", "flex": "tab:green"}
    for ax, v in zip(axes.flat, variants):
        for (var, who, mode, shape), pts in sorted(series.items()):
            if var != v:
                continue
            pts.sort()
            tag = "" if len(shapes) == 1 else f" {shape}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], STYLE[mode], marker="o", markersize=3,
                    color=colors[who], alpha=1.0 if len(shapes) == 1 else 0.4 + 0.6 * (shapes.index(shape) + 1) / len(shapes),
                    label=f"{LABEL[who]} {mode}{tag}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(v, fontsize=9)
        ax.set_xlabel("sequence length", fontsize=8)
        ax.set_ylabel("TFLOP/s", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(variants):]:
        ax.axis("off")
    fig.suptitle("pigeon vs SDPA and FlexAttention" + (f" ({shapes[0]})" if len(shapes) == 1 else ""), fontsize=10)
    return save_figure(plt, fig, path)


def write_results(out: Path, result: dict, keys: tuple[str, ...], plot: bool = True) -> str | None:
    """cases.json, cases.md, summary.json, summary.md (and tflops.png when ``plot``) in ``out``."""
    return write_files(out, result, plot=plot, plot_fn=plot_tflops, plot_name=PLOT, cases_md=cases_markdown,
                       summary_md=lambda r: summary_markdown(r, keys))
