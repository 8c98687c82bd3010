from .api import (aggregate, concat, dot, edge_softmax, elu, exp, gelu, leaky_relu, linear, relu,
                  sigmoid, tanh, typed_linear, weight)
from .layer import EdgeTensor, Layer, NodeTensor, layer
from .trace import SpecError
from .values import Graph, TypeSelector, Value

__all__ = ["aggregate", "concat", "dot", "edge_softmax", "elu", "exp", "gelu", "leaky_relu", "linear",
           "relu", "sigmoid", "tanh", "typed_linear", "weight", "EdgeTensor", "Layer", "NodeTensor",
           "layer", "SpecError", "Graph", "TypeSelector", "Value"]
