"""pigeon::gemm and pigeon::traversal on CUDA tensors: the generated kernels against the plain-torch
semantics of their instances, forward and gradients."""
import random
import sys
from pathlib import Path

import pytest
import torch

from pigeon.graph.kernel_graph import kernel_graph
from pigeon.runtime.family_traversal import run_traversal_reference
from pigeon.ir.kernel import GemmInstance
from pigeon.runtime.kernel_ops import graph_args, instance_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from graphs import random_graph  # noqa: E402
from traversal_cases import random_inputs, traversal_cases  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


def test_gemm_op_on_cuda():
    seed = random.randrange(1 << 30)
    kg = kernel_graph(random_graph(seed, num_nodes=300, num_edges=3000, num_etypes=5)).to(DEV)
    inst = GemmInstance("rows", 16, 24, gather=True)
    torch.manual_seed(seed)
    a = torch.randn(kg.num_nodes, 16, device=DEV, requires_grad=True)
    b = torch.randn(kg.num_etypes, 16, 24, device=DEV, requires_grad=True)
    out = torch.ops.pigeon.gemm(instance_json(inst), a, b, kg.etype_ptr, kg.src, None, None, kg.num_edges)
    ref = torch.einsum("ek,ekn->en", a[kg.src.long()], b[kg.etype.long()])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    up = torch.randn_like(out)
    g1 = torch.autograd.grad((out * up).sum(), [a, b])
    g2 = torch.autograd.grad((ref * up).sum(), [a, b])
    for p, q in zip(g1, g2):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["aggregate_sum_dst", "edge_softmax_dot"])
def test_traversal_op_on_cuda(name):
    inst = {n: i for n, i, _ in traversal_cases()}[name]
    seed = random.randrange(1 << 30)
    kg = kernel_graph(random_graph(seed, num_nodes=300, num_edges=3000, num_etypes=5)).to(DEV)
    bufs = random_inputs(inst, kg, seed=seed, device=DEV)
    inputs = [bufs[b.name] for b in inst.inputs()]
    sizes, graph = graph_args(kg)
    out = torch.ops.pigeon.traversal(instance_json(inst), sizes, graph, inputs)
    ref = run_traversal_reference(inst, kg, bufs)
    torch.testing.assert_close(out, ref.reshape(out.shape), rtol=1e-4, atol=1e-4)
