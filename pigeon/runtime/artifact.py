"""Ahead-of-time artifacts: ``pigeon compile --out DIR`` writes everything a compiled layer needs
to run on a GPU machine that has neither TVM nor nvcc:

    DIR/manifest.json     format, versions, spec, hyperparameters, arch, the forward and backward
                          kernel programs (JSON), input/param/output names, kernel list
    DIR/graph.pt          the graph the layer was compiled for (pigeon.graph.save_graph)
    DIR/params.pt         the initial weights
    DIR/ir.json           the inter-operator IR text (for people; not read back)
    DIR/kernels/NAME.cu   the generated CUDA source of each kernel
    DIR/kernels/NAME.cubin  its cubin for the chosen arch

The directory is written under a temporary name and renamed at the end, so a crash never leaves a
half artifact.  ``load(DIR)`` rebuilds the layer, with every kernel module loaded from the cubins.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

FORMAT = 1


class ArtifactError(ValueError):
    pass


def _render(launch):
    """The rendered CUDA kernel of a launch (None for host ops)."""
    from ..codegen.lower import GemmLaunch, TraversalLaunch
    if isinstance(launch, GemmLaunch):
        from ..codegen.gemm import render_gemm
        return render_gemm(launch.inst)
    if isinstance(launch, TraversalLaunch):
        from ..codegen.traversal import render_traversal
        return render_traversal(launch.inst)
    return None


def kernels_of(layer) -> dict:
    """name -> RenderedKernel for every kernel of a compiled layer's forward and backward programs."""
    out = {}
    for prog in (layer.forward_program, layer.backward_program):
        if prog is None:
            continue
        for launch in prog.launches:
            rk = _render(launch)
            if rk is not None:
                out.setdefault(rk.name, rk)
    return out


def save(layer, out_dir: str | os.PathLike, *, arch: str = "sm_90", progress=print) -> Path:
    """Write ``layer`` (compiled with backend="kernels") as an artifact directory."""
    from .. import __version__
    from ..graph import save_graph
    from ..ir.printer import format_ir
    from ..ir.serialize import to_json
    from .build import build_kernel
    if getattr(layer, "layer_id", None) is None:
        raise ArtifactError("only layers compiled with backend='kernels' can be saved as artifacts")
    out = Path(out_dir)
    if out.exists():
        raise ArtifactError(f"{out} exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "kernels").mkdir()
        kernels = kernels_of(layer)
        listing = {}
        for i, (name, rk) in enumerate(sorted(kernels.items())):
            progress(f"[pigeon] building kernel {i + 1}/{len(kernels)} {name} for {arch}")
            entry = build_kernel(rk.source, arch, name=name)
            cubin = entry.read_cubin()
            (tmp / "kernels" / f"{name}.cu").write_text(rk.source)
            (tmp / "kernels" / f"{name}.cubin").write_bytes(cubin)
            listing[name] = {"sha256": hashlib.sha256(cubin).hexdigest(), "template": rk.template,
                             "resources": entry.meta.get("resources", {})}
        save_graph(layer.graph, tmp / "graph.pt")
        torch.save({k: v.detach().cpu() for k, v in layer.weights.items()}, tmp / "params.pt")
        (tmp / "ir.json").write_text(json.dumps({"ir": format_ir(layer.ir)}, indent=1))
        manifest = {
            "format": FORMAT, "pigeon_version": __version__, "arch": arch, "spec": layer.spec.name,
            "dtype": layer.dtype, "in_dims": layer.in_dims, "hparams": layer.hparams,
            "forward": to_json(layer.forward_program),
            "backward": to_json(layer.backward_program) if layer.backward_program else None,
            "input_names": [op.attr("name") for op in layer.ir.inputs()],
            "param_names": [op.attr("name") for op in layer.ir.params()],
            "forward_outputs": list(layer.autodiff.forward.output_names),
            "n_outputs": len(layer.ir.outputs), "grads": [list(g) for g in layer.autodiff.grads],
            "kernels": listing,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class ArtifactLayer(torch.nn.Module):
    """A layer loaded from an artifact: the same forward/backward ops as a compiled layer."""

    def __init__(self, manifest: dict, graph, params: dict, modules: dict):
        super().__init__()
        from ..codegen.layout import kernel_graph
        from ..ir.serialize import from_json
        from .ops import LayerPrograms, register_layer
        from .program import CudaBackend
        self.manifest, self.graph = manifest, graph
        self.in_dims = manifest["in_dims"]
        self.dtype = manifest["dtype"]
        self.weights = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in params.items()})
        self.forward_program = from_json(manifest["forward"])
        self.backward_program = from_json(manifest["backward"]) if manifest["backward"] else None
        self.kgraph = kernel_graph(graph)
        backend = CudaBackend(arch=manifest["arch"])
        backend._modules.update(modules)
        self.input_names = tuple(manifest["input_names"])
        self.param_names = tuple(manifest["param_names"])
        self.n_outputs = manifest["n_outputs"]
        lp = LayerPrograms(self.forward_program, self.backward_program, self.input_names, self.param_names,
                           tuple(manifest["forward_outputs"]), self.n_outputs,
                           tuple(tuple(g) for g in manifest["grads"]), {str(self.kgraph.device): self.kgraph},
                           {"cuda": backend})
        self.layer_id = register_layer(lp)

    def forward(self, *args):
        from .program import TORCH_DTYPES
        dt = TORCH_DTYPES[self.dtype]
        ins = [a.to(dt).contiguous() for a in args]
        params = [self.weights[n].to(dt) for n in self.param_names]
        outs = torch.ops.pigeon.layer_forward(self.layer_id, ins, params)[:self.n_outputs]
        return outs[0] if self.n_outputs == 1 else outs


def _check_graph(manifest: dict, g, params: dict, where: Path) -> None:
    """The kernels serve any graph, but the weights have one block per relation / node type."""
    from ..ir.serialize import from_json
    prog = from_json(manifest["forward"])
    for name, bname in prog.params:
        b = prog.buffer(bname)
        count = {"etype": g.num_etypes, "ntype": g.num_ntypes}.get(b.rows)
        if count is not None and params[name].shape[0] != count:
            raise ArtifactError(f"{where}: weight {name!r} has {params[name].shape[0]} {b.rows} blocks but the "
                                f"graph has {count} {'relations' if b.rows == 'etype' else 'node types'}")


def load(path: str | os.PathLike, graph=None) -> ArtifactLayer:
    """Load an artifact; ``graph`` defaults to the one it was compiled for."""
    from ..graph import load_graph
    from .launch import load_module
    p = Path(path)
    mf = p / "manifest.json"
    if not mf.exists():
        raise ArtifactError(f"{p} is not a pigeon artifact (no manifest.json)")
    manifest = json.loads(mf.read_text())
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{p}: artifact format {manifest.get('format')} is not {FORMAT}")
    g = graph if graph is not None else load_graph(p / "graph.pt")
    params = torch.load(p / "params.pt", weights_only=True)
    _check_graph(manifest, g, params, p)
    modules = {}
    for name, info in manifest["kernels"].items():
        cubin = (p / "kernels" / f"{name}.cubin").read_bytes()
        if hashlib.sha256(cubin).hexdigest() != info["sha256"]:
            raise ArtifactError(f"{p}: kernel {name} cubin does not match its checksum")
        modules[name] = cubin
    if torch.cuda.is_available():
        modules = {n: load_module(c) for n, c in modules.items()}
    else:
        raise ArtifactError("an artifact's kernels need a CUDA GPU; run the layer on the CPU with "
                            "pigeon.compile(..., backend='kernels') instead")
    return ArtifactLayer(manifest, g, params, modules)
