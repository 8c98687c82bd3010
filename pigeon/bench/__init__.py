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
- :mod:`pigeon.bench.attention`: ``pigeon bench attention``: pigeon's attention kernels against
  SDPA (per backend) and compiled FlexAttention per (variant, shape, dtype, mode), with
  :mod:`~pigeon.bench.attn_variants` (the variants and their peers' masks), ``attn_peers``,
  ``attn_check`` (an exact slice against the float64 reference) and ``attn_report``.
- :mod:`pigeon.bench.gemm`: ``pigeon bench gemm``: pigeon.gemm / grouped_gemm against cuBLAS
  through torch, ``torch._grouped_mm``, bmm and a loop.
- :mod:`pigeon.bench.common`: what the attention and GEMM benchmarks share (flags, environment,
  ``--resume``, the case loop).

This package imports pigeon; nothing in pigeon imports it except the CLI's ``bench`` command.
"""
