"""`pigeon compile` and `pigeon inspect` as a user runs them: a subprocess, exit codes, output."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = Path(__file__).resolve().parent / "specs"


def pigeon(*args):
    return subprocess.run([sys.executable, "-m", "pigeon.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("spec", ["pigeon/models/rgcn.py", "pigeon/models/rgat.py", "pigeon/models/hgt.py",
                                  "examples/gated_rgat.py", "rgat"])
def test_compile_each_model_prints_ir(spec):
    r = pigeon("compile", spec)
    assert r.returncode == 0, r.stderr
    assert "# IR after passes" in r.stdout and "return out=" in r.stdout
    assert "finite=True" in r.stdout


def test_compile_dump_shows_source_lines():
    r = pigeon("compile", "rgcn", "--dump", "--set", "out_dim=4", "--set", "aggr=sum")
    assert r.returncode == 0, r.stderr
    assert "rgcn.py:9" in r.stdout and "# traced IR" in r.stdout and "shape=[40, 4]" in r.stdout


def test_broken_spec_reports_file_and_line():
    r = pigeon("compile", str(SPECS / "broken_shape.py"))
    assert r.returncode != 0
    assert f"{SPECS / 'broken_shape.py'}:7" in r.stderr and "maps 17 -> 8" in r.stderr


def test_error_in_user_code_reports_file_and_line():
    r = pigeon("compile", str(SPECS / "broken_user_code.py"))
    assert r.returncode != 0
    assert f"{SPECS / 'broken_user_code.py'}:7" in r.stderr and "AttributeError" in r.stderr


def test_ambiguous_and_missing_specs():
    r = pigeon("compile", str(SPECS / "two_layers.py"))
    assert r.returncode == 2 and "defines 2 layers" in r.stderr
    assert pigeon("compile", str(SPECS / "two_layers.py") + ":second").returncode == 0
    r = pigeon("compile", "no_such_model")
    assert r.returncode == 2 and "no spec" in r.stderr


def test_inspect_prints_statistics():
    r = pigeon("inspect")
    assert r.returncode == 0, r.stderr
    assert "edges" in r.stdout and "relations" in r.stdout


def test_bad_graph_name_is_a_clear_error():
    r = pigeon("compile", "rgcn", "--graph", "no_such_graph")
    assert r.returncode == 2 and "error:" in r.stderr


# ---------------------------------------------------------------- the test session's own kernel cache

def test_session_does_not_write_the_users_cache():
    from pigeon.codegen.cuda_emulate import cache_root as emulate_root
    from pigeon.runtime.cache import KernelCache, default_cache_root
    home = Path("~/.cache/pigeon").expanduser()
    for root in (default_cache_root(), KernelCache().root, emulate_root()):
        assert root != home and home not in root.parents, root
    # subprocesses (the CLI tests) inherit it
    r = subprocess.run([sys.executable, "-c", "from pigeon.runtime.cache import default_cache_root as d; print(d())"],
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
