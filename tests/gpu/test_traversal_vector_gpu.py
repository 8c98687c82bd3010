"""The traversal kernels' 16-byte dot loads (pigeon/codegen/expr_c.py VEC_CHUNK) on the GPU: the
kernel programs of RGAT and HGT with head dims that are multiples of 8 equal each instance's torch
semantics, forward and backward, in float32 and bfloat16, with inputs aligned and 2 bytes off."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_traversal_vector_loads import AGG_CASES, CASES, check_against_semantics  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


@pytest.mark.parametrize("offset", [False, True], ids=["aligned", "offset"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", sorted(CASES))
def test_vector_loads_equal_semantics_on_the_gpu(model, dtype, offset):
    check_against_semantics(model, dtype, "synthetic:aifb", "cuda", offset, DEV, 1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", sorted(AGG_CASES))
def test_vector_aggregates_equal_semantics_on_the_gpu(model, dtype, monkeypatch):
    """PIGEON_AGG_VEC=1 (8 elements per thread in edge-chunk aggregates), inputs 2 bytes off."""
    monkeypatch.setenv("PIGEON_AGG_VEC", "1")
    monkeypatch.setenv("PIGEON_AGGREGATE_SCHEDULE", "edge_chunks")
    check_against_semantics(model, dtype, "synthetic:aifb", "cuda", True, DEV, 1e-4, vec_aggregates=True)
