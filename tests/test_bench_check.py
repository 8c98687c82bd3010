"""The bench's correctness check: float32 tolerance first, then the float64 arbiter for float32 cases
(pigeon no farther from float64 than ARBITER_FACTOR times the float32 reference)."""
import torch

import pigeon as pg
from pigeon.bench import check as C
from pigeon.models import MODELS


def test_arbiter_accepts_rounding_like_the_references_and_refuses_worse():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(1000, generator=g, dtype=torch.float64)
    ref32 = truth + 1e-5 * torch.randn(1000, generator=g, dtype=torch.float64)
    ok, numbers = C.arbitrate(truth + 1.5e-5 * torch.randn(1000, generator=g, dtype=torch.float64), ref32, truth)
    assert ok and "float32 reference" in numbers
    bad, _ = C.arbitrate(truth + 1e-3 * torch.randn(1000, generator=g, dtype=torch.float64), ref32, truth)
    assert not bad
    nan = truth.clone()
    nan[3] = float("nan")
    assert not C.arbitrate(nan, ref32, truth)[0]


def test_check_passes_and_catches_a_wrong_weight():
    from pigeon.graph.synthetic import tiny_graph
    graph = tiny_graph()
    layer = pg.compile(MODELS["rgcn"], graph, 8, backend="kernels", **C.hparams("rgcn", 8))
    x = torch.randn(graph.num_nodes, 8)
    assert C.check(layer, "rgcn", graph, 8, x, "training", "float32") == "ok"
    orig = C._reference

    def wrong(*a, **k):                          # a reference whose weights differ: must fail, arbiter or not
        ref = orig(*a, **k)
        with torch.no_grad():
            next(iter(ref.weights.parameters())).mul_(1.01)
        return ref
    C._reference = wrong
    try:
        out = C.check(layer, "rgcn", graph, 8, x, "inference", "float32")
    finally:
        C._reference = orig
    assert out.startswith("FAILED") and "float64" in out


def test_bf16_misses_go_to_the_arbiter_with_a_bf16_baseline(monkeypatch):
    """A 16-bit case that misses the tolerance is judged against the reference interpreter in the
    same dtype (float64 truth): bf16 rounding like the reference's passes, a wrong weight does not."""
    from pigeon.graph.synthetic import tiny_graph
    graph = tiny_graph()
    layer = pg.compile(MODELS["rgcn"], graph, 8, backend="kernels", dtype="bfloat16", **C.hparams("rgcn", 8))
    x = torch.randn(graph.num_nodes, 8).to(torch.bfloat16)
    assert C.check(layer, "rgcn", graph, 8, x, "training", "bfloat16") == "ok"
    monkeypatch.setitem(C.TOLERANCE, "bfloat16", (0.0, 0.0))          # every difference is a miss
    out = C.check(layer, "rgcn", graph, 8, x, "training", "bfloat16")
    assert out.startswith("ok (float64 arbiter") and "bfloat16 reference" in out
    orig = C._reference

    def wrong(*a, **k):           # every reference (float64 included) with a weight 30% off: pigeon is wrong
        ref = orig(*a, **k)
        with torch.no_grad():
            next(iter(ref.weights.parameters())).mul_(1.3)
        return ref
    monkeypatch.setattr(C, "_reference", wrong)
    monkeypatch.setitem(C.TOLERANCE, "bfloat16", (4e-2, 4e-2))
    out = C.check(layer, "rgcn", graph, 8, x, "inference", "bfloat16")
    assert out.startswith("FAILED") and "bfloat16 reference" in out
