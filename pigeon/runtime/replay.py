"""CUDA-graph replay of kernel programs: one captured graph per program and call shape, so a
steady-state layer call costs one graph launch instead of a Python round per kernel.

Why.  ``Executor.run`` (pigeon/runtime/program.py) binds tensors, allocates buffers and hands each
launch to its family in Python: argument checks, packing and a driver launch per kernel, some
10-30 us each.  On a small graph (AIFB: 8k nodes, 29k edges) that host work is several times the
kernels' own time.  A ``torch.cuda.CUDAGraph`` of the whole program replays every kernel (and the
torch ops between them) with one ``cudaGraphLaunch``; a call then costs the copies of its inputs
into the graph's static tensors, the replay, and one clone of each output.

The rule (``use_replay``), checked on every call:

* only the ``cuda`` executor backend on a CUDA graph, never the CPU backends (torch, emulate);
* never while torch.compile traces or any tensor is a subclass (fake or functional tensors),
  nor while the current stream is already capturing (torch.compile's ``reduce-overhead`` mode or a
  caller's own ``torch.cuda.graph``: the program's kernels are then recorded into that graph);
* never under ``PIGEON_SYNC_LAUNCH`` or ``PIGEON_CHECK_INDICES``: they synchronize and check on the
  host at every launch, which a capture cannot do and a replay would skip;
* ``PIGEON_CUDA_GRAPHS`` = ``auto`` (default): only programs of more than one launch whose buffers
  (inputs, weights, graph data, intermediates and outputs) total at most ``MAX_BUFFER_BYTES``
  (256 MiB).  A single launch has nothing to save.  A program with more bytes keeps the GPU busy
  for longer than the host takes to launch it (at an H200's ~4 TB/s, touching 256 MiB once takes
  ~65 us; the kernels read and write most buffers more than once, while the host path costs about
  20 us per launch), so launches queue ahead of the GPU and the host cost is already hidden, while
  a captured graph would pin all those bytes; ``1``: every program on the cuda backend; ``0``: never.

How.  The first call of a key (the program, its kernel graph, the device, the shapes and dtypes of
its inputs and weights, poisoning on or off) runs the plain executor: it builds and loads every
kernel and fills the per-graph caches (tile schedules, graph data casts), so nothing is compiled or
loaded during a capture.  The second call captures: static copies of the inputs (the weights are
read where they lie when contiguous, their addresses part of the key; see below), one
warm-up run on a side stream (as torch's CUDA-graph docs ask), then ``Executor`` runs inside
``torch.cuda.graph`` (its own memory pool; ``capture_error_mode="thread_local"``, as torch.compile's
CUDA graphs use).  Every later call of the key copies the caller's tensors into the static ones
(always: a same-address tensor may hold new data), replays, and returns CLONES of the outputs: the
next replay overwrites the static outputs, and a result the caller holds, or that autograd saved
for backward, must not change under it.  Strides are not part of the key: the executor makes every
input contiguous anyway, and the copy into a contiguous static tensor does the same.

Weights in place.  A contiguous ``torch.nn.Parameter`` is not copied: the graph's kernels read the param's own
memory, and the key holds its address (``Executor._key``), so assigning a new tensor to it makes a
new key (captured on its second call) while an in-place update (an optimizer step, ``copy_`` from a
state dict) is read by the next replay, in stream order, exactly as a copy made at call time would
have been.  That saves one fused copy of every weight per call.  Any other param (strided, or a
plain tensor such as a 16-bit layer's per-call cast of its float32 master weight) is copied in like
an input.

Kept alive by a replay: its static tensors, the params it reads in place (a replaced param's old
memory lives until its replay is evicted), every buffer of the captured run, the kernel graph,
and every tensor a captured kernel received (pigeon/runtime/launch.py's ``keep_launch_args``), so
no memory a graph reads is freed and reused while the graph lives (a tile schedule evicted from
its cache, say).

Memory.  A captured graph holds its buffers for as long as it lives: about the program's buffer
bytes (at most 256 MiB under ``auto``) plus the static inputs.  Each (program, executor backend)
keeps at most ``MAX_REPLAYS`` (4) captured keys, least recently used first out; the replays die
with the layer (its programs and backend).

Failure.  Any exception while capturing (a kernel that synchronizes, an allocation the capture
refuses, ...) falls back to the plain executor for that key with a one-time ``RuntimeWarning``
that names the program and the error: the results are the same, only the host cost differs.

Threads and streams: a replay is used by one call at a time (a lock), on the caller's current
stream; a call on another stream than the last one first waits for the work already queued on that
stream, so two streams never overlap on the static tensors.
"""
from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch

ENV = "PIGEON_CUDA_GRAPHS"
MODES = ("auto", "1", "0")
MAX_BUFFER_BYTES = 256 << 20      # auto: programs whose buffers total more are not captured
MAX_REPLAYS = 4                   # captured keys per (program, backend), least recently used evicted
MAX_SEEN = 16                     # keys seen once (waiting for their second call) per (program, backend)
DEBUG_ENVS = ("PIGEON_SYNC_LAUNCH", "PIGEON_CHECK_INDICES")
DEVICE_TYPES = ("cuda",)          # devices whose programs may be captured

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


class ReplayError(ValueError):
    pass


# ------------------------------------------------------------------------------ environment

def _env_reader() -> Callable[[str], str | None]:
    """``os.environ.get`` without its per-call key encoding: three variables are read on every
    call, and ``os.environ.get`` costs about a microsecond each. ``os.environ._data`` is the dict
    ``os.environ`` itself reads and writes (monkeypatch.setenv included); elsewhere the plain get."""
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(data, dict):
        return os.environ.get
    keys: dict[str, bytes] = {}

    def get(name: str) -> str | None:
        k = keys.get(name)
        if k is None:
            k = keys[name] = os.fsencode(name)
        v = data.get(k)
        return None if v is None else os.fsdecode(v)
    return get


getenv = _env_reader()


def graphs_mode() -> str:
    """``PIGEON_CUDA_GRAPHS``: ``auto`` (default), ``1`` or ``0``."""
    v = getenv(ENV)
    if v is None or v == "":
        return "auto"
    v = v.strip().lower()
    v = {"on": "1", "true": "1", "yes": "1", "off": "0", "false": "0", "no": "0"}.get(v, v)
    if v not in MODES:
        raise ReplayError(f"{ENV}={v!r}: expected 'auto', '1' or '0'")
    return v


def _debug_env_set() -> str | None:
    for name in DEBUG_ENVS:
        v = getenv(name)
        if v and v.strip().lower() not in ("0", "false", "no", "off"):
            return name
    return None


# ------------------------------------------------------------------------------ the rule

def cost_rule(mode: str, n_launches: int, buffer_bytes: int) -> bool:
    """The size part of the rule: ``1`` always, ``0`` never, ``auto`` more than one launch and at
    most ``MAX_BUFFER_BYTES`` of buffers."""
    if mode == "1":
        return True
    if mode == "0":
        return False
    return n_launches > 1 and buffer_bytes <= MAX_BUFFER_BYTES


def _tracing_or_capturing(tensors) -> bool:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    for t in tensors:
        if type(t) not in _PLAIN_TYPES:
            return True
    return CUDA.capturing()


def use_replay(backend_name: str, device: torch.device, n_launches: int, buffer_bytes: int,
               tensors=(), *, mode: str | None = None) -> bool:
    """Whether a call of a program on ``device`` through the ``backend_name`` executor replays a
    CUDA graph (the module docstring says why each part of the rule is there). ``mode`` overrides
    ``PIGEON_CUDA_GRAPHS``."""
    if backend_name != "cuda" or device.type not in DEVICE_TYPES:
        return False
    mode = graphs_mode() if mode is None else mode
    if mode == "0" or not cost_rule(mode, n_launches, buffer_bytes):
        return False
    if _debug_env_set() is not None:
        return False
    return not _tracing_or_capturing(tensors)


# ------------------------------------------------------------------------------ CUDA operations

class TorchCuda:
    """The CUDA operations a replay uses, through torch's public CUDA-graph API (one object, so the
    CPU tests can stand in a fake)."""

    def capturing(self) -> bool:
        """Whether the current stream is capturing a CUDA graph already."""
        return torch.cuda.is_current_stream_capturing()

    def stream_handle(self, device: torch.device) -> int:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if raw is not None:
            return int(raw(idx))
        return int(torch.cuda.current_stream(idx).cuda_stream)

    def order_after(self, handle: int, device: torch.device) -> None:
        """Make the current stream wait for everything queued so far on the stream ``handle``."""
        ev = torch.cuda.Event()
        ev.record(torch.cuda.ExternalStream(handle, device=device))
        torch.cuda.current_stream(device).wait_event(ev)

    def warmup(self, fn: Callable[[], Any], device: torch.device) -> None:
        """One uncaptured run on a side stream (torch's CUDA-graph docs)."""
        with torch.cuda.device(device):
            cur = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                fn()
            cur.wait_stream(side)

    def capture(self, fn: Callable[[], Any], device: torch.device):
        """``(graph, result)``: ``fn`` captured into a new CUDAGraph (a private memory pool);
        ``graph.replay()`` recomputes ``result``'s tensors in place."""
        with torch.cuda.device(device):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                result = fn()
        return graph, result


CUDA = TorchCuda()


def _in_place(t: torch.Tensor) -> bool:
    """Whether a captured graph may read the param ``t`` where it lies (``Executor._key`` then
    holds its address): a ``torch.nn.Parameter`` (it outlives the call: a plain tensor, such as the
    per-call bf16 cast of a 16-bit layer's float32 master weight, has a new address every call and
    would make every call a new key, never replayed; H200 test_bf16_layer_replays at 4bbab3d), and
    contiguous, so the executor binds ``t`` itself, not a copy."""
    return type(t) is torch.nn.Parameter and t.is_contiguous()


def _copy_into(dst: list, src: list) -> None:
    """One fused copy for all (same dtype, device and shape by the key) where torch has it."""
    if not dst:
        return
    try:
        torch._foreach_copy_(dst, src)
    except (AttributeError, RuntimeError, TypeError):
        for d, s in zip(dst, src):
            d.copy_(s)


def _copied_out(statics: list) -> list:
    """Fresh copies of ``statics``: one foreach op (``x * 1.0``, exact for every float, -0.0 and
    NaN included) where all are floating point, instead of an allocation per tensor and a fused
    copy (each torch op costs 10-40 us of host time on the GPU machines measured)."""
    if all(t.is_floating_point() for t in statics):
        try:
            return list(torch._foreach_mul(statics, 1.0))
        except (AttributeError, RuntimeError, TypeError):
            pass
    outs = [torch.empty_like(t) for t in statics]
    _copy_into(outs, statics)
    return outs


# ------------------------------------------------------------------------------ one captured program

class ProgramReplay:
    """One program captured for one key. ``execute(inputs, params)`` is the plain executor's run,
    returning ``(outputs, buffers)``; ``inputs`` / ``params`` are the first captured call's.

    ``shared``: input or param names bound to the given tensors instead of static copies of their
    own; a call passes nothing for them and the graph reads whatever those tensors hold when it
    replays (pigeon/runtime/train_replay.py: a backward graph reading its forward graph's static
    inputs and saved values where they lie; that module keeps their contents right)."""

    def __init__(self, name: str, execute: Callable, kg: Any, device: torch.device,
                 inputs: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                 input_names: tuple[str, ...], param_names: tuple[str, ...],
                 shared: Mapping[str, torch.Tensor] | None = None):
        from .launch import keep_launch_args
        shared = dict(shared or {})
        self.name, self.kg, self.device = name, kg, device
        self.shared = shared                                    # kept alive
        input_names = tuple(n for n in input_names if n not in shared)
        self.input_names, self.param_names = input_names, param_names
        # inputs get static copies (a caller's next input is a new tensor, or the same memory with
        # new data); contiguous params are read in place: their address is in the key
        # (Executor._key), so a replaced param is a new key, and an in-place update (an optimizer
        # step) is what the kernels read, as they would read a fresh copy made on the same stream
        copied = [n for n in param_names if n not in shared and not _in_place(params[n])]
        self.copied_param_names = tuple(copied)
        self.in_place_params = tuple(params[n] for n in param_names
                                     if n not in copied and n not in shared)   # kept alive
        src = [inputs[n] for n in input_names] + [params[n] for n in copied]
        with torch.no_grad():
            self.static = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in src]
            _copy_into(self.static, src)
        s_in = dict(zip(input_names, self.static[:len(input_names)]))
        s_in.update((n, t) for n, t in shared.items() if n not in params)
        s_par = dict(params)
        s_par.update(zip(copied, self.static[len(input_names):]))
        s_par.update((n, t) for n, t in shared.items() if n in params)
        CUDA.warmup(lambda: execute(s_in, s_par), device)
        with keep_launch_args() as kept:
            self.graph, (outputs, self.buffers) = CUDA.capture(lambda: execute(s_in, s_par), device)
        self.kept = kept                   # tensors the captured kernels read (launch.py)
        # each output buffer is cloned once per call; names that share a buffer share the clone,
        # as the plain executor returns one tensor for them
        self.out_names = tuple(outputs)
        uniq: dict[int, int] = {}
        self.out_index = tuple(uniq.setdefault(id(outputs[n]), len(uniq)) for n in self.out_names)
        order = sorted(uniq, key=uniq.get)
        by_id = {id(t): t for t in outputs.values()}
        self.out_static = [by_id[i] for i in order]
        self._selections: dict = {}
        self.lock = threading.Lock()
        self.stream: int | None = None
        self.replays = 0

    def static_of(self, name: str) -> torch.Tensor | None:
        """The tensor the graph reads for input or copied param ``name`` (None: read in place)."""
        if name in self.shared:
            return self.shared[name]
        names = self.input_names + self.copied_param_names
        return self.static[names.index(name)] if name in names else None

    def output_static(self, name: str) -> torch.Tensor:
        """The tensor the graph writes output ``name`` into (each replay overwrites it)."""
        return self.out_static[self.out_index[self.out_names.index(name)]]

    def _selection(self, needed):
        """(names, their static tensors once each, each name's position among those) for the
        output names ``needed`` (None: all)."""
        sel = self._selections.get(needed)
        if sel is None:
            names = tuple(n for n in self.out_names if needed is None or n in needed)
            index = dict(zip(self.out_names, self.out_index))
            uniq = sorted({index[n] for n in names})
            pos = {u: k for k, u in enumerate(uniq)}
            sel = (names, [self.out_static[u] for u in uniq], tuple(pos[index[n]] for n in names))
            self._selections[needed] = sel
        return sel

    def __call__(self, inputs: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                 needed: tuple[str, ...] | None = None) -> dict:
        """Copy in, replay, and return fresh copies of the outputs (only those ``needed`` names,
        when given): the next replay overwrites the static outputs."""
        src = [inputs[n] for n in self.input_names] + [params[n] for n in self.copied_param_names]
        names, statics, where = self._selection(needed)
        with self.lock:
            handle = CUDA.stream_handle(self.device)
            if self.stream is not None and handle != self.stream:
                CUDA.order_after(self.stream, self.device)
            self.stream = handle
            grad = torch.is_grad_enabled()
            if grad:
                torch.set_grad_enabled(False)
            try:
                _copy_into(self.static, src)
                self.graph.replay()
                outs = _copied_out(statics)          # one fused copy out, not a clone per output
            finally:
                if grad:
                    torch.set_grad_enabled(True)
            self.replays += 1
        return {n: outs[w] for n, w in zip(names, where)}


# ------------------------------------------------------------------------------ per program

_warned: set[tuple[str, str]] = set()
_warn_lock = threading.Lock()


def _warn_once(program: str, err: BaseException, what: str = "kernel program", stacklevel: int = 4) -> None:
    """One RuntimeWarning per (program, error) that a capture failed and the plain path runs."""
    why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    with _warn_lock:
        if (what, program, why) in _warned:
            return
        _warned.add((what, program, why))
    warnings.warn(f"pigeon: CUDA-graph capture of {what} {program!r} failed ({why}); this call "
                  f"shape runs the plain path from now on (same results, more host time per call). "
                  f"{ENV}=0 turns capture off.", RuntimeWarning, stacklevel=stacklevel)


class ReplaySet:
    """The replays of one program on one executor backend: an LRU of at most ``MAX_REPLAYS``
    captured keys, the keys seen once (captured on their second call) and the keys whose capture
    failed (plain from then on); the last two bounded by ``MAX_SEEN``."""

    def __init__(self, name: str, max_replays: int | None = None):
        self.name = name
        self.max_replays = max_replays
        self.replays: "OrderedDict[tuple, ProgramReplay]" = OrderedDict()
        self.seen: "OrderedDict[tuple, None]" = OrderedDict()
        self.failed: "OrderedDict[tuple, str]" = OrderedDict()
        self.lock = threading.Lock()
        self.captures = 0

    @staticmethod
    def _remember(d: OrderedDict, key: tuple, value: Any) -> None:
        d[key] = value
        while len(d) > MAX_SEEN:
            d.popitem(last=False)

    def run(self, key: tuple, execute: Callable, kg: Any, device: torch.device,
            inputs: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
            input_names: tuple[str, ...], param_names: tuple[str, ...],
            needed: tuple[str, ...] | None = None) -> dict | None:
        """The outputs of one call (at least the ``needed`` names; None: all): replayed, or run
        plainly (a key's first call); None when the key's capture failed (the caller then runs the
        plain executor)."""
        rep = self.replays.get(key)
        if rep is not None:
            with self.lock:
                if key in self.replays:
                    self.replays.move_to_end(key)
            return rep(inputs, params, needed)
        if key in self.failed:
            return None
        if key not in self.seen:          # the first call: plain; it builds and loads the kernels
            outputs = execute(inputs, params)[0]
            with self.lock:
                self._remember(self.seen, key, None)
            return outputs
        try:
            rep = ProgramReplay(self.name, execute, kg, device, inputs, params, input_names, param_names)
        except Exception as e:            # a performance-only fallback: same results, plain executor
            _warn_once(self.name, e)
            with self.lock:
                self.seen.pop(key, None)
                self._remember(self.failed, key, f"{type(e).__name__}: {e}")
            return None
        with self.lock:
            self.seen.pop(key, None)
            self.replays[key] = rep
            self.captures += 1
            limit = self.max_replays if self.max_replays is not None else MAX_REPLAYS
            while len(self.replays) > limit:
                self.replays.popitem(last=False)     # its graph and buffers are freed with it
        return rep(inputs, params, needed)

    def __len__(self) -> int:
        return len(self.replays)


# (backend) -> {id(program): (weakref to program, ReplaySet)}; entries die with the backend, and
# a program's entry with the program
_SETS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_sets_lock = threading.Lock()


def replay_set(backend: Any, program: Any) -> ReplaySet:
    """The ReplaySet of ``program`` on ``backend`` (created on first use)."""
    per = _SETS.get(backend)
    if per is None:
        with _sets_lock:
            per = _SETS.get(backend)
            if per is None:
                per = _SETS[backend] = {}
    pid = id(program)
    ent = per.get(pid)
    if ent is not None and ent[0]() is program:
        return ent[1]
    with _sets_lock:
        ent = per.get(pid)
        if ent is None or ent[0]() is not program:
            ref = weakref.ref(program)
            ent = per[pid] = (ref, ReplaySet(getattr(program, "name", "program")))
            weakref.finalize(program, _drop, per, pid, ref)
    return ent[1]


def _drop(per: dict, pid: int, ref) -> None:
    ent = per.get(pid)
    if ent is not None and ent[0] is ref:
        del per[pid]


def replays_of(backend: Any, program: Any) -> ReplaySet | None:
    """The ReplaySet of ``program`` on ``backend`` if one exists (tests, benchmarks)."""
    ent = _SETS.get(backend, {}).get(id(program))
    return ent[1] if ent is not None and ent[0]() is program else None
