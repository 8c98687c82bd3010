"""The kernel-family registry: a toy family defined in this file alone (launch record, semantics,
CUDA kernel, emulation) runs end to end through the executor, the serializer and the artifact
kernel listing, with no other file touched; the built-in families are all registered."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from pigeon.codegen.kernel_source import KernelParam, RenderedKernel
from pigeon.graph.kernel_graph import kernel_graph
from pigeon.graph import load
from pigeon.ir.expr import Buffer
from pigeon.ir.program import KernelProgram
from pigeon.ir.serialize import from_json, to_json
from pigeon.runtime import emulate
from pigeon.runtime.artifact import _render
from pigeon.runtime.families import FAMILIES, KernelFamily, family_of, register_family
from pigeon.runtime.family import FamilyError, unregister_family
from pigeon.runtime.program import EmulateBackend, Executor, TorchBackend


@dataclass(frozen=True)
class AxpyLaunch:
    """y[r, j] = alpha * x[r, j] + b[j] over node rows."""
    family: ClassVar[str] = "toy_axpy"
    x: str
    b: str
    y: str
    alpha: float
    width: int

    def reads(self):
        return (self.x, self.b)

    def writes(self):
        return (self.y,)

    def describe(self):
        return f"toy_axpy {self.alpha} * {self.x} + {self.b} -> {self.y}"


def _semantics(launch, kg, bufs):
    bufs[launch.y].copy_(launch.alpha * bufs[launch.x] + bufs[launch.b])


def _render_axpy(launch):
    name = "toy_axpy_" + format(abs(hash((launch.alpha, launch.width))) % (1 << 32), "x")
    params = (KernelParam("x", "ptr", "const float* __restrict__", f"buffer:{launch.x}"),
              KernelParam("b", "ptr", "const float* __restrict__", f"buffer:{launch.b}"),
              KernelParam("y", "ptr", "float* __restrict__", f"out:{launch.y}"),
              KernelParam("n", "int32", "int", "size:elements"))
    src = (f'extern "C" __global__ void {name}({", ".join(p.c for p in params)}) {{\n'
           f"  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
           f"  if (i < n) y[i] = {float(launch.alpha)!r}f * x[i] + b[i % {launch.width}];\n}}\n")
    return RenderedKernel(name, src, params, (128, 1, 1), lambda kg: (max(1, -(-kg.num_nodes * launch.width // 128)), 1, 1))


def _emulate(launch, kg, bufs):
    rk = _render_axpy(launch)
    mod = emulate.EmulatedModule(rk)
    n = kg.num_nodes * launch.width
    mod.function(rk.name).launch(rk.grid(kg), rk.block, [bufs[launch.x], bufs[launch.b], bufs[launch.y], n],
                                 rk.ctypes)


@pytest.fixture
def toy_family():
    fam = register_family(KernelFamily("toy_axpy", AxpyLaunch, (), semantics=_semantics, render=_render_axpy,
                                       emulate=_emulate, doc="a test family"))
    yield fam
    unregister_family("toy_axpy")


def _program():
    bufs = (Buffer("in0", "node", (4,)), Buffer("p0", "global", (4,)), Buffer("t0", "node", (4,)))
    launch = AxpyLaunch("in0", "p0", "t0", 2.5, 4)
    return KernelProgram("toy", bufs, (launch,), (("x", "in0"),), (("b", "p0"),), (), (("out", "t0"),))


@pytest.mark.parametrize("backend", ["torch", "emulate"])
def test_toy_family_end_to_end(toy_family, backend):
    if backend == "emulate" and not emulate.available():
        pytest.skip("no C++ compiler for the CUDA emulation")
    g = load("tiny")
    kg = kernel_graph(g)
    prog = _program()
    assert family_of(prog.launches[0]) is toy_family
    # the program round-trips through the serializer (the family registered its launch type)
    again = from_json(to_json(prog))
    assert again == prog
    # the artifact's kernel listing asks the family to render
    rk = _render(prog.launches[0])
    assert rk is not None and "2.5f * x[i]" in rk.source
    x, b = torch.randn(g.num_nodes, 4), torch.randn(4)
    be = TorchBackend() if backend == "torch" else EmulateBackend()
    out = Executor(again, be, poison=True).run(kg, {"x": x}, {"b": b})["out"]
    torch.testing.assert_close(out, 2.5 * x + b)
    assert "toy_axpy 2.5" in again.describe()


def test_family_registry_errors(toy_family):
    with pytest.raises(FamilyError, match="already registered"):
        register_family(toy_family)

    @dataclass(frozen=True)
    class Unnamed:
        x: str

    with pytest.raises(FamilyError, match="must declare"):
        register_family(KernelFamily("other", Unnamed, (), semantics=_semantics))
    with pytest.raises(FamilyError, match="no kernel family"):
        family_of(Unnamed("a"))


def test_builtin_families_registered():
    assert {"gemm", "traversal", "host_add"} <= set(FAMILIES)
    for fam in FAMILIES.values():
        assert fam.semantics is not None and fam.launch_type.family == fam.name
