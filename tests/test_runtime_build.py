"""Building kernels with nvcc/NVRTC: ptxas report parsing, real compiles, failures, caching (no GPU)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pigeon.runtime import build as B
from pigeon.runtime import toolchain as T
from pigeon.runtime.build import (
    CompilerNotFoundError,
    KernelBuildError,
    build_kernel,
    compile_cuda,
    nvcc_available,
    nvrtc_available,
    parse_ptxas_report,
)
from pigeon.runtime.cache import KernelCache

needs_nvcc = pytest.mark.skipif(not nvcc_available(), reason="nvcc not found (PIGEON_NVCC, PATH, CUDA_HOME)")
needs_nvrtc = pytest.mark.skipif(not nvrtc_available(), reason="cuda.bindings.nvrtc not importable/loadable")

KERNELS = r"""
extern "C" __global__ void saxpy(float a, const float* __restrict__ x, float* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}

extern "C" __global__ void reverse_smem(float* y, int k) {
    __shared__ float s[1024];
    float local[64];
    for (int i = 0; i < 64; ++i) local[i] = y[(i * k + threadIdx.x) % 1024];
    s[threadIdx.x] = local[(threadIdx.x * k) % 64];
    __syncthreads();
    y[threadIdx.x] = s[1023 - threadIdx.x];
}

template <int N> __global__ void scale(float* y) { y[threadIdx.x] *= N; }
template __global__ void scale<3>(float*);
"""

PTXAS_SM80 = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z5scaleILi3EEvPf' for 'sm_80'
ptxas info    : Function properties for _Z5scaleILi3EEvPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 360 bytes cmem[0]
ptxas info    : Compile time = 2.926 ms
ptxas info    : Function properties for helper
    24 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'big' for 'sm_80'
ptxas info    : Function properties for big
    256 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 256 bytes cumulative stack size, 4096 bytes smem, 360 bytes cmem[0], 8 bytes cmem[2]
ptxas info    : Compile time = 13.263 ms
"""

PTXAS_OLD = """\
ptxas info    : Compiling entry function 'k' for 'sm_70'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, 49152 bytes smem, 352 bytes cmem[0]
"""


# ---------------------------------------------------------------------------- parsing (no compiler)


def test_parse_ptxas_report_sm80_format():
    r = parse_ptxas_report(PTXAS_SM80)
    assert r["_Z5scaleILi3EEvPf"] == {
        "entry": True, "arch": "sm_80", "stack": 0, "spill_stores": 0, "spill_loads": 0,
        "registers": 8, "barriers": 0, "smem": 0, "cmem": {"cmem[0]": 360},
    }
    big = r["big"]
    assert (big["registers"], big["smem"], big["barriers"]) == (255, 4096, 1)
    assert (big["stack"], big["spill_stores"], big["spill_loads"]) == (256, 16, 12)
    assert big["cumulative_stack"] == 256 and big["cmem"] == {"cmem[0]": 360, "cmem[2]": 8}
    helper = r["helper"]  # a non-inlined device function: stack and spills only
    assert helper["entry"] is False and (helper["stack"], helper["spill_stores"], helper["spill_loads"]) == (24, 8, 4)
    assert "registers" not in helper


def test_parse_ptxas_report_without_barriers_field():
    r = parse_ptxas_report(PTXAS_OLD)
    assert r["k"]["registers"] == 12 and r["k"]["smem"] == 49152 and r["k"]["barriers"] == 0


def test_parse_empty_report():
    assert parse_ptxas_report("") == {}
    assert parse_ptxas_report("nvcc warning : something unrelated\n") == {}


# ---------------------------------------------------------------------------- argument checks


def test_bad_arguments_rejected():
    with pytest.raises(ValueError, match="arch"):
        compile_cuda(KERNELS, arch="90")
    with pytest.raises(ValueError, match="arch"):
        compile_cuda(KERNELS, arch="compute_90")
    with pytest.raises(TypeError, match="flags"):
        compile_cuda(KERNELS, flags="-DX=1")
    with pytest.raises(ValueError, match="identifier"):
        compile_cuda(KERNELS, name="../x")
    with pytest.raises(ValueError, match="builder"):
        compile_cuda(KERNELS, builder="clang")


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PIGEON_NVCC", str(tmp_path / "no-such-nvcc"))
    with pytest.raises(CompilerNotFoundError, match="nvcc"):
        compile_cuda(KERNELS, builder="nvcc")
    monkeypatch.setattr(T, "nvrtc_available", lambda: False)
    with pytest.raises(CompilerNotFoundError, match="nvcc.*nvrtc|nvrtc.*nvcc"):
        compile_cuda(KERNELS)


def _fake_nvcc(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-nvcc"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_failed_build_with_fake_nvcc_keeps_source_and_leaves_no_entry(monkeypatch, tmp_path):
    """Runs everywhere: an nvcc that prints 100 error lines and fails."""
    fake = _fake_nvcc(
        tmp_path,
        'if [ "$1" = "--version" ]; then echo "fake nvcc 0.1"; exit 0; fi\n'
        'i=0; while [ $i -lt 100 ]; do echo "kernel.cu($i): error: bad thing $i" >&2; i=$((i+1)); done\n'
        "exit 2\n",
    )
    monkeypatch.setenv("PIGEON_NVCC", str(fake))
    T._nvcc_version_of.cache_clear()
    cache = KernelCache(tmp_path / "cache")
    source = "this is not CUDA\n"
    with pytest.raises(KernelBuildError) as ei:
        build_kernel(source, "sm_90", ("-DA=1",), cache, builder="nvcc")
    err = ei.value
    msg = str(err)
    assert str(fake) in msg and "-arch=sm_90" in msg and "-DA=1" in msg and "exit 2" in msg
    assert err.source_path is not None and str(err.source_path) in msg
    assert err.source_path.parent == cache.failed_dir
    assert err.source_path.read_text() == source
    assert err.source_path.with_suffix(".log").read_text().count("error: bad thing") == 100
    assert "bad thing 0" in msg and "bad thing 39" in msg and "bad thing 40" not in msg
    assert "first 40 of 100 lines" in msg
    assert err.returncode == 2
    assert cache.entries() == []
    assert not [p for p in cache.root.rglob(".tmp-*")]


# ---------------------------------------------------------------------------- real nvcc


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compile_real_kernels(arch, tmp_path):
    res = compile_cuda(KERNELS, arch=arch, failed_dir=tmp_path / "failed")
    assert res.cubin[:4] == b"\x7fELF"
    assert res.builder == "nvcc" and res.arch == arch
    assert res.compiler.startswith("nvcc: NVIDIA")
    assert f"-arch={arch}" in res.command and "-lineinfo" in res.command and "-O3" in res.command
    r = res.resources
    assert set(r) >= {"saxpy", "reverse_smem", "_Z5scaleILi3EEvPf"}
    for name in ("saxpy", "reverse_smem", "_Z5scaleILi3EEvPf"):
        assert r[name]["entry"] and r[name]["arch"] == arch
        assert 0 < r[name]["registers"] <= 255
        assert r[name]["spill_stores"] == 0 and r[name]["spill_loads"] == 0
    assert r["saxpy"]["smem"] == 0 and r["saxpy"]["stack"] == 0
    assert r["reverse_smem"]["smem"] == 4096 and r["reverse_smem"]["barriers"] == 1
    assert r["reverse_smem"]["stack"] == 256  # the dynamically indexed local array lives on the stack
    assert "ptxas" in res.report and "Used" in res.report
    meta = res.meta()
    assert meta["resources"] == r and meta["ptxas_report"] == res.report
    assert not (tmp_path / "failed").exists()


@needs_nvcc
def test_flags_reach_nvcc_and_keep_dir(tmp_path):
    src = '#ifndef WIDTH\n#error WIDTH not set\n#endif\nextern "C" __global__ void k(float* y) { y[threadIdx.x] = WIDTH; }\n'
    with pytest.raises(KernelBuildError, match="WIDTH not set"):
        compile_cuda(src, arch="sm_80", failed_dir=tmp_path / "failed")
    res = compile_cuda(src, arch="sm_80", flags=("-DWIDTH=4",), name="widthk", keep_dir=tmp_path / "keep")
    assert "-DWIDTH=4" in res.command and "k" in res.resources
    assert (tmp_path / "keep" / "widthk.cu").read_text() == src
    assert (tmp_path / "keep" / "widthk.cubin").read_bytes() == res.cubin


@needs_nvcc
def test_real_compile_error(tmp_path):
    cache = KernelCache(tmp_path / "cache")
    src = 'extern "C" __global__ void k(float* y) { y[0] = undefined_thing; }\n'
    with pytest.raises(KernelBuildError) as ei:
        build_kernel(src, "sm_90", (), cache)
    msg = str(ei.value)
    assert "undefined_thing" in msg and "nvcc" in msg and "-arch=sm_90" in msg
    assert str(ei.value.source_path) in msg and ei.value.source_path.read_text() == src
    assert cache.entries() == []


@needs_nvcc
def test_build_kernel_uses_cache(tmp_path, monkeypatch):
    calls = []
    real = B.compile_cuda

    def counting(*a, **k):
        calls.append(k.get("arch"))
        return real(*a, **k)

    monkeypatch.setattr(B, "compile_cuda", counting)
    cache = KernelCache(tmp_path)
    e1 = build_kernel(KERNELS, "sm_90", (), cache)
    e2 = build_kernel(KERNELS, "sm_90", (), cache)
    assert calls == ["sm_90"] and e1 == e2
    assert e1.read_cubin()[:4] == b"\x7fELF" and e1.read_source() == KERNELS
    assert e1.meta["compiler"] == B.nvcc_version() and e1.meta["builder"] == "nvcc"
    assert e1.resources["reverse_smem"]["smem"] == 4096
    assert "ptxas" in e1.meta["ptxas_report"]
    # a different arch or flags is a different entry
    build_kernel(KERNELS, "sm_80", (), cache)
    build_kernel(KERNELS, "sm_90", ("-DUNUSED=1",), cache)
    assert calls == ["sm_90", "sm_80", "sm_90"]
    assert len(cache.entries()) == 3
    # the cache root comes from PIGEON_CACHE_DIR when none is given
    monkeypatch.setenv("PIGEON_CACHE_DIR", str(tmp_path))
    assert build_kernel(KERNELS, "sm_90") == e1 and len(calls) == 3


@needs_nvrtc
def test_compile_with_nvrtc(tmp_path):
    res = compile_cuda(KERNELS, arch="sm_90", builder="nvrtc", failed_dir=tmp_path / "failed")
    assert res.cubin[:4] == b"\x7fELF" and res.builder == "nvrtc"
    assert res.compiler.startswith("nvrtc ")
    if res.resources:  # ptxas -v through NVRTC's log, where the NVRTC version passes it on
        assert res.resources["reverse_smem"]["smem"] == 4096
    with pytest.raises(KernelBuildError) as ei:
        compile_cuda("not cuda", arch="sm_90", builder="nvrtc", failed_dir=tmp_path / "failed")
    assert ei.value.source_path.read_text() == "not cuda"


def test_device_arch_without_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert B.device_arch() is None
    with pytest.raises(ValueError, match="arch"):
        build_kernel(KERNELS, None, (), KernelCache(os.devnull + "-unused"))


# ---------------------------------------------------------------------------- launch helpers (no GPU)


def test_launch_module_imports_without_gpu_and_packs_scalars(monkeypatch):
    torch = pytest.importorskip("torch")
    from pigeon.runtime import launch as L

    assert L.C_TYPES["ptr"][0] is L.C_TYPES["uint64"][0]
    assert L._canon_types(("int", "f32", "bf16", None)) == ("int32", "float32", "bfloat16", None)
    with pytest.raises(TypeError, match="unknown C type"):
        L._canon_types(("int7",))
    assert L._dims(7, "grid") == (7, 1, 1) and L._dims((2, 3), "grid") == (2, 3, 1)
    for bad in (0, (1, 2, 3, 4), (2, 0), (-1, 1, 1)):
        with pytest.raises(ValueError, match="grid"):
            L._dims(bad, "grid")
    values = [0.0, -0.0, 1.0, -1.5, 3.14159, 1e-8, 65504.0, 1e30, float("inf"), -float("inf"), 0.333]
    for v in values:
        want16 = torch.tensor([v], dtype=torch.float32).to(torch.float16).view(torch.int16).item() & 0xFFFF
        wantbf = torch.tensor([v], dtype=torch.float32).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF
        if abs(v) < 65520:  # struct's 'e' refuses values that overflow half
            assert L._f16_bits(v) == want16, v
        assert L._bf16_bits(v) == wantbf, v
    nan_bits = L._bf16_bits(float("nan"))
    assert (nan_bits & 0x7F80) == 0x7F80 and (nan_bits & 0x7F)
    monkeypatch.delenv("PIGEON_SYNC_LAUNCH", raising=False)
    assert not L.sync_launch_enabled()
    for on, expect in (("1", True), ("0", False), ("off", False), ("yes", True)):
        monkeypatch.setenv("PIGEON_SYNC_LAUNCH", on)
        assert L.sync_launch_enabled() is expect


@needs_nvcc
def test_build_kernels_builds_in_parallel_and_reports_each_failure_in_one_line(tmp_path, monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setenv("PIGEON_CACHE_DIR", str(tmp_path))
    ok = SimpleNamespace(name="pg_ok", meta={}, source='extern "C" __global__ void pg_ok(float* x) { x[0] = 1.0f; }')
    bad = SimpleNamespace(name="pg_bad", meta={"arch": "sm_90"},
                          source='extern "C" __global__ void pg_bad(float* x) { x[0] = undefined_name; }')
    fails = B.build_kernels([ok, bad], arch="sm_90", jobs=2)
    assert len(fails) == 1 and fails[0].startswith("pg_bad: KernelBuildError") and "\n" not in fails[0].split(":")[0]
    assert B.build_kernels([ok], arch="sm_90") == [] and B.build_kernels([], arch="sm_90") == []
