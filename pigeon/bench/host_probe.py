"""The host-overhead measurement of ``pigeon bench rgnn`` (:func:`pigeon.bench.rgnn.host_overhead`)
in a process of its own: ``python -m pigeon.bench.host_probe MODELS DIM DEVICE`` prints one JSON
object {"result": per-model dict or null, "note": str}.

Why a process of its own: measured at the end of a bench run, after the large graphs' layers, the
peers and torch.compile have run in the same process, the same RGCN call on the tiny graph took
77 us per call on the H200 (2026-12-02), against 36-58 us in a fresh process on the same machine
(2026-12-03): a user's steady-state call is the fresh process's, and the run records both."""
from __future__ import annotations

import json
import sys

import torch


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m pigeon.bench.host_probe MODELS DIM DEVICE", file=sys.stderr)
        return 2
    from .rgnn import host_overhead
    models, dim, device = argv[0].split(","), int(argv[1]), torch.device(argv[2])
    res, note = host_overhead(models, dim, device)
    print(json.dumps({"result": res, "note": note}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
