"""The DSL: tracing, and errors that point at the spec's own line."""
import pytest

import pigeon as pg
from pigeon.ir import Domain, OpKind


def test_error_names_spec_file_and_line():
    @pg.layer
    def bad(g, x):
        W = pg.weight("W", (3, 4), per=g.etype)
        return pg.aggregate(g, pg.typed_linear(g.src(x), W), "sum")   # the offending line

    with pytest.raises(pg.SpecError) as info:
        bad.trace(8)
    assert info.value.loc.file == __file__
    import inspect
    lines, start = inspect.getsourcelines(bad.fn)
    assert info.value.loc.line == start + 3
    assert "maps 3 -> 4" in str(info.value)


@pytest.mark.parametrize("body,match", [
    (lambda g, x: pg.aggregate(g, x, "sum"), "edge-wise"),
    (lambda g, x: pg.edge_softmax(g, x), "edge-wise"),
    (lambda g, x: pg.aggregate(g, g.src(x), "median"), "reduce must be"),
    (lambda g, x: g.src(x) + x, "different domains"),
    (lambda g, x: pg.weight("W", (4,), per=g.etype)[g.ntype], "per etype, indexed by g.ntype"),
    (lambda g, x: x.heads(3), "not divisible"),
    (lambda g, x: pg.weight("w", (0,)), "positive ints"),
    (lambda g, x: pg.weight("w", (2,), init="xavier"), "init must be"),
    (lambda g, x: g.src(g.src(x)), "node-wise"),
    (lambda g, x: (pg.weight("w", (2,)), pg.weight("w", (3,)))[0], "declared twice"),
    (lambda g, x: 1 if x else 0, "no truth value"),
    (lambda g, x: x * "a", "cannot combine"),
    (lambda g, x: x[0], "indexed by g.etype"),
])
def test_spec_errors(body, match):
    spec = pg.layer(lambda g, x: body(g, x))
    with pytest.raises(pg.SpecError, match=match):
        spec.trace(8)


def test_unknown_hyperparameter_and_missing_dim():
    from pigeon.models import rgcn
    with pytest.raises(pg.SpecError, match="no hyperparameter"):
        rgcn.trace(8, outdim=3)
    with pytest.raises(pg.SpecError, match="feature size"):
        rgcn.trace()


def test_dsl_outside_tracing_is_an_error():
    with pytest.raises(pg.SpecError, match="only work while a spec is being traced"):
        pg.weight("w", (3,))


def test_trace_records_hyperparameters_and_outputs():
    from pigeon.models import rgat
    ir = rgat.trace(8, heads=2, out_dim=5)
    out = ir.op(ir.outputs[0])
    assert out.type.domain is Domain.NODE and out.type.shape == (10,)
    assert [p.attr("name") for p in ir.params()] == ["W", "a_src", "a_dst"]


def test_multiple_outputs_and_edge_inputs():
    @pg.layer
    def two(g, x, e: pg.EdgeTensor):
        m = g.src(x) * e
        return {"sum": pg.aggregate(g, m, "sum"), "max": pg.aggregate(g, m, "max")}

    ir = two.trace({"x": 4, "e": 4})
    assert ir.output_names == ("sum", "max")
    assert [i.type.domain for i in ir.inputs()] == [Domain.NODE, Domain.EDGE]
    assert len(ir.of_kind(OpKind.AGGREGATE)) == 2


def _line_of(fn, marker: str) -> int:
    import inspect
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if marker in line)


@pytest.mark.parametrize("divisor", [0, 0.0, -0.0, 1e-320, 1e-45])
def test_division_by_constant_zero_names_the_spec_line(divisor):
    @pg.layer
    def div(g, x):
        h = pg.aggregate(g, g.src(x), "sum")
        return h / divisor   # the division

    with pytest.raises(pg.SpecError, match="division by zero") as info:
        div.trace(8)
    assert info.value.loc.file == __file__
    assert info.value.loc.line == _line_of(div.fn, "# the division")


@pytest.mark.parametrize("expr,match", [
    (lambda h: h / float("nan"), "constants must be finite"),
    (lambda h: h * float("inf"), "constants must be finite"),
    (lambda h: h + 0j, "constants must be real numbers"),
    (lambda h: h / 0j, "constants must be real numbers"),
    (lambda h: pg.leaky_relu(h, float("nan")), "must be finite"),
])
def test_non_finite_and_complex_constants_are_spec_errors(expr, match):
    spec = pg.layer(lambda g, x: expr(pg.aggregate(g, g.src(x), "sum")))
    with pytest.raises(pg.SpecError, match=match) as info:
        spec.trace(8)
    assert info.value.loc is not None and info.value.loc.file == __file__


def test_division_by_a_small_constant_still_traces():
    ir = pg.layer(lambda g, x: pg.aggregate(g, g.src(x), "sum") / 1e-30).trace(8)
    scale = [op for op in ir.ops() if op.kind is OpKind.UNARY]
    assert [op.attr("c") for op in scale] == [pytest.approx(1e30)]
    # a constant numerator is fine: 0 / h divides by the (runtime) value, not by a constant
    pg.layer(lambda g, x: 0 / pg.aggregate(g, g.src(x), "sum")).trace(8)
