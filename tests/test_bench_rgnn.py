"""`pigeon bench rgnn` on the CPU: the quick run end to end (files, keys, checks), one-line errors,
the floor arithmetic and the summary's aggregation on hand-made records."""
import json
import math
from pathlib import Path

import pytest
import torch

import pigeon as pg
from pigeon.bench import rgnn
from pigeon.graph import tiny_graph
from pigeon.models import MODELS

from bench_cli import assert_files_written, one_error, quick_run, run_bench

REQUIRED = ("gpu", "commit", "date", "command", "geomean_speedup_inference", "geomean_speedup_training",
            "cases_total", "cases_slower_than_a_peer", "cases_within_3x_floor", "host_overhead_us",
            "aggregate_tbps_min", "pigeon_oom", "peer_oom", "cost_model_within_10pct")


def bench(*args):
    return run_bench("rgnn", *args)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return quick_run("rgnn", tmp_path_factory.mktemp("rgnn"))


def test_quick_run_writes_every_file(quick):
    code, stdout, stderr, out = quick
    assert_files_written(code, stderr, out)
    summary = json.loads((out / "summary.json").read_text())
    for key in REQUIRED:
        assert key in summary, key
    for key in ("host_overhead_us", "cost_model_within_10pct"):
        assert summary[key] is None and summary[f"{key}_note"], key          # CPU / no --tune-check: not measured, and why
    assert "--tune-check" in summary["cost_model_within_10pct_note"]
    # per-kernel TB/s on a CPU: the host's times of the kernels' semantics, said so
    assert summary["aggregate_tbps_min"] > 0 and "CPU" in summary["aggregate_tbps_min_note"]
    assert isinstance(summary["aggregate_slower_than_peer"], int)
    assert summary["command"].startswith("pigeon bench rgnn --graphs tiny ") and "--device cpu" in summary["command"]
    assert summary["cases_total"] == 12 and summary["synthetic_graphs"] == ["tiny"]
    assert summary["plot"] == "speedup.png" or summary["plot"].startswith("skipped: matplotlib")
    if summary["plot"] == "speedup.png":
        assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("geomean_speedup_inference", "geomean_speedup_training"):
        assert isinstance(summary[key], float) and summary[key] > 0


def test_quick_run_cases_are_checked_and_timed(quick):
    code, stdout, stderr, out = quick
    cases = json.loads((out / "cases.json").read_text())["cases"]
    assert {(c["model"], c["dtype"], c["mode"]) for c in cases} == {
        (m, d, mode) for m in MODELS for d in ("float32", "bfloat16") for mode in ("inference", "training")}
    for c in cases:
        assert c["check"] == "ok", c
        assert c["pigeon_status"] == "ok" and c["pigeon_ms"] > 0
        assert isinstance(c["speedup_best"], float) and c["speedup_best"] > 0
        assert c["speedup"] and all(isinstance(v, float) and v > 0 for v in c["speedup"].values())
        assert c["floor"]["floor_ms"] > 0 and c["floor_ratio"] > 0
        kinds = {r["kind"] for r in c["impls"]}
        assert kinds == {"pigeon", "pyg", "reference"}         # torch.compile is off on a CPU by default
    # progress: one line per case on stderr; the table on stdout
    assert sum(line.startswith("[") for line in stderr.splitlines()) == 12
    assert "| graph | model | dim | dtype | mode | pigeon ms |" in stdout
    assert stdout.count("| tiny (synthetic) |") == 12
    assert "cases_slower_than_a_peer" in (out / "summary.md").read_text()


@pytest.mark.parametrize("args,needles", [
    (("--graphs", "no_such_graph"), ("unknown graph 'no_such_graph'",)),
    (("--graphs", "synthetic:nope"), ("synthetic:nope", "no synthetic preset")),
    (("--graphs", "synthetic:ogbl-wikikg2"), ("no synthetic preset",)),
    (("--models", "gcn"), ("--models gcn", "'gcn'", "rgcn, rgat, hgt")),
    (("--dtypes", "float16"), ("--dtypes", "'float16'")),
    (("--modes", "eval"), ("--modes", "'eval'")),
    (("--peers", "dgl"), ("--peers", "'dgl'")),
    (("--dims", "10", "--models", "rgat"), ("--dims 10", "multiple of 4")),
    (("--dims", "x"), ("--dims x",)),
    (("--reps", "0"), ("--reps 0",)),
])
def test_bad_choices_are_one_line_errors(tmp_path, args, needles):
    code, out, err = bench("--quick", "--device", "cpu", "--out", tmp_path / "o", *args)
    assert code == 2
    one_error(err, *needles)
    assert not (tmp_path / "o").exists()


def test_missing_dataset_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PIGEON_DATA", raising=False)
    code, out, err = bench("--graphs", "aifb", "--device", "cpu", "--out", tmp_path / "o")
    assert code == 2
    one_error(err, "graph aifb", "PIGEON_DATA")
    monkeypatch.setenv("PIGEON_DATA", str(tmp_path))
    code, out, err = bench("--graphs", "tiny,fb15k-237+rev", "--device", "cpu", "--out", tmp_path / "o")
    assert code == 2
    one_error(err, "graph fb15k-237+rev", "fb15k-237", "does not exist")


def test_unwritable_out_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out, err = bench("--quick", "--device", "cpu", "--out", blocker)
    assert code == 2
    one_error(err, f"--out {blocker}", "a file is in the way")
    code, out, err = bench("--quick", "--device", "cpu", "--out", blocker / "sub")
    assert code == 2
    one_error(err, "--out", "not a directory")


def test_floor_of_a_tiny_case_by_hand():
    N, E, R, T = 40, 151, 4, 2
    # rgcn d16: 2*E*16*16 + 2*N*16*16 FLOPs; bytes: x 40*16*4 + W (4*256 + 256 + 16)*4 + 12*E + out 40*16*4
    f = rgnn.case_floor("rgcn", 16, "float32", "inference", N, E, R, T)
    assert f["flops"] == 77312 + 20480
    assert f["bytes"] == 2560 + 5184 + 1812 + 2560
    assert f["floor_ms"] == pytest.approx(12116 / 4.2e12 * 1e3) and f["bound"] == "memory"
    # training: 3x FLOPs; also writes grad x and grad W, reads the output once
    t = rgnn.case_floor("rgcn", 16, "float32", "training", N, E, R, T)
    assert t["flops"] == 3 * 97792 and t["bytes"] == 12116 + 2560 + 5184 + 2560
    b = rgnn.case_floor("rgcn", 16, "bfloat16", "inference", N, E, R, T)
    assert b["bytes"] == 1280 + 2592 + 1812 + 1280
    assert b["floor_ms"] == pytest.approx(max(97792 / 750e12, 6964 / 4.2e12) * 1e3)
    assert rgnn.forward_flops("rgat", 16, N, E) == 2 * (2 * E) * 16 * 16
    assert rgnn.forward_flops("hgt", 16, N, E) == 4 * 2 * N * 16 * 16 + 2 * 2 * E * 4 * 4 * 4
    big = rgnn.case_floor("hgt", 128, "float32", "training", 10**6, 10**7, 4, 4)
    assert big["bound"] == "compute" and big["floor_ms"] == pytest.approx(big["flops"] / 50e12 * 1e3)


@pytest.mark.parametrize("model", list(MODELS))
def test_param_count_matches_the_layer(model):
    g = tiny_graph()
    layer = pg.compile(MODELS[model], g, 16, backend="reference", **rgnn.hparams(model, 16))
    assert rgnn.param_count(model, 16, g.num_etypes, g.num_ntypes) == sum(p.numel() for p in layer.parameters())


def _case(mode, pigeon, *peers, floor_ms=1.0):
    """A hand-made case record: pigeon's status-or-ms and (name, status-or-ms) per peer."""
    def row(name, kind, v):
        ok = isinstance(v, (int, float))
        return {"impl": name, "kind": kind, "status": "ok" if ok else v, "median_ms": float(v) if ok else None}
    c = {"graph": "g", "synthetic": True, "model": "rgcn", "dim": 8, "dtype": "float32", "mode": mode,
         "check": "ok", "floor": {"floor_ms": floor_ms},
         "impls": [row("pigeon", "pigeon", pigeon)] + [row(n, "pyg", v) for n, v in peers]}
    return rgnn.finish_case(c)


def test_summary_of_hand_made_cases():
    cases = [
        _case("inference", 1.0, ("A", 4.0), ("B", "OOM"), ("C", "error: RuntimeError: boom"), floor_ms=0.5),
        _case("inference", 2.0, ("A", 1.0), ("B", 8.0)),                   # slower than A
        _case("training", 1.0, ("A", "OOM"), ("B", "timeout"), ("C", "n/a: no dict form")),   # no peer ran
        _case("training", "OOM", ("A", 3.0)),                              # pigeon OOM where a peer ran
        _case("training", 1.0, ("A", 9.0), ("B", 18.0), floor_ms=0.1),
    ]
    assert cases[0]["best_peer"] == "A" and cases[0]["speedup_best"] == 4.0 and cases[0]["speedup"] == {"A": 4.0}
    assert cases[1]["speedup"] == {"A": 0.5, "B": 4.0} and cases[1]["speedup_best"] == 0.5
    assert cases[2]["best_peer"] is None and cases[2]["speedup_best"] is None
    assert cases[3]["pigeon_ms"] is None and cases[3]["speedup_best"] is None
    s = rgnn.summarize(cases)
    assert s["geomean_speedup_inference"] == pytest.approx(math.sqrt(4.0 * 0.5))
    assert s["geomean_speedup_training"] == pytest.approx(9.0)
    assert s["cases_total"] == 5 and s["cases_compared"] == 3
    assert s["cases_slower_than_a_peer"] == 2
    assert s["cases_within_3x_floor"] == 3          # 1.0 <= 3 * 0.5, 2.0 <= 3, 1.0 <= 3; not 1.0 vs 0.1
    assert s["pigeon_oom"] == 1 and s["pigeon_errors"] == 0
    assert s["peer_oom"] == 2 and s["peer_oom_by_impl"] == {"B": 1, "A": 1}
    assert s["peer_timeouts"] == 1 and s["peer_errors"] == 1


def test_host_share_of_a_case_and_its_table_cells():
    """GPU time per step (the profiler's, every kernel) against pigeon's wall time: the share the host
    adds, in the case, its progress line and the cases table; absent where no GPU time was measured."""
    from pigeon.bench import report
    c = _case("training", 2.0, ("A", 4.0))
    assert c["host_share"] is None
    c["gpu_ms_per_step"] = 0.5
    c = rgnn.finish_case(c)
    assert c["host_share"] == pytest.approx(0.75)
    assert "GPU 0.500 ms/step (host 75% of pigeon's time)" in rgnn.case_line(c)
    row = report.cases_table([c])[-1]
    assert row.endswith("| 0.500 | 75% |")
    c["gpu_ms_per_step"] = 3.0                     # more GPU than wall (profiled without replay): no negative share
    assert rgnn.finish_case(c)["host_share"] == 0.0


def test_failures_become_statuses():
    assert rgnn.failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) == "OOM"
    assert rgnn.failure(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")) == "OOM"
    assert rgnn.failure(rgnn.PeerTimeout()) == "timeout"
    assert rgnn.failure(ValueError("bad\nthing")) == "error: ValueError: bad; thing"


def test_compile_peer_on_the_tiny_graph(tmp_path):
    """torch.compile of the reference, with its compile time (on a CPU it needs the C++ compiler)."""
    code, out, err = bench("--quick", "--device", "cpu", "--out", tmp_path, "--models", "rgcn", "--dtypes",
                           "float32", "--modes", "inference", "--peers", "compile")
    assert code == 0, err
    (case,) = json.loads((tmp_path / "cases.json").read_text())["cases"]
    assert case["check"] == "ok"
    (row,) = [r for r in case["impls"] if r["kind"] == "compile"]
    assert row["status"] == "ok", row
    assert row["compile_s"] > 0 and row["median_ms"] > 0


def test_peer_timeout_is_recorded(tmp_path):
    code, out, err = bench("--quick", "--device", "cpu", "--out", tmp_path, "--models", "rgcn", "--dtypes",
                           "float32", "--modes", "inference", "--peers", "compile", "--peer-timeout", "0.01")
    assert code == 0, err
    (case,) = json.loads((tmp_path / "cases.json").read_text())["cases"]
    (row,) = [r for r in case["impls"] if r["kind"] == "compile"]
    assert row["status"] == "timeout" and row["median_ms"] is None
    assert case["best_peer"] is None
    assert json.loads((tmp_path / "summary.json").read_text())["peer_timeouts"] == 1


def test_resume_keeps_finished_cases(tmp_path):
    args = ("--quick", "--device", "cpu", "--out", tmp_path, "--models", "rgcn", "--dtypes", "float32",
            "--peers", "reference", "--reps", "1")
    code, out, err = bench(*args, "--modes", "inference")
    assert code == 0, err
    first = json.loads((tmp_path / "cases.json").read_text())["cases"]
    code, out, err = bench(*args, "--resume")
    assert code == 0, err
    assert "1 cases from" in err and sum(line.startswith("[") for line in err.splitlines()) == 1
    cases = json.loads((tmp_path / "cases.json").read_text())["cases"]
    assert [c["mode"] for c in cases] == ["inference", "training"] and cases[0] == first[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cases_total"] == 2 and len(summary["commands"]) == 2
    (tmp_path / "cases.json").write_text("{not json")
    code, out, err = bench(*args, "--resume")
    assert code == 2
    one_error(err, "cases.json")


def test_floor_counts_rows_per_unique_node_relation_pair():
    """The floor's FLOPs are those of the cheapest form (compaction, aggregate-first, the reordered
    destination score): a lower bound, never above the as-written count."""
    g = tiny_graph()
    us, ud = g.relation_pairs()
    pairs = lambda a: len({(int(n), int(r)) for n, r in zip(a, g.etype)})      # noqa: E731
    assert (us, ud) == (pairs(g.src), pairs(g.dst))
    N, E, d = g.num_nodes, g.num_edges, 16
    assert rgnn.forward_flops("rgcn", d, N, E, us, ud) == 2 * min(us, ud) * d * d + 2 * N * d * d
    assert rgnn.forward_flops("rgat", d, N, E, us, ud) == 2 * us * d * 16 + 2 * ud * d * 4
    assert rgnn.forward_flops("hgt", d, N, E, us, ud) == 4 * 2 * N * d * d + 2 * 2 * us * 4 * 4 * 4
    for m in MODELS:
        assert rgnn.forward_flops(m, d, N, E, us, ud) <= rgnn.forward_flops(m, d, N, E)
        lo = rgnn.case_floor(m, d, "float32", "training", N, E, g.num_etypes, g.num_ntypes, us, ud)
        assert lo["floor_ms"] <= rgnn.case_floor(m, d, "float32", "training", N, E, g.num_etypes, g.num_ntypes)["floor_ms"]


def test_quick_run_measures_kernels_aggregation_peers_and_the_cost_model(tmp_path):
    """The new fields: per-kernel min bytes / time (profiler), the aggregation against index_add_ and
    the CSR SpMM, and --tune-check's pick vs best per case."""
    code, out, err = bench("--quick", "--device", "cpu", "--out", tmp_path, "--models", "rgcn", "--dtypes",
                           "float32", "--modes", "inference", "--peers", "reference", "--tune-check")
    assert code == 0, err
    data = json.loads((tmp_path / "cases.json").read_text())
    (case,) = data["cases"]
    ks = case["kernels"]
    assert ks and all(k["min_bytes"] > 0 and k["ms"] > 0 and k["tbps"] > 0 and k["kernel"].startswith("pigeon_trav_")
                      for k in ks)
    assert case["aggregate_tbps_min"] == min(k["tbps"] for k in ks)
    t = case["tune"]
    assert t["status"] == "ok" and t["candidates"] >= 2 and t["ratio"] >= 1.0 and t["pick_status"] == "ok"
    assert t["within_10pct"] == (t["ratio"] <= 1.1)
    (agg,) = data["aggregations"]
    assert {"pigeon", "index_add_", "torch.sparse.mm (CSR)"} <= set(agg["impls"])
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in agg["impls"].values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cost_model_within_10pct"] == (1.0 if t["within_10pct"] else 0.0)
    assert summary["aggregate_slower_than_peer"] in (0, 1) and summary["aggregate_tbps_min"] > 0
    assert "--tune-check" in summary["command"]
    assert "| min aggregation TB/s | cost model: pick ms / best candidate ms / ratio |" in out
    assert "index_add_ ms (TB/s)" in (tmp_path / "cases.md").read_text()


def test_resume_skips_an_implementation_the_process_died_in(tmp_path):
    """running.json names what ran when a process died; --resume records that implementation as an
    error and runs the rest; a finished run leaves no running.json; a fresh run ignores a stale one."""
    args = ("--quick", "--device", "cpu", "--out", tmp_path, "--models", "rgcn", "--dtypes", "float32",
            "--modes", "inference", "--peers", "pyg,reference", "--reps", "1")
    (tmp_path / "running.json").write_text(json.dumps(
        {"case": ["tiny", "rgcn", 16, "float32", "inference"], "impl": "reference (per-relation torch)",
         "since": "2026-12-02T03:10:00+00:00"}))
    code, out, err = bench(*args, "--resume")
    assert code == 0, err
    assert not (tmp_path / "running.json").exists()
    (case,) = json.loads((tmp_path / "cases.json").read_text())["cases"]
    rows = {r["impl"]: r for r in case["impls"]}
    assert rows["reference (per-relation torch)"]["status"].startswith("error: the process died while this ran")
    assert rows["pigeon"]["status"] == "ok" and case["check"] == "ok"
    assert any(r["status"] == "ok" for n, r in rows.items() if n.startswith("PyG"))
    # a fresh run (no --resume) removes a stale mark and runs everything
    (tmp_path / "running.json").write_text('{"case": ["tiny", "rgcn", 16, "float32", "inference"], "impl": "pigeon"}')
    code, out, err = bench(*args)
    assert code == 0, err
    (case,) = json.loads((tmp_path / "cases.json").read_text())["cases"]
    assert all(r["status"] == "ok" for r in case["impls"])
    assert not (tmp_path / "running.json").exists()


def test_time_limit_restores_grad_mode():
    """An alarm that lands between a grad-mode switch and the try restoring it (simulated: switched
    off, then the timeout raised) must not leave the mode off for the rest of the process."""
    from pigeon.bench.timing import PeerTimeout, time_limit
    assert torch.is_grad_enabled()
    with pytest.raises(PeerTimeout):
        with time_limit(30):
            torch.set_grad_enabled(False)
            raise PeerTimeout()
    assert torch.is_grad_enabled()


def test_merge_tune_only_joins_tune_results_and_keeps_timings(tmp_path):
    """benchmarks/merge_rgnn.py --tune-only: a `--peers none --tune-check` run adds each case's tune
    result to the results folder's case of the same key; timings and peers stay; an unknown case is an error."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("merge_rgnn", Path(__file__).parents[1] / "benchmarks" / "merge_rgnn.py")
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    common = ("--quick", "--device", "cpu", "--models", "rgcn", "--dtypes", "float32", "--modes", "inference",
              "--reps", "1")
    assert bench(*common, "--out", base, "--peers", "reference")[0] == 0
    assert bench(*common, "--out", tuned, "--peers", "none", "--tune-check")[0] == 0
    before = json.loads((base / "cases.json").read_text())["cases"][0]
    assert "tune" not in before
    assert merge.main(["--tune-only", str(base), str(tuned)]) == 0
    after = json.loads((base / "cases.json").read_text())["cases"][0]
    assert after["impls"] == before["impls"] and after["tune"]["status"] == "ok" and after["tune"]["commit"]
    summary = json.loads((base / "summary.json").read_text())
    assert summary["cost_model_within_10pct"] == (1.0 if after["tune"]["within_10pct"] else 0.0)
    assert "--tune-check" in summary["commands"][-1] and "tune-check results" in summary["merged"]
    other = tmp_path / "other"
    assert bench("--quick", "--device", "cpu", "--models", "rgat", "--dtypes", "float32", "--modes", "inference",
                 "--reps", "1", "--out", other, "--peers", "none", "--tune-check")[0] == 0
    assert merge.main(["--tune-only", str(base), str(other)]) == 2


def test_summary_keeps_each_host_overhead_batch(quick):
    """The host overhead's batches and GPU time reach the summary beside the number (the number
    swings several-fold between runs on the H200: the batches show whether one run was noisy)."""
    code, stdout, stderr, out = quick
    data = json.loads((out / "cases.json").read_text())
    cfg = rgnn.Config(plan=(("tiny", (16,)),), models=("rgcn",), dtypes=("float32",), modes=("inference",),
                      peers=(), device=torch.device("cpu"), reps=1, warmup=1, peer_timeout=1.0, out=str(out))
    host = {"rgcn": {"wall_us": 40.0, "gpu_us": 12.5, "host_overhead_us": 27.5, "wall_us_batches": [39.0, 40.0, 41.0]}}
    s = rgnn.build_summary(data["cases"], data["meta"], [], cfg, host=host, host_note="test")
    assert s["host_overhead_us"] == 27.5 and s["host_overhead_us_by_model"] == {"rgcn": 27.5}
    assert s["host_overhead_detail"] == {"rgcn": {"wall_us": 40.0, "gpu_us": 12.5, "wall_us_batches": [39.0, 40.0, 41.0]}}


def test_modes_none_runs_only_the_aggregation_comparisons(tmp_path):
    """--modes none: no cases, the sum aggregations per (graph, dim, dtype) all the same; the command
    that repeats the run says none."""
    code, out, err = bench("--quick", "--device", "cpu", "--out", tmp_path, "--models", "rgcn", "--modes", "none",
                           "--peers", "none", "--reps", "1")
    assert code == 0, err
    data = json.loads((tmp_path / "cases.json").read_text())
    assert data["cases"] == []
    assert sorted(a["dtype"] for a in data["aggregations"]) == ["bfloat16", "float32"]
    assert all(a["impls"]["pigeon"]["status"] == "ok" for a in data["aggregations"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cases_total"] == 0 and "--modes none" in summary["command"]
    code, out, err = bench("--quick", "--device", "cpu", "--out", tmp_path, "--modes", "none,training")
    assert code == 2
    one_error(err, "--modes")


def test_host_overhead_is_the_fresh_process_measurement_with_the_in_run_one_beside_it():
    fresh = {"rgcn": {"wall_us": 40.0, "gpu_us": 30.0, "host_overhead_us": 10.0}}
    in_run = {"rgcn": {"wall_us": 80.0, "gpu_us": 30.0, "host_overhead_us": 50.0}}
    res, note = rgnn.combine_host(fresh, "tiny graph", in_run, "tiny graph")
    assert res["rgcn"]["host_overhead_us"] == 10.0 and res["rgcn"]["in_run_us"] == 50.0
    assert "fresh process" in note and "rgcn 50.0" in note
    res, note = rgnn.combine_host(None, "exit 1: boom", in_run, "tiny graph")
    assert res is in_run and "boom" in note
    assert rgnn.host_overhead_fresh(["rgcn"], 16, torch.device("cpu"))[0] is None


def test_host_probe_prints_one_json_line(capsys):
    from pigeon.bench import host_probe
    assert host_probe.main(["rgcn", "16", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["result"] is None and "CUDA" in got["note"]
    assert host_probe.main(["rgcn"]) == 2
