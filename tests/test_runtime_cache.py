"""Disk kernel cache: hits, misses, corrupted entries, concurrent writers, failed builds (no GPU, no nvcc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pigeon.runtime.cache import CUBIN_NAME, META_NAME, SOURCE_NAME, CacheEntry, KernelCache, default_cache_root

REPO = Path(__file__).resolve().parents[1]
COMPILER = "fake-nvcc 1.0"
SRC = 'extern "C" __global__ void k(float* y) { y[threadIdx.x] = 1.0f; }\n'


class Builder:
    """A stand-in for compile_cuda that counts its calls."""

    def __init__(self, payload: bytes = b"\x7fELF fake cubin"):
        self.calls = 0
        self.payload = payload

    def __call__(self):
        self.calls += 1
        return {CUBIN_NAME: self.payload + bytes([self.calls])}, {"resources": {"k": {"registers": 8}}}


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".trash-"))]


def get_or_build(cache: KernelCache, builder, source: str = SRC, arch: str = "sm_90", flags=()) -> CacheEntry:
    return cache.get_or_build(source, arch, flags, builder, compiler=COMPILER, version="1.2.3")


def test_default_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PIGEON_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c"
    assert KernelCache().root == tmp_path / "c"
    monkeypatch.delenv("PIGEON_CACHE_DIR")
    assert default_cache_root() == Path("~/.cache/pigeon").expanduser()


def test_key_depends_on_every_input():
    k = KernelCache.key(SRC, "sm_90", ("-DX=1",), compiler=COMPILER, version="1")
    assert len(k) == 64 and k == KernelCache.key(SRC, "sm_90", ["-DX=1"], compiler=COMPILER, version="1")
    variants = [
        KernelCache.key(SRC + " ", "sm_90", ("-DX=1",), compiler=COMPILER, version="1"),
        KernelCache.key(SRC, "sm_80", ("-DX=1",), compiler=COMPILER, version="1"),
        KernelCache.key(SRC, "sm_90", ("-DX=2",), compiler=COMPILER, version="1"),
        KernelCache.key(SRC, "sm_90", ("-DX=1", "-G"), compiler=COMPILER, version="1"),
        KernelCache.key(SRC, "sm_90", ("-DX=1",), compiler=COMPILER + "x", version="1"),
        KernelCache.key(SRC, "sm_90", ("-DX=1",), compiler=COMPILER, version="2"),
    ]
    assert len({k, *variants}) == 1 + len(variants)
    with pytest.raises(TypeError):
        KernelCache.key(SRC, "sm_90", "-DX=1", compiler=COMPILER)  # a bare string is not a flag list


def test_miss_then_hit(tmp_path):
    cache = KernelCache(tmp_path)
    build = Builder()
    key = cache.key(SRC, "sm_90", (), compiler=COMPILER, version="1.2.3")
    assert cache.get(key) is None

    e1 = get_or_build(cache, build)
    assert build.calls == 1
    assert e1.path == tmp_path / key[:2] / key and e1.key == key
    assert e1.read_cubin() == b"\x7fELF fake cubin\x01"
    assert e1.read_source() == SRC
    assert e1.meta["arch"] == "sm_90" and e1.meta["compiler"] == COMPILER
    assert e1.resources == {"k": {"registers": 8}}
    assert {p.name for p in e1.path.iterdir()} == {CUBIN_NAME, SOURCE_NAME, META_NAME}

    e2 = get_or_build(cache, build)
    assert build.calls == 1, "a hit must not rebuild"
    assert e2 == e1 and e2.read_cubin() == e1.read_cubin()
    assert KernelCache(tmp_path).get(key) == e1  # another instance on the same root sees it

    get_or_build(cache, build, arch="sm_80")
    get_or_build(cache, build, flags=("-DN=2",))
    assert build.calls == 3
    assert len(cache.entries()) == 3
    assert not leftovers(tmp_path)


def _corrupt_truncate(entry: CacheEntry):
    data = entry.cubin_path.read_bytes()
    entry.cubin_path.write_bytes(data[: len(data) // 2])


def _corrupt_flip(entry: CacheEntry):
    data = bytearray(entry.cubin_path.read_bytes())
    data[0] ^= 0xFF
    entry.cubin_path.write_bytes(bytes(data))


def _corrupt_delete_meta(entry: CacheEntry):
    (entry.path / META_NAME).unlink()


def _corrupt_garbage_json(entry: CacheEntry):
    (entry.path / META_NAME).write_text("{ this is not json")


def _corrupt_json_list(entry: CacheEntry):
    (entry.path / META_NAME).write_text("[1, 2, 3]")


def _corrupt_delete_cubin(entry: CacheEntry):
    entry.cubin_path.unlink()


def _corrupt_delete_source(entry: CacheEntry):
    (entry.path / SOURCE_NAME).unlink()


def _corrupt_wrong_key(entry: CacheEntry):
    meta = json.loads((entry.path / META_NAME).read_text())
    meta["key"] = "0" * 64
    (entry.path / META_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "corrupt",
    [
        _corrupt_truncate,
        _corrupt_flip,
        _corrupt_delete_meta,
        _corrupt_garbage_json,
        _corrupt_json_list,
        _corrupt_delete_cubin,
        _corrupt_delete_source,
        _corrupt_wrong_key,
    ],
    ids=lambda f: f.__name__.removeprefix("_corrupt_"),
)
def test_corrupted_entry_is_removed_and_rebuilt(tmp_path, corrupt):
    cache = KernelCache(tmp_path)
    build = Builder()
    e1 = get_or_build(cache, build)
    corrupt(e1)

    assert cache.get(e1.key) is None, "a corrupted entry must not be returned"
    assert not e1.path.exists(), "a corrupted entry must be removed"

    e2 = get_or_build(cache, build)
    assert build.calls == 2
    assert e2.path == e1.path
    assert e2.read_cubin() == b"\x7fELF fake cubin\x02"
    assert cache.get(e1.key) == e2
    assert not leftovers(tmp_path)


def test_corrupted_entry_rebuilt_directly_by_get_or_build(tmp_path):
    cache = KernelCache(tmp_path)
    build = Builder()
    e1 = get_or_build(cache, build)
    _corrupt_truncate(e1)
    e2 = get_or_build(cache, build)  # no explicit get() first
    assert build.calls == 2 and e2.read_cubin().endswith(b"\x02")


def test_put_over_corrupted_entry(tmp_path):
    """A writer that finds a corrupted entry in its way removes it and installs its own."""
    cache = KernelCache(tmp_path)
    key = cache.key(SRC, "sm_90", (), compiler=COMPILER)
    e1 = cache.put(key, {CUBIN_NAME: b"one", SOURCE_NAME: b"src"}, {})
    _corrupt_garbage_json(e1)
    e2 = cache.put(key, {CUBIN_NAME: b"two", SOURCE_NAME: b"src"}, {})
    assert e2.read_cubin() == b"two" and cache.get(key) == e2
    assert not leftovers(tmp_path)


def test_put_loses_race_to_valid_entry(tmp_path):
    cache = KernelCache(tmp_path)
    key = cache.key(SRC, "sm_90", (), compiler=COMPILER)
    first = cache.put(key, {CUBIN_NAME: b"first"}, {"who": 1})
    second = cache.put(key, {CUBIN_NAME: b"second"}, {"who": 2})
    assert second == first and second.read_cubin() == b"first" and second.meta["who"] == 1
    assert len(cache.entries()) == 1
    assert not leftovers(tmp_path)


def test_put_rejects_bad_input(tmp_path):
    cache = KernelCache(tmp_path)
    key = "a" * 64
    with pytest.raises(ValueError):
        cache.put(key, {SOURCE_NAME: b"x"}, {})  # no cubin
    with pytest.raises(ValueError):
        cache.put(key, {CUBIN_NAME: b"x", "../evil": b"x"}, {})
    with pytest.raises(ValueError):
        cache.put(key, {CUBIN_NAME: b"x", META_NAME: b"{}"}, {})
    with pytest.raises(ValueError):
        cache.get("../../etc")
    assert cache.entries() == [] and not leftovers(tmp_path)


def test_failed_build_leaves_nothing(tmp_path):
    cache = KernelCache(tmp_path)

    def failing():
        raise RuntimeError("compiler exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        get_or_build(cache, failing)
    assert cache.entries() == []
    assert not leftovers(tmp_path)
    key = cache.key(SRC, "sm_90", (), compiler=COMPILER, version="1.2.3")
    assert cache.get(key) is None


def test_crash_while_writing_leaves_no_entry(tmp_path, monkeypatch):
    """A writer dying between writing files and renaming leaves at most a temp dir, never an entry."""
    import pigeon.runtime.cache as cache_mod

    cache = KernelCache(tmp_path)
    real_rename = os.rename

    def boom(src, dst):
        raise KeyboardInterrupt  # like a kill in the middle

    monkeypatch.setattr(cache_mod.os, "rename", boom)
    key = cache.key(SRC, "sm_90", (), compiler=COMPILER)
    with pytest.raises(KeyboardInterrupt):
        cache.put(key, {CUBIN_NAME: b"x"}, {})
    monkeypatch.setattr(cache_mod.os, "rename", real_rename)
    assert cache.get(key) is None and cache.entries() == []

    # a temp dir abandoned by a crashed process is cleaned by prune_temp once old enough
    stale = tmp_path / key[:2] / f".tmp-{key[:16]}-dead"
    stale.mkdir(parents=True)
    (stale / CUBIN_NAME).write_bytes(b"half")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert cache.get(key) is None
    assert cache.prune_temp(max_age_s=3600) == 1
    assert not leftovers(tmp_path)


def test_clear_only_removes_cache_files(tmp_path):
    cache = KernelCache(tmp_path)
    get_or_build(cache, Builder())
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "x.cu").write_text("x")
    (tmp_path / "unrelated.txt").write_text("keep me")
    cache.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated.txt"]
    assert cache.entries() == []
    KernelCache(tmp_path / "does-not-exist").clear()


_WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    from pathlib import Path
    from pigeon.runtime.cache import KernelCache, CUBIN_NAME

    root, go, who = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    cache = KernelCache(root)
    src = 'extern "C" __global__ void k(float* y) { y[0] = 2.0f; }'
    built = []

    def build():
        built.append(who)
        (go.parent / f"building-{who}").write_text("x")
        other = go.parent / ("building-B" if who == "A" else "building-A")
        t_end = time.time() + 20
        while not other.exists() and time.time() < t_end:  # both are inside build() at once
            time.sleep(0.005)
        return {CUBIN_NAME: b"cubin from " + who.encode()}, {"who": who}

    (go.parent / f"ready-{who}").write_text("ready")
    deadline = time.time() + 30
    while not go.exists():  # start line: both processes miss the cache together
        if time.time() > deadline:
            sys.exit("no start signal")
        time.sleep(0.005)
    e = cache.get_or_build(src, "sm_90", ("-DZ",), build, compiler="fake", version="0")
    print(json.dumps({"who": who, "path": str(e.path), "built": bool(built),
                      "cubin": e.read_cubin().decode(), "meta_who": e.meta["who"],
                      "valid": cache.get(e.key) is not None}))
    """
)


def test_concurrent_builds_from_two_processes(tmp_path):
    root = tmp_path / "cache"
    go = tmp_path / "go"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(root), str(go), who],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(REPO),
        )
        for who in ("A", "B")
    ]
    deadline = time.time() + 60
    while not all((tmp_path / f"ready-{who}").exists() for who in ("A", "B")):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "workers did not start"
        time.sleep(0.01)
    go.write_text("go")  # both are waiting at the start line: release them together
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))

    assert all(r["valid"] for r in results)
    assert results[0]["path"] == results[1]["path"]
    # both report the one entry that won, whatever each built itself
    assert results[0]["cubin"] == results[1]["cubin"]
    assert results[0]["meta_who"] == results[1]["meta_who"]
    assert results[0]["cubin"] == f"cubin from {results[0]['meta_who']}"
    # both were inside build() at once, so both built and one of them lost the rename race
    assert all(r["built"] for r in results)

    cache = KernelCache(root)
    assert len(cache.entries()) == 1
    shard = Path(results[0]["path"]).parent
    assert [p.name for p in shard.iterdir()] == [Path(results[0]["path"]).name], "no temp dirs may be left"
    assert not leftovers(root)


def test_cache_version_comes_from_the_source_tree_not_the_installed_metadata(monkeypatch):
    """A bare checkout on PYTHONPATH (the GPU machine) and a pip-installed one must compute the same
    keys: the version is pigeon/_version.py's, whatever importlib.metadata says."""
    import importlib.metadata

    import pigeon
    from pigeon.runtime.cache import KernelCache, pigeon_version

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    before = KernelCache.key("src", "sm_90", (), compiler="nvcc x")
    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert pigeon_version() == pigeon.__version__
    assert KernelCache.key("src", "sm_90", (), compiler="nvcc x") == before
