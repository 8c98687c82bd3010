"""Heterogeneous graphs, their layouts (CSR/CSC/etype-segmented COO/compact maps) and dataset loaders."""
from .datasets import DatasetError, load, load_fb15k237, load_graph, load_hgb, load_rdf, save_graph
from .hetero import GraphError, HeteroGraph
from .layouts import CSC, CSR, CompactMap, EtypeCOO
from .synthetic import PRESETS, preset, synthetic_graph, tiny_graph

__all__ = ["HeteroGraph", "GraphError", "DatasetError", "load", "tiny_graph", "synthetic_graph", "preset",
           "PRESETS", "save_graph", "load_graph", "load_fb15k237", "load_rdf", "load_hgb",
           "CSR", "CSC", "EtypeCOO", "CompactMap"]
