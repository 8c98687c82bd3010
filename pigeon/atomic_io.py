"""Files written whole or not at all: a temporary file in the target's folder, flushed (and fsynced,
so a crash cannot leave a renamed but empty file), then ``os.replace``d over the target.  A full disk
or any other error removes the temporary file and re-raises; the target keeps its old content.
One definition for every writer in pigeon: bench results, tuning records, cache records, latency
tables, saved graphs.  Standard library only, so any layer may use it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["write_atomic", "save_atomic"]


def save_atomic(path, write: Callable[[str], None]) -> Path:
    """``write(tmp_name)`` fills a temporary file, which then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_atomic(path, data: str | bytes) -> Path:
    """``data`` (text as UTF-8, or bytes) as the whole content of ``path``."""
    raw = data.encode("utf-8") if isinstance(data, str) else data

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(raw)
    return save_atomic(path, write)
