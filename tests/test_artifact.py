"""AOT artifacts on the CPU machine: written completely or not at all (also with two writers of one
directory), with cubins for the arch; loading checks the manifest, every checksum and the graph
before anything runs.  Running the cubins is a GPU test (tests/gpu); here ``load(..., cpu=True)``
runs an artifact's programs and forward glue on the CPU backends."""
import json
import os
import shutil
import threading

import pytest
import torch

import pigeon as pg
from pigeon.graph import HeteroGraph, tiny_graph
from pigeon.models import rgcn
from pigeon.graph import load as load_graph_named
from pigeon.runtime import artifact

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


@pytest.fixture(scope="module")
def layer():
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


def test_unwritable_out_is_a_one_line_artifact_error(layer, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "art"
    with pytest.raises(artifact.ArtifactError) as info:
        artifact.save(layer, out, progress=lambda m: None)
    assert str(info.value).startswith(f"cannot write artifact {out}: ") and "\n" not in str(info.value)
    if os.geteuid() != 0:      # root writes anywhere: a read-only directory only stops others
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(artifact.ArtifactError, match=f"cannot write artifact {ro / 'art'}: "):
                artifact.save(layer, ro / "art", progress=lambda m: None)
        finally:
            ro.chmod(0o700)


def test_a_failure_while_writing_files_leaves_nothing(layer, tmp_path, monkeypatch):
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(artifact.torch, "save", full_disk)
    with pytest.raises(artifact.ArtifactError, match=r"cannot write artifact .*art: No space left on device"):
        artifact.save(layer, tmp_path / "art", progress=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_two_writers_of_one_out_never_mix_files(layer, tmp_path):
    out = tmp_path / "art"
    both_writing = threading.Barrier(2, timeout=120)
    results = {}

    def writer(tag):
        first = [True]

        def progress(msg):
            if first[0]:          # both are past the "exists" check and writing their files
                first[0] = False
                both_writing.wait()
        try:
            artifact.save(layer, out, progress=progress)
            results[tag] = "wrote"
        except Exception as e:    # noqa: BLE001 - the test inspects it
            results[tag] = e

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = sorted(results.values(), key=lambda r: r != "wrote")
    assert outcomes[0] == "wrote", results
    assert isinstance(outcomes[1], artifact.ArtifactError) and "another writer" in str(outcomes[1]), results
    assert [p.name for p in tmp_path.iterdir()] == ["art"]         # the loser's temporary files are gone
    artifact.read_manifest(out)                                    # whole: every checksum holds


# ------------------------------------------------------------------------ corrupt manifests

@pytest.fixture(scope="module")
def saved(layer, tmp_path_factory):
    return artifact.save(layer, tmp_path_factory.mktemp("saved") / "art", progress=lambda m: None)


def _edit_manifest(fn, resign=False):
    def edit(art):
        mf = art / "manifest.json"
        m = json.loads(mf.read_text())
        fn(m)
        if resign:
            m["sha256"] = artifact.manifest_checksum(m)
        mf.write_text(json.dumps(m))
    return edit


def _write(name, data):
    def edit(art):
        (art / name).write_text(data)
    return edit


def _flip_byte(name):
    def edit(art):
        f = art / name
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))
    return edit


CORRUPTIONS = {
    "invalid_json": (_write("manifest.json", '{"format": 2, "arch": '), r"manifest.json: invalid JSON \(.* line 1"),
    "not_an_object": (_write("manifest.json", "[1, 2]"), r"manifest.json: not a manifest \(a JSON list"),
    "empty": (_write("manifest.json", ""), r"manifest.json: invalid JSON"),
    "wrong_version": (_edit_manifest(lambda m: m.update(format=1)), r"manifest.json: artifact format 1, but pigeon .* reads format 2"),
    "no_version": (_edit_manifest(lambda m: m.pop("format")), r"manifest.json: artifact format None"),
    "missing_key": (_edit_manifest(lambda m: m.pop("forward")), r"manifest.json: missing key 'forward'$"),
    "missing_keys": (_edit_manifest(lambda m: [m.pop("glue"), m.pop("files")]), r"manifest.json: missing keys 'glue', 'files'$"),
    "edited": (_edit_manifest(lambda m: m.update(dtype="bfloat16")), r"manifest.json: checksum mismatch"),
    "params_changed": (_flip_byte("params.pt"), r"params.pt: checksum mismatch \(sha256 "),
    "graph_missing": (lambda art: (art / "graph.pt").unlink(), r"graph.pt: missing \(manifest.json lists it\)"),
    "cubin_changed": (lambda art: _flip_byte(f"kernels/{next((art / 'kernels').glob('*.cubin')).name}")(art),
                      r"\.cubin: checksum mismatch"),
    "unlisted_params": (_edit_manifest(lambda m: m["files"].pop("params.pt"), resign=True),
                        r"manifest.json: lists no checksum for params.pt"),
    "escaping_path": (_edit_manifest(lambda m: m["files"].update({"../elsewhere": "0" * 64}), resign=True),
                      r"manifest.json: file '../elsewhere' is outside the artifact"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_artifacts_are_refused_before_anything_loads(saved, tmp_path, monkeypatch, case):
    corrupt, message = CORRUPTIONS[case]
    art = tmp_path / "art"
    shutil.copytree(saved, art)
    corrupt(art)

    def must_not_run(*a, **k):
        raise AssertionError("loaded something from a corrupt artifact")
    import pigeon.graph
    import pigeon.runtime.ops
    monkeypatch.setattr(torch, "load", must_not_run)
    monkeypatch.setattr(pigeon.graph, "load_graph", must_not_run)
    monkeypatch.setattr(pigeon.runtime.ops, "register_layer", must_not_run)
    for kw in ({}, {"cpu": True}):
        with pytest.raises(artifact.ArtifactError) as info:
            artifact.load(art, **kw)
        msg = str(info.value)
        assert "\n" not in msg and str(art) in msg, msg
        assert __import__("re").search(message, msg), msg


def test_the_saved_artifact_itself_loads(saved):
    assert artifact.read_manifest(saved)["spec"] == "rgcn"
    layer = artifact.load(saved, cpu=True)
    assert isinstance(layer, artifact.ArtifactLayer)


# ------------------------------------------------------------------------ edge-wise inputs and outputs

@pg.layer
def edge_gated(g, x, w: pg.EdgeTensor, *, out_dim: int = 4):
    W = pg.weight("W", (x.dim, out_dim), per=g.etype)
    m = pg.typed_linear(g.src(x), W, by=g.etype) * pg.sigmoid(w)       # edge-wise [E, out_dim]
    return {"h": pg.aggregate(g, m, "sum"), "m": m}


@pytest.fixture(scope="module")
def edge_artifact(tmp_path_factory):
    g = load_graph_named("tiny")
    k = pg.compile(edge_gated, g, {"x": 6, "w": 1}, backend="kernels", seed=3)
    out = artifact.save(k, tmp_path_factory.mktemp("edge") / "art", progress=lambda m: None)
    return g, k, out


def _outputs_and_grads(layer, x, w, ups):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = layer(x, w)
    loss = sum((out[n] * ups[n]).sum() for n in ups)
    return out, torch.autograd.grad(loss, [x, w] + list(layer.weights.values()))


def test_artifact_with_edge_inputs_and_outputs_equals_the_reference(edge_artifact):
    g, k, art = edge_artifact
    loaded = artifact.load(art, cpu=True)
    ref = pg.compile(edge_gated, g, {"x": 6, "w": 1}, backend="reference")
    ref.load_state_dict(k.state_dict())
    torch.manual_seed(0)
    x, w = torch.randn(g.num_nodes, 6), torch.randn(g.num_edges, 1)
    ups = {"h": torch.randn(g.num_nodes, 4), "m": torch.randn(g.num_edges, 4)}
    want, g_want = _outputs_and_grads(ref, x, w, ups)
    for layer in (loaded, k):
        got, g_got = _outputs_and_grads(layer, x, w, ups)
        for n in want:         # row e of the edge-wise output is edge e of the graph, as w's row e
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{type(layer).__name__} output {n}: {m}")
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{type(layer).__name__}: {m}")


def test_artifact_and_compiled_layers_share_one_forward_glue(edge_artifact, monkeypatch):
    import pigeon.runtime.ops as ops
    g, k, art = edge_artifact
    loaded = artifact.load(art, cpu=True)
    calls = []
    real = ops.run_layer_forward

    def spy(layer_id, glue, kgraph, inputs, weights):
        calls.append(layer_id)
        return real(layer_id, glue, kgraph, inputs, weights)
    monkeypatch.setattr(ops, "run_layer_forward", spy)
    x, w = torch.randn(g.num_nodes, 6), torch.randn(g.num_edges, 1)
    torch.testing.assert_close(loaded(x, w=w), k(x, w=w))
    assert calls == [loaded.layer_id, k.layer_id] and loaded.glue == k.glue
    from pigeon.reference import InputError         # and the same input checks
    with pytest.raises(InputError, match="input 'w' has shape"):
        loaded(x, torch.randn(g.num_nodes, 1))
