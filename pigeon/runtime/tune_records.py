"""Tuning records of ``pigeon compile --tune``, kept beside the kernel cache's entries:

    <cache root>/tune/<key[:2]>/<key>.json      one record: the winner's choices and every candidate

The key (pigeon/tune.py: ``tune_key``) covers the spec's traced IR, hyperparameters, dims, dtype, the
graph's statistics, the device name and the tuning mode.  A record is written to a temporary file in
the same directory, fsynced and renamed onto its name, so a reader never sees half of one; a record
that cannot be read (or names another key) is ignored and measured again.  The root is the kernel
cache's (``PIGEON_CACHE_DIR``), with its fallback when that cannot be written."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .cache import KernelCache
from ..atomic_io import write_atomic

__all__ = ["TuneRecords"]

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


class TuneRecords:
    def __init__(self, root: str | os.PathLike | None = None):
        self.cache = KernelCache(root)

    def _path(self, key: str, root: Path) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"not a tuning key (64 lowercase hex digits): {key!r}")
        return root / "tune" / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        for root in self.cache._roots():
            path = self._path(key, root)
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and rec.get("key") == key and isinstance(rec.get("choices"), dict):
                return rec
        return None

    def put(self, key: str, record: dict) -> Path:
        path = self._path(key, self.cache.write_root)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, json.dumps(record, indent=1, sort_keys=True, default=str))
