"""Real dtypes: every built-in model traces in every float dtype (weights and graph data take the
trace's dtype), the reference runs it in that dtype close to float64, and the lowering gives each
buffer its IR value's dtype; integer, bool and fp8 types exist in the IR."""
import pytest
import torch

import pigeon as pg
from pigeon.graph import load
from pigeon.ir import OpKind
from pigeon.ir import expr as ex
from pigeon.ir.traversal import Buffer, RowRef
from pigeon.ir.types import DTYPES, ValueType, Domain
from pigeon.models import MODELS
from pigeon.passes.autodiff import autodiff
from pigeon.passes.lower import lower
from pigeon.reference import run

TOL = {"bfloat16": 3e-2, "float16": 5e-3, "float32": 1e-5}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_traces_and_runs_in_every_float_dtype(model, dtype):
    spec = MODELS[model]
    ir = spec.trace(8, dtype=dtype)
    assert {op.type.dtype for op in ir.ops()} == {dtype}, "inputs, weights, graph data and results"
    g = load("tiny")
    layer = pg.compile(spec, g, 8, backend="reference", dtype="float64")
    x = torch.randn(g.num_nodes, 8, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.weights.items()}
    want = run(spec.trace(8, dtype="float64"), g, {"x": x}, params)["out"]
    tdt = getattr(torch, dtype)
    got = run(ir, g, {"x": x.to(tdt)}, {k: v.to(tdt) for k, v in params.items()})["out"]
    assert got.dtype == tdt
    if dtype != "float64":
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < TOL[dtype], err
    # every buffer of the kernel programs has its IR value's dtype (no program-wide stamp), except
    # graph constants (float32 in every layer) and, in a 16-bit layer, sum aggregations and dense
    # GEMM rows only elementwise ops read (float32; tests/test_bf16_graph_data.py says why)
    res = autodiff(ir)
    for prog in (lower(res.forward), lower(res.backward)):
        gdata = {b for _, b in prog.graph_data}
        sums = {la.inst.out.name for la in prog.launches if getattr(la, "family", "") == "traversal"
                and la.inst.loop == "aggregate" and la.inst.out.dtype != dtype}
        sums |= {la.y for la in prog.launches if getattr(la, "family", "") == "gemm" and la.inst.y_dtype is not None}
        assert all(prog.buffer(b).dtype == "float32" for b in sums) and (not sums or dtype in ("bfloat16", "float16"))
        assert {b.dtype for b in prog.buffers if b.name not in gdata | sums} == {dtype}, prog.describe()
        want_g = "float64" if dtype == "float64" else "float32"
        assert {prog.buffer(b).dtype for b in gdata} <= {want_g}, prog.describe()


def test_mixed_dtypes_per_buffer():
    """A bfloat16 program with a float32 input keeps the float32 buffer where the IR says so."""
    x = ex.load(Buffer("x", "node", (4,), "bfloat16"), RowRef.SELF)
    d = ex.load(Buffer("deg", "node", (), "float32"), RowRef.SELF)
    e = ex.binary("mul", x, d)
    assert e.dtype == "float32" and {b.dtype for b in e.buffers()} == {"bfloat16", "float32"}


def test_integer_bool_and_fp8_types_exist():
    for dt in ("int8", "int32", "int64", "bool", "float8_e4m3fn", "float8_e5m2"):
        assert dt in DTYPES
        ValueType(Domain.NODE, (4,), dt)
    codes = ex.load(Buffer("codes", "node", (4,), "int32"), RowRef.SELF)
    ham = ex.unary("popcount", ex.binary("bit_xor", codes, ex.const(5)))
    assert ham.dtype == "int32"
    assert ex.binary("lt", ham, ex.const(3)).dtype == "bool"
    with pytest.raises(ValueError, match="operand dtype"):
        ex.binary("shl", ex.load(Buffer("f", "node", (4,)), RowRef.SELF), ex.const(1))


def test_unknown_trace_dtype_is_a_spec_error():
    from pigeon.dsl.trace import SpecError
    with pytest.raises(SpecError, match="dtype must be one of"):
        MODELS["rgcn"].trace(8, dtype="int7")
    assert OpKind.GRAPH_DATA in {op.kind for op in MODELS["rgcn"].trace(8, dtype="bfloat16").ops()}
