"""Inter-operator IR: type rules, structural keys, verifier, printer."""
import pytest

from pigeon.ir import (Domain, IRGraph, Op, OpKind, SignatureError, TypeAxis, ValueType, VerifyError,
                       format_ir, infer_type, make_op, verify)
from pigeon.models import MODELS


def leaf(kind, name, vt, **attrs):
    return Op(kind, (), tuple(sorted({"name": name, **attrs}.items())), vt)


X = leaf(OpKind.INPUT, "x", ValueType(Domain.NODE, (8,)))
W = leaf(OpKind.PARAM, "W", ValueType(Domain.WEIGHT, (8, 4), per=TypeAxis.ETYPE), init="glorot")


def test_keys_are_structural_and_ignore_locations():
    a = make_op(OpKind.GATHER, [X], side="src")
    b = make_op(OpKind.GATHER, [X], side="src")
    c = make_op(OpKind.GATHER, [X], side="dst")
    assert a.key == b.key and a.key != c.key
    from pigeon.ir import SourceLoc
    assert make_op(OpKind.GATHER, [X], SourceLoc("f.py", 3), side="src").key == a.key


def test_typed_linear_rules():
    e = make_op(OpKind.GATHER, [X], side="src")
    y = make_op(OpKind.TYPED_LINEAR, [e, W])
    assert y.type == ValueType(Domain.EDGE, (4,))
    with pytest.raises(SignatureError, match="per etype applies to"):
        make_op(OpKind.TYPED_LINEAR, [X, W])          # node rows with an edge-type weight
    bad = leaf(OpKind.PARAM, "V", ValueType(Domain.WEIGHT, (5, 4), per=TypeAxis.ETYPE), init="glorot")
    with pytest.raises(SignatureError, match="feature shape"):
        make_op(OpKind.TYPED_LINEAR, [e, bad])


def test_broadcast_is_left_aligned():
    t = infer_type(OpKind.BINARY, {"fn": "mul"},
                   [ValueType(Domain.EDGE, (4,)), ValueType(Domain.EDGE, (4, 16))])
    assert t.shape == (4, 16)
    with pytest.raises(SignatureError, match="do not broadcast"):
        infer_type(OpKind.BINARY, {"fn": "mul"}, [ValueType(Domain.EDGE, (3,)), ValueType(Domain.EDGE, (4, 16))])
    with pytest.raises(SignatureError, match="different domains"):
        infer_type(OpKind.BINARY, {"fn": "add"}, [ValueType(Domain.EDGE, (4,)), ValueType(Domain.NODE, (4,))])


def test_verifier_catches_a_wrong_stored_type():
    e = make_op(OpKind.GATHER, [X], side="src")
    wrong = Op(OpKind.AGGREGATE, (e.key,), (("reduce", "sum"),), ValueType(Domain.NODE, (9,)))
    with pytest.raises(VerifyError, match="stored type"):
        verify(IRGraph([X, e, wrong], [wrong.key]))


def test_verifier_rejects_duplicate_names():
    x2 = leaf(OpKind.INPUT, "x", ValueType(Domain.NODE, (9,)))
    g1, g2 = make_op(OpKind.GATHER, [X], side="src"), make_op(OpKind.GATHER, [x2], side="dst")
    cat = make_op(OpKind.CONCAT, [g1, g2])
    with pytest.raises(VerifyError, match="two different inputs"):
        verify(IRGraph([X, x2, g1, g2, cat], [cat.key]))


def test_cse_merges_identical_ops():
    e1, e2 = make_op(OpKind.GATHER, [X], side="src"), make_op(OpKind.GATHER, [X], side="src")
    s = make_op(OpKind.BINARY, [e1, e2], fn="add")
    ir = IRGraph([X, e1, e2, s], [s.key])
    assert len(ir) == 3


@pytest.mark.parametrize("name", sorted(MODELS))
def test_printer_is_stable(name):
    a = format_ir(MODELS[name].trace(16), locs=False)
    b = format_ir(MODELS[name].trace(16), locs=False)
    assert a == b and a.startswith(f"ir {name} {{") and "return out=" in a


def test_live_drops_dead_ops():
    e = make_op(OpKind.GATHER, [X], side="src")
    d = make_op(OpKind.GATHER, [X], side="dst")
    ir = IRGraph([X, e, d], [e.key])
    assert len(ir.live()) == 2 and len(ir) == 3
