"""CUTLASS/CuTe headers: found from the wheel or $PIGEON_CUTLASS_INCLUDE, added to a build only when
the source includes them, and a CuTe MMA atom compiles for sm_90 (nvcc on the CPU machine)."""
import pytest

from pigeon.codegen import cutlass_headers as ch
from pigeon.runtime.toolchain import nvcc_available

CUTE_SOURCE = """#include <cute/arch/mma_sm80.hpp>
extern "C" __global__ void k(float* d, const unsigned* a, const unsigned* b) {
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b[0], b[1],
                                              c[0], c[1], c[2], c[3]);
}
"""


def test_needs_cutlass_only_for_sources_that_include_it():
    assert ch.needs_cutlass(CUTE_SOURCE)
    assert ch.needs_cutlass('#include "cutlass/gemm/device/gemm.h"\n')
    assert not ch.needs_cutlass("#include <cuda_bf16.h>\n// cute/ in a comment\n")
    assert ch.build_flags("#include <cuda_bf16.h>\n") == ()


def test_include_dir_and_version_from_the_wheel():
    d = ch.include_dir()
    assert ch.build_flags(CUTE_SOURCE)[:2] == ("-I", d)
    assert ch.version().count(".") == 2 and ch.version() != "unknown"
    assert ch.version() in ch.source_tag()


def test_bad_override_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIGEON_CUTLASS_INCLUDE", str(tmp_path))
    with pytest.raises(ch.CutlassNotFoundError, match="has no cute/ directory"):
        ch.include_dir()


@pytest.mark.skipif(not nvcc_available(), reason="needs nvcc")
def test_cute_atom_compiles_for_sm90():
    from pigeon.runtime.build import compile_cuda
    res = compile_cuda(CUTE_SOURCE, arch="sm_90", name="k")
    assert res.cubin and "--expt-relaxed-constexpr" in res.command
