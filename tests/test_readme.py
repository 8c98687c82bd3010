"""The README's Python blocks run as written.

Every fenced block opened with ```python in README.md is executed, in order, in one namespace (a
block may use names an earlier block defined, as a reader running them one after another would),
with the repository root as the working directory.  A block that raises fails the test, naming the
block's first line in README.md.

Blocks that need what CI does not have say so on their first line, and are skipped where it is
missing (the skip says which block and why):

    # needs: gpu      a CUDA device (torch.cuda.is_available())
    # needs: nvcc     the CUDA compiler (pigeon.runtime.build.nvcc_available())
    # needs: data     the real datasets: PIGEON_DATA names a directory (docs/datasets.md)

Several may be combined (``# needs: gpu, data``).  Put everything else that cannot run here
(shell commands, output, error messages) in ```bash or ```text blocks, which are not run.
The kernel cache is the test session's own (tests/conftest.py).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NEEDS_RE = re.compile(r"^#\s*needs:\s*(.+?)\s*$")
FENCE_RE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the block's first code line, code) for every ```python block, in order."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise AssertionError(f"README.md:{i + 1}: code block is never closed")
        if lang.lower() in ("python", "py", "python3"):
            blocks.append((i + 2, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def _missing(need: str) -> str | None:
    """Why ``need`` is not met here, or None when it is."""
    if need == "gpu":
        import torch
        return None if torch.cuda.is_available() else "no CUDA device"
    if need == "nvcc":
        from pigeon.runtime.build import nvcc_available
        return None if nvcc_available() else "nvcc not found"
    if need == "data":
        d = os.environ.get("PIGEON_DATA")
        return None if d and Path(d).is_dir() else "PIGEON_DATA does not name a datasets directory"
    raise AssertionError(f"unknown requirement {need!r} in a README '# needs:' line; "
                         f"known: gpu, nvcc, data (see tests/test_readme.py)")


def needs(code: str) -> list[str]:
    first = code.lstrip("\n").splitlines()[0] if code.strip() else ""
    m = NEEDS_RE.match(first)
    return [n.strip() for n in m.group(1).split(",") if n.strip()] if m else []


def test_readme_has_python_blocks():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```python block"


def test_block_extraction():
    text = "a\n```python\nx = 1\n```\n```bash\nnot python\n```\n  ```python\n  y = x\n  ```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = x\n")]
    assert needs("# needs: gpu, data\nimport torch\n") == ["gpu", "data"]
    assert needs("import torch\n") == []


def test_readme_python_blocks_run(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__readme__"}
    skipped = []
    for line, code in python_blocks(README.read_text(encoding="utf-8")):
        why = [f"{n}: {w}" for n in needs(code) if (w := _missing(n))]
        if why:
            skipped.append(f"README.md:{line} ({'; '.join(why)})")
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"the python block at README.md:{line} raised {type(e).__name__}: {e}\n{code}")
    capsys.readouterr()       # the blocks' prints are for readers, not for the test log
    if skipped:
        pytest.skip("ran every block but " + ", ".join(skipped))
