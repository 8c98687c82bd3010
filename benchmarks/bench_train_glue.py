"""Host time of pigeon's glue around a training call, on the CPU machine: the cuda executor path with
the tests' stand-in CUDA graphs (tests/fake_cuda.py) whose replay does nothing after warm-up, so only
pigeon's Python and torch's dispatch are timed (no kernel runs; the numbers are not GPU numbers).
A/B, interleaved in rounds: the one-step training entry (pigeon/runtime/train_replay.py
``fast_lookup``) on and off; both replay through the TrainReplay.

    python benchmarks/bench_train_glue.py --out benchmarks/results/train_glue_cpu_<commit>.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


class _Patch:
    """The three monkeypatch calls tests/fake_cuda.py's install_for_layers makes."""
    def setattr(self, obj, name, val):
        setattr(obj, name, val)

    def setenv(self, k, v):
        os.environ[k] = v

    def delenv(self, k, raising=False):
        os.environ.pop(k, None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=50, help="calls per round and path")
    ap.add_argument("--out", default="/tmp/train_glue.json")
    args = ap.parse_args()
    import fake_cuda
    import pigeon as pg
    from pigeon.graph import load
    from pigeon.models import hgt, rgat, rgcn
    from pigeon.runtime import train_replay
    fake_cuda.install_for_layers(_Patch())
    real_lookup, real_learn = train_replay.fast_lookup, train_replay.learn
    g = load("tiny")
    rows = []
    for spec, hp in ((rgcn, {"out_dim": 16}), (rgat, {"out_dim": 4, "heads": 4}), (hgt, {"heads": 4})):
        layer = pg.compile(spec, g, 16, **hp)
        x = torch.randn(g.num_nodes, 16, requires_grad=True)
        for _ in range(4):                           # plain, capture, learned
            layer(x).sum().backward()
        replay_fn = fake_cuda.FakeGraph.replay
        fake_cuda.FakeGraph.replay = lambda self: None
        times = {"one-step": [], "full": []}
        try:
            for _ in range(args.rounds):
                for path in times:
                    on = path == "one-step"
                    train_replay.fast_lookup = real_lookup if on else (lambda *a: None)
                    train_replay.learn = real_learn if on else (lambda *a: None)
                    for _ in range(args.calls):
                        t0 = time.perf_counter()
                        out = layer(x)
                        times[path].append((time.perf_counter() - t0) * 1e6)
                        out.sum().backward()
        finally:
            train_replay.fast_lookup, train_replay.learn = real_lookup, real_learn
            fake_cuda.FakeGraph.replay = replay_fn
        row = {"model": spec.name, **{f"{p}_forward_us": statistics.median(v) for p, v in times.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"machine": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), stand-in CUDA graphs",
            "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
            "what": "median host microseconds of one training forward call (layer(x) in grad mode), tiny graph, dim 16"}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
