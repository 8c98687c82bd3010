"""Compile time of one attention variant from a cold and from a warm kernel cache, each in a fresh
process (so that no in-process module memo hides the build): the first forward (and forward +
backward) call with ``PIGEON_CACHE_DIR`` pointing at an empty directory, then again in a new
process with that directory filled.  Next to it the bench reports FlexAttention's compile time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time, torch
import pigeon.attention as pa
variant, D, dtype = sys.argv[1], int(sys.argv[2]), getattr(torch, sys.argv[3])
pattern = {"causal": pa.Causal(), "dense": None}.get(variant, pa.Causal())
q, k, v = (torch.randn(1, 4, 256, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
t0 = time.perf_counter()
out = pa.attention(q, k, v, pattern=pattern)
torch.cuda.synchronize()
t1 = time.perf_counter()
out.sum().backward()
torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({"forward_s": t1 - t0, "backward_s": t2 - t1}))
"""


def cold_warm(variant: str = "causal", head_dim: int = 128, dtype: str = "bfloat16", timeout: float = 600.0) -> dict:
    """{"cold": {...}, "warm": {...}} first-call seconds (forward, backward) of ``variant``, or
    {"error": why}."""
    out = {"variant": variant, "head_dim": head_dim, "dtype": dtype, "shape": "B1 H4 S256"}
    with tempfile.TemporaryDirectory(prefix="pigeon-cold-cache-") as cache:
        env = dict(os.environ, PIGEON_CACHE_DIR=cache)
        for which in ("cold", "warm"):
            t0 = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, "-c", CHILD, variant, str(head_dim), dtype], env=env,
                                      capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return {**out, "error": f"{which} run timed out after {timeout:.0f} s"}
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                return {**out, "error": f"{which} run failed: {tail[0][:300]}"}
            out[which] = {**json.loads(proc.stdout.strip().splitlines()[-1]),
                          "process_s": time.perf_counter() - t0}
    return out
