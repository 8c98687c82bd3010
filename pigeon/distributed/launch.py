"""Start N local processes with torch.multiprocessing.spawn, each with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port), and run an entry point in each.

    python -m pigeon.distributed.launch --nproc 2 [--entry pigeon.distributed.ddp:main] -- [entry args]

The entry (``module:function``, default the DDP demo ``pigeon.distributed.ddp:main``) is called with the
arguments after ``--`` and initialises its own process group (``ddp.init_from_env``).  On one machine or many,
torchrun does the same job:

    torchrun --nproc_per_node 2 -m pigeon.distributed.ddp --steps 5 --check

(multi-node: ``torchrun --nnodes M --node_rank i --rdzv_backend c10d --rdzv_endpoint HOST:PORT ...``).
:func:`spawn` is the library form the tests use.
"""
from __future__ import annotations

import argparse
import importlib
import os
import socket

import torch.multiprocessing as mp

__all__ = ["free_port", "spawn", "main"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve(entry: str):
    mod, _, fn = entry.partition(":")
    return getattr(importlib.import_module(mod), fn or "main")


def _worker(rank: int, world: int, port: int, entry, args) -> None:
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))     # no oversubscription of the cores
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn = _resolve(entry) if isinstance(entry, str) else entry
    fn(*args)


def spawn(entry, nproc: int, *args, port: int | None = None, start_method: str = "spawn") -> None:
    """Run ``entry(*args)`` (a picklable function or a ``"module:function"`` string) in ``nproc`` new
    processes with the distributed environment set; raises if any process fails (torch.multiprocessing names
    the rank and its traceback) and terminates the others then.  ``start_method="fork"`` (what the tests use)
    skips re-importing torch and pigeon in every child (seconds each); it is safe only in a parent that has
    not initialised a process group, CUDA or thread pools it relies on in the child."""
    mp.start_processes(_worker, args=(nproc, port or free_port(), entry, args), nprocs=nproc, join=True,
                       start_method=start_method)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="pigeon.distributed.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, required=True)
    p.add_argument("--entry", default="pigeon.distributed.ddp:main")
    p.add_argument("--start-method", choices=("spawn", "fork", "forkserver"), default="spawn")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    spawn(a.entry, a.nproc, rest, start_method=a.start_method)


if __name__ == "__main__":
    main()
