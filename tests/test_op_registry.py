"""The op registry (pigeon/ir/registry.py, records in pigeon/opset.py): every op kind has one
record, and the IR, autodiff, the reference interpreter, the lowering and the printer all read
their behaviour from it (a record swapped in a test changes what each of them does)."""
import dataclasses

import pytest
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.ir import OpKind, format_ir
from pigeon.ir.registry import OP_DEFS, op_def, register_op
from pigeon.passes.autodiff import AutodiffError, autodiff
from pigeon.passes.lower import LoweringError, lower
from pigeon.reference import run


@pg.layer
def small(g, x):
    return pg.aggregate(g, pg.relu(g.src(x)), "sum")


def test_every_kind_has_one_record():
    assert set(OP_DEFS) == set(OpKind)
    for kind, d in OP_DEFS.items():
        assert d.kind is kind and d.type_rule is not None and d.doc
        assert d.lower in (None, "leaf", "fused", "gemm", "aggregate", "edge_softmax", "type_reduce", "host_index")
        if kind not in (OpKind.INPUT, OpKind.PARAM):
            assert d.reference is not None, kind


@pytest.fixture
def swap():
    saved = dict(OP_DEFS)

    def put(kind, **changes):
        register_op(dataclasses.replace(op_def(kind), **changes), replace=True)
    yield put
    OP_DEFS.clear()
    OP_DEFS.update(saved)


def test_consumers_read_the_record(swap):
    g = load("tiny")
    x = torch.randn(g.num_nodes, 4)
    ir = small.trace(4)
    base = run(ir, g, {"x": x}, {})["out"]
    # reference semantics come from the record
    swap(OpKind.UNARY, reference=lambda op, args, types, graph, dtype: args[0] * 0 + 1.0)
    ones = run(ir, g, {"x": x}, {})["out"]
    assert not torch.equal(base, ones)
    torch.testing.assert_close(ones, run(ir, g, {"x": torch.zeros_like(x)}, {})["out"])
    # gradient rules come from the record
    swap(OpKind.UNARY, grad=None)
    with pytest.raises(AutodiffError, match="no gradient rule for unary"):
        autodiff(ir)
    # lowering rules come from the record
    swap(OpKind.AGGREGATE, lower=None)
    with pytest.raises(LoweringError, match="aggregate is not lowered"):
        lower(ir)
    # printing comes from the record
    swap(OpKind.UNARY, fmt=lambda op, args: f"{op.attr('fn')}!({', '.join(args)})")
    assert "relu!(%" in format_ir(ir)
    # type rules come from the record
    from pigeon.dsl.trace import SpecError
    swap(OpKind.UNARY, type_rule=lambda kind, attrs, ins: (_ for _ in ()).throw(
        __import__("pigeon.ir.ops", fromlist=["SignatureError"]).SignatureError("unary refused by the test")))
    with pytest.raises(SpecError, match="unary refused by the test"):
        small.trace(4)
