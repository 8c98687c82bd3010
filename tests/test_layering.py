"""The import graph of the package (read from the source, lazy imports included): no circles, and
the layering of docs/design.md: ir imports nothing of pigeon outside ir (and neither torch nor
TVM); codegen does not import the runtime or torch; only the top-level API, the CLI and the
runtime itself import the runtime."""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent / "pigeon"


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}     # `from . import x` imports module x
    return out


def _graph():
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    ext = {}
    for m, p in mods.items():
        imps = _imports(p)
        ext[m] = imps
        for t in imps:
            if t in mods and t != m and not m.startswith(t + ".") and t != "pigeon":
                g.add_edge(m, t)
    return g, ext


def test_no_import_circles():
    g, _ = _graph()
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles[:5]


def test_layering():
    g, ext = _graph()
    for m in g:
        deps = set(g.successors(m))
        if m.startswith("pigeon.ir"):
            assert all(d.startswith("pigeon.ir") for d in deps), (m, deps)
            assert not any(i.split(".")[0] in ("torch", "tvm") for i in ext[m]), (m, "imports torch/tvm")
        if m.startswith("pigeon.codegen"):
            assert not any(d.startswith("pigeon.runtime") for d in deps), (m, deps)
            assert "torch" not in {i.split(".")[0] for i in ext[m]}, (m, "codegen imports torch")
        if m.startswith(("pigeon.passes", "pigeon.dsl")):
            assert all(d.startswith(("pigeon.ir", m.rsplit(".", 1)[0])) for d in deps), (m, deps)
    users = {m for m in g for d in g.successors(m) if d.startswith("pigeon.runtime")}
    # pigeon: pigeon.load; pigeon.gemm_api: pigeon.gemm, the pigeon::gemm op; pigeon.attention.api:
    # the attention kernel's launcher (lazily); pigeon.attention.ops: the pigeon::attention_* ops;
    # pigeon.shiftadd.layers: the ShiftAdd kernels' launcher (lazily, on CUDA tensors); pigeon.shiftadd.fp8:
    # the e4m3 row quantization kernel's launcher (lazily, on CUDA tensors)
    allowed = {"pigeon", "pigeon.module", "pigeon.cli", "pigeon.sizes", "pigeon.gemm_api", "pigeon.attention.api",
               "pigeon.attention.ops", "pigeon.shiftadd.layers", "pigeon.shiftadd.fp8"}
    assert {u for u in users if not u.startswith("pigeon.runtime")} <= allowed, users
    # pigeon.bench sits on top: it uses pigeon; only the CLI's bench command imports it (lazily)
    bench_users = {m for m in g for d in g.successors(m) if d.startswith("pigeon.bench")}
    assert {u for u in bench_users if not u.startswith("pigeon.bench")} <= {"pigeon.cli"}, bench_users
