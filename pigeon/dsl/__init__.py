from .api import (aggregate, concat, dot, edge_softmax, elu, exp, gelu, leaky_relu, linear, relu,
                  sigmoid, tanh, typed_linear, weight)
from .layer import EdgeTensor, EtypeTensor, Layer, NodeTensor, NtypeTensor, layer
from .trace import SpecError
from .values import Graph, TypeSelector, Value

__all__ = ["aggregate", "concat", "dot", "edge_softmax", "elu", "exp", "gelu", "leaky_relu", "linear",
           "relu", "sigmoid", "tanh", "typed_linear", "weight", "EdgeTensor", "EtypeTensor", "Layer", "NodeTensor", "NtypeTensor",
           "layer", "SpecError", "Graph", "TypeSelector", "Value"]
