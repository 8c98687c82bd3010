#!/usr/bin/env python3
"""Copy the CUTLASS/CuTe headers that pigeon's kernels include into a small directory, for a GPU
machine without the nvidia-cutlass wheel (the device tool's image): point PIGEON_CUTLASS_INCLUDE
at it there (scripts/gpu_session.sh does, for .gpu/cutlass_include).

The header set is what ``nvcc -M`` lists for the cached sources that include CUTLASS/CuTe (every
kernel prebuilt into $PIGEON_CACHE_DIR), plus cutlass/version.h (the version enters the cache key);
the headers of CUTLASS's example collectives (88_hopper_fmha/, from the wheel's source/examples) go
beside cute/ and cutlass/.

    PIGEON_CACHE_DIR=.gpu/cache python scripts/pack_cutlass_headers.py --out .gpu/cutlass_include
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pigeon.codegen import cutlass_headers  # noqa: E402
from pigeon.runtime.cache import SOURCE_NAME, default_cache_root  # noqa: E402
from pigeon.runtime.toolchain import nvcc_path  # noqa: E402


def headers_of(source: str, roots: tuple[str, ...], arch: str) -> set[tuple[str, str]]:
    """(root, path relative to it) of every header ``source`` includes from one of ``roots``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.cu"
        src.write_text(source, encoding="utf-8")
        out = subprocess.run([nvcc_path(), "-M", f"-arch={arch}", "--std=c++17", *cutlass_headers.build_flags(source),
                              str(src)], capture_output=True, text=True, check=True).stdout
    deps = [os.path.realpath(d) for d in out.replace("\\\n", " ").split()[1:]]
    found = set()
    for d in deps:
        for root in roots:
            r = os.path.realpath(root) + os.sep
            if d.startswith(r):
                found.add((root, os.path.relpath(d, r)))
                break
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--match", default="",
                    help="only sources containing this text (e.g. 'pigeon attention': the CUTLASS GEMM libraries "
                         "come prebuilt, and their headers are most of the size)")
    args = ap.parse_args(argv)
    inc = cutlass_headers.include_dir()
    sources = {}
    for p in default_cache_root().rglob(SOURCE_NAME):
        text = p.read_text(encoding="utf-8", errors="replace")
        if cutlass_headers.needs_cutlass(text) and args.match in text:
            sources[text] = p
    # the example collectives (88_hopper_fmha/...) land beside cute/ and cutlass/, where
    # cutlass_headers.examples_dir() looks first
    roots = (inc,)
    if any(cutlass_headers.needs_example(t) for t in sources):
        roots = (inc, cutlass_headers.examples_dir())
    needed = {(inc, os.path.join("cutlass", "version.h"))}
    for text in sources:
        needed |= headers_of(text, roots, args.arch)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for root, rel in sorted(needed):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(root, rel), tmp / rel)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)                              # never a half-written header directory
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{len(needed)} headers ({size / 2**20:.1f} MiB) from {len(sources)} cached CUTLASS/CuTe sources -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
