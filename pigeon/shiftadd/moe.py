"""Token routing, dispatch and combine of the ShiftAdd mixture MLP (issue 9), without host syncs.

Given each token's top-k expert ids ``expert_ids [T, k]`` and gates ``gates [T, k]``:

- :func:`route` (torch ops on the ids' device, no host read): the rank of each (token, choice) among
  the choices of its expert, in (t, j) order (a cumulative sum of the one-hot ids), gives its row in
  a fixed-capacity expert-sorted buffer ``[E * C, D]`` (expert e owns rows e*C .. e*C + C - 1):
  ``slot[t, j] = e * C + rank`` (-1 when rank >= C: dropped, Switch-style), and the inverse map
  ``src[r] = t * k + j`` (-1: an empty row).  ``C`` is a host number fixed by the shape
  (MoEMLP: T, so nothing is ever dropped, or ``capacity_factor * T * k / E``), so every expert GEMM
  has a static row count and no per-expert count is read on the host;
- the compact layout (``layout="compact"``, MoEMLP's default): the same ranks and the same
  kept / dropped choices, but the kept rows packed by expert with no padding: ``slot[t, j] =
  base[e] + rank`` with ``base`` the exclusive cumulative sum of ``min(counts, C)`` (on the device),
  ``src`` of ``R = min(T * k, E * C)`` rows (the rows past ``ends[E - 1]`` empty: -1) and ``ends
  [E]`` (int32, device) the inclusive sums, the group ends ``torch._grouped_mm``'s ``offs`` takes.
  Expert e owns rows ``ends[e] - min(counts[e], C) .. ends[e] - 1``; a capacity row e*C + q is
  compact row base[e] + q.  The dispatch and combine kernels read the layout through src / slot
  only, so they serve both layouts (combine with one "expert" output of R rows);
- dispatch (layers.moe_dispatch): ``buf[r] = x[src[r] // k]`` (0 for an empty row);
- combine (layers.moe_combine): ``out[t] = sum_j gates[t, j] * y_e[r]`` over token t's kept slots, float32
  accumulation (float64 on the float64 torch path), in j order, rounded once.

This module holds the layout and the torch reference (:func:`dispatch_ref` / :func:`combine_ref`,
the kernels' oracle); the differentiable ``moe_dispatch`` / ``moe_combine`` are in layers.py (the
importer of the kernels' launcher): ``backend="kernels"`` on CUDA tensors: one launch each of the
generated kernels of pigeon/codegen/shiftadd_moe.py (``shiftadd.moe.cu.jinja``); ``"emulate"``:
the same kernel text on CPU tensors (pigeon/runtime/emulate.py); ``"torch"`` (and any CPU or
float64 tensor under ``"kernels"``): the torch reference.  Autograd: the gradient of dispatch is an
unscaled combine of the buffer's gradient, the gradient of combine wrt the expert outputs a
dispatch scaled by the gates (each through the same kernels); the gates' gradient
``<g[t], y[slot[t, j]]>`` is torch ops.
"""
from __future__ import annotations

import torch

BACKENDS = ("kernels", "emulate", "torch")
LAYOUTS = ("capacity", "compact")


class MoERoutingError(ValueError):
    """Bad expert ids or gates (names the tensor)."""


def _what(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_routing(expert_ids, gates, tokens: int, experts: int) -> None:
    """One-line MoERoutingError unless ``expert_ids`` is int32/int64 ``[tokens, k]`` with 1 <= k <= experts
    and ``gates`` (if not None) a floating-point tensor of the same shape and device.  The id values
    are checked on a CPU only (on CUDA that would read them on the host)."""
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dtype not in (torch.int32, torch.int64) or \
            expert_ids.dim() != 2 or expert_ids.shape[0] != tokens or not 1 <= expert_ids.shape[1] <= experts:
        raise MoERoutingError(f"expert_ids must be an int32/int64 [T={tokens}, k] tensor with 1 <= k <= {experts}, "
                              f"got {_what(expert_ids)}")
    if gates is not None and (not isinstance(gates, torch.Tensor) or not gates.is_floating_point() or
                              gates.shape != expert_ids.shape or gates.device != expert_ids.device):
        raise MoERoutingError(f"gates must be a floating-point tensor of expert_ids' shape "
                              f"{tuple(expert_ids.shape)} on {expert_ids.device}, got "
                              f"{_what(gates)}{'' if not isinstance(gates, torch.Tensor) else ' on ' + str(gates.device)}")
    if expert_ids.device.type == "cpu" and expert_ids.numel() and \
            (int(expert_ids.min()) < 0 or int(expert_ids.max()) >= experts):
        raise MoERoutingError(f"expert_ids must lie in [0, {experts}), got {int(expert_ids.min())}..{int(expert_ids.max())}")


class Routing:
    """The buffer layout of one call: ``slot [T, k]``, ``src [R]`` (int32; R = E * C, or min(T * k, E * C)
    compact), ``counts [E]`` (the tokens routed to each expert before the capacity cut, on the
    device), ``experts``, ``capacity``, ``k``, ``layout`` and (compact only, else None) ``ends [E]``
    (int32, device: the end row of each expert's group)."""
    __slots__ = ("slot", "src", "counts", "experts", "capacity", "k", "layout", "ends")

    def __init__(self, slot, src, counts, experts, capacity, k, layout="capacity", ends=None):
        self.slot, self.src, self.counts = slot, src, counts
        self.experts, self.capacity, self.k = experts, capacity, k
        self.layout, self.ends = layout, ends

    @property
    def tokens(self) -> int:
        return self.slot.shape[0]

    @property
    def rows(self) -> int:
        """Rows of the dispatch buffer (host number, from the shapes)."""
        return self.src.shape[0]

    def groups(self) -> tuple[int, int]:
        """(number of expert outputs combine takes, rows of each): (E, C), or (1, R) compact."""
        return (self.experts, self.capacity) if self.layout == "capacity" else (1, self.rows)


def compact_rows(tokens: int, k: int, experts: int, capacity: int) -> int:
    """R of the compact layout: no more kept choices than T * k, nor than E * C."""
    return min(tokens * k, experts * capacity)


def row_groups(ends: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert of each compact row ``[rows]`` (int64, on ends' device, no host read): e with
    ends[e-1] <= r < ends[e]; rows past ends[E-1] (never read) get E - 1."""
    r = torch.arange(rows, device=ends.device, dtype=ends.dtype)
    return torch.bucketize(r, ends, right=True).clamp_max(ends.shape[0] - 1)


def route(expert_ids: torch.Tensor, experts: int, capacity: int | None = None, layout: str = "capacity") -> Routing:
    """The expert-sorted layout for ``expert_ids [T, k]`` (module doc); ``capacity`` rows per expert
    (default T: each token picks an expert at most once, so nothing is dropped); ``layout``
    "capacity" (row e*C + rank) or "compact" (row base[e] + rank, no padding rows)."""
    if layout not in LAYOUTS:
        raise MoERoutingError(f"layout is one of {LAYOUTS}, got {layout!r}")
    t = expert_ids.shape[0] if isinstance(expert_ids, torch.Tensor) and expert_ids.dim() == 2 else -1
    check_routing(expert_ids, None, t, experts)
    k = expert_ids.shape[1]
    c = t if capacity is None else int(capacity)
    if c < 0:
        raise MoERoutingError(f"capacity must be >= 0, got {capacity}")
    dev = expert_ids.device
    flat = expert_ids.reshape(-1).long()
    hit = flat.unsqueeze(1) == torch.arange(experts, device=dev)                     # [T*k, E]
    rank = hit.cumsum(0, dtype=torch.int32).gather(1, flat.unsqueeze(1)).squeeze(1) - 1
    keep = rank < c
    counts = hit.sum(0, dtype=torch.int32)
    if layout == "capacity":
        slot = torch.where(keep, flat * c + rank, -1)
        rows, ends = experts * c, None
    else:
        ends = counts.clamp_max(c).cumsum(0, dtype=torch.int32)
        base = ends - counts.clamp_max(c)
        slot = torch.where(keep, base.index_select(0, flat) + rank, -1)
        rows = compact_rows(t, k, experts, c)
    src = torch.full((rows + 1,), -1, dtype=torch.int32, device=dev)
    src.scatter_(0, torch.where(keep, slot, rows).long(), torch.arange(t * k, dtype=torch.int32, device=dev))
    return Routing(slot.to(torch.int32).reshape(t, k), src[:-1], counts, experts, c, k, layout, ends)


# ---------------------------------------------------------------- the torch reference (the kernels' oracle)

def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dispatch_ref(x: torch.Tensor, src: torch.Tensor, k: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``buf[r] = x[src[r] // k]`` (times ``scale.flatten()[src[r]]`` in float32, rounded to x's dtype), 0 where src < 0."""
    valid = (src >= 0).unsqueeze(1)
    s = src.clamp_min(0).long()
    rows = x.index_select(0, torch.div(s, k, rounding_mode="floor"))
    if scale is not None:
        acc = _acc_dtype(x.dtype)
        rows = (scale.reshape(-1).to(acc).index_select(0, s).unsqueeze(1) * rows.to(acc)).to(x.dtype)
    return torch.where(valid, rows, torch.zeros((), dtype=x.dtype, device=x.device))


def combine_ref(ys, slot: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_j gate[t, j] * y[slot[t, j]]`` over ``slot >= 0`` with y = cat(ys), in j order,
    float32 products and sums (float64 for float64), rounded once to y's dtype."""
    y = torch.cat(list(ys)) if len(ys) > 1 else ys[0]
    acc_t = _acc_dtype(y.dtype)
    t, k = slot.shape
    acc = torch.zeros(t, y.shape[1], dtype=acc_t, device=y.device)
    for j in range(k):
        s = slot[:, j]
        v = y.index_select(0, s.clamp_min(0).long()).to(acc_t)
        if gate is not None:
            v = gate[:, j:j + 1].to(acc_t) * v
        acc = acc + torch.where((s >= 0).unsqueeze(1), v, torch.zeros((), dtype=acc_t, device=y.device))
    return acc.to(y.dtype)
