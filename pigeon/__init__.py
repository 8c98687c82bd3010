"""pigeon: a compiler from a small Python DSL for relational GNNs to fused GPU kernels."""
from .dsl import (EdgeTensor, EtypeTensor, Graph, Layer, NodeTensor, NtypeTensor, SpecError, Value, aggregate, concat,
                  dot, edge_softmax, elu, exp, gelu, leaky_relu, layer, linear, relu, sigmoid, tanh,
                  typed_linear, weight)
from . import opset  # noqa: F401  (the op registry's records)
from .module import CompiledLayer, compile
from .gemm_api import fp8_gemm, gemm, grouped_gemm

from ._version import __version__  # noqa: E402


def load(path, graph=None):
    """Load an AOT artifact written by ``pigeon compile --out DIR`` (needs a CUDA GPU; no TVM, no nvcc)."""
    from .runtime.artifact import load as _load
    return _load(path, graph)

__all__ = ["EdgeTensor", "EtypeTensor", "Graph", "Layer", "NodeTensor", "NtypeTensor", "SpecError", "Value", "aggregate", "concat", "dot",
           "edge_softmax", "elu", "exp", "gelu", "leaky_relu", "layer", "linear", "relu", "sigmoid", "tanh",
           "typed_linear", "weight", "CompiledLayer", "compile", "gemm", "grouped_gemm", "fp8_gemm", "load"]
