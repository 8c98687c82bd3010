"""The physical floor of a benchmark case: FLOPs of its typed linears and the bytes it must move,
against the GPU's peak numbers (``PEAK_FLOPS``, ``PEAK_BYTES_PER_S``).

floor = max(FLOPs / peak FLOP/s of the dtype, min bytes / peak bytes/s); training counts 3x the
forward's FLOPs.  The counts follow pigeon/models/*.py with the benchmark's hyperparameters
(:func:`hparams`)."""
from __future__ import annotations

__all__ = ["PEAK_FLOPS", "PEAK_BYTES_PER_S", "INDEX_BYTES_PER_EDGE", "ELEMENT_BYTES", "HEADS", "hparams", "out_dim",
           "param_count", "forward_flops", "min_bytes", "case_floor"]

# The GPU's ceilings that the floors use: the calibration numbers measured on the H200 (dense GEMM
# FLOP/s per storage dtype, and HBM bytes/s).  Floors on any other device still use them.
PEAK_FLOPS = {"float32": 50e12, "bfloat16": 750e12}
PEAK_BYTES_PER_S = 4.2e12
INDEX_BYTES_PER_EDGE = 12                    # src, dst, etype as int32
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2}
HEADS = 4                                    # RGAT and HGT


def hparams(model: str, dim: int) -> dict:
    """The hyperparameters of each model at hidden size ``dim`` (out size = dim for all three)."""
    return {"rgcn": {"out_dim": dim}, "rgat": {"out_dim": dim // HEADS, "heads": HEADS},
            "hgt": {"heads": HEADS}}[model]


def out_dim(model: str, dim: int) -> int:
    hp = hparams(model, dim)
    return hp["out_dim"] * hp["heads"] if model == "rgat" else hp.get("out_dim", dim)


def param_count(model: str, dim: int, num_etypes: int, num_ntypes: int) -> int:
    """Number of weights of pigeon's layer (pigeon/models/*.py) on a graph with R relations and T
    node types."""
    R, T, d = num_etypes, num_ntypes, dim
    hp = hparams(model, dim)
    if model == "rgcn":
        o = hp["out_dim"]
        return R * d * o + d * o + o                                  # W, W_self, b
    if model == "rgat":
        H, D = hp["heads"], hp["out_dim"]
        return R * d * H * D + 2 * R * H * D                          # W, a_src, a_dst
    if model == "hgt":
        H = hp["heads"]
        dh = d // H
        return T * 4 * d * d + R * (2 * H * dh * dh + H) + T          # W_k,q,v,out; W_att, W_msg, mu; skip
    raise ValueError(f"unknown model {model!r}")


def forward_flops(model: str, dim: int, num_nodes: int, num_edges: int) -> int:
    """FLOPs of the forward's typed linears (2 * rows * K * N per GEMM; elementwise work, dots and
    softmax not counted), as pigeon/models/*.py write them."""
    N, E, d = num_nodes, num_edges, dim
    hp = hparams(model, dim)
    if model == "rgcn":                       # x_src W_r on E rows, x W_self on N rows
        o = hp["out_dim"]
        return 2 * E * d * o + 2 * N * d * o
    if model == "rgat":                       # z_src and z_dst: x W_r on E rows each
        return 2 * (2 * E) * d * (hp["heads"] * hp["out_dim"])
    if model == "hgt":                        # K, Q, V, out on N rows; W_att, W_msg per head on E rows
        H = hp["heads"]
        dh = d // H
        return 4 * (2 * N * d * d) + 2 * (2 * E * H * dh * dh)
    raise ValueError(f"unknown model {model!r}")


def min_bytes(model: str, dim: int, dtype: str, mode: str, num_nodes: int, num_edges: int, num_etypes: int,
              num_ntypes: int) -> int:
    """Bytes a case must move at least: inputs, weights and graph indices read once, outputs written
    once; training also writes the gradients of the input and the weights once and reads the forward
    output once."""
    s = ELEMENT_BYTES[dtype]
    x = num_nodes * dim * s
    w = param_count(model, dim, num_etypes, num_ntypes) * s
    out = num_nodes * out_dim(model, dim) * s
    total = x + w + INDEX_BYTES_PER_EDGE * num_edges + out
    if mode == "training":
        total += x + w + out
    return total


def case_floor(model: str, dim: int, dtype: str, mode: str, num_nodes: int, num_edges: int, num_etypes: int,
               num_ntypes: int) -> dict:
    """The physical floor of a case: max(FLOPs / peak FLOP/s of the dtype, min bytes / peak bytes/s),
    training = 3x the forward's FLOPs."""
    flops = forward_flops(model, dim, num_nodes, num_edges) * (3 if mode == "training" else 1)
    nbytes = min_bytes(model, dim, dtype, mode, num_nodes, num_edges, num_etypes, num_ntypes)
    t_flops, t_bytes = flops / PEAK_FLOPS[dtype], nbytes / PEAK_BYTES_PER_S
    return {"flops": flops, "bytes": nbytes, "floor_ms": max(t_flops, t_bytes) * 1e3,
            "bound": "compute" if t_flops >= t_bytes else "memory"}
