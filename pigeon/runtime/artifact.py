"""Ahead-of-time artifacts: ``pigeon compile --out DIR`` writes everything a compiled layer needs
to run on a GPU machine that has neither TVM nor nvcc:

    DIR/manifest.json     format, versions, spec, hyperparameters, arch, the forward and backward
                          kernel programs (JSON), input/param/output names, kernel list
    DIR/graph.pt          the graph the layer was compiled for (pigeon.graph.save_graph)
    DIR/params.pt         the initial weights
    DIR/ir.json           the inter-operator IR text (for people; not read back)
    DIR/kernels/NAME.cu   the generated CUDA source of each kernel
    DIR/kernels/NAME.cubin  its cubin for the chosen arch

The manifest lists the sha256 of every other file and of itself.  The directory is written under a
temporary name and renamed at the end, so a crash never leaves a half artifact and two writers of
one DIR never mix files.  ``load(DIR)`` checks the manifest and every checksum before it loads
anything, then rebuilds the layer, with every kernel module loaded from the cubins.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

FORMAT = 2     # 2: forward glue (input/output domains), checksums of the manifest and of every file


class ArtifactError(ValueError):
    pass


def _render(launch):
    """The rendered CUDA kernel of a launch (None for host work), from its kernel family."""
    from .families import family_of
    return family_of(launch).render(launch)


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``sha256`` entry."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(layer, out_dir: str | os.PathLike, *, arch: str = "sm_90", progress=print) -> Path:
    """Write ``layer`` (compiled with backend="kernels") as an artifact directory.

    Everything is written into a fresh temporary directory next to ``out_dir``, synced, and renamed
    to ``out_dir`` at the end: readers see no artifact or a whole one.  Two writers of one
    ``out_dir`` cannot mix files: the rename of the second fails (the target is no longer empty)
    and it raises ArtifactError, leaving the first writer's artifact as it was."""
    from .._version import __version__
    from ..graph import save_graph
    from ..ir.printer import format_ir
    from ..ir.serialize import to_json
    from .build import build_kernel
    if getattr(layer, "layer_id", None) is None:
        raise ArtifactError("only layers compiled with backend='kernels' can be saved as artifacts")
    out = Path(out_dir)
    if out.exists():
        raise ArtifactError(f"{out} exists; remove it or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ArtifactError(f"cannot write artifact {out}: {e.strerror or e}") from None
    try:
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
            files = {str(f.relative_to(tmp)): _sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
            manifest = {
                "format": FORMAT, "pigeon_version": __version__, "arch": arch, "spec": layer.spec.name,
                "dtype": layer.dtype, "in_dims": layer.in_dims, "hparams": layer.hparams,
                "forward": to_json(layer.forward_program),
                "backward": to_json(layer.backward_program) if layer.backward_program else None,
                "input_names": [op.attr("name") for op in layer.ir.inputs()],
                "param_names": [op.attr("name") for op in layer.ir.params()],
                "forward_outputs": list(layer.autodiff.forward.output_names),
                "n_outputs": len(layer.ir.outputs), "grads": [list(g) for g in layer.autodiff.grads],
                "glue": layer.glue.to_json(), "kernels": listing, "files": files,
            }
            manifest["sha256"] = manifest_checksum(manifest)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync(f)
            _fsync(tmp / "kernels")
            _fsync(tmp)
        except OSError as e:
            raise ArtifactError(f"cannot write artifact {out}: {e.strerror or e}") from None
        try:
            os.rename(tmp, out)      # atomic; fails if another writer's artifact is already there
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY) or out.exists():
                raise ArtifactError(f"{out} was written by another writer while this one ran; this "
                                    f"writer's files were discarded and {out} is the other's, whole") from None
            raise ArtifactError(f"cannot write artifact {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _fsync(out.parent)
    except OSError:
        pass
    return out


class ArtifactLayer(torch.nn.Module):
    """A layer loaded from an artifact: the same forward/backward ops as a compiled layer, and the
    same forward glue (``pigeon.runtime.ops.call_layer``: input checks, edge order, dtype)."""

    def __init__(self, manifest: dict, graph, params: dict, modules: dict | None):
        super().__init__()
        from ..ir.serialize import from_json
        from .ops import LayerGlue, LayerPrograms, layer_kgraph, register_layer
        from .program import CudaBackend
        self.manifest, self.graph = manifest, graph
        self.in_dims = manifest["in_dims"]
        self.dtype = manifest["dtype"]
        self.glue = LayerGlue.from_json(manifest["glue"])
        self.weights = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in params.items()})
        self.forward_program = from_json(manifest["forward"])
        self.backward_program = from_json(manifest["backward"]) if manifest["backward"] else None
        self.kgraph = layer_kgraph(graph)
        # the compact layouts the programs read, made now: not on a first call torch.compile traces
        rows = {b.rows for prog in (self.forward_program, self.backward_program) if prog is not None
                for b in prog.buffers}
        if "compact" in rows:
            self.kgraph.compact_stats  # noqa: B018
        if "compact_dst" in rows:
            self.kgraph.compact_dst_stats  # noqa: B018
        backends = {}
        if modules is not None:       # the cubins; without them (cpu=True) CPU tensors use the CPU backends
            backend = CudaBackend(arch=manifest["arch"])
            backend._modules.update(modules)
            backends["cuda"] = backend
        self.input_names = tuple(manifest["input_names"])
        self.param_names = tuple(manifest["param_names"])
        self.n_outputs = manifest["n_outputs"]
        lp = LayerPrograms(self.forward_program, self.backward_program, self.input_names, self.param_names,
                           tuple(manifest["forward_outputs"]), self.n_outputs,
                           tuple(tuple(g) for g in manifest["grads"]), {str(self.kgraph.device): self.kgraph},
                           backends)
        self._programs = register_layer(lp)      # held here: the registry holds entries weakly
        self.layer_id = self._programs.layer_id

    def forward(self, *args, **kwargs):
        from . import ops
        return ops.call_layer(self.layer_id, self.glue, self.kgraph, args, kwargs, self.weights)


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


REQUIRED = ("format", "pigeon_version", "arch", "spec", "dtype", "in_dims", "hparams", "forward", "backward",
            "input_names", "param_names", "forward_outputs", "n_outputs", "grads", "glue", "kernels", "files",
            "sha256")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the artifact at ``path``, checked before anything is loaded or run: valid
    JSON, this format, every key, its own checksum, and the checksum of every file it lists.
    Raises ArtifactError naming the file and the problem."""
    from .._version import __version__
    p = Path(path)
    mf = p / "manifest.json"
    if not mf.is_file():
        raise ArtifactError(f"{p} is not a pigeon artifact (no manifest.json)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mf}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mf}: not a manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mf}: artifact format {manifest.get('format')!r}, but pigeon {__version__} reads "
                            f"format {FORMAT}; rebuild it with `pigeon compile --out`")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(f"{mf}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    if manifest["sha256"] != manifest_checksum(manifest):
        raise ArtifactError(f"{mf}: checksum mismatch: the manifest was changed or damaged after it was written")
    files = manifest["files"]
    needed = ["graph.pt", "params.pt"] + [f"kernels/{n}.cubin" for n in manifest["kernels"]]
    for rel in needed:
        if rel not in files:
            raise ArtifactError(f"{mf}: lists no checksum for {rel}")
    root = p.resolve()
    for rel, want in files.items():
        f = (p / rel)
        if Path(rel).is_absolute() or root not in f.resolve().parents:
            raise ArtifactError(f"{mf}: file {rel!r} is outside the artifact")
        if not f.is_file():
            raise ArtifactError(f"{f}: missing (manifest.json lists it)")
        got = _sha256(f)
        if got != want:
            raise ArtifactError(f"{f}: checksum mismatch (sha256 {got[:16]}..., manifest.json says {want[:16]}...)")
    return manifest


def load(path: str | os.PathLike, graph=None, *, cpu: bool = False) -> ArtifactLayer:
    """Load an artifact; ``graph`` defaults to the one it was compiled for.

    Its kernels are cubins, so running it needs a CUDA GPU.  ``cpu=True`` skips the cubins: the
    layer then runs its kernel programs on CPU tensors with the CPU executors (each instance's torch
    semantics, or the emulated CUDA text), which tests an artifact's programs and glue on a machine without one."""
    from ..graph import load_graph
    from ..ir.serialize import from_json
    p = Path(path)
    manifest = read_manifest(p)
    try:
        from .ops import LayerGlue
        LayerGlue.from_json(manifest["glue"])
        from_json(manifest["forward"])
        if manifest["backward"]:
            from_json(manifest["backward"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{p / 'manifest.json'}: unreadable program or glue ({type(e).__name__}: {e})") from None
    g = graph if graph is not None else load_graph(p / "graph.pt")
    params = torch.load(p / "params.pt", weights_only=True)
    _check_graph(manifest, g, params, p)
    if cpu:
        return ArtifactLayer(manifest, g, params, None)
    if not torch.cuda.is_available():
        raise ArtifactError("an artifact's kernels need a CUDA GPU; run the layer on the CPU with "
                            "pigeon.compile(..., backend='kernels') instead (or check the artifact's programs "
                            "on the CPU with pigeon.runtime.artifact.load(path, cpu=True))")
    from .launch import load_module
    modules = {name: load_module((p / "kernels" / f"{name}.cubin").read_bytes()) for name in manifest["kernels"]}
    return ArtifactLayer(manifest, g, params, modules)
