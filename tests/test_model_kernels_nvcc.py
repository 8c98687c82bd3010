"""Every CUDA kernel that the lowering produces for the five test models, forward and backward,
fp32 and bf16, compiles with nvcc for sm_90 (sm_80 under -m slow); the ptxas resource report of each is kept
(written next to the test's temporary directory and printed) and spills are listed."""
import json
import shutil

import pytest

import pigeon as pg
from pigeon.codegen.bundle import bundle_sources
from pigeon.graph import tiny_graph
from pigeon.runtime.artifact import kernels_of

from test_models_reference import IN, MODELS

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


@pytest.fixture(scope="module")
def model_kernels():
    ks = {}
    for dtype in ("float32", "bfloat16"):
        for spec, hp, _ in MODELS.values():
            ks.update(kernels_of(pg.compile(spec, tiny_graph(), IN, backend="kernels", dtype=dtype, **hp)))
    return ks


@pytest.mark.parametrize("arch", [pytest.param("sm_80", marks=pytest.mark.slow), "sm_90"])   # sm_80: -m slow
def test_every_model_kernel_compiles(model_kernels, arch, tmp_path):
    from pigeon.runtime.build import compile_cuda
    res = compile_cuda(bundle_sources(model_kernels.values()), arch=arch, name=f"models_{arch}")
    report = {name: res.resources.get(name) for name in model_kernels}
    missing = [n for n, r in report.items() if r is None]
    assert not missing, f"no ptxas entry for {missing[:5]}"
    (tmp_path / f"ptxas_{arch}.json").write_text(json.dumps(report, indent=1))
    spills = {n: (r["spill_stores"], r["spill_loads"]) for n, r in report.items()
              if r.get("spill_stores") or r.get("spill_loads")}
    regs = sorted(r["registers"] for r in report.values())
    print(f"{arch}: {len(report)} kernels, registers {regs[0]}..{regs[-1]}, spills: {spills or 'none'}")
    assert not spills, f"kernels spill on {arch}: {spills}"
