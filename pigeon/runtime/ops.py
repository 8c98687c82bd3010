"""torch.library registration: a compiled layer's forward and backward kernel programs as two
custom ops, ``pigeon::layer_forward`` and ``pigeon::layer_backward``, with fake (meta)
implementations and autograd, so compiled layers work under torch.compile and pass opcheck.

The ops take a layer id (a string naming a ``LayerPrograms`` in this process's registry) and
lists of tensors; the registry holds the programs, the kernel graph and the executor backend, and
holds them weakly: the layers using an entry keep it alive.  ``call_layer`` is the forward glue
around the op (input checks, edge order, dtype) of compiled layers and loaded artifacts alike.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..graph.kernel_graph import KernelGraph
from ..ir.program import KernelProgram
from . import fast_replay as _fast
from . import train_replay as _train
from . import kernel_ops  # noqa: F401  (registers pigeon::gemm and pigeon::traversal)
from .program import TORCH_DTYPES, Executor, buffer_rows
from .replay import getenv as _replay_getenv
from .weight_casts import cast_weight, is_master


@dataclass(eq=False)
class LayerPrograms:
    forward: KernelProgram
    backward: KernelProgram | None
    input_names: tuple[str, ...]
    param_names: tuple[str, ...]
    output_names: tuple[str, ...]     # forward outputs, then saved values
    n_outputs: int                    # how many of output_names are user-visible outputs
    grad_names: tuple[tuple[str, str], ...]   # (input/param name, backward output name)
    kgraphs: dict = field(default_factory=dict)   # device -> KernelGraph
    backends: dict = field(default_factory=dict)  # device type -> Backend
    backward_error: str | None = None             # why there is no backward program, if it failed
    layer_id: str | None = None                   # set by register_layer
    fast_replays: dict = field(default_factory=dict)  # pigeon/runtime/fast_replay.py's entries
    train_replays: OrderedDict = field(default_factory=OrderedDict)  # pigeon/runtime/train_replay.py's
    fast_trains: dict = field(default_factory=dict)    # its one-step training entries

    def __post_init__(self):
        # What pigeon::layer_forward returns. A value can be a user output and saved for backward
        # (a spec returning the attention weights it aggregates with), or be returned twice: the
        # forward program then names one buffer several times, and a custom op may not return
        # aliases. So each buffer is returned once, as the first output naming it; user outputs
        # that repeat a buffer (or pass an input, weight or graph array through) are copies, and
        # saved values are indices into what the op returns (``saved_of``).
        buf = dict(self.forward.outputs)
        fwd = self.forward
        fixed = {b for _, b in fwd.inputs + fwd.params + fwd.graph_data}
        returned, copy, where = [], [], {}
        for name in self.output_names[:self.n_outputs]:
            b = buf[name]
            copy.append(b in where or b in fixed)
            where.setdefault(b, len(returned))
            returned.append(name)
        saved_index = []
        for name in self.output_names[self.n_outputs:]:
            b = buf[name]
            if b not in where:
                where[b] = len(returned)
                returned.append(name)
                copy.append(b in fixed)
            saved_index.append(where[b])
        self.returned, self.returned_copy = tuple(returned), tuple(copy)
        self.saved_index = tuple(saved_index)

    def backward_plan(self) -> tuple:
        """What every backward call of this layer reads, computed once: the backward program's input
        names, the grad_<output> and saved-value names, the (input or weight -> gradient output)
        map, the gradient outputs' buffers, and the buffers a gradient may not be returned as."""
        plan = self.__dict__.get("_backward_plan")
        if plan is None:
            bwd, names = self.backward, self.output_names
            plan = (frozenset(n for n, _ in bwd.inputs), tuple(f"grad_{n}" for n in names[:self.n_outputs]),
                    tuple(names[self.n_outputs:]), dict(self.grad_names), dict(bwd.outputs),
                    frozenset(b for _, b in bwd.inputs + bwd.params + bwd.graph_data))
            self.__dict__["_backward_plan"] = plan
        return plan

    @property
    def param_dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtype each weight has in the kernel programs (a 16-bit layer's; its float32 master
        weights are cast to it: ``low_params``)."""
        dts = self.__dict__.get("_param_dtypes")
        if dts is None:
            buf = dict(self.forward.params)
            dts = tuple(TORCH_DTYPES[self.forward.buffer(buf[n]).dtype] for n in self.param_names)
            self.__dict__["_param_dtypes"] = dts
        return dts

    def saved_of(self, outputs):
        """The saved values (the backward program's ``saved_<i>`` inputs) among the op's outputs."""
        return [outputs[i] for i in self.saved_index]

    def kg(self, device: torch.device) -> KernelGraph:
        key = str(device)
        if key not in self.kgraphs:
            base = next(iter(self.kgraphs.values()))
            self.kgraphs[key] = base.to(device)
        return self.kgraphs[key]

    def backend(self, device: torch.device):
        from .program import BACKENDS, default_backend
        if device.type not in self.backends:
            self.backends[device.type] = BACKENDS[default_backend(device)]()
        return self.backends[device.type]

    def out_spec(self, kg: KernelGraph):
        """(shape, dtype) of every tensor pigeon::layer_forward returns."""
        buf = dict(self.forward.outputs)
        specs = []
        for name in self.returned:
            b = self.forward.buffer(buf[name])
            specs.append((buffer_rows(b, kg) + b.shape, TORCH_DTYPES[b.dtype]))
        return specs

    # The registry holds entries weakly; the layers (and autograd graphs) that use an entry hold it.
    # A copy of a layer shares its entry, and an unpickled one registers (or joins) it again.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        state = {f: getattr(self, f) for f in ("forward", "backward", "input_names", "param_names", "output_names",
                                               "n_outputs", "grad_names", "kgraphs", "backward_error")}
        return _revive, (state,)


def _revive(state: dict) -> "LayerPrograms":
    return register_layer(LayerPrograms(**state))


# layer id -> programs, held weakly: an entry lives while a compiled or loaded layer (or the
# autograd graph of one of its outputs) holds it, so compiling many layers does not leak
_REGISTRY: "weakref.WeakValueDictionary[str, LayerPrograms]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


def layer_key(programs: LayerPrograms) -> str:
    """A content address: the programs and the graph itself.  The id is baked into traced graphs
    as a constant, and torch.compile's on-disk caches are shared between processes, so an id that
    only counted layers ("layer7") would let a cached graph of another layer's shapes be reused."""
    import hashlib
    import json

    from ..ir.serialize import to_json
    h = hashlib.sha256()
    h.update(json.dumps([to_json(programs.forward), to_json(programs.backward) if programs.backward else None,
                         programs.input_names, programs.param_names, programs.output_names,
                         programs.n_outputs, programs.grad_names, programs.backward_error],
                        sort_keys=True).encode())
    kg = next(iter(programs.kgraphs.values()))
    h.update(repr(kg.signature).encode())
    for t in (kg.src, kg.dst, kg.etype, kg.ntype):
        h.update(t.detach().cpu().numpy().tobytes())
    return "pg" + h.hexdigest()[:24]


def register_layer(programs: LayerPrograms) -> LayerPrograms:
    """The registry's entry for ``programs``: ``programs`` itself, or the live entry of an equal
    layer (equal ids mean equal programs on an equal graph: the entry is interchangeable). The
    caller must keep the returned object alive for as long as it runs the layer."""
    layer_id = layer_key(programs)
    with _lock:
        entry = _REGISTRY.get(layer_id)
        if entry is None:
            programs.layer_id = layer_id
            _REGISTRY[layer_id] = entry = programs
        else:
            _merge_backends(entry, programs)
    return entry


def _merge_backends(entry: LayerPrograms, other: LayerPrograms) -> None:
    """A loaded artifact joining a live entry brings its cubins along."""
    for dev, backend in other.backends.items():
        mine = entry.backends.setdefault(dev, backend)
        if mine is not backend and hasattr(mine, "_modules") and hasattr(backend, "_modules"):
            for name, mod in backend._modules.items():
                mine._modules.setdefault(name, mod)


def get_layer(layer_id: str) -> LayerPrograms:
    entry = _REGISTRY.get(layer_id)
    if entry is None:
        raise KeyError(f"no compiled pigeon layer {layer_id!r} in this process") from None
    return entry


# ------------------------------------------------------------------------ the forward glue

@dataclass(frozen=True)
class LayerGlue:
    """What a layer's forward needs besides tensors, as plain tuples (torch.compile traces the
    glue and must not walk the IR). Compiled layers build it from the IR; artifacts store it."""
    name: str                                        # the spec's name, for messages
    dtype: str                                       # what the layer computes in
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]   # (name, "node" | "edge", feature shape)
    params: tuple[str, ...]
    outputs: tuple[tuple[str, str], ...]             # user outputs: (name, "node" | "edge" | ...)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "inputs": [[n, r, list(s)] for n, r, s in self.inputs],
                "params": list(self.params), "outputs": [list(o) for o in self.outputs]}

    @classmethod
    def from_json(cls, d: dict) -> "LayerGlue":
        return cls(str(d["name"]), str(d["dtype"]), tuple((n, r, tuple(s)) for n, r, s in d["inputs"]),
                   tuple(d["params"]), tuple((n, r) for n, r in d["outputs"]))


# dtypes an input may have: the layer's own, and float32 for a 16-bit layer (whose weights are
# float32 master copies, cast down on every call, as the inputs are)
def _accepts(layer_dtype: torch.dtype, x: torch.dtype) -> bool:
    return x == layer_dtype or (x == torch.float32 and layer_dtype in (torch.bfloat16, torch.float16))


_CAST = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "bfloat16", torch.float16: "half"}


def bind_inputs(glue: LayerGlue, args: tuple, kwargs: dict, weights, num_nodes: int, num_edges: int,
                num_types: tuple[int, int] = (0, 0)) -> dict:
    """The inputs of one call by name, checked: every input present, a floating-point tensor of
    the layer's dtype, the shape the graph gives it, on the layer's device. Both backends and
    artifacts call this, so they take the same inputs and refuse the same ones with the same
    InputError (one line, naming the tensor). Nothing is moved or cached before it passes."""
    from ..reference import InputError
    names = [n for n, _, _ in glue.inputs]
    if len(args) > len(names):
        raise InputError(f"{glue.name} takes {len(names)} inputs ({', '.join(names)}), got {len(args)}")
    inputs = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise InputError(f"{glue.name}: unexpected input {k!r}; it takes {', '.join(names)}")
        if k in inputs:
            raise InputError(f"{glue.name}: input {k!r} given twice (by position and by keyword)")
        inputs[k] = v
    dt = TORCH_DTYPES[glue.dtype]
    device = None
    for w in (weights[n] for n in glue.params):
        device = w.device
        break
    for name, rows, shape in glue.inputs:
        want = ({"node": (num_nodes,), "edge": (num_edges,), "etype": (num_types[0],),
                 "ntype": (num_types[1],)}[rows]) + tuple(shape)
        if name not in inputs:
            raise InputError(f"{glue.name}: input {name!r} is missing; expected a tensor of shape {list(want)}")
        x = inputs[name]
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{glue.name}: input {name!r} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"{glue.name}: input {name!r} must be a floating-point tensor, got {x.dtype}")
        if not _accepts(dt, x.dtype):
            hint = f"pass {name}.{_CAST.get(dt, 'to')}()"
            if x.dtype == torch.float64 and dt != torch.float64:
                hint += (", or compile the layer with pg.compile(..., dtype='float64', backend='reference') "
                         "to compute in float64")
            raise InputError(f"{glue.name}: input {name!r} is {x.dtype} but the layer computes in {glue.dtype}; "
                             f"{hint}")
        if tuple(x.shape) != want:
            raise InputError(f"{glue.name}: input {name!r} has shape {list(x.shape)}, expected {list(want)} "
                             f"({rows}-wise input of feature shape {list(shape)} on a graph of {num_nodes} "
                             f"nodes, {num_edges} edges)")
        if device is None:
            device = x.device
        if x.device != device:
            raise InputError(f"{glue.name}: input {name!r} is on {x.device} but the layer is on {device}; "
                             f"move the input with .to({str(device)!r}) or the layer with .to({str(x.device)!r})")
    return inputs


def layer_kgraph(graph) -> KernelGraph:
    """The kernel layout of ``graph`` as a layer's forward glue reads it: the inverse edge order is
    computed here, once, not on a first call that torch.compile may be tracing (a cached_property
    takes a lock there, which dynamo cannot trace)."""
    from ..graph.kernel_graph import kernel_graph
    kg = kernel_graph(graph)
    kg.edge_perm_inverse  # noqa: B018
    return kg


def layer_result(out: dict):
    """A spec's outputs as a layer returns them: the tensor of a single output, else the dict."""
    return out["out"] if list(out) == ["out"] else out


def run_layer_forward(layer_id: str, glue: LayerGlue, kgraph: KernelGraph, inputs: dict, weights) -> dict:
    """pigeon::layer_forward on checked inputs (``bind_inputs``): edge-wise inputs permuted into
    the kernels' edge order and edge-wise outputs back, tensors cast to the layer's dtype. The one
    forward of compiled kernels-backend layers and of loaded artifacts; ``kgraph`` comes from
    ``layer_kgraph``."""
    dt = TORCH_DTYPES[glue.dtype]
    ins = []
    for name, rows, _ in glue.inputs:
        x = inputs[name]
        if rows == "edge":   # kernels see edges sorted by type
            x = x[kgraph.edge_perm.to(x.device)]
        if x.dtype != dt:
            x = x.to(dt)
        ins.append(x if x.is_contiguous() else x.contiguous())
    params = [weights[name] for name in glue.params]
    # once per call: a cast below keeps both (the cast of a plain tensor is plain, and it records
    # grad exactly when its master does)
    eager, grad = _eager(ins, params), _records_grad(ins, params)
    if any(w.dtype != dt for w in params):          # a no-op .to() still costs a dispatch per weight per call
        if not (eager and grad and _masters_pass(params, dt)):
            fresh = torch.compiler.is_compiling() or grad    # cast afresh
            params = [w if w.dtype == dt else w.to(dt) if fresh else cast_weight(w, dt, False)  # once per
                      for w in params]                                                          # master state
    if eager:
        if grad:
            outs = _LayerForward.apply(layer_id, len(ins), None, *ins, *params)
        else:       # nothing to differentiate: the forward alone, without the autograd.Function (~12 us)
            outs = _forward_impl(layer_id, ins, params, user_only=True)
    else:
        outs = torch.ops.pigeon.layer_forward(layer_id, ins, params)
    result = {}
    for (name, rows), val in zip(glue.outputs, outs):
        if rows == "edge":
            val = val[kgraph.edge_perm_inverse.to(val.device)]
        result[name] = val
    return result


def call_layer(layer_id: str, glue: LayerGlue, kgraph: KernelGraph, args: tuple, kwargs: dict, weights):
    """``forward(*args, **kwargs)`` of a kernels-backend layer (compiled or loaded). A no-grad call
    like one already checked and replayed goes straight to its replay (pigeon/runtime/fast_replay.py)."""
    # first the compile check: dynamo must trace none of this (the registry is a weak dictionary)
    single = not torch.compiler.is_compiling() and len(args) == 1 and not kwargs
    if single:
        lp = get_layer(layer_id)
        out = _fast.try_call(lp, glue, args[0], weights)
        if out is not None:
            return layer_result(out)
        hit = _train.fast_lookup(lp, glue, args[0], weights)     # the same for a training call
        if hit is not None:
            outs = _LayerForward.apply(layer_id, 1, hit[0], args[0], *hit[1])
            return layer_result(dict(zip((name for name, _ in glue.outputs), outs)))
    inputs = bind_inputs(glue, args, kwargs, weights, kgraph.num_nodes, kgraph.num_edges,
                         (kgraph.num_etypes, kgraph.num_ntypes))
    result = layer_result(run_layer_forward(layer_id, glue, kgraph, inputs, weights))
    if single:
        _fast.learn(lp, glue, args[0], weights)
        _train.learn(lp, glue, args[0], weights)
    return result


MASTERS_ENV = "PIGEON_MASTER_CASTS_INSIDE"     # "0": a 16-bit layer's masters are cast outside it (as before)


def _masters_pass(params, dt) -> bool:
    """Whether, on an eager training call, a 16-bit layer's float32 master weights go into
    ``_LayerForward`` as they are, to be cast inside it (``low_params``; on a replayed training call
    inside its CUDA graphs, pigeon/runtime/train_replay.py), instead of one differentiable ``.to()``
    per weight per call outside. The casts and their gradients' casts back are then no autograd
    nodes of their own (on the GPU machine's host each cost 20-40 us a call, forward and backward)."""
    if torch.compiler.is_compiling() or _replay_getenv(MASTERS_ENV) == "0":   # "0": the A/B switch
        return False
    return all(w.dtype == dt or is_master(w.dtype, dt) for w in params)


def low_params(lp, params: list) -> list:
    """``params`` in the programs' dtypes: float32 master weights of a 16-bit layer cast down (the
    values a ``.to()`` per weight outside the layer gives). Called inside ``_LayerForward``, where
    autograd records nothing: the layer's backward returns their gradients in the programs' dtype
    and autograd casts each to its master's dtype, as a ``.to()`` node would."""
    out = None
    for i, (p, dt) in enumerate(zip(params, lp.param_dtypes)):
        if p.dtype != dt:
            if out is None:
                out = list(params)
            out[i] = p.to(dt)
    return params if out is None else out


def _device(tensors) -> torch.device:
    for t in tensors:
        return t.device
    return torch.device("cpu")


def _forward_impl(layer_id: str, inputs: list[torch.Tensor], params: list[torch.Tensor],
                  user_only: bool = False) -> list[torch.Tensor]:
    """What pigeon::layer_forward returns; ``user_only``: only the user outputs (the first
    ``n_outputs``), not the values saved for backward (no backward will run: a CUDA-graph replay
    then copies out fewer tensors)."""
    lp = get_layer(layer_id)
    dev = _device(inputs + params)
    kg = lp.kg(dev)
    names = lp.returned[:lp.n_outputs] if user_only else lp.returned
    out = Executor(lp.forward, lp.backend(dev)).run(kg, dict(zip(lp.input_names, inputs)),
                                                    dict(zip(lp.param_names, params)), needed=names)
    # outputs may not alias inputs or each other (custom-op contract): see LayerPrograms.returned
    return [out[n].clone() if c else out[n] for n, c in zip(names, lp.returned_copy)]


@torch.library.custom_op("pigeon::layer_forward", mutates_args=())
def layer_forward(layer_id: str, inputs: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    return _forward_impl(layer_id, inputs, params)


@layer_forward.register_fake
def _(layer_id, inputs, params):
    lp = get_layer(layer_id)
    kg = next(iter(lp.kgraphs.values()))
    dev = _device(inputs + params)
    return [torch.empty(shape, dtype=dt, device=dev) for shape, dt in lp.out_spec(kg)]


def _backward_impl(layer_id: str, grads: list[torch.Tensor], inputs: list[torch.Tensor],
                   params: list[torch.Tensor], saved: list[torch.Tensor]) -> list[torch.Tensor]:
    lp = get_layer(layer_id)
    dev = _device(inputs + params)
    kg = lp.kg(dev)
    used, grad_keys, saved_keys, *_ = lp.backward_plan()
    bwd_inputs = {k: v for k, v in zip(lp.input_names, inputs) if k in used}
    # not made contiguous here: a replay copies each into its contiguous static tensor, the plain
    # executor makes its inputs contiguous itself (a sum's gradient is an expanded tensor: a copy)
    bwd_inputs.update((k, g) for k, g in zip(grad_keys, grads) if k in used)
    bwd_inputs.update((k, v) for k, v in zip(saved_keys, saved) if k in used)
    out = Executor(lp.backward, lp.backend(dev)).run(kg, bwd_inputs, dict(zip(lp.param_names, params)))
    return _gradients(lp, out, inputs, params)


def _gradients(lp: LayerPrograms, out: dict, inputs: list, params: list) -> list[torch.Tensor]:
    """The gradient of every input and weight from the backward program's outputs ``out``: zeros
    where it has none, a copy where one buffer would be returned twice or is an input's."""
    _, _, _, by_name, bufs, taken0 = lp.backward_plan()
    result = []
    taken = set(taken0)                # buffers a gradient may not be returned as (it would alias)
    for name, like in itertools.chain(zip(lp.input_names, inputs), zip(lp.param_names, params)):
        gname = by_name.get(name, "")
        g = out.get(gname)
        if g is None:
            g = torch.zeros_like(like)
        elif bufs[gname] in taken:
            g = g.clone()
        else:
            taken.add(bufs[gname])
        result.append(g)
    return result


@torch.library.custom_op("pigeon::layer_backward", mutates_args=())
def layer_backward(layer_id: str, grads: list[torch.Tensor], inputs: list[torch.Tensor],
                   params: list[torch.Tensor], saved: list[torch.Tensor]) -> list[torch.Tensor]:
    return _backward_impl(layer_id, grads, inputs, params, saved)


@layer_backward.register_fake
def _(layer_id, grads, inputs, params, saved):
    return [torch.empty_like(t) for t in inputs + params]


def _setup_context(ctx, inputs, output):
    layer_id, ins, params = inputs
    _save(ctx, layer_id, ins, params, output)


def _save(ctx, layer_id, ins, params, output):
    lp = get_layer(layer_id)
    ctx.layer_id = layer_id
    ctx.programs = lp          # the registry holds entries weakly: backward may outlive the layer
    ctx.n_in = len(ins)
    ctx.save_for_backward(*ins, *params, *lp.saved_of(output))
    ctx.n_params = len(params)
    ctx.out_meta = [(o.shape, o.dtype, o.device) for o in output[:lp.n_outputs]]


def _input_grads(ctx, grads, backward_fn):
    """The gradients of a layer's inputs and weights: ``(inputs' grads, weights' grads)``."""
    lp = get_layer(ctx.layer_id)
    saved = ctx.saved_tensors
    ins, params = list(saved[:ctx.n_in]), list(saved[ctx.n_in:ctx.n_in + ctx.n_params])
    rest = list(saved[ctx.n_in + ctx.n_params:])
    if lp.backward is None:
        if lp.backward_error:
            raise RuntimeError(f"pigeon: no backward for this layer: {lp.backward_error}")
        # no input or weight reaches an output: every gradient is zero
        return [torch.zeros_like(t) for t in ins], [torch.zeros_like(t) for t in params]
    res = backward_fn(ctx.layer_id, _output_grads(ctx, lp, grads), ins, params, rest)
    return res[:ctx.n_in], res[ctx.n_in:]


def _output_grads(ctx, lp, grads) -> list[torch.Tensor]:
    """The user outputs' gradients, zeros where autograd passed None (materialize_grads is off)."""
    return [torch.zeros(shape, dtype=dt, device=dev) if gr is None else gr
            for gr, (shape, dt, dev) in zip(grads[:lp.n_outputs], ctx.out_meta)]


def _backward(ctx, grads):
    gi, gp = _input_grads(ctx, grads, layer_backward)
    return None, gi, gp


torch.library.register_autograd("pigeon::layer_forward", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------ the eager fast path

FASTPATH_ENV = "PIGEON_EAGER_FASTPATH"
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _eager(ins, params) -> bool:
    """Whether a call may skip the torch.library dispatch of pigeon::layer_forward (its Python
    wrappers flatten every argument list: ~40 us a call, ~150 us with autograd, on a CPU where the
    autograd.Function below takes ~12 us) and run the same forward and backward through
    ``_LayerForward``: in eager mode only, on plain tensors, with no dispatch mode or functorch
    transform active. torch.compile (which must see the op), opcheck, fake tensors and transforms
    take the op. ``PIGEON_EAGER_FASTPATH=0`` always takes the op."""
    if torch.compiler.is_compiling():          # first: dynamo must not trace the checks below
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    if _replay_getenv(FASTPATH_ENV) == "0":
        return False
    for t in ins:
        if type(t) not in _PLAIN_TYPES:
            return False
    for t in params:
        if type(t) not in _PLAIN_TYPES:
            return False
    return True


def _records_grad(ins, params) -> bool:
    """Whether autograd would record this call: grad mode on and some input or weight requiring grad."""
    if not torch.is_grad_enabled():
        return False
    for t in ins:
        if t.requires_grad:
            return True
    for t in params:
        if t.requires_grad:
            return True
    return False


class _LayerForward(torch.autograd.Function):
    """pigeon::layer_forward and its autograd formula without the op's dispatch: the same
    ``_forward_impl``, the same saved tensors and ``_input_grads``. Backward calls the
    pigeon::layer_backward op only when it must be differentiable itself (create_graph), where the
    op refuses as it does on the op path."""

    @staticmethod
    def forward(ctx, layer_id, n_in, train, *tensors):
        ins, params = list(tensors[:n_in]), list(tensors[n_in:])
        lp = get_layer(layer_id)
        if not any(ctx.needs_input_grad):      # no backward: the user outputs alone
            return tuple(_forward_impl(layer_id, ins, low_params(lp, params), user_only=True))
        # ``train``: the TrainReplay of a one-step call (train_replay.fast_lookup), else looked up
        tr = train if train is not None else _train.lookup(lp, ins, params)
        if tr is not None:                     # forward and backward graphs sharing their buffers
            outs, sv = tr.forward(ins, params)
            ctx.layer_id, ctx.programs, ctx.n_in, ctx.n_params = layer_id, lp, n_in, len(params)
            ctx.saved_values = sv
            ctx.out_meta = [(o.shape, o.dtype, o.device) for o in outs]
            ctx.set_materialize_grads(False)
            return tuple(outs)
        params = low_params(lp, params)        # saved as the programs read them (the master's cast)
        out = _forward_impl(layer_id, ins, params)
        _save(ctx, layer_id, ins, params, out)
        ctx.set_materialize_grads(False)
        n = get_layer(layer_id).n_outputs
        if len(out) > n:                       # saved values: not outputs the caller sees
            ctx.mark_non_differentiable(*out[n:])
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        sv = getattr(ctx, "saved_values", None)
        if sv is not None:
            gi, gp = _replayed_input_grads(ctx, sv, grads)
        else:
            fn = layer_backward if torch.is_grad_enabled() else _backward_impl
            gi, gp = _input_grads(ctx, grads, fn)
        return (None, None, None, *gi, *gp)


def _replayed_input_grads(ctx, sv, grads):
    """``_input_grads`` for a forward that ran through pigeon/runtime/train_replay.py."""
    lp, tr = get_layer(ctx.layer_id), sv.train
    g = _output_grads(ctx, lp, grads)
    ins, params = sv.tensors[:ctx.n_in], sv.tensors[ctx.n_in:]
    if torch.is_grad_enabled():                # a double backward: the op, on tensors of their own
        sv.check_versions()
        res = layer_backward(ctx.layer_id, g, *tr.saved_tensors(sv))
    else:
        try:
            res = _gradients(lp, tr.backward(sv, g), ins, params)
        except _train.CaptureError as e:      # this key runs plainly from now on; this call too
            _train.fail(lp, tr, e)
            res = _backward_impl(ctx.layer_id, g, *tr.saved_tensors(sv))
    return res[:ctx.n_in], res[ctx.n_in:]
