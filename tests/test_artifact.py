"""AOT artifacts on the CPU machine: written completely or not at all, with cubins for the arch;
loading checks checksums and the graph.  (Running one is a GPU test: tests/gpu.)"""
import json
import shutil

import pytest
import torch

import pigeon as pg
from pigeon.graph import HeteroGraph, tiny_graph
from pigeon.models import rgcn
from pigeon.runtime import artifact

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


@pytest.fixture(scope="module")
def layer():
    pytest.importorskip("tvm")
    return pg.compile(rgcn, tiny_graph(), 8, backend="kernels", out_dim=4)


def test_save_writes_manifest_sources_and_cubins(layer, tmp_path):
    out = artifact.save(layer, tmp_path / "art", progress=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["spec"] == "rgcn" and m["arch"] == "sm_90" and m["hparams"] == {"out_dim": 4}
    names = set(m["kernels"])
    assert names == {p.stem for p in (out / "kernels").glob("*.cubin")}
    assert names == {p.stem for p in (out / "kernels").glob("*.cu")}
    assert all((out / "kernels" / f"{n}.cubin").read_bytes()[:4] == b"\x7fELF" for n in names)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]     # no temporary directory left


def test_failed_save_leaves_nothing(layer, tmp_path, monkeypatch):
    import pigeon.runtime.build as build

    def boom(*a, **k):
        raise build.KernelBuildError("simulated nvcc failure")
    monkeypatch.setattr(build, "build_kernel", boom)
    with pytest.raises(build.KernelBuildError):
        artifact.save(layer, tmp_path / "art", progress=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_and_reference_layers_are_refused(layer, tmp_path):
    (tmp_path / "art").mkdir()
    with pytest.raises(artifact.ArtifactError, match="exists"):
        artifact.save(layer, tmp_path / "art")
    ref = pg.compile(rgcn, tiny_graph(), 8, backend="reference")
    with pytest.raises(artifact.ArtifactError, match="backend='kernels'"):
        artifact.save(ref, tmp_path / "other")


def test_load_checks_checksums_and_graph(layer, tmp_path):
    out = artifact.save(layer, tmp_path / "art", progress=lambda m: None)
    g = tiny_graph()
    other = HeteroGraph(g.src, g.dst, g.etype % 2, num_nodes=g.num_nodes, ntype=g.ntype, num_etypes=2)
    with pytest.raises(artifact.ArtifactError, match="weight 'W' has 4 etype blocks but the graph has 2 relations"):
        artifact.load(out, graph=other)
    victim = next((out / "kernels").glob("*.cubin"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match="checksum"):
        artifact.load(out)
    with pytest.raises(artifact.ArtifactError, match="not a pigeon artifact"):
        artifact.load(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only message")
def test_load_without_gpu_is_a_clear_error(layer, tmp_path):
    out = artifact.save(layer, tmp_path / "art", progress=lambda m: None)
    with pytest.raises(artifact.ArtifactError, match="need a CUDA GPU"):
        pg.load(out)
