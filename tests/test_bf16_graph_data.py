"""Graph constants of a 16-bit layer stay float32 (pigeon/passes/lower.py): a 1/degree normalizer
rounded to bf16 is off by the same relative amount for every node of that degree, and a sum over
many nodes (RGCN's bias gradient) collects that bias instead of averaging it out. Found on the H200
(AM-sized RGCN bf16 training: the bias gradient 16% off, 40x the bf16 reference's error; the H200
run of the bench case is the end-to-end check, benchmarks/results/rgnn/README.md)."""
import torch

import pigeon as pg
from pigeon.graph import HeteroGraph
from pigeon.models import MODELS

DIM = 8


def _regular_graph(n: int, seed: int = 0) -> HeteroGraph:
    gen = torch.Generator().manual_seed(seed)
    dst = torch.cat([torch.arange(n).repeat_interleave(3), torch.arange(n).repeat_interleave(6)])
    etype = torch.cat([torch.zeros(3 * n, dtype=torch.long), torch.ones(6 * n, dtype=torch.long)])
    src = torch.randint(0, n, (9 * n,), generator=gen)
    return HeteroGraph(src, dst, etype, num_nodes=n, num_etypes=2)


def test_graph_data_buffers_are_float32_in_a_bf16_layer():
    layer = pg.compile(MODELS["rgcn"], _regular_graph(50), DIM, out_dim=DIM, dtype="bfloat16")
    for prog in (layer.forward_program, layer.backward_program):
        assert prog.graph_data
        for _, b in prog.graph_data:
            assert prog.buffer(b).dtype == "float32"
