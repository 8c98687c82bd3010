"""Builds of TVM-generated kernels for the CPU (llvm).  TVM is the generator of the families it
writes the GPU code for (ShiftAdd next); their TIR comes from pigeon/codegen/expr_tir.py, and the
llvm build runs those same definitions on a CPU."""
from __future__ import annotations

from ..codegen.expr_tir import elementwise_primfunc
from ..ir.expr import Expr


def build_elementwise_llvm(e: Expr):
    """``out[r, j] = e(r, j)`` built for the CPU: a TVM module whose ``main`` takes torch tensors."""
    import tvm
    return tvm.compile(tvm.IRModule({"main": elementwise_primfunc(e)}), target="llvm")


def build_llvm(mod):
    """A scheduled TIR module (or PrimFunc) built for the CPU; its functions take torch tensors."""
    import tvm
    return tvm.compile(mod, target="llvm")
