"""Mini-batch DDP training of a pigeon-compiled RGNN over sampled k-hop blocks (sampling.py).

Every rank owns a share of the target nodes (``assign_targets``); each epoch it cuts its share into batches
(:func:`~pigeon.distributed.sampling.epoch_batches`, seeded by ``(seed, epoch, rank)``), samples each batch's
block (:class:`~pigeon.distributed.sampling.NeighborSampler`, seeded by ``(seed, epoch, rank, step)``) and runs
the model on it; DDP all-reduces the gradients every step.  All ranks step together: an epoch has as many steps
as the rank with the most batches; a rank that has run out takes an empty step (zero loss over every parameter,
so it still joins the all-reduce).

The loss of a step is the mean over the union of the ranks' batches of that step: rank r's per-target sum over
its batch divided by the union's size (known on every rank without communication: the batch sizes follow from
the ranks' target counts), times ``world`` (DDP averages).

The model is a :class:`BlockRGNN`: the parameters of a ``build_model`` stack (compiled once, on a one-edge
stand-in graph with the full graph's relation and node-type counts, so the weight shapes and seeded initial
values are those of the full graph), and per block the compiled layers re-bound to the block's graph
(``CompiledLayer(spec, compilation, block_graph)``, sharing the one ``weights`` ParameterDict per layer).

:func:`reference_minibatch_train` is the single-process oracle: ``mode="union"`` runs one block per step over the
union of the ranks' batches (with every fanout ``None`` that is single-process full-neighbour mini-batch
training, and DDP equals it), ``mode="per_rank"`` sums the loss over each rank's own block (equal to DDP for any
fanout).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..graph import HeteroGraph
from .sampling import NeighborSampler, epoch_batches, num_steps

__all__ = ["BlockRGNN", "batch_sizes", "reference_minibatch_train", "stand_in_graph", "train_minibatch"]


def stand_in_graph(graph: HeteroGraph) -> HeteroGraph:
    """A one-node, one-edge graph with ``graph``'s relation and node-type counts and names."""
    z = torch.zeros(1, dtype=torch.int64)
    return HeteroGraph(z, z, z, num_nodes=1, ntype=z, num_etypes=graph.num_etypes, num_ntypes=graph.num_ntypes,
                       etype_names=graph.etype_names, ntype_names=graph.ntype_names, name=f"{graph.name}[stand-in]")


class BlockRGNN(torch.nn.Module):
    """The parameters of an ``RGNNStack`` (``ddp.build_model``), run on any graph with the same relation and
    node-type counts: ``forward(graph, x)`` binds the compiled layers to ``graph`` and applies them (elu between
    layers).  ``forward(None, None)`` is an empty step: a zero that depends on every parameter."""

    def __init__(self, stack):
        super().__init__()
        self.weights = torch.nn.ModuleList([layer.weights for layer in stack.layers])
        self._layers = [(layer.spec, layer.compilation, layer.backend, layer.dtype) for layer in stack.layers]

    def bind(self, graph: HeteroGraph) -> list:
        from ..module import CompiledLayer
        out = []
        for (spec, comp, backend, dtype), w in zip(self._layers, self.weights):
            layer = CompiledLayer(spec, comp, graph, backend, 0, dtype)     # seed 0: no global RNG draw
            layer.weights = w                                              # the shared parameters
            out.append(layer)
        return out

    def forward(self, graph, x):
        if graph is None:
            return sum(p.sum() for p in self.parameters()) * 0.0
        layers = self.bind(graph)
        for i, layer in enumerate(layers):
            x = layer(x)
            if i + 1 < len(layers):
                x = torch.nn.functional.elu(x)
        return x


def batch_sizes(n_owned: int, batch_size: int) -> list[int]:
    """The batch sizes :func:`epoch_batches` cuts ``n_owned`` targets into."""
    return [batch_size] * (n_owned // batch_size) + ([n_owned % batch_size] if n_owned % batch_size else [])


def _build(graph, in_dim, fanouts, seed, model_kw) -> BlockRGNN:
    from .ddp import build_model
    return BlockRGNN(build_model(stand_in_graph(graph), in_dim, seed=seed, num_layers=len(fanouts), **model_kw))


def _schedule(owned: list[torch.Tensor], batch_size: int, seed: int, epoch: int):
    """(steps, every rank's batches, the union's size at each step) of one epoch."""
    per = [epoch_batches(o, batch_size, seed=seed, epoch=epoch, rank=r) for r, o in enumerate(owned)]
    steps = num_steps([o.numel() for o in owned], batch_size)
    sizes = [sum(len(b[s]) if s < len(b) else 0 for b in per) for s in range(steps)]
    return steps, per, sizes


def _block_loss(model, sampler, x, labels, batch, *, epoch, rank, step, scale):
    blk = sampler.sample(batch, epoch=epoch, rank=rank, step=step)        # on the host
    out = model(blk.graph, blk.gather_features(x))[blk.targets_local.to(x.device)]
    return torch.nn.functional.cross_entropy(out, labels[blk.targets_global.to(labels.device)], reduction="sum") \
        * scale


def train_minibatch(graph, x, labels, targets, *, fanouts, batch_size: int, lr: float, seed: int, epochs: int = 1,
                    per_relation: bool = True, method: str = "contiguous", on_step=None,
                    timeout_s: float | None = None, device=None, **model_kw) -> list[dict]:
    """One rank's mini-batch DDP loop (process group initialised); the parameters after every step.
    ``graph``, ``x``, ``labels``, ``targets`` are the global ones (host memory; only blocks reach the model);
    ``device``: where the model runs (default: the features' device; CUDA: this rank's GPU, NCCL)."""
    from .ddp import wrap_ddp
    from .faults import guard
    from .partition import assign_targets
    rank, world = dist.get_rank(), dist.get_world_size()
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    sampler = NeighborSampler(graph, fanouts, per_relation=per_relation, seed=seed)
    owned = assign_targets(targets, world, method)
    device = torch.device(device) if device is not None else x.device
    model = _build(graph, x.shape[1], fanouts, seed, model_kw).to(device)
    x, labels = x.to(device), labels.to(device)
    with guard("DDP setup (parameter broadcast)", timeout_s):
        ddp = wrap_ddp(model, device)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        steps, per, sizes = _schedule(owned, batch_size, seed, epoch)
        mine = per[rank]
        for step in range(steps):
            if on_step is not None:
                on_step(epoch, step)
            opt.zero_grad()
            with guard(f"epoch {epoch} step {step} (gradient all-reduce)", timeout_s):
                if step < len(mine):
                    loss = _block_loss(ddp, sampler, x, labels, mine[step], epoch=epoch, rank=rank, step=step,
                                       scale=world / sizes[step])
                else:
                    loss = ddp(None, None)
                loss.backward()                         # DDP all-reduces here
            opt.step()
            history.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return history


def reference_minibatch_train(graph, x, labels, targets, *, world: int, fanouts, batch_size: int, lr: float,
                              seed: int, epochs: int = 1, per_relation: bool = True, method: str = "contiguous",
                              mode: str = "union", device=None, **model_kw) -> list[dict]:
    """Single-process training over the same steps as :func:`train_minibatch` on ``world`` ranks (module
    docstring: ``mode="union"`` / ``"per_rank"``)."""
    from .partition import assign_targets
    if mode not in ("union", "per_rank"):
        raise ValueError(f"mode must be 'union' or 'per_rank', got {mode!r}")
    sampler = NeighborSampler(graph, fanouts, per_relation=per_relation, seed=seed)
    owned = assign_targets(targets, world, method)
    device = torch.device(device) if device is not None else x.device
    model = _build(graph, x.shape[1], fanouts, seed, model_kw).to(device)
    x, labels = x.to(device), labels.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    history = []
    for epoch in range(epochs):
        steps, per, sizes = _schedule(owned, batch_size, seed, epoch)
        for step in range(steps):
            opt.zero_grad()
            here = [(r, b[step]) for r, b in enumerate(per) if step < len(b)]
            if mode == "union":
                batch = torch.cat([b for _, b in here])
                loss = _block_loss(model, sampler, x, labels, batch, epoch=epoch, rank=0, step=step,
                                   scale=1.0 / sizes[step])
            else:
                loss = sum(_block_loss(model, sampler, x, labels, b, epoch=epoch, rank=r, step=step,
                                       scale=1.0 / sizes[step]) for r, b in here)
            loss.backward()
            opt.step()
            history.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return history
