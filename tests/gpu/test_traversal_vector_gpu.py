"""The traversal kernels' 16-byte dot loads (pigeon/codegen/expr_c.py VEC_CHUNK) on the GPU: the
kernel programs of RGAT and HGT with head dims that are multiples of 8 equal each instance's torch
semantics, forward and backward, in float32 and bfloat16, with inputs aligned and 2 bytes off."""
import sys
from pathlib import Path

import pytest
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.runtime.program import TORCH_DTYPES

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_traversal_vector_loads import CASES, IN, _programs_run, _traversals  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


@pytest.mark.parametrize("offset", [False, True], ids=["aligned", "offset"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", sorted(CASES))
def test_vector_loads_equal_semantics_on_the_gpu(model, dtype, offset):
    spec, hp = CASES[model]
    g = load("synthetic:aifb")
    layer = pg.compile(spec, g, IN, dtype=dtype, **hp)
    assert any(rk.meta["aligned16"] for _, rk in _traversals(layer))
    layer = layer.to(DEV)
    dt = TORCH_DTYPES[dtype]
    torch.manual_seed(5)
    x = torch.randn(g.num_nodes, IN, device=DEV).to(dt)
    params = {k: (torch.randn_like(v) * 0.5).to(dt) for k, v in layer.weights.items()}
    with torch.no_grad():
        width = layer(x).shape[1]
    up = torch.randn(g.num_nodes, width, device=DEV).to(dt)
    want_f, want_b = _programs_run(layer, "torch", x, up, params, False)
    got_f, got_b = _programs_run(layer, "cuda", x, up, params, offset)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    for name, want in list(want_f.items()) + list(want_b.items()):
        got = got_f.get(name, got_b.get(name))
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{model} {dtype} {name}: {m}")
