"""Benchmarks of pigeon's compiled layers against their peers (``pigeon bench ...``).

- :mod:`pigeon.bench.rgnn`: ``pigeon bench rgnn``: RGCN, RGAT and HGT against PyG, the reference
  interpreter and torch.compile of it, per (graph, model, hidden size, dtype, mode): the cases, the
  run, the summary file (its docstring says what is measured and how).
- :mod:`pigeon.bench.peers`: the peer implementations.
- :mod:`pigeon.bench.timing`: timing one implementation (CUDA events, peak memory, time limit,
  failures as statuses).
- :mod:`pigeon.bench.check`: pigeon's outputs and gradients against the reference interpreter.
- :mod:`pigeon.bench.floors`: FLOPs, minimum bytes and the physical floor of a case.
- :mod:`pigeon.bench.summary`: the aggregate of the case records.
- :mod:`pigeon.bench.report`: the JSON, markdown and PNG files.

This package imports pigeon; nothing in pigeon imports it except the CLI's ``bench`` command.
"""
