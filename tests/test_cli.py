"""`pigeon compile` and `pigeon inspect` as a user runs them: a subprocess, exit codes, output."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = Path(__file__).resolve().parent / "specs"


def pigeon(*args):
    return subprocess.run([sys.executable, "-m", "pigeon.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("spec", ["pigeon/models/rgcn.py", "pigeon/models/rgat.py", "pigeon/models/hgt.py",
                                  "examples/gated_rgat.py", "rgat"])
def test_compile_each_model_prints_ir(spec):
    r = pigeon("compile", spec)
    assert r.returncode == 0, r.stderr
    assert "# IR after passes" in r.stdout and "return out=" in r.stdout
    assert "finite=True" in r.stdout


def test_compile_dump_shows_source_lines():
    r = pigeon("compile", "rgcn", "--dump", "--set", "out_dim=4", "--set", "aggr=sum")
    assert r.returncode == 0, r.stderr
    assert "rgcn.py:9" in r.stdout and "# traced IR" in r.stdout and "shape=[40, 4]" in r.stdout


def test_broken_spec_reports_file_and_line():
    r = pigeon("compile", str(SPECS / "broken_shape.py"))
    assert r.returncode != 0
    assert f"{SPECS / 'broken_shape.py'}:7" in r.stderr and "maps 17 -> 8" in r.stderr


def test_error_in_user_code_reports_file_and_line():
    r = pigeon("compile", str(SPECS / "broken_user_code.py"))
    assert r.returncode != 0
    assert f"{SPECS / 'broken_user_code.py'}:7" in r.stderr and "AttributeError" in r.stderr


def test_ambiguous_and_missing_specs():
    r = pigeon("compile", str(SPECS / "two_layers.py"))
    assert r.returncode == 2 and "defines 2 layers" in r.stderr
    assert pigeon("compile", str(SPECS / "two_layers.py") + ":second").returncode == 0
    r = pigeon("compile", "no_such_model")
    assert r.returncode == 2 and "no spec" in r.stderr


def test_inspect_prints_statistics():
    r = pigeon("inspect")
    assert r.returncode == 0, r.stderr
    assert "edges" in r.stdout and "relations" in r.stdout


def test_bad_graph_name_is_a_clear_error():
    r = pigeon("compile", "rgcn", "--graph", "no_such_graph")
    assert r.returncode == 2 and "error:" in r.stderr
