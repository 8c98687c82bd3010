"""Writing a benchmark's results: JSON, markdown tables and the speedup plot, each file atomically
(written to a temporary name in the same folder, then ``os.replace``d)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

from ..atomic_io import write_atomic

__all__ = ["atomic_write", "write_json", "read_results", "cases_table", "cases_markdown", "summary_markdown", "keyed_summary", "plot_speedup",
           "write_results", "write_files", "aggregations_table", "fmt", "meta_lines", "pyplot", "save_figure", "NO_MATPLOTLIB"]

NO_MATPLOTLIB = "skipped: matplotlib not installed (pip install -e '.[bench]')"


def atomic_write(path: Path, data: str | bytes) -> None:
    write_atomic(path, data)


def _clean(v):
    """JSON-safe: non-finite floats become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(_clean(obj), indent=1, default=str) + "\n")


def read_results(out: Path, bench: str = "rgnn") -> dict | None:
    """What ``out``/cases.json holds ({"meta", "graphs", "cases"}; ``pigeon bench attention`` and
    ``gemm`` write no "graphs"), None when there is none; a ValueError naming the file when it
    cannot be read as one."""
    path = Path(out) / "cases.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
            raise ValueError("no list of cases")
        return data
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a cases.json of pigeon bench {bench}: {e}") from None


# ---------------------------------------------------------------------------------------- markdown

def _ms(v) -> str:
    return "" if v is None else f"{v:.3f}"


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def _peer_cell(c: dict) -> str:
    parts = []
    for r in c["impls"]:
        if r["kind"] == "pigeon":
            continue
        name = r["impl"].replace("|", "/")
        if r["status"] == "ok" and r.get("median_ms"):
            extra = f"; compile {r['compile_s']:.1f} s" if r.get("compile_s") is not None else ""
            parts.append(f"{name} {r['median_ms']:.3f} ({_x(c['speedup'].get(r['impl']))}{extra})")
        else:
            parts.append(f"{name} {r['status'].replace('|', '/')}")
    return "; ".join(parts)


def cases_table(cases: list[dict]) -> list[str]:
    """The per-case table: one row per case. Times in ms; speedup = peer time / pigeon time."""
    lines = ["| graph | model | dim | dtype | mode | pigeon ms | best peer | best peer ms | speedup | floor ms "
             "| pigeon / floor | pigeon peak MiB | check | peers: ms (speedup) | min aggregation TB/s "
             "| cost model: pick ms / best candidate ms / ratio | GPU ms / step | host share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        pig = _ms(c["pigeon_ms"]) if c["pigeon_status"] == "ok" else c["pigeon_status"]
        peak = c.get("pigeon_peak_mib")
        graph = c["graph"] + (" (synthetic)" if c.get("synthetic") else "")
        ratio = "" if c["floor_ratio"] is None else f"{c['floor_ratio']:.3g}x"
        lines.append(
            f"| {graph} | {c['model']} | {c['dim']} | {c['dtype']} | {c['mode']} | {pig.replace('|', '/')} "
            f"| {c['best_peer'] or ''} | {_ms(c['best_peer_ms'])} | {_x(c['speedup_best'])} "
            f"| {c['floor']['floor_ms']:.3g} | {ratio} "
            f"| {'' if peak is None else f'{peak:.1f}'} | {str(c['check']).replace('|', '/')} | {_peer_cell(c)} "
            f"| {_tbps(c)} | {_tune_cell(c.get('tune'))} | {_ms(c.get('gpu_ms_per_step'))} | {_share(c)} |")
    return lines


def _share(c: dict) -> str:
    v = c.get("host_share")
    return "" if v is None else f"{v:.0%}"


def _tbps(c: dict) -> str:
    v = c.get("aggregate_tbps_min")
    if v is None:
        return c.get("kernels_error", "").replace("|", "/")
    return f"{v:.3g}" if v >= 1e-3 else f"{v:.2e}"


def _tune_cell(t) -> str:
    if not t:
        return ""
    if t.get("ratio") is None:
        return str(t.get("status", "")).replace("|", "/")[:120] if t.get("status") != "ok" else \
            f"pick {t.get('pick_status', '')}".replace("|", "/")[:120]
    best = str(t["best"]).replace("|", "/")
    return (f"{t['pick_ms']:.3f} / {t['best_ms']:.3f} ({best}) / {t['ratio']:.3f}"
            + ("" if t["within_10pct"] else " (pick > 1.1x best)"))


def aggregations_table(aggs: list[dict]) -> list[str]:
    """The sum of x[src] over incoming edges: pigeon's kernel, index_add_ and the CSR SpMM."""
    names = []
    for a in aggs:
        for k in a["impls"]:
            if k not in names:
                names.append(k)
    lines = ["| graph | dim | dtype | pigeon schedule | min bytes | " + " | ".join(f"{n} ms (TB/s)" for n in names)
             + " | pigeon slower than a peer |", "|---|---|---|---|---|" + "---|" * len(names) + "---|"]
    for a in aggs:
        cells = []
        for n in names:
            r = a["impls"].get(n)
            if r is None:
                cells.append("")
            elif r.get("ms"):
                cells.append(f"{r['ms']:.4f}" + (f" ({r['tbps']:.3g})" if r.get("tbps") else ""))
            else:
                cells.append(str(r["status"]).replace("|", "/")[:100])
        lines.append(f"| {a['graph']} | {a['dim']} | {a['dtype']} | {a.get('pigeon_schedule') or ''} "
                     f"| {a.get('min_bytes') or ''} | " + " | ".join(cells)
                     + f" | {'yes' if a.get('pigeon_slower_than_peer') else 'no'} |")
    return lines


def _meta_lines(meta: dict, keys=("gpu", "device", "torch", "torch_geometric", "commit", "date", "command")) -> list[str]:
    return [f"- {k}: `{meta[k]}`" if k == "command" else f"- {k}: {meta[k]}" for k in keys if k in meta]


def _graph_lines(graphs: list[dict]) -> list[str]:
    return [f"- {g['graph']}: {g['nodes']} nodes, {g['edges']} edges, {g['relations']} relations, "
            f"{g['node_types']} node types; {g['source']}" + (" (synthetic)" if g["synthetic"] else "")
            for g in graphs]


def cases_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# pigeon bench rgnn: cases", "", *_meta_lines(meta), "", "Graphs:", *_graph_lines(result["graphs"]), "",
             *cases_table(result["cases"]), "",
             *(["Sum of x[src] over incoming edges (" + result["aggregations"][0].get("timer", "") + "):", "",
                *aggregations_table(result["aggregations"]), ""] if result.get("aggregations") else []),
             "Times are medians in ms (CUDA events on a GPU, perf_counter on a CPU); speedup = peer time / pigeon "
             "time; the best peer is the fastest peer that ran; floor = max(FLOPs / peak FLOP/s, min bytes / peak "
             "B/s) with the H200's calibration numbers; peak MiB = max allocated in one step beyond what was "
             "allocated before it (GPU only). Training = forward, backward, SGD step."]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) or "{}"
    return "null" if v is None else str(v)


fmt = _fmt
meta_lines = _meta_lines

SUMMARY_KEYS = ("geomean_speedup_inference", "geomean_speedup_training", "geomean_speedup_by_mode_dtype",
                "cases_total", "cases_compared", "cases_slower_than_a_peer", "cases_within_3x_floor",
                "cases_check_failed", "floor_ratio_geomean", "host_overhead_us", "host_overhead_us_by_model",
                "aggregate_tbps_min", "aggregate_slower_than_peer", "pigeon_oom", "pigeon_errors", "peer_oom", "peer_oom_by_impl",
                "peer_timeouts", "peer_errors", "cost_model_within_10pct", "plot")


def summary_markdown(result: dict) -> str:
    s = result["summary"]
    lines = ["# pigeon bench rgnn: summary", "", *_meta_lines(result["meta"]), "", "| key | value | note |", "|---|---|---|"]
    for k in SUMMARY_KEYS:
        if k in s:
            lines.append(f"| {k} | {_fmt(s[k])} | {s.get(k + '_note', '')} |")
    lines += ["", "Graphs (synthetic ones say so):", *_graph_lines(result["graphs"])]
    for g, why in (s.get("graphs_not_run") or {}).items():
        lines.append(f"- {g}: not run ({why})")
    lines += ["", s.get("floor_note", ""), "", "The per-case table is in cases.md, every number in cases.json."]
    return "\n".join(lines) + "\n"


def keyed_summary(title: str, result: dict, meta_keys, keys, *, skip=(), value=None, note=None, footer=()) -> str:
    """The summary markdown of the GEMM, attention and ShiftAdd benches: the meta lines, then one
    row (key, value, case, note) per issue key in ``keys`` order and per other summary key (not
    ``*_note`` / ``*_case``, not in ``meta_keys`` or ``skip``).  ``value`` / ``note`` format cells."""
    s = result["summary"]

    def default_value(v):
        return ("; ".join(map(str, v)) or "none") if isinstance(v, list) else fmt(v)
    value = value or default_value
    note = note or (lambda t: t)
    lines = [f"# {title}: summary", "", *meta_lines(result["meta"], meta_keys), "",
             "| key | value | case | note |", "|---|---|---|---|"]
    rest = [k for k in s if not k.endswith(("_note", "_case")) and k not in keys and k not in tuple(skip) + tuple(meta_keys)]
    for k in tuple(keys) + tuple(rest):
        if k in s:
            lines.append(f"| {k} | {value(s[k])} | {s.get(k + '_case', '')} | {note(s.get(k + '_note', ''))} |"
                         .replace("\n", " "))
    lines += list(footer)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- plot

def pyplot():
    """matplotlib.pyplot on the Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    return plt


def save_figure(plt, fig, path: Path) -> str:
    """Write ``fig`` to ``path`` (PNG, atomically) and close it; returns the file's name."""
    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        atomic_write(path, buf.getvalue())
    finally:
        plt.close(fig)
    return Path(path).name


def plot_speedup(cases: list[dict], path: Path) -> str:
    """speedup.png: pigeon's speedup over the best peer per case (graph, model, dim, dtype), inference
    and training side by side, log y, a line at 1x. Returns what went into summary.json's "plot"."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    keys, vals = [], {}
    for c in cases:
        k = (c["graph"], c["model"], c["dim"], c["dtype"])
        if k not in vals:
            keys.append(k)
            vals[k] = {}
        vals[k][c["mode"]] = c["speedup_best"]
    if not any(v is not None for d in vals.values() for v in d.values()):
        return "skipped: no case has a peer to compare with"
    modes = [m for m in ("inference", "training") if any(m in d for d in vals.values())]
    width = 0.8 / max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(keys) + 2), 4.8))
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(keys))]
        ys = [vals[k].get(mode) for k in keys]
        ax.bar([x for x, y in zip(xs, ys) if y], [y for y in ys if y], width, label=mode)
        for x, y in zip(xs, ys):
            if not y:
                ax.annotate("n/a", (x, 1.0), ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{g} {m} d{d} {'bf16' if t == 'bfloat16' else 'fp32'}" for g, m, d, t in keys],
                       rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup over the best peer (x)")
    ax.set_title("pigeon vs the best peer per case (above 1: pigeon faster)")
    ax.legend(loc="best", fontsize=8)
    return save_figure(plt, fig, path)


def write_files(out, result: dict, *, plot: bool, plot_fn, plot_name: str, cases_md, summary_md,
                json_keys: tuple[str, ...] = ("meta", "cases")) -> str | None:
    """Every benchmark's files in ``out``: cases.json (``json_keys`` of ``result``), cases.md,
    summary.json, summary.md and, when ``plot``, the plot ``plot_fn(cases, path)`` draws (its status
    goes into the summary before the markdown is written). Returns the plot's status when attempted."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    status = None
    if plot:
        status = plot_fn(result["cases"], out / plot_name)
        result["summary"]["plot"] = status
        if status.startswith("skipped"):       # not a stale plot of an earlier run beside these results
            (out / plot_name).unlink(missing_ok=True)
    write_json(out / "cases.json", {k: result[k] for k in json_keys})
    atomic_write(out / "cases.md", cases_md(result))
    write_json(out / "summary.json", result["summary"])
    atomic_write(out / "summary.md", summary_md(result))
    return status


def write_results(out: Path, result: dict, plot: bool = True) -> str | None:
    """Write cases.json, cases.md, summary.json, summary.md (and speedup.png when ``plot``) to ``out``.
    Returns the plot's status when it was attempted."""
    result.setdefault("aggregations", [])
    return write_files(out, result, plot=plot, plot_fn=plot_speedup, plot_name="speedup.png",
                       cases_md=cases_markdown, summary_md=summary_markdown,
                       json_keys=("meta", "graphs", "cases", "aggregations"))
