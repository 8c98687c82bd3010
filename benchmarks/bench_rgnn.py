"""Thin wrapper of ``pigeon bench rgnn`` (pigeon/bench/rgnn.py), kept for scripts that call it.

    python benchmarks/bench_rgnn.py --graph fb15k-237 --reverse --dim 64 --out benchmarks/results/rgnn

is ``pigeon bench rgnn --graphs fb15k-237+rev --dims 64 --out benchmarks/results/rgnn``; any other
flag goes to ``pigeon bench rgnn`` as it is (``--models``, ``--dtypes``, ``--modes``, ``--peers``,
``--reps``, ``--peer-timeout``, ``--quick``, ``--device``).  ``timeit`` stays for
benchmarks/bench_aggregate.py.
"""
from __future__ import annotations

import argparse
import sys

import torch


def timeit(fn, warmup=3, reps=20):
    """Median CUDA-event milliseconds of ``fn()`` (pigeon.bench.rgnn.median_ms on the GPU)."""
    from pigeon.bench.rgnn import median_ms
    return median_ms(fn, torch.device("cuda"), warmup, reps)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", help="one graph (pigeon bench rgnn --graphs takes a list)")
    ap.add_argument("--reverse", action="store_true", help="add reverse relations (NAME+rev)")
    ap.add_argument("--dim", help="hidden size (pigeon bench rgnn --dims takes a list)")
    ap.add_argument("--tag", help="ignored (the files are cases.json/.md, summary.json/.md, speedup.png)")
    args, rest = ap.parse_known_args(argv)
    cmd = ["bench", "rgnn"]
    if args.graph:
        cmd += ["--graphs", args.graph + ("+rev" if args.reverse else "")]
    if args.dim:
        cmd += ["--dims", args.dim]
    from pigeon.cli import main as cli
    return cli(cmd + rest)


if __name__ == "__main__":
    sys.exit(main())
