"""torch.library registration: a compiled layer's forward and backward kernel programs as two
custom ops, ``pigeon::layer_forward`` and ``pigeon::layer_backward``, with fake (meta)
implementations and autograd, so compiled layers work under torch.compile and pass opcheck.

The ops take a layer id (a string naming a ``LayerPrograms`` in this process's registry) and
lists of tensors; the registry holds the programs, the kernel graph and the executor backend.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import torch

from ..codegen.layout import KernelGraph
from ..codegen.lower import KernelProgram
from . import kernel_ops  # noqa: F401  (registers pigeon::gemm and pigeon::traversal)
from .program import TORCH_DTYPES, Executor, buffer_rows


@dataclass
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

    def out_spec(self, program: KernelProgram, kg: KernelGraph):
        specs = []
        for _, bname in program.outputs:
            b = program.buffer(bname)
            specs.append((buffer_rows(b, kg) + b.shape, TORCH_DTYPES[b.dtype]))
        return specs


_REGISTRY: dict[str, LayerPrograms] = {}
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


def register_layer(programs: LayerPrograms) -> str:
    layer_id = layer_key(programs)
    with _lock:
        # equal ids mean equal programs on an equal graph: the entry is interchangeable
        _REGISTRY.setdefault(layer_id, programs)
    return layer_id


def get_layer(layer_id: str) -> LayerPrograms:
    try:
        return _REGISTRY[layer_id]
    except KeyError:
        raise KeyError(f"no compiled pigeon layer {layer_id!r} in this process") from None


def _device(tensors) -> torch.device:
    for t in tensors:
        return t.device
    return torch.device("cpu")


@torch.library.custom_op("pigeon::layer_forward", mutates_args=())
def layer_forward(layer_id: str, inputs: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    lp = get_layer(layer_id)
    dev = _device(inputs + params)
    kg = lp.kg(dev)
    out = Executor(lp.forward, lp.backend(dev)).run(kg, dict(zip(lp.input_names, inputs)),
                                                    dict(zip(lp.param_names, params)))
    # outputs must not alias inputs (custom-op contract): copy the rare pass-through
    ins = {t.data_ptr() for t in inputs + params}
    return [out[n].clone() if out[n].data_ptr() in ins else out[n] for n in lp.output_names]


@layer_forward.register_fake
def _(layer_id, inputs, params):
    lp = get_layer(layer_id)
    kg = next(iter(lp.kgraphs.values()))
    dev = _device(inputs + params)
    return [torch.empty(shape, dtype=dt, device=dev) for shape, dt in lp.out_spec(lp.forward, kg)]


@torch.library.custom_op("pigeon::layer_backward", mutates_args=())
def layer_backward(layer_id: str, grads: list[torch.Tensor], inputs: list[torch.Tensor],
                   params: list[torch.Tensor], saved: list[torch.Tensor]) -> list[torch.Tensor]:
    lp = get_layer(layer_id)
    dev = _device(inputs + params)
    kg = lp.kg(dev)
    names = lp.output_names
    bwd_inputs = dict(zip(lp.input_names, inputs))
    bwd_inputs |= {f"grad_{n}": g.contiguous() for n, g in zip(names[:lp.n_outputs], grads)}
    bwd_inputs |= dict(zip(names[lp.n_outputs:], saved))
    used = {n for n, _ in lp.backward.inputs}
    out = Executor(lp.backward, lp.backend(dev)).run(
        kg, {k: v for k, v in bwd_inputs.items() if k in used}, dict(zip(lp.param_names, params)))
    result = []
    by_name = dict(lp.grad_names)
    for name, like in itertools.chain(zip(lp.input_names, inputs), zip(lp.param_names, params)):
        g = out.get(by_name.get(name, ""))
        result.append(torch.zeros_like(like) if g is None else g)
    return result


@layer_backward.register_fake
def _(layer_id, grads, inputs, params, saved):
    return [torch.empty_like(t) for t in inputs + params]


def _setup_context(ctx, inputs, output):
    layer_id, ins, params = inputs
    lp = get_layer(layer_id)
    ctx.layer_id = layer_id
    ctx.n_in = len(ins)
    ctx.save_for_backward(*ins, *params, *output[lp.n_outputs:])
    ctx.n_params = len(params)
    ctx.out_meta = [(o.shape, o.dtype, o.device) for o in output[:lp.n_outputs]]


def _backward(ctx, grads):
    lp = get_layer(ctx.layer_id)
    saved = ctx.saved_tensors
    ins, params = list(saved[:ctx.n_in]), list(saved[ctx.n_in:ctx.n_in + ctx.n_params])
    rest = list(saved[ctx.n_in + ctx.n_params:])
    if lp.backward is None:
        if lp.backward_error:
            raise RuntimeError(f"pigeon: no backward for this layer: {lp.backward_error}")
        # no input or weight reaches an output: every gradient is zero
        return None, [torch.zeros_like(t) for t in ins], [torch.zeros_like(t) for t in params]
    g = [torch.zeros(shape, dtype=dt, device=dev) if gr is None else gr
         for gr, (shape, dt, dev) in zip(grads[:lp.n_outputs], ctx.out_meta)]
    res = layer_backward(ctx.layer_id, g, ins, params, rest)
    return None, res[:ctx.n_in], res[ctx.n_in:]


torch.library.register_autograd("pigeon::layer_forward", _backward, setup_context=_setup_context)
