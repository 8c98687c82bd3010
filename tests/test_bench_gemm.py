"""`pigeon bench gemm` on the CPU: the quick run end to end (files, every summary key, checks), the
FLOP count by hand, --resume and one-line errors."""
import json

import pytest

from pigeon.bench import gemm as G

from bench_cli import assert_files_written, one_error, quick_run, run_bench



def bench(*args):
    return run_bench("gemm", *args)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return quick_run("gemm", tmp_path_factory.mktemp("gemm"))


def test_quick_run_writes_every_file_and_key(quick):
    code, stdout, stderr, out = quick
    assert_files_written(code, stderr, out)
    s = json.loads((out / "summary.json").read_text())
    for key in G.KEYS:
        assert key in s, key
    for key in ("gemm_vs_cublas_min", "gemm_epilogue_vs_cublas_min", "grouped_vs_best_peer", "fp8_blockscaled_vs_bf16"):
        assert isinstance(s[key], float) and s[key] > 0 and s[f"{key}_case"], key
    # torch._scaled_mm needs CUDA: on a CPU the per-tensor fp8 case has no peer
    assert s["fp8_vs_scaled_mm"] is None and "scaled_mm n/a" in s["fp8_vs_scaled_mm_note"]
    assert s["command"].startswith("pigeon bench gemm --cases gemm-4096,gemm-8192,gemm-gelu,gemm-bias-gelu,grouped,"
                                   "fp8-8192,fp8-block-4096 ")
    assert s["cases_total"] == 7 and s["cases_check_failed"] == []
    assert [f.split(": ", 1)[1] for f in s["failures"]] == ["scaled_mm n/a: torch._scaled_mm needs a CUDA device"]
    assert s["plot"] == "tflops.png" or s["plot"].startswith("skipped: matplotlib")
    assert "| gemm_vs_cublas_min |" in (out / "summary.md").read_text()


def test_quick_run_cases_are_checked_and_timed(quick):
    code, stdout, stderr, out = quick
    cases = {c["case"]: c for c in json.loads((out / "cases.json").read_text())["cases"]}
    assert set(cases) == set(G.CASES)
    for c in cases.values():
        assert c["check"] == "ok" and c["pigeon_status"] == "ok" and c["pigeon_ms"] > 0
        for r in c["impls"]:
            if r["impl"] == "scaled_mm":
                assert r["status"].startswith("n/a"), r
                continue
            assert r["status"] == "ok" and r["check"] == "ok", r
    assert [r["impl"] for r in cases["gemm-gelu"]["impls"]] == ["pigeon", "matmul+gelu"]
    assert [r["impl"] for r in cases["grouped"]["impls"]] == ["pigeon", "grouped_mm", "bmm", "loop"]
    g = cases["grouped"]
    best = min((r for r in g["impls"] if r["kind"] != "pigeon"), key=lambda r: r["median_ms"])
    assert g["best_peer"] == best["impl"] and g["speedup_best"] == pytest.approx(best["median_ms"] / g["pigeon_ms"])
    assert [r["impl"] for r in cases["fp8-block-4096"]["impls"]] == ["pigeon", "matmul bf16"]
    assert sum(line.startswith("[") for line in stderr.splitlines()) == 7
    assert "| case | G | M x K x N | dtype | pigeon ms |" in stdout


def test_flops_by_hand(quick):
    cases = {c["case"]: c for c in json.loads((quick[3] / "cases.json").read_text())["cases"]}
    assert cases["gemm-4096"]["flops"] == 2 * 128**3
    assert cases["grouped"]["flops"] == 2 * 8 * 32 * 64 * 64
    c = cases["gemm-gelu"]
    assert (c["M"], c["K"], c["N"]) == (256, 64, 128) and c["flops"] == 2 * 256 * 64 * 128
    assert c["pigeon_tflops"] == pytest.approx(c["flops"] / (c["pigeon_ms"] * 1e-3) / 1e12)
    assert G.CASES["gemm-gelu"] == ("gelu", 1, 16384, 1024, 4096) and G.CASES["grouped"] == ("grouped", 64, 256, 1024, 1024)


def test_resume_keeps_finished_cases(tmp_path):
    args = ("--quick", "--device", "cpu", "--out", tmp_path, "--peers", "matmul", "--reps", "1")
    code, out, err = bench(*args, "--cases", "gemm-4096")
    assert code == 0, err
    code, out, err = bench(*args, "--cases", "gemm-4096,gemm-gelu", "--resume")
    assert code == 0, err
    assert "1 cases from" in err and sum(line.startswith("[") for line in err.splitlines()) == 1
    cases = json.loads((tmp_path / "cases.json").read_text())["cases"]
    assert [c["case"] for c in cases] == ["gemm-4096", "gemm-gelu"]
    assert len(json.loads((tmp_path / "summary.json").read_text())["commands"]) == 2


@pytest.mark.parametrize("args,needles", [
    (("--cases", "gemm-1024"), ("--cases gemm-1024", "'gemm-1024'", "gemm-4096")),
    (("--dtypes", "float8_e4m3fn"), ("--dtypes", "'float8_e4m3fn'")),
    (("--peers", "cutlass"), ("--peers", "'cutlass'")),
    (("--reps", "0"), ("--reps 0",)),
    (("--timeout", "0"), ("--timeout",)),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, needles):
    code, out, err = bench("--quick", "--device", "cpu", "--out", tmp_path / "o", *args)
    assert code == 2
    one_error(err, *needles)
    assert not (tmp_path / "o").exists()
