"""``pigeon bench shiftadd`` on the CPU: the quick run writes every file with the issue's summary keys
(the torch forms time there: no kernel runs without CUDA), and bad flags are one-line errors."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import assert_files_written, one_error, quick_run, run_bench  # noqa: E402

from pigeon.bench.shiftadd import KEYS  # noqa: E402


def test_quick_cpu_run(tmp_path):
    code, stdout, stderr, out = quick_run("shiftadd", tmp_path / "sa")
    assert_files_written(code, stderr, out)
    s = json.loads((out / "summary.json").read_text())
    for k in KEYS:
        assert k in s, k
    assert s["cases_check_failed"] == [] and s["failures"] == [], s
    cases = json.loads((out / "cases.json").read_text())["cases"]
    assert {c["kind"] for c in cases} == {"linear", "attention", "moe"}
    assert all(r["check"] in ("ok",) or r["check"].startswith("n/a") for c in cases for r in c["impls"])
    assert "[4/4]" in stderr and "pigeon (torch forms on cpu)" in (out / "cases.json").read_text()


def test_bad_flags(tmp_path):
    code, _, stderr = run_bench("shiftadd", "--kinds", "linear,conv", "--device", "cpu", "--out", tmp_path / "x")
    assert code == 2
    one_error(stderr, "--kinds", "conv")
    code, _, stderr = run_bench("shiftadd", "--reps", "0", "--device", "cpu", "--out", tmp_path / "x")
    assert code == 2
    one_error(stderr, "--reps 0")
