"""Running ``pigeon bench <kind>`` in this process for the benchmark CLI tests."""
import contextlib
import io


def run_bench(kind: str, *args):
    """``pigeon bench KIND ARGS``: (exit code, stdout, stderr)."""
    from pigeon.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["bench", kind, *map(str, args)])
        except SystemExit as e:      # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def one_error(stderr: str, *needles: str) -> None:
    """stderr is one ``error: ...`` line holding every needle."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


FILES = ("cases.json", "cases.md", "summary.json", "summary.md")


def quick_run(kind: str, out):
    """``pigeon bench KIND --quick --device cpu --out OUT``: (exit code, stdout, stderr, out)."""
    code, stdout, stderr = run_bench(kind, "--quick", "--device", "cpu", "--out", out)
    return code, stdout, stderr, out


def assert_files_written(code, stderr: str, out) -> None:
    """The run succeeded, wrote every results file and left no temporary file behind."""
    assert code == 0, stderr
    for name in FILES:
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]      # no temporary files left
