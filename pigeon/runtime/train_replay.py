"""A layer's training call as two CUDA graphs that share their buffers: the forward graph's static
input and saved values are the backward graph's inputs, read where they lie.

Why.  Replaying the forward and the backward programs as two independent graphs
(pigeon/runtime/replay.py) costs, per training step, a copy out of every saved value after the
forward (one allocation each, one fused copy), ``save_for_backward`` of the inputs, weights and
saved values, a copy of the same values (and of the input again) into the backward graph's own
static tensors, and the Executor's plan, rule and key lookups for the backward.  On the small real
graphs a training step is 80-90% host time (``host share`` in benchmarks/results/rgnn/cases.md),
so that glue is much of what pigeon costs there.  Here a forward call copies its input in and its
user outputs out, a backward call copies the output gradients in and the input and weight
gradients out, and nothing else moves.

The one catch is that the forward's statics hold the values of ONE call.  ``SavedValues`` is what a
forward leaves for its backward (the autograd context holds it); ``TrainReplay.current`` is the one
whose values the statics hold.  Before a replay overwrites them, the current holder, if it is
still alive (its autograd graph not freed), is parked: its values are copied out into tensors of
its own.  A backward of a parked holder first copies its values back in (parking the holder there
now).  So two forwards before their backwards, a retained graph's second backward, or a backward
after another call all get their own forward's values; the common step (forward, backward, the
graph freed) copies nothing.

Master weights.  A 16-bit layer's training call passes its float32 master weights as they are
(ops.low_params): the forward graph reads each master in place and casts it to the programs' dtype
inside the graph, the backward graph reads those casts where the forward left them (shared
statics, parked and restored like the rest: a backward sees its own forward's weights, as a saved
``.to()`` would give it) and casts the weights' gradients up to float32 inside the graph. A step
then costs no cast, and no cast-back, per weight on the host.

Checks that the plain path makes through ``save_for_backward`` are kept: an input or weight
modified in place between forward and backward raises, naming it.  A double backward
(``create_graph``) gets the saved values as tensors and goes through the pigeon::layer_backward op,
as on the plain path.

When.  Eager calls that the plain path would replay (replay.py's rule, on the forward and backward
programs' launches and bytes together), on the ``cuda`` executor, of layers with a backward
program.  A key (replay.py's forward key) is captured on its second training call (the first runs
plainly, building and loading every kernel); at most ``MAX_TRAIN_REPLAYS`` keys per layer, least
recently used out.  A capture that fails warns once and leaves that key on the plain path; the
results are the same either way.  ``PIGEON_TRAIN_REPLAY=0`` turns this path off (training calls then
replay the forward and backward programs separately, with the copies above: an A/B switch).
"""
from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict

import torch

from . import replay as _replay
from .program import Executor, _plan
from .weight_casts import is_master

__all__ = ["TrainReplay", "SavedValues", "CaptureError", "lookup", "fail", "MAX_TRAIN_REPLAYS"]

ENV = "PIGEON_TRAIN_REPLAY"      # "0": training calls replay their programs separately (replay.py)
MAX_TRAIN_REPLAYS = 4
_SEEN, _FAILED = "seen", "failed"


class CaptureError(RuntimeError):
    """Capturing the backward graph failed (the caller runs this backward plainly)."""


class SavedValues:
    """What one training forward of a TrainReplay left for its backward: the inputs and weights it
    was called with (their versions, for autograd's in-place check) and, once parked, copies of
    the shared statics."""
    __slots__ = ("train", "tensors", "versions", "data", "__weakref__")
    # a master weight's version is not checked: the forward's cast of it is what backward reads

    def __init__(self, train: "TrainReplay", tensors: list):
        self.train = train
        self.tensors = tensors
        self.versions = [t._version for t in tensors]
        self.data: list | None = None      # None while the statics hold this call's values

    def check_versions(self) -> None:
        tr = self.train
        for name, t, v in zip(tr.arg_names, self.tensors, self.versions):
            if t._version != v and name not in tr.casts:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: {name!r} of pigeon layer {tr.name!r} is at version {t._version}; expected "
                    f"version {v} instead (it was changed between the layer's forward and its backward)")


class TrainReplay:
    """The forward and backward replays of one layer for one forward key (see the module
    docstring). ``forward`` and ``backward`` hold ``lock`` for their whole call."""

    def __init__(self, lp, kg, backend, inputs: dict, params: dict, poison: bool):
        self.lp, self.kg, self.backend, self.poison = lp, kg, backend, poison
        self.name = getattr(lp.forward, "name", "layer")
        self.device = kg.device
        self.arg_names = tuple(lp.input_names) + tuple(lp.param_names)
        fplan = _plan(lp.forward, kg)
        fexec = functools.partial(Executor(lp.forward, backend, poison=poison)._execute, fplan, kg)
        # master weights (float32, of a 16-bit layer): cast inside the graphs (module docstring)
        self.casts = {n: dt for n, dt in zip(lp.param_names, lp.param_dtypes)
                      if n in params and params[n].dtype != dt}
        with torch.no_grad():            # where the graph casts the masters to (the backward reads them)
            cast_statics = {n: torch.empty(params[n].shape, dtype=dt, device=params[n].device)
                            for n, dt in self.casts.items()}
        if self.casts:
            fexec = functools.partial(_cast_masters, fexec, self.casts, cast_statics, None)
        self.fwd = _replay.ProgramReplay(self.name, fexec, kg, self.device, inputs, params,
                                         fplan.input_names, fplan.param_names)
        self.user_names = tuple(lp.returned[:lp.n_outputs])
        self.user_copy = tuple(lp.returned_copy[:lp.n_outputs])
        _, self.grad_keys, self.saved_keys, _, _, _ = lp.backward_plan()
        # what the backward reads from the forward's statics, by the backward's names for them
        shared = {n: self.fwd.static_of(n) for n in fplan.input_names + fplan.param_names}
        shared = {n: t for n, t in shared.items() if t is not None}     # params read in place: not shared
        shared.update(cast_statics)       # the captured run's casts of the masters (replays rewrite them)
        shared.update((n, self.fwd.output_static(n)) for n in self.saved_keys)
        self.shared = shared
        uniq: dict[int, torch.Tensor] = {}
        for t in shared.values():
            uniq.setdefault(id(t), t)
        self.shared_list = list(uniq.values())   # parked and restored as one list
        self.bwd: _replay.ProgramReplay | None = None
        self.current = None                      # weakref to the SavedValues the statics hold
        self.lock = threading.Lock()
        self.replays = 0

    # -------------------------------------------------------------------- the statics' holder

    def _order_after_replays(self) -> None:
        """The current stream waits for replays queued on other streams (they read or write the
        statics about to change)."""
        handle = _replay.CUDA.stream_handle(self.device)
        for rep in (self.fwd, self.bwd):
            if rep is not None and rep.stream is not None and rep.stream != handle:
                _replay.CUDA.order_after(rep.stream, self.device)

    def _park_current(self) -> None:
        cur = self.current() if self.current is not None else None
        if cur is not None and cur.data is None:
            with torch.no_grad():
                cur.data = [torch.empty_like(t) for t in self.shared_list]
                _replay._copy_into(cur.data, self.shared_list)
        self.current = None

    def _make_current(self, sv: SavedValues) -> None:
        cur = self.current() if self.current is not None else None
        if cur is sv:
            return
        self._park_current()
        if sv.data is None:        # cannot happen: a holder that is not current was parked
            raise RuntimeError(f"pigeon: the saved values of a call of layer {self.name!r} were lost")
        with torch.no_grad():
            _replay._copy_into(self.shared_list, sv.data)
        sv.data = None
        self.current = weakref.ref(sv)

    # -------------------------------------------------------------------- calls

    def forward(self, ins: list, params: list) -> tuple[list, SavedValues]:
        """The user outputs of one training forward (fresh tensors) and its SavedValues."""
        lp = self.lp
        with self.lock:
            self._order_after_replays()
            self._park_current()
            out = self.fwd(dict(zip(lp.input_names, ins)), dict(zip(lp.param_names, params)), self.user_names)
            sv = SavedValues(self, list(ins) + list(params))
            self.current = weakref.ref(sv)
            self.replays += 1
        return [out[n].clone() if c else out[n] for n, c in zip(self.user_names, self.user_copy)], sv

    def backward(self, sv: SavedValues, grads: list) -> dict:
        """The backward program's outputs for the forward that left ``sv``; ``grads``: the user
        outputs' gradients (no None)."""
        sv.check_versions()
        lp = self.lp
        params = dict(zip(lp.param_names, sv.tensors[len(lp.input_names):]))
        g = {k: v for k, v in zip(self.grad_keys, grads)}
        with self.lock:
            self._order_after_replays()
            self._make_current(sv)
            if self.bwd is None:
                try:
                    self.bwd = self._capture_backward(g, params)
                except Exception as e:
                    raise CaptureError(f"{type(e).__name__}: {e}") from e
            return self.bwd(g, params)

    def _capture_backward(self, grads: dict, params: dict) -> _replay.ProgramReplay:
        lp, kg = self.lp, self.kg
        bplan = _plan(lp.backward, kg)
        used = set(bplan.input_names)
        shared = {n: t for n, t in self.shared.items() if n in used or n in bplan.param_names}
        inputs = {n: t for n, t in shared.items() if n in used}
        inputs.update((n, t) for n, t in grads.items() if n in used)
        missing = used - set(inputs)
        if missing:
            raise RuntimeError(f"pigeon: the backward of {self.name!r} reads {sorted(missing)}, "
                               f"which its forward does not keep")
        bexec = functools.partial(Executor(lp.backward, self.backend, poison=self.poison)._execute, bplan, kg)
        if self.casts:
            by_name = lp.backward_plan()[3]
            up = {by_name[n]: params[n].dtype for n in self.casts if n in by_name}
            bexec = functools.partial(_cast_masters, bexec, self.casts, {}, up)
        return _replay.ProgramReplay(f"{self.name} (backward)", bexec, kg, self.device, inputs, params,
                                     bplan.input_names, bplan.param_names, shared=shared)

    def saved_tensors(self, sv: SavedValues) -> tuple[list, list, list]:
        """``(inputs, weights, saved values)`` of ``sv``'s forward as tensors of their own (the
        pigeon::layer_backward op's arguments: a double backward)."""
        lp = self.lp
        with self.lock:
            self._make_current(sv)
            copy = {id(t): t.clone() for t in self.shared_list}
        ins = [copy[id(self.shared[n])] if n in self.shared else t
               for n, t in zip(lp.input_names, sv.tensors)]
        params = [copy[id(self.shared[n])] if n in self.shared else t
                  for n, t in zip(lp.param_names, sv.tensors[len(lp.input_names):])]
        return ins, params, [copy[id(self.shared[n])] for n in self.saved_keys]


def _cast_masters(execute, casts: dict, statics: dict, up: dict | None, inputs, params):
    """``execute(inputs, params)`` of a program whose weights ``casts`` (name -> the programs' dtype)
    arrive as float32 masters: each cast first, inside the capture (so the graph does it), into its
    tensor in ``statics`` where there is one (the forward's: its backward reads them there); a
    weight already of that dtype (the backward's shared forward casts) is taken as it is. Then the
    outputs named in ``up`` (gradients of masters) are cast to their master's dtype."""
    params = dict(params)
    for n, dt in casts.items():
        p = params.get(n)
        if p is not None and p.dtype != dt:
            low = statics.get(n)
            params[n] = low.copy_(p) if low is not None else p.to(dt)
    outputs, buffers = execute(inputs, params)
    if up:
        outputs = dict(outputs)
        for g, dt in up.items():
            if g in outputs and outputs[g].dtype != dt:
                outputs[g] = outputs[g].to(dt)
    return outputs, buffers


# ------------------------------------------------------------------------------ per layer

def _warn_once(name: str, err: BaseException) -> None:
    _replay._warn_once(name, err, what="the training call of", stacklevel=5)


def lookup(lp, ins: list, params: list) -> TrainReplay | None:
    """The TrainReplay for this training call of layer ``lp`` (ops.LayerPrograms), or None: the
    plain path (not eligible, a key's first call, a failed capture)."""
    if lp.backward is None or not ins and not params or _replay.getenv(ENV) == "0":
        return None
    dev = (ins or params)[0].device
    backend = lp.backend(dev)
    if getattr(backend, "name", None) != "cuda":
        return None
    kg = lp.kg(dev)
    fplan, bplan = _plan(lp.forward, kg), _plan(lp.backward, kg)
    tensors = list(ins) + list(params)
    if not _replay.use_replay("cuda", kg.device, fplan.n_launches + bplan.n_launches,
                              fplan.buffer_bytes + bplan.buffer_bytes, tensors):
        return None
    inputs, pdict = dict(zip(lp.input_names, ins)), dict(zip(lp.param_names, params))
    ex = Executor(lp.forward, backend)
    key = ex._key(fplan, kg, inputs, pdict)
    if key is None:
        return None
    key = (id(backend),) + key
    memo: OrderedDict = lp.train_replays
    ent = memo.get(key)
    if ent.__class__ is TrainReplay:
        memo.move_to_end(key)
        return ent
    if ent == _FAILED:
        return None
    if ent is None:                    # the first call: plain (it builds and loads the kernels)
        memo[key] = _SEEN
        _bound(memo)
        return None
    try:
        tr = TrainReplay(lp, kg, backend, inputs, pdict, ex.poison)
    except Exception as e:             # performance only: the plain path gives the same results
        _warn_once(getattr(lp.forward, "name", "layer"), e)
        memo[key] = _FAILED
        return None
    memo[key] = tr
    _bound(memo)
    return tr


def fail(lp, tr: TrainReplay, err: BaseException) -> None:
    """A backward capture of ``tr`` failed: its key takes the plain path from now on."""
    _warn_once(tr.name, err)
    for k, v in list(lp.train_replays.items()):
        if v is tr:
            lp.train_replays[k] = _FAILED


def _bound(memo: OrderedDict) -> None:
    live = [k for k, v in memo.items() if v.__class__ is TrainReplay]
    for k in live[:max(0, len(live) - MAX_TRAIN_REPLAYS)]:
        del memo[k]
    while len(memo) > 4 * MAX_TRAIN_REPLAYS:
        memo.popitem(last=False)


# ------------------------------------------------------------------------------ the one-step training call

class _FastEntry:
    """A training call that ``learn`` saw take a TrainReplay: the weight tensors it was called
    with (identity and address), the TrainReplay and its key in ``lp.train_replays``."""
    __slots__ = ("tr", "key", "params", "ptrs", "weight_names")

    def __init__(self, tr, key, params, weight_names):
        self.tr, self.key, self.params = tr, key, tuple(params)
        self.ptrs = tuple(p.data_ptr() for p in params)
        self.weight_names = tuple(weight_names)


FAST_ENTRIES_PER_LAYER = 8


def _fast_eligible(lp, glue, x) -> bool:
    """What fast_replay.py's one-step no-grad call takes, for training: a single node-wise input of
    the layer's own dtype, contiguous, no edge-wise output (``learn`` checks the weights: of that
    dtype, or a 16-bit layer's float32 masters, which the graphs cast)."""
    from .program import TORCH_DTYPES
    if len(glue.inputs) != 1 or glue.inputs[0][1] != "node" or any(r == "edge" for _, r in glue.outputs):
        return False
    return x.dtype == TORCH_DTYPES[glue.dtype] and x.is_contiguous()


def fast_lookup(lp, glue, x, weights):
    """``(TrainReplay, weight tensors)`` for a training call of ``lp`` on ``x`` that matches one the
    full path already replayed (``learn``), or None (take the full path). What a hit skips is what
    its key proves unchanged: the input's checks and casts (same type, dtype, shape, device), the
    weights (the same tensors at the same addresses), the rule's per-call modes (checked every
    call), and the TrainReplay still being the one held for its key."""
    memo = lp.fast_trains
    if not memo or type(x) is not torch.Tensor or not torch.is_grad_enabled():
        return None
    from .fast_replay import _modes, same_weights
    modes = _modes()
    if modes is None or (_replay.getenv(ENV) == "0"):
        return None
    e = memo.get((x.shape, x.dtype, x.device, id(weights), modes))
    if e is None or not x.is_contiguous() or not same_weights(weights, e.weight_names, e.params, e.ptrs):
        return None
    if not (x.requires_grad or any(p.requires_grad for p in e.params)):
        return None
    return (e.tr, e.params) if lp.train_replays.get(e.key) is e.tr else None


def learn(lp, glue, x, weights) -> None:
    """After a full training call of ``lp`` on ``x``: remember its TrainReplay for the next calls
    (a key's first training call runs plainly and has none yet: the next full call learns it)."""
    if type(x) is not torch.Tensor or not torch.is_grad_enabled() or _replay.getenv(ENV) == "0":
        return
    if not _fast_eligible(lp, glue, x):
        return
    from .fast_replay import replayable_modes, same_weights
    modes = replayable_modes(lp, x)
    if modes is None:
        return
    params = [weights[n] for n in glue.params]
    # weights of the layer's dtype, or float32 masters of a 16-bit layer (cast inside the graphs)
    if any(type(p) not in (torch.Tensor, torch.nn.Parameter) or
           (p.dtype != x.dtype and not is_master(p.dtype, x.dtype)) for p in params):
        return
    if not (x.requires_grad or any(p.requires_grad for p in params)):
        return
    key = (x.shape, x.dtype, x.device, id(weights), modes)
    memo = lp.fast_trains
    old = memo.get(key)
    if old is not None and lp.train_replays.get(old.key) is old.tr and \
            same_weights(weights, old.weight_names, old.params, old.ptrs):
        return
    dev = x.device
    backend = lp.backend(dev)
    kg = lp.kg(dev)
    full = Executor(lp.forward, backend)._key(_plan(lp.forward, kg), kg, {lp.input_names[0]: x},
                                              dict(zip(lp.param_names, params)))
    if full is None:
        return
    full = (id(backend),) + full
    tr = lp.train_replays.get(full)
    if tr.__class__ is not TrainReplay:
        memo.pop(key, None)
        return
    while len(memo) >= FAST_ENTRIES_PER_LAYER:
        memo.pop(next(iter(memo)))
    memo[key] = _FastEntry(tr, full, params, glue.params)
