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
