"""The steady-state no-grad layer call as one step: a call whose input matches one the full path
already checked, bound and replayed goes straight to that CUDA-graph replay
(pigeon/runtime/replay.py ``ProgramReplay``).

Why: the full path of a layer call (ops.call_layer: bind_inputs' checks, the cast and permutation
loop, the autograd decision, the Executor's plan, rule and key, the ReplaySet lookup) costs ~60 us
of Python on the CPU machine for a 4-launch RGCN program whose replay itself costs ~9 us; on small
graphs that host time is most of a call (issue 7: at most 30 us beyond the kernels).

What a hit skips is exactly what its key proves unchanged since the full call that made the entry:
* ``bind_inputs``' checks depend only on the input's type, dtype, shape and device and on the
  weights' device: a hit has the same type, dtype, shape and device, and the same weight tensors
  (identity, dtype and address: a replaced or moved weight, or ``.data =``, misses);
* the replay rule's per-call parts (``PIGEON_CUDA_GRAPHS``, the debug variables, tracing or
  capture in progress, dispatch modes and functorch transforms, ``PIGEON_EAGER_FASTPATH``,
  ``PIGEON_POISON``) are checked on every call, as the full path checks them;
* the ReplayProgram must still be the one its ReplaySet holds for the full key (an LRU eviction or
  a failed capture sends the call down the full path).
Only single-input layers whose input is node-wise and contiguous, of the layer's dtype (or float32
for a 16-bit layer: cast as the full path casts it), and whose outputs are not edge-wise, take it,
and only when autograd would record nothing; a 16-bit layer's float32 masters are read through
pigeon/runtime/weight_casts.py (cast once per master state), as the full path reads them. Results are the full path's: the same replay, the same copies out.
"""
from __future__ import annotations

import threading

import torch

from . import replay as _replay
from .program import TORCH_DTYPES, Executor, _plan
from .weight_casts import cast_weight

__all__ = ["try_call", "learn", "ENTRIES_PER_LAYER", "LEARN_TRIES"]

ENTRIES_PER_LAYER = 8          # (input shape, dtype, device, weights container, modes) per layer
LEARN_TRIES = 4                # misses per key that look for a replay before the key gives up

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_lock = threading.Lock()


class _Entry:
    __slots__ = ("rep", "rs", "full_key", "params", "ptrs", "in_name", "weight_names", "param_names",
                 "needed", "copy", "out_names", "cast")

    def __init__(self, rep, rs, full_key, params, in_name, weight_names, param_names, needed, copy, out_names,
                 cast):
        self.rep, self.rs, self.full_key = rep, rs, full_key
        self.cast = cast                              # the layer's dtype where its masters are float32, else None
        self.params = params                          # the weight tensors of the full call (the masters)
        self.ptrs = tuple(p.data_ptr() for p in params)
        self.in_name = in_name                        # the program's name of the input
        self.weight_names = weight_names              # the layer's names of its weights (glue.params)
        self.param_names = param_names                # the program's names of the same, in that order
        self.needed, self.copy, self.out_names = needed, copy, out_names


def _modes() -> tuple | None:
    """The per-call parts of the rule as a key part, or None when this call must take the full
    path (compiling, a dispatch mode or transform active, a debug variable set, capture running)."""
    if torch.compiler.is_compiling():
        return None
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return None
    get = _replay.getenv
    if get("PIGEON_EAGER_FASTPATH") == "0":
        return None
    mode = _replay.graphs_mode()
    if mode == "0" or _replay._debug_env_set() is not None or _replay.CUDA.capturing():
        return None
    return mode, get("PIGEON_POISON") == "1"


def replayable_modes(lp, x) -> tuple | None:
    """The per-call modes (``_modes``) for a call of ``lp`` on ``x`` whose device the cuda executor
    replays on, else None (a CPU layer never asks about CUDA capture)."""
    if x.device.type not in _replay.DEVICE_TYPES:
        return None
    if getattr(lp.backend(x.device), "name", None) != "cuda":      # only the cuda executor replays
        return None
    return _modes()


def _cheap_key(x, weights, modes) -> tuple:
    return (x.shape, x.dtype, x.device, id(weights), modes)


def _eligible(glue, x) -> bool:
    if len(glue.inputs) != 1 or glue.inputs[0][1] != "node":
        return False
    if any(rows == "edge" for _, rows in glue.outputs):
        return False
    dt = TORCH_DTYPES[glue.dtype]
    ok = x.dtype == dt or (x.dtype == torch.float32 and dt in (torch.bfloat16, torch.float16))   # ops._accepts
    return ok and x.is_contiguous()


def same_weights(weights, names, params, ptrs) -> bool:
    """Whether the ParameterDict ``weights`` still holds ``params`` under ``names``, at the addresses
    ``ptrs`` (a replaced, moved or ``.data``-reassigned weight misses)."""
    held = getattr(weights, "_parameters", None)         # a ParameterDict's own dict: ~20x cheaper
    if held is None:                                     # than its __getitem__, and the same tensors
        return False
    for name, p, ptr in zip(names, params, ptrs):
        if held.get(name) is not p or p.data_ptr() != ptr:
            return False
    return True


def _holds(e: _Entry, weights) -> bool:
    """Whether ``e`` still stands for ``weights``: the same weight tensors at the same addresses, and
    its replay still the one its ReplaySet holds (not evicted, not replaced by a new capture)."""
    return same_weights(weights, e.weight_names, e.params, e.ptrs) and e.rs.replays.get(e.full_key) is e.rep


def try_call(lp, glue, x, weights):
    """The outputs dict of a replayed call of layer ``lp`` on input ``x``, or None (take the full
    path). ``lp``: the layer's ops.LayerPrograms."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:   # dynamo must see the op
        return None
    memo = lp.fast_replays
    if not memo:
        return None
    modes = _modes()
    if modes is None:
        return None
    e = memo.get(_cheap_key(x, weights, modes))
    if e is None or e.__class__ is not _Entry:
        return None
    params = e.params
    if not x.is_contiguous():
        return None
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return None
    if grad and any(p.requires_grad for p in params):
        return None
    if not _holds(e, weights):
        return None
    if e.cast is not None:                             # a 16-bit layer: the cached casts of its masters
        dt = e.cast
        params = [p if p.dtype == dt else cast_weight(p, dt, False) for p in params]
        if x.dtype != dt:                              # a float32 input, cast as the full path casts it
            x = x.to(dt)
    out = e.rep({e.in_name: x}, dict(zip(e.param_names, params)), e.needed)
    vals = [out[n].clone() if c else out[n] for n, c in zip(e.needed, e.copy)]
    return dict(zip(e.out_names, vals))


def learn(lp, glue, x, weights) -> None:
    """After a full no-grad call of ``lp`` on ``x``: remember its replay for the next calls, if
    that call replayed (a key's first calls run plainly and capture: they are looked at again, at
    most LEARN_TRIES times)."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return
    if torch.is_grad_enabled():         # first, and cheaply: a training call (autograd records it) learns nothing
        if x.requires_grad:
            return
        held = getattr(weights, "_parameters", None)
        if held is None or any(p is not None and p.requires_grad for p in held.values()):
            return
    if not _eligible(glue, x):
        return
    modes = replayable_modes(lp, x)
    if modes is None:
        return
    key = _cheap_key(x, weights, modes)
    memo = lp.fast_replays
    old = memo.get(key)
    if old.__class__ is _Entry:
        if _holds(old, weights):
            return
        old = None                      # stale (a weight replaced or moved, the replay evicted): learn again
    tries = old or 0
    if tries >= LEARN_TRIES:
        return
    dt = TORCH_DTYPES[glue.dtype]
    params = [weights[n] for n in glue.params]
    if any(type(p) not in _PLAIN for p in params):
        memo[key] = LEARN_TRIES
        return
    lows = [p if p.dtype == dt else cast_weight(p, dt, False) for p in params]   # what the full call bound
    dev = x.device
    backend = lp.backend(dev)
    rs = _replay.replays_of(backend, lp.forward)
    rep = None
    full_key = None
    if rs is not None:
        kg = lp.kg(dev)
        ex = Executor(lp.forward, backend, poison=modes[1])
        inputs = dict(zip(lp.input_names, [x if x.dtype == dt else x.to(dt)]))
        pdict = dict(zip(lp.param_names, lows))
        full_key = ex._key(_plan(lp.forward, kg), kg, inputs, pdict)
        rep = rs.replays.get(full_key) if full_key is not None else None
    if rep is None:
        memo[key] = tries + 1
        return
    needed = lp.returned[:lp.n_outputs]
    entry = _Entry(rep, rs, full_key, tuple(params), lp.input_names[0], tuple(glue.params), tuple(lp.param_names), needed,
                   tuple(lp.returned_copy[:lp.n_outputs]), tuple(name for name, _ in glue.outputs),
                   dt if x.dtype != dt or any(p.dtype != dt for p in params) else None)
    with _lock:
        while len(memo) >= ENTRIES_PER_LAYER:
            memo.pop(next(iter(memo)))
        memo[key] = entry
