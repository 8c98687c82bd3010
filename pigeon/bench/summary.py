"""The aggregate of a benchmark's case records: the numbers of the issue's summary file."""
from __future__ import annotations

import math

__all__ = ["geomean", "summarize", "MODES"]

MODES = ("inference", "training")


def geomean(values) -> float | None:
    vals = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def summarize(cases: list[dict]) -> dict:
    """The aggregate numbers of the issue's summary file, from case records alone."""
    def ok(c):
        return c["pigeon_status"] == "ok"

    def peers(c):
        return [r for r in c["impls"] if r["kind"] != "pigeon"]

    def slower(c):      # a peer that ran beat pigeon, or pigeon failed where a peer ran
        ran = [r for r in peers(c) if r["status"] == "ok" and r.get("median_ms")]
        if not ran:
            return False
        return not ok(c) or any(r["median_ms"] < c["pigeon_ms"] for r in ran)

    out = {}
    for mode in MODES:
        out[f"geomean_speedup_{mode}"] = geomean(c["speedup_best"] for c in cases if c["mode"] == mode)
    by = {}
    for c in cases:
        by.setdefault(f"{c['mode']}/{c['dtype']}", []).append(c["speedup_best"])
    out["geomean_speedup_by_mode_dtype"] = {k: geomean(v) for k, v in sorted(by.items())}
    out["cases_total"] = len(cases)
    out["cases_compared"] = sum(1 for c in cases if c["speedup_best"] is not None)
    out["cases_slower_than_a_peer"] = sum(1 for c in cases if slower(c))
    out["cases_within_3x_floor"] = sum(1 for c in cases if c.get("floor_ratio") is not None and c["floor_ratio"] <= 3)
    out["cases_check_failed"] = sum(1 for c in cases if str(c.get("check", "")).startswith("FAILED"))
    out["pigeon_oom"] = sum(1 for c in cases if c["pigeon_status"] == "OOM")
    out["pigeon_errors"] = sum(1 for c in cases if c["pigeon_status"] not in ("ok", "OOM"))
    peer_oom = {}
    for c in cases:
        for r in peers(c):
            if r["status"] == "OOM":
                peer_oom[r["impl"]] = peer_oom.get(r["impl"], 0) + 1
    out["peer_oom"] = sum(peer_oom.values())
    out["peer_oom_by_impl"] = peer_oom
    out["peer_timeouts"] = sum(1 for c in cases for r in peers(c) if r["status"] == "timeout")
    out["peer_errors"] = sum(1 for c in cases for r in peers(c) if r["status"].startswith("error"))
    ratios = [c["floor_ratio"] for c in cases if c.get("floor_ratio") is not None]
    out["floor_ratio_geomean"] = geomean(ratios)
    return out
