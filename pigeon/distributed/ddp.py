"""Data-parallel training of a pigeon-compiled RGNN on torch.distributed.

Each rank owns a share of the target nodes (partition.py) and holds the k-hop subgraph they need; the model
(a stack of ``pg.compile``-d layers, ``backend="reference"`` or ``"kernels"``) is compiled on that subgraph
and wrapped in ``torch.nn.parallel.DistributedDataParallel``: a CompiledLayer is an ordinary ``nn.Module``
whose parameters live in ``.weights`` (a ParameterDict), so DDP's bucketed gradient all-reduce fits it as is
(parameters are broadcast from rank 0 when DDP wraps the module; every rank also starts from the same seed).

The loss is the mean over the global batch ``B`` of targets: rank r computes the sum of its per-target losses
over ``B ∩ owned_r`` divided by ``|B|``, times ``world`` (DDP averages gradients over ranks, so the all-reduced
gradient is that of ``sum_r sum_{B∩owned_r} l / |B|`` = the mean over ``B``), whatever the ranks' shares.

Entry points: :func:`train` (one rank's loop, in an initialised process group), :func:`main` (argument
parsing; run by ``python -m pigeon.distributed.launch --nproc N`` or by ``torchrun``).
"""
from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["RGNNStack", "build_model", "wrap_ddp", "global_batches", "reference_train", "train", "local_loss", "main",
           "init_from_env"]


class RGNNStack(torch.nn.Module):
    """``layers[0] -> elu -> layers[1] -> ... -> layers[-1]`` over one graph (no activation after the last)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.nn.functional.elu(x)
        return x


def build_model(graph, in_dim: int, *, hidden: int = 3, heads: int = 2, classes: int = 3, num_layers: int = 2,
                model: str = "rgat", backend: str = "reference", dtype: str = "float64", seed: int = 0) -> RGNNStack:
    """A ``num_layers``-layer RGAT (or RGCN) stack bound to ``graph``; the same arguments on any graph with the
    same relation / node-type counts give the same initial weights (each layer's init is seeded ``seed + i``)."""
    import pigeon as pg
    from pigeon.models import MODELS
    spec = MODELS[model]
    layers, d = [], in_dim
    for i in range(num_layers):
        last = i + 1 == num_layers
        if model == "rgat":
            hp = dict(out_dim=classes, heads=1) if last else dict(out_dim=hidden, heads=heads)
            out = hp["out_dim"] * hp["heads"]
        else:
            hp = dict(out_dim=classes if last else hidden)
            out = hp["out_dim"]
        layers.append(pg.compile(spec, graph, d, backend=backend, dtype=dtype, seed=seed + i, **hp))
        d = out
    return RGNNStack(layers)


def global_batches(targets: torch.Tensor, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The global batch of each step (sorted global node ids), the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.as_tensor(targets, dtype=torch.int64)
    return [torch.sort(t[torch.randperm(t.numel(), generator=gen)[:batch_size]]).values for _ in range(steps)]


def local_loss(logits_targets: torch.Tensor, labels_targets: torch.Tensor, owned_global: torch.Tensor,
               batch: torch.Tensor, world: int) -> torch.Tensor:
    """This rank's share of the global mean loss over ``batch`` (scaled by ``world``: DDP averages)."""
    sel = torch.isin(owned_global.cpu(), batch.cpu()).to(logits_targets.device)
    per = torch.nn.functional.cross_entropy(logits_targets[sel], labels_targets.to(sel.device)[sel], reduction="sum")
    return per * (world / batch.numel())


def reference_train(graph, x, labels, targets, *, steps: int, batch_size: int, lr: float, seed: int,
                    device=None, **model_kw) -> list[dict]:
    """Single-process training on the full graph: the parameters after each step (on ``device``, default the
    features' device)."""
    device = torch.device(device) if device is not None else x.device
    model = build_model(graph, x.shape[1], seed=seed, **model_kw).to(device)
    x, labels = x.to(device), labels.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    history = []
    for batch in global_batches(targets, steps, batch_size, seed):
        opt.zero_grad()
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out[batch.to(device)], labels[batch.to(device)])
        loss.backward()
        opt.step()
        history.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return history


def train(graph, x, labels, targets, *, steps: int, batch_size: int, lr: float, seed: int, num_layers: int = 2,
          method: str = "contiguous", on_step=None, timeout_s: float | None = None, device=None,
          **model_kw) -> list[dict]:
    """One rank's DDP training loop (process group initialised); returns the parameters after each step.
    ``graph``, ``x``, ``labels``, ``targets`` are the global ones (each rank builds only its own partition).
    ``on_step(step)`` runs before each step (the failure tests use it); a collective that fails because another
    rank exited or stalled past the process group's timeout raises :class:`~pigeon.distributed.faults.RankFailure`.
    ``device``: where the model runs (default: the features' device; a CUDA device: this rank's GPU, NCCL)."""
    from .faults import guard
    from .partition import partition
    rank, world = dist.get_rank(), dist.get_world_size()
    part = partition(graph, world, num_layers, targets, method, rank=rank)
    device = torch.device(device) if device is not None else x.device
    model = build_model(part.graph, x.shape[1], seed=seed, num_layers=num_layers, **model_kw).to(device)
    with guard("DDP setup (parameter broadcast)", timeout_s):
        ddp = wrap_ddp(model, device)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    xl = part.gather_features(x).to(device)
    lab = labels[part.targets_global].to(device)
    history = []
    for step, batch in enumerate(global_batches(targets, steps, batch_size, seed)):
        if on_step is not None:
            on_step(step)
        opt.zero_grad()
        with guard(f"training step {step} (gradient all-reduce)", timeout_s):
            out = ddp(xl)[part.targets_local]
            local_loss(out, lab, part.targets_global, batch, world).backward()   # DDP all-reduces here
        opt.step()
        history.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return history


def wrap_ddp(model, device: torch.device):
    """``DistributedDataParallel`` of ``model`` (on ``device``; a CUDA device is this rank's only GPU)."""
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def demo_problem(seed: int = 0, in_dim: int = 4, classes: int = 3, dtype=torch.float64):
    """The bundled tiny graph, seeded features and labels; targets: the paper nodes (0..23)."""
    from pigeon.graph import tiny_graph
    g = tiny_graph()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g.num_nodes, in_dim, generator=gen, dtype=dtype)
    labels = torch.randint(0, classes, (g.num_nodes,), generator=gen)
    targets = (g.ntype == 0).nonzero().flatten()
    return g, x, labels, targets


def init_from_env(backend: str = "gloo", timeout_s: float = 60.0) -> None:
    """``init_process_group`` from torchrun's / the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), with a timeout on every collective."""
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=timedelta(seconds=timeout_s))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="pigeon.distributed.ddp",
                                description="DDP-train a pigeon RGAT on the bundled tiny graph (gloo, float64)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", choices=("contiguous", "hash"), default="contiguous")
    p.add_argument("--check", action="store_true", help="compare with single-process training (rank 0)")
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    init_from_env("gloo", a.timeout)
    try:
        g, x, labels, targets = demo_problem(a.seed)
        kw = dict(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
        hist = train(g, x, labels, targets, method=a.method, **kw)
        if dist.get_rank() == 0:
            msg = f"trained {a.steps} steps on {dist.get_world_size()} ranks"
            if a.check:
                ref = reference_train(g, x, labels, targets, **kw)
                err = max(float((h[k] - r[k]).abs().max()) for h, r in zip(hist, ref) for k in r)
                msg += f"; max |param - single-process param| = {err:.3g}"
            print(msg, flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
