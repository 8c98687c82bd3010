"""The per-shape choice of how a shift linear runs on a GPU, among

- ``shift``:  the TVM-generated float32 shift kernel (64 x 64 output tiles per block; CUDA cores),
- ``packed``: the weight-only packed kernel (1-16 tokens; 5/6-bit codes read, unpacked in registers),
- ``fp8``:    an fp8 tensor-core GEMM (e5m2 weights, exact; e4m3 activations, lossy; fp8.py),
- ``dense``:  the dequantized weights in x's dtype through cuBLAS (bf16/fp16 tensor cores).

``choose(M, N, K, dtype, ...)`` takes the fastest path that applies, by latencies measured on this
GPU when the cache holds them (``pigeon bench shiftadd`` writes ``<cache root>/shiftadd/latency.json``:
the GPU's name and one entry per (path, M, N, K, dtype) with its median microseconds), else by the
explicit estimate ``estimate_us`` (bytes at HBM bandwidth and FLOPs at the unit's rate plus launch
overhead; H200 numbers, stated below).  A measured shape must match exactly (M, N, K, dtype on a GPU
of the same name); otherwise every path of the decision is estimated, never a mix.  No torch
import at module level: the decision is plain arithmetic.

The measured table is read once per process and table file (``cached_table``; ``save_table`` and
``forget_table`` drop the copy and bump ``GENERATION``, which ShiftLinear compares to know when
its per-shape decisions are stale); a table written by another process is seen after
``forget_table()``."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from ..atomic_io import write_atomic

PATHS = ("shift", "packed", "fp8", "dense")
CHOICES = ("auto",) + PATHS
TABLE_NAME = "latency.json"

# the estimate's constants (H200; explicit guesses to be replaced by measurement)
HBM_BYTES_PER_S = 4.0e12           # achieved, of 4.8 TB/s peak
SHIFT_FLOPS = 15.0e12              # the tiled TVM kernel (64 x 64 tiles, shared-memory K steps): a guess, unmeasured
PACKED_FLOPS = 40.0e12             # float32 FMAs of the packed kernel
FP8_FLOPS = 1000.0e12              # measured ~1300 TFLOP/s dense fp8 on this H200; lower for thin shapes
BF16_FLOPS = 600.0e12              # measured ~750 TFLOP/s bf16
LAUNCH_US = {"shift": 4.0, "packed": 4.0, "fp8": 12.0, "dense": 5.0}      # fp8: + the row quantization pass


def _bytes_of(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)


def estimate_us(path: str, m: int, n: int, k: int, dtype: str = "bfloat16", bits: int = 6) -> float:
    """Estimated microseconds of one ``[M, K] x [K, N]`` shift linear on ``path`` (module doc)."""
    b = _bytes_of(dtype)
    if path == "shift":          # float32 x and out, codes; the work of whole 64 x 64 tiles (tvm_shift.py)
        mp, np_ = -(-m // 64) * 64, -(-n // 64) * 64
        byts, flops, rate = 4 * m * k + n * k * 32 / (32 // bits) / 8 + 4 * m * n, 2.0 * mp * np_ * k, SHIFT_FLOPS
    elif path == "packed":
        byts, flops, rate = b * m * k + n * k * 32 / (32 // bits) / 8 + b * m * n, 2.0 * m * n * k, PACKED_FLOPS
    elif path == "fp8":
        byts, flops, rate = (b + 1 + b) * m * k + n * k + 2 * m * n, 2.0 * m * n * k, FP8_FLOPS
    elif path == "dense":
        byts, flops, rate = b * (m * k + n * k + m * n), 2.0 * m * n * k, BF16_FLOPS
    else:
        raise ValueError(f"estimate_us: path is one of {PATHS}, got {path!r}")
    return LAUNCH_US[path] + 1e6 * max(byts / HBM_BYTES_PER_S, flops / rate)


def table_path(cache_root=None) -> Path:
    if cache_root is None:
        env = os.environ.get("PIGEON_CACHE_DIR")
        cache_root = Path(env).expanduser() if env else Path("~/.cache/pigeon").expanduser()
    return Path(cache_root) / "shiftadd" / TABLE_NAME


def load_table(cache_root=None) -> dict:
    try:
        data = json.loads(table_path(cache_root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("entries"), list) else {}


_CACHED: dict = {}         # table path -> its data
GENERATION = 0             # bumped whenever a cached table is dropped


def cached_table(cache_root=None) -> dict:
    """``load_table``, read once per process and table path."""
    path = table_path(cache_root)
    got = _CACHED.get(path)
    if got is None:
        got = _CACHED[path] = load_table(cache_root)
    return got


def forget_table() -> None:
    """Drop the cached tables (the next decision reads the file again)."""
    global GENERATION
    _CACHED.clear()
    GENERATION += 1


def save_table(gpu: str, entries: list[dict], cache_root=None) -> Path:
    """Merge ``entries`` ({path, M, N, K, dtype, us}) into the table of ``gpu`` (atomic write)."""
    path = table_path(cache_root)
    old = load_table(cache_root)
    keep = [e for e in old.get("entries", []) if old.get("gpu") == gpu]
    new_keys = {(e["path"], e["M"], e["N"], e["K"], e["dtype"]) for e in entries}
    keep = [e for e in keep if (e["path"], e["M"], e["N"], e["K"], e["dtype"]) not in new_keys] + list(entries)
    out = write_atomic(path, json.dumps({"gpu": gpu, "entries": keep}, indent=1))
    forget_table()                                   # decisions made from the old table are stale
    return out


@dataclass
class Decision:
    path: str
    source: str                    # "measured" | "estimate" | "explicit"
    us: dict = field(default_factory=dict)          # path -> microseconds (measured or estimated)
    excluded: dict = field(default_factory=dict)    # path -> why it cannot run this shape
    shape: tuple = ()

    def describe(self) -> str:
        m, n, k, dtype = self.shape
        cands = ", ".join(f"{p} {self.us[p]:.1f} us" for p in PATHS if p in self.us)
        out = ", ".join(f"{p}: {why}" for p, why in self.excluded.items())
        return (f"shift linear M={m} N={n} K={k} {dtype}: path {self.path} ({self.source}"
                f"{'' if self.source == 'explicit' else ' latencies'}: {cands or 'none'})"
                + (f"; not applicable: {out}" if out else ""))


def applicable(m: int, n: int, k: int, dtype: str, p_min: int, p_max: int, fp8_ok: bool = True) -> dict:
    """path -> why it cannot run this shape (absent: it can)."""
    why = {}
    if m > 16:
        why["packed"] = f"{m} tokens > 16"
    if dtype not in ("bfloat16", "float16", "float32"):
        why["packed"] = f"dtype {dtype}"
    if not fp8_ok:
        why["fp8"] = "no fp8 tensor cores on this device (sm_89+)"
    elif k % 16 or n % 16:
        why["fp8"] = f"K={k}, N={n} not multiples of 16"
    elif p_min < -16 or p_max > 15:
        why["fp8"] = f"range {p_min}..{p_max} not exact in e5m2"
    return why


def choose(m: int, n: int, k: int, dtype: str, *, p_min: int = -15, p_max: int = 0, bits: int = 6,
           gpu: str | None = None, fp8_ok: bool = True, table: dict | None = None) -> Decision:
    """The fastest applicable path (module doc); ``table`` defaults to the cache's measured table."""
    excluded = applicable(m, n, k, dtype, p_min, p_max, fp8_ok)
    cands = [p for p in PATHS if p not in excluded]
    table = cached_table() if table is None else table
    measured = {}
    if gpu is not None and table.get("gpu") == gpu:
        for e in table.get("entries", []):
            if (e.get("M"), e.get("N"), e.get("K"), e.get("dtype")) == (m, n, k, dtype) and e.get("path") in cands:
                measured[e["path"]] = float(e["us"])
    if measured and all(p in measured for p in cands):
        us, source = measured, "measured"
    else:
        us, source = {p: estimate_us(p, m, n, k, dtype, bits) for p in cands}, "estimate"
    best = min(cands, key=lambda p: us[p])
    return Decision(best, source, us, excluded, (m, n, k, dtype))
