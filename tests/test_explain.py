"""``pigeon compile --explain``: every graph-dependent decision is printed with its costs, and
the numbers are the graph's (hand-computed for the bundled tiny graph)."""
import re

from pigeon.cli import main
from pigeon.graph import tiny_graph


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, [l[len("# explain: "):] for l in out.splitlines() if l.startswith("# explain: ")], err


def test_explain_names_reordering_compaction_and_schedules(capsys, monkeypatch):
    monkeypatch.delenv("PIGEON_COMPACT", raising=False)
    monkeypatch.setenv("PIGEON_COMPACT_DST", "0")       # the reordered linear on E rows (below: on Ud)
    monkeypatch.delenv("PIGEON_CUDA_GRAPHS", raising=False)
    code, lines, err = _run(capsys, "compile", "rgat", "--in-dim", 8, "--set", "heads=2", "--set", "out_dim=4",
                            "--explain")
    assert code == 0, err
    g = tiny_graph()
    E, U = g.num_edges, g.compact().num_rows
    reorder = [l for l in lines if l.startswith("linear_reorder:")]
    assert len(reorder) == 1 and "GEMM n=2 instead of n=8" in reorder[0]
    before, after = (int(v.replace(",", "")) for v in re.search(r"([\d,]+) -> ([\d,]+) FLOP", reorder[0]).groups())
    assert (before, after) == (2 * E * 8 * 8 + 2 * E * 8, 2 * E * 8 * 2)
    comp = [l for l in lines if l.startswith("compaction:")]
    assert comp and comp[0].startswith("compaction: applied") and f"E/U = {E / U:.2f}" in comp[0]
    gemm = next(l for l in lines if "GEMM on U rows" in l)
    assert f"{2 * E * 8 * 8:,} -> {2 * U * 8 * 8:,} FLOP" in gemm
    sched = [l for l in lines if l.startswith("schedule:")]
    assert any("forward aggregate sum/dst" in l for l in sched)
    assert any("backward aggregate sum/compact " in l or "sum/compact ->" in l for l in sched)
    graphs = [l for l in lines if l.startswith("cuda graphs:")]
    assert len(graphs) == 2 and all("replayed on a GPU (PIGEON_CUDA_GRAPHS=auto" in l for l in graphs), graphs


def test_explain_says_when_compaction_is_not_applied(capsys, monkeypatch):
    monkeypatch.setenv("PIGEON_COMPACT", "0")
    code, lines, err = _run(capsys, "compile", "rgcn", "--in-dim", 8, "--explain")
    assert code == 0, err
    assert any(l.startswith("compaction: not applied: PIGEON_COMPACT=0") for l in lines)
    assert not any("GEMM on U rows" in l for l in lines)


def test_explain_names_the_sunk_score_and_destination_compaction(capsys, monkeypatch):
    """RGAT on the tiny graph: the source score sunk onto U pairs, the reordered destination linear
    on Ud (dst, etype) pairs, with the graph's numbers."""
    monkeypatch.delenv("PIGEON_COMPACT", raising=False)
    monkeypatch.delenv("PIGEON_COMPACT_DST", raising=False)
    code, lines, err = _run(capsys, "compile", "rgat", "--in-dim", 8, "--set", "heads=2", "--set", "out_dim=4",
                            "--explain")
    assert code == 0, err
    g = tiny_graph()
    E, U, Ud = g.num_edges, g.compact().num_rows, g.compact_dst().num_rows
    sink = next(l for l in lines if l.startswith("  sink:") and "dot on U compact rows" in l)
    assert f"{2 * E * 8:,} -> {2 * U * 8:,} FLOP" in sink
    assert f"{E * (8 + 2 * 2) * 4:,} -> {U * (8 + 2) * 4 + E * 2 * 4:,} B" in sink
    comp = next(l for l in lines if l.startswith("compaction_dst:"))
    assert comp.startswith("compaction_dst: applied") and f"E/Ud = {E / Ud:.2f}" in comp
    gemm = next(l for l in lines if "GEMM on Ud rows" in l)
    assert f"{2 * E * 8 * 2:,} -> {2 * Ud * 8 * 2:,} FLOP" in gemm
    assert any("aggregate sum/dcompact" in l for l in lines if l.startswith("schedule:"))
    monkeypatch.setenv("PIGEON_COMPACT_DST", "0")
    code, lines, err = _run(capsys, "compile", "rgat", "--in-dim", 8, "--explain")
    assert any(l.startswith("compaction_dst: not applied: PIGEON_COMPACT_DST=0") for l in lines)
    assert not any("GEMM on Ud rows" in l for l in lines)
