"""`pigeon compile` and `pigeon inspect` as a user runs them: a subprocess, exit codes, output."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = Path(__file__).resolve().parent / "specs"


def pigeon(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pigeon.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=None if env is None else {**os.environ, **env})


def cli(capsys, *args):
    """``pigeon ARGS`` in this process (fast: no interpreter start; kernel builds shared between tests)."""
    from pigeon.cli import main
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:   # argparse: --version, bad flags
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error(stderr: str, *needles: str) -> str:
    """stderr is exactly one line ``error: ...`` that contains every needle; no traceback."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("spec", ["pigeon/models/rgcn.py", "pigeon/models/rgat.py", "pigeon/models/hgt.py",
                                  "examples/gated_rgat.py", "rgat"])
def test_compile_each_model_prints_ir(spec):
    r = pigeon("compile", spec)
    assert r.returncode == 0, r.stderr
    assert "# IR after passes" in r.stdout and "return out=" in r.stdout
    assert "finite=True" in r.stdout


def test_compile_dump_shows_source_lines():
    r = pigeon("compile", "rgcn", "--dump", "--set", "out_dim=4", "--set", "aggr=sum", "--backend", "reference")
    assert r.returncode == 0, r.stderr
    assert "rgcn.py:9" in r.stdout and "# traced IR" in r.stdout and "shape=[40, 4]" in r.stdout


def test_broken_spec_reports_file_and_line():
    r = pigeon("compile", str(SPECS / "broken_shape.py"))
    assert r.returncode == 2
    one_error(r.stderr, f"{SPECS / 'broken_shape.py'}:7", "maps 17 -> 8")


def test_error_in_user_code_reports_file_and_line():
    r = pigeon("compile", str(SPECS / "broken_user_code.py"))
    assert r.returncode == 2
    one_error(r.stderr, f"{SPECS / 'broken_user_code.py'}:7", "AttributeError")


def test_ambiguous_and_missing_specs(capsys):
    code, out, err = cli(capsys, "compile", SPECS / "two_layers.py")
    assert code == 2
    one_error(err, "defines 2 layers")
    code, out, err = cli(capsys, "compile", f"{SPECS / 'two_layers.py'}:second", "--backend", "reference")
    assert code == 0, err
    code, out, err = cli(capsys, "compile", f"{SPECS / 'two_layers.py'}:third")
    assert code == 2
    one_error(err, "has no @pigeon.layer named 'third'")
    code, out, err = cli(capsys, "compile", "no_such_model")
    assert code == 2
    one_error(err, "no spec")


def test_inspect_prints_statistics():
    r = pigeon("inspect")
    assert r.returncode == 0, r.stderr
    assert "edges" in r.stdout and "relations" in r.stdout


def test_bad_graph_name_is_a_clear_error():
    r = pigeon("compile", "rgcn", "--graph", "no_such_graph")
    assert r.returncode == 2
    one_error(r.stderr, "no_such_graph")


# ---------------------------------------------------------------- the test session's own kernel cache

def test_session_does_not_write_the_users_cache():
    from pigeon.runtime.emulate import cache_root as emulate_root
    from pigeon.runtime.cache import KernelCache, default_cache_root
    home = Path("~/.cache/pigeon").expanduser()
    for root in (default_cache_root(), KernelCache().root, emulate_root()):
        assert root != home and home not in root.parents, root
    # subprocesses (the CLI tests) inherit it
    r = subprocess.run([sys.executable, "-c", "import os; print(os.environ['PIGEON_CACHE_DIR'])"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and Path(r.stdout.strip()) == default_cache_root()


# ---------------------------------------------------------------- an unusable kernel cache falls back

SRC = 'extern "C" __global__ void k(float* y) { y[threadIdx.x] = 1.0f; }\n'


def _build():
    return {"kernel.cubin": b"\x7fELF fake cubin"}, {}


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".trash-"))] if root.is_dir() else []


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile's directory (where the cache falls back to) inside this test's tmp_path."""
    import tempfile
    d = tmp_path / "systmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _assert_fallback(cache, bad: Path, private_tmp: Path):
    with pytest.warns(RuntimeWarning) as rec:
        e = cache.get_or_build(SRC, "sm_90", (), _build, compiler="fake", version="1")
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert str(bad) in msgs[0] and str(cache.write_root) in msgs[0] and "PIGEON_CACHE_DIR" in msgs[0]
    assert private_tmp in e.path.parents and e.read_cubin() == b"\x7fELF fake cubin"
    # the same process finds the entry again, without building or warning again
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get_or_build(SRC, "sm_90", (), lambda: pytest.fail("rebuilt"), compiler="fake",
                                  version="1") == e
    return e


def test_cache_dir_that_is_a_file_falls_back(tmp_path, monkeypatch, private_tmp):
    from pigeon.runtime.cache import KernelCache
    bad = tmp_path / "not_a_dir"
    bad.write_text("I am a file")
    monkeypatch.setenv("PIGEON_CACHE_DIR", str(bad))
    cache = KernelCache()
    assert cache.root == bad
    _assert_fallback(cache, bad, private_tmp)
    assert bad.read_text() == "I am a file"
    # a root below a file fails the same way
    _assert_fallback(KernelCache(bad / "sub"), bad / "sub", private_tmp)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes read-only dirs")
def test_read_only_cache_dir_falls_back(tmp_path, private_tmp):
    from pigeon.runtime.cache import KernelCache
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _assert_fallback(KernelCache(ro), ro, private_tmp)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs")
def test_cache_dir_nobody_may_write_falls_back(private_tmp):
    """/sys refuses new directories even to root: the read-only case where chmod does not help."""
    from pigeon.runtime.cache import KernelCache
    bad = Path("/sys/pigeon-cache-test")
    if bad.exists():
        pytest.skip("sysfs accepted a directory")
    _assert_fallback(KernelCache(bad), bad, private_tmp)


def test_read_only_cache_still_serves_its_entries(tmp_path, monkeypatch, private_tmp):
    """A prebuilt cache that cannot be written is read as usual; nothing warns."""
    import warnings

    from pigeon.runtime import cache as cache_mod
    good = cache_mod.KernelCache(tmp_path / "prebuilt")
    e = good.get_or_build(SRC, "sm_90", (), _build, compiler="fake", version="1")
    monkeypatch.setattr(cache_mod, "root_problem", lambda root: "read-only file system")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = cache_mod.KernelCache(tmp_path / "prebuilt").get_or_build(
            SRC, "sm_90", (), lambda: pytest.fail("rebuilt"), compiler="fake", version="1")
    assert again.path == e.path


def _disk_full_after(nbytes: int, only_under: Path | None = None):
    """A _write_file that writes ``nbytes`` of each file and then fails like a full disk."""
    import errno

    def write(path: Path, data: bytes) -> None:
        if only_under is not None and only_under not in path.parents:
            with open(path, "wb") as f:
                f.write(data)
            return
        with open(path, "wb") as f:
            f.write(data[:nbytes])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write


def test_full_disk_falls_back_and_leaves_no_half_entry(tmp_path, monkeypatch, private_tmp):
    from pigeon.runtime import cache as cache_mod
    root = tmp_path / "cache"
    monkeypatch.setattr(cache_mod, "_write_file", _disk_full_after(4, only_under=root))
    cache = cache_mod.KernelCache(root)
    e = _assert_fallback(cache, root, private_tmp)
    assert root not in e.path.parents
    assert _leftovers(root) == [] and cache.entries() == []
    assert not any(p.name == "meta.json" for p in root.rglob("*"))


def test_full_disk_everywhere_is_a_clear_error(tmp_path, monkeypatch, private_tmp):
    import errno

    from pigeon.runtime import cache as cache_mod
    root = tmp_path / "cache"
    monkeypatch.setattr(cache_mod, "_write_file", _disk_full_after(4))
    cache = cache_mod.KernelCache(root)
    with pytest.warns(RuntimeWarning, match="No space left"), \
            pytest.raises(cache_mod.CacheWriteError) as info:
        cache.get_or_build(SRC, "sm_90", (), _build, compiler="fake", version="1")
    msg = str(info.value)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert "No space left on device" in msg and str(root) in msg and "PIGEON_CACHE_DIR" in msg
    assert "\n" not in msg
    for r in (root, private_tmp):
        assert _leftovers(r) == []
        assert not any(p.name in ("meta.json", "kernel.cubin") for p in r.rglob("*"))


# ---------------------------------------------------------------- user mistakes: one line, exit 2

def test_version():
    from pigeon import __version__
    r = pigeon("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"pigeon {__version__}"


@pytest.mark.parametrize("spec,line,exc", [
    ("import_name_error.py", 3, "NameError"),
    ("import_zero_division.py", 5, "ZeroDivisionError"),
    ("import_missing_module.py", 2, "ModuleNotFoundError"),
])
def test_spec_that_fails_to_import_names_file_and_line(capsys, spec, line, exc):
    code, out, err = cli(capsys, "compile", SPECS / spec, "--backend", "reference")
    assert code == 2
    one_error(err, f"{SPECS / spec}:{line}:", exc, "while importing the spec")
    assert out == ""


def test_spec_that_fails_to_import_in_a_subprocess():
    r = pigeon("compile", str(SPECS / "import_zero_division.py"))
    assert r.returncode == 2
    one_error(r.stderr, f"{SPECS / 'import_zero_division.py'}:5:", "ZeroDivisionError")


@pytest.mark.parametrize("arch,hint", [("sm90", "did you mean --arch sm_90"), ("foo", "sm_XY"),
                                       ("compute_90", "virtual (PTX) architecture"), ("sm_9", "sm_XY"),
                                       ("", "sm_XY")])
def test_bad_arch_is_refused_before_any_work(capsys, arch, hint):
    code, out, err = cli(capsys, "compile", "rgat", "--arch", arch, "--set", "heads=2")
    assert code == 2
    one_error(err, f"--arch {arch}:", "not a GPU architecture", hint)
    assert out == ""   # nothing traced, nothing printed


def test_valid_archs_are_accepted():
    from pigeon.cli import CliError, check_arch
    for arch in ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a", "sm_100", "sm_100a", "sm_120f"):
        assert check_arch(arch) == arch
    for arch in ("sm90", "SM_90", "sm_90b", "compute_90", "sm_1000"):
        with pytest.raises(CliError):
            check_arch(arch)


def test_unknown_hyperparameter_is_refused_before_any_work(capsys):
    code, out, err = cli(capsys, "compile", "rgat", "--set", "heads2=3")
    assert code == 2
    assert one_error(err) == ("error: --set heads2=3: spec rgat has no hyperparameter 'heads2'; "
                              "it has ['heads', 'negative_slope', 'out_dim']")
    assert out == ""


def test_hyperparameter_values_take_the_type_of_the_default(capsys):
    spec = SPECS / "forward_hparams.py"
    code, out, err = cli(capsys, "compile", spec, "--set", "use_bias=maybe")
    assert code == 2
    one_error(err, "--set use_bias=maybe:", "bool")
    code, out, err = cli(capsys, "compile", spec, "--set", "out_dim=2.5")
    assert code == 2
    one_error(err, "--set out_dim=2.5:", "int")
    # scale=2 stays a float, use_bias=false a bool (not the string 'false'), aggr=mean a string
    code, out, err = cli(capsys, "compile", spec, "--backend", "reference", "--set", "scale=2",
                         "--set", "use_bias=false", "--set", "aggr=mean", "--set", "out_dim=3")
    assert code == 0, err
    assert "c=2.0, fn='scale'" in out and "%b" not in out and "reduce='mean'" in out and "shape=[40, 3]" in out


def test_bad_flags_are_one_line(capsys):
    code, out, err = cli(capsys, "compile", "rgat", "--backend", "foo")
    assert code == 2
    one_error(err, "--backend", "invalid choice")
    code, out, err = cli(capsys, "compile", "rgat", "--in-dim", "0")
    assert code == 2
    one_error(err, "--in-dim 0")
    code, out, err = cli(capsys, "compile", "rgat", "--set", "heads")
    assert code == 2
    one_error(err, "--set takes KEY=VALUE")


def test_division_by_zero_in_a_spec_names_file_and_line(capsys):
    code, out, err = cli(capsys, "compile", SPECS / "divide_by_zero.py", "--backend", "reference")
    assert code == 2
    one_error(err, f"{SPECS / 'divide_by_zero.py'}:7:", "division by zero")
    assert "# IR after passes" not in out
    code, out, err = cli(capsys, "compile", SPECS / "divide_by_zero.py", "--backend", "reference",
                         "--set", "count=4")
    assert code == 0, err


@pytest.mark.parametrize("args,largest", [
    (("--in-dim", "1000000000"), "param W [4, 1000000000, 64] float32"),
    (("--set", "out_dim=100000000"), "%7 = expand_compact (rgat.py:10) [151, 4, 100000000] float32"),
])
def test_sizes_too_large_are_refused_before_allocating(capsys, args, largest):
    code, out, err = cli(capsys, "compile", "rgat", "--backend", "reference", *args)
    assert code == 2
    line = one_error(err, "rgat on tiny would need ~", "TiB", f"(largest: {largest}", "limit is")
    assert "PIGEON_MAX_BYTES" in line
    assert "# ran on" not in out


def test_memory_limit_comes_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("PIGEON_MAX_BYTES", "1K")
    code, out, err = cli(capsys, "compile", "rgcn", "--backend", "reference")
    assert code == 2
    one_error(err, "rgcn on tiny would need ~", "limit is 1.0 KiB (PIGEON_MAX_BYTES=1K")
    monkeypatch.setenv("PIGEON_MAX_BYTES", "lots")
    code, out, err = cli(capsys, "compile", "rgcn", "--backend", "reference")
    assert code == 2
    one_error(err, "PIGEON_MAX_BYTES='lots'")
    monkeypatch.setenv("PIGEON_MAX_BYTES", "1G")
    code, out, err = cli(capsys, "compile", "rgcn", "--backend", "reference")
    assert code == 0, err


def test_size_estimate_matches_what_is_allocated():
    import torch

    import pigeon as pg
    from pigeon.graph import load
    from pigeon.models import hgt
    from pigeon.reference import evaluate
    from pigeon.sizes import estimate
    g = load("tiny")
    layer = pg.compile(hgt, g, in_dim=8, backend="reference")
    est = estimate(layer.ir, g, "float32")
    x = torch.randn(g.num_nodes, 8)
    env = evaluate(layer.ir, g, {"x": x}, dict(layer.weights.items()))
    ops = list(layer.ir.ops())
    assert len(est.items) == len(ops)
    for item, op in zip(est.items, ops):     # every value, sized on the graph as the interpreter makes it
        assert item.shape == tuple(env[op.key].shape), (item, op)
        assert item.nbytes == env[op.key].numel() * 4
    assert sum(i.nbytes for i in est.items if i.what.startswith("param ")) == \
        sum(p.numel() * 4 for p in layer.parameters())
    assert est.total == sum(v.numel() * 4 for v in env.values()) and est.largest.nbytes == max(
        v.numel() * 4 for v in env.values())
    # bf16 storage: values at 2 bytes; weights and inputs keep their float32 tensor plus a bf16 copy
    est16 = estimate(layer.ir, g, "bfloat16")
    for a, b in zip(est.items, est16.items):
        leaf = a.what.startswith(("param ", "input "))
        assert b.nbytes == (a.nbytes * 3 // 2 if leaf else a.nbytes // 2)


def test_unwritable_out_dir_is_refused_before_any_work(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, out, err = cli(capsys, "compile", "rgcn", "--out", blocker / "art")
    assert code == 2
    one_error(err, f"--out {blocker / 'art'}", "not a directory")
    assert out == ""
    code, out, err = cli(capsys, "compile", "rgcn", "--out", blocker)
    assert code == 2
    one_error(err, f"--out {blocker}", "a file is in the way")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs")
def test_out_dir_nobody_may_write(capsys):
    code, out, err = cli(capsys, "compile", "rgcn", "--out", "/sys/pigeon-artifact-test")
    assert code == 2
    one_error(err, "--out /sys/pigeon-artifact-test", "cannot write in /sys")


def test_artifact_write_errors_are_one_line(capsys, monkeypatch, tmp_path):
    import errno

    from pigeon.runtime import artifact

    def full_disk(layer, out_dir, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(out_dir) / "manifest.json"))
    monkeypatch.setattr(artifact, "save", full_disk)
    code, out, err = cli(capsys, "compile", SPECS / "two_layers.py:first", "--out", tmp_path / "art")
    assert code == 2
    one_error(err, f"--out {tmp_path / 'art'}", "No space left on device")


@pytest.mark.parametrize("err", [(28, "/tmp/pigeon-build/lib.so"), (13, "/opt/readonly/kernel.so")])
def test_os_errors_are_one_line(capsys, monkeypatch, err):
    """A full disk or a permission while building (shared libraries, nvcc's temporaries)."""
    import pigeon.module
    code_, path = err

    def fails(self, *a, **kw):
        raise OSError(code_, os.strerror(code_), path)
    monkeypatch.setattr(pigeon.module.CompiledLayer, "__init__", fails)
    code, out, err_ = cli(capsys, "compile", "rgcn", "--backend", "reference")
    assert code == 2
    one_error(err_, os.strerror(code_), path)


# ---------------------------------------------------------------- what ran where; --check; --reverse

RAN_ON = re.compile(r"^# ran on (\S+) \((cpu|cuda [^,]+), (reference|kernels via (\w+))\): "
                    r"(first call|build\+first call) [0-9.]+ ms, steady call [0-9.]+ ms$", re.M)


def test_reverse_adds_reverse_relations(capsys):
    code, out, err = cli(capsys, "compile", "rgcn", "--backend", "reference", "--reverse")
    assert code == 0, err
    assert "relations=8" in out and "(reverse relations added)" in out
    m = RAN_ON.search(out)
    assert m and m.group(1) == "tiny+rev" and m.group(3) == "reference" and m.group(5) == "first call"
    code, out, err = cli(capsys, "inspect", "--reverse")
    assert code == 0 and "relations=8" in out


def test_kernels_check_against_reference(capsys):
    from pigeon.runtime.program import default_backend
    import torch
    code, out, err = cli(capsys, "compile", SPECS / "two_layers.py:first", "--device", "cpu", "--check")
    assert code == 0, err
    m = RAN_ON.search(out)
    assert m, out
    assert m.group(2) == "cpu" and m.group(4) == default_backend(torch.device("cpu"))
    assert m.group(5) == "build+first call"
    assert re.search(r"^# check vs reference: out max_abs=\S+ max_rel=\S+ ok \(tolerance rtol=0.0001 ",
                     out, re.M), out


def test_check_fails_with_exit_1_when_kernels_are_off(capsys, monkeypatch):
    from pigeon.module import CompiledLayer
    real = CompiledLayer.forward

    def off_by_a_bit(self, *args, **kwargs):   # the kernels' outputs, 1e-2 off; the reference's as they are
        out = real(self, *args, **kwargs)
        return out + 1e-2 if self.backend == "kernels" else out
    monkeypatch.setattr(CompiledLayer, "forward", off_by_a_bit)
    code, out, err = cli(capsys, "compile", SPECS / "two_layers.py:first", "--device", "cpu", "--check")
    assert code == 1
    assert re.search(r"^# check vs reference: out max_abs=1\.0\d*e-02 max_rel=\S+ FAIL", out, re.M), out
    assert err.splitlines()[-1].startswith("check failed:")


def test_bfloat16_on_cpu_says_what_runs(capsys):
    import torch

    from pigeon.cli import planned_backend
    code, out, err = cli(capsys, "compile", SPECS / "two_layers.py:first", "--device", "cpu",
                         "--dtype", "bfloat16", "--check")
    assert code == 0, err
    why = "--device cpu" if torch.cuda.is_available() else "no CUDA device"
    planned = planned_backend(torch.device("cpu"))     # what pigeon.runtime.program picks for a CPU
    assert err.startswith(f"[pigeon] {why}: bfloat16 kernel programs run on the CPU through "), err
    assert f"(executor {planned!r})" in err.splitlines()[0]
    m = RAN_ON.search(out)
    assert m and m.group(2) == "cpu" and m.group(4) in (planned, "torch"), out
    if m.group(4) != planned:   # the planned executor refused bf16 storage: the switch is said out loud
        assert f"the {planned} executor refused bfloat16" in err
        assert "running the plain-torch semantics of each kernel instance (executor 'torch') instead" in err
    assert "dtype=bfloat16" in out
    assert re.search(r"^# check vs reference: out .* ok \(tolerance rtol=0.02 ", out, re.M), out
