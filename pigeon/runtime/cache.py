"""Disk cache of compiled kernels.

Layout of the cache root (``$PIGEON_CACHE_DIR``, default ``~/.cache/pigeon``)::

    <root>/<key[:2]>/<key>/kernel.cu       the kernel source
    <root>/<key[:2]>/<key>/kernel.cubin    the compiled code (or kernel.so: a host shared library,
                                           pigeon/runtime/hostlib.py)
    <root>/<key[:2]>/<key>/meta.json       arch, flags, compiler, ptxas report, resources, checksums
    <root>/<key[:2]>/.tmp-<key>-*/         an entry being written (renamed onto <key>/ when complete)
    <root>/failed/<key>.cu, <key>.log      sources of failed builds, kept for the user
    <root>/records/<key>.json              small JSON records keyed by a caller's sha256 (e.g. the
                                           CUDA source TVM generated for a named kernel, so a
                                           machine without TVM finds the source, hence the entry)

The key is a sha256 over the kernel source, the target arch, the compiler identity, the build flags and
pigeon's version. An entry is written into a temporary directory next to its final name and moved there
with one ``os.rename``, so a reader never sees half an entry and a crash leaves at most a stale temporary
directory. When two processes build the same kernel at once, the first rename wins and the loser discards
its copy. An entry that fails validation on read (missing file, unreadable meta.json, wrong checksum) is
removed, and ``get_or_build`` builds it again.

A root that cannot be written (a file, a read-only directory, a full disk) is not fatal: the cache warns
once, naming the bad path, and writes its entries under a per-user temporary directory instead
(``$TMPDIR/pigeon-cache-<uid>``); entries already present under the bad root are still read. When the
fallback cannot be written either, :class:`CacheWriteError` (an ``OSError``) says which path failed and
why; no half-written entry is left behind in either case.

This module needs neither torch nor a GPU.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..atomic_io import write_atomic

__all__ = [
    "CacheEntry",
    "CacheWriteError",
    "KernelCache",
    "default_cache_root",
    "pigeon_version",
    "CUBIN_NAME",
    "LIBRARY_NAME",
    "SOURCE_NAME",
    "META_NAME",
]

CUBIN_NAME = "kernel.cubin"
LIBRARY_NAME = "kernel.so"          # the main file of a host-library entry, in place of the cubin
SOURCE_NAME = "kernel.cu"
META_NAME = "meta.json"
# Bumped when the entry format changes; part of every key, so old entries are simply never hit.
CACHE_FORMAT = "pigeon-kernel-cache-v1"

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
# errors of a root that cannot hold entries: they make the cache fall back to a temporary root
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOENT,
               errno.ENOSPC, errno.EDQUOT}


class CacheWriteError(OSError):
    """A cache entry could not be written, to the configured root nor to the temporary fallback."""


def fallback_cache_root() -> Path:
    """Where entries go when the configured root cannot be written: ``$TMPDIR/pigeon-cache-<uid>``."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"pigeon-cache-{uid}"


def _describe(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def root_problem(root: Path) -> str | None:
    """Why entries cannot be written under ``root`` (None if they can): creates the directory and
    a probe file, so a read-only directory or full disk is found before a build, not after."""
    if root.exists() and not root.is_dir():
        return "it is not a directory"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=_TMP_PREFIX + "probe-", dir=root)
        try:
            os.write(fd, b"pigeon")
            os.fsync(fd)
        finally:
            os.close(fd)
            try:
                os.unlink(probe)
            except OSError:
                pass
    except OSError as e:
        return _describe(e)
    return None


_WARNED: set[tuple[str, str]] = set()


def _warn_fallback(bad: Path, problem: str, fallback: Path) -> None:
    key = (str(bad), str(fallback))
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(f"pigeon: kernel cache {bad} is not usable ({problem}); caching kernels in {fallback} "
                  f"instead (set PIGEON_CACHE_DIR to a writable directory)", RuntimeWarning, stacklevel=3)


def default_cache_root() -> Path:
    """``$PIGEON_CACHE_DIR`` if set and non-empty, else ``~/.cache/pigeon``."""
    env = os.environ.get("PIGEON_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/pigeon").expanduser()


def pigeon_version() -> str:
    """pigeon's version from its source tree (``pigeon/_version.py``), the same whether pigeon is
    pip-installed or run from a checkout on ``PYTHONPATH``: a cache built on one machine must be
    hit on another (installed-package metadata is absent in a bare checkout, and keying on it made
    every carried entry miss there)."""
    from .._version import __version__
    return __version__


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _main_name(names) -> str | None:
    """The entry's compiled file: kernel.cubin, else kernel.so; None without either."""
    for n in (CUBIN_NAME, LIBRARY_NAME):
        if n in names:
            return n
    return None


@dataclass(frozen=True)
class CacheEntry:
    """One valid cache entry. ``meta`` is the parsed meta.json (treat as read-only)."""

    path: Path
    cubin_path: Path
    meta: Mapping[str, Any] = field(compare=False, hash=False, repr=False)

    @property
    def key(self) -> str:
        return self.path.name

    @property
    def source_path(self) -> Path:
        return self.path / SOURCE_NAME

    def read_cubin(self) -> bytes:
        return self.cubin_path.read_bytes()

    def read_source(self) -> str:
        return self.source_path.read_text(encoding="utf-8")

    @property
    def resources(self) -> Mapping[str, Any]:
        """Per-kernel resource numbers from ptxas (registers, smem, stack, spills), if recorded."""
        return self.meta.get("resources", {})


class KernelCache:
    """A directory of compiled kernels keyed by :meth:`key`; safe for concurrent processes."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        # where new entries are written: self.root, or the fallback once self.root proved unwritable
        self._write_root: Path | None = None

    @property
    def write_root(self) -> Path:
        """The directory new entries go to: :attr:`root`, or (with a one-time warning) the temporary
        fallback when :attr:`root` cannot be written."""
        if self._write_root is None:
            problem = root_problem(self.root)
            self._write_root = self.root if problem is None else self._fall_back(self.root, problem)
        return self._write_root

    def _fall_back(self, bad: Path, problem: str) -> Path:
        fallback = fallback_cache_root()
        if fallback == bad or root_problem(fallback) is not None:
            try:
                fallback = Path(tempfile.mkdtemp(prefix="pigeon-cache-"))
            except OSError as e:
                raise CacheWriteError(e.errno, f"kernel cache {bad} is not usable ({problem}), and no "
                                      f"temporary directory can be made to fall back to ({_describe(e)}); "
                                      f"set PIGEON_CACHE_DIR to a writable directory") from e
        _warn_fallback(bad, problem, fallback)
        self._write_root = fallback
        return fallback

    def _roots(self) -> list[Path]:
        """Roots entries are read from: the configured one, then the fallback in use (if any)."""
        roots = [self.root]
        if self._write_root is not None and self._write_root != self.root:
            roots.append(self._write_root)
        return roots

    def __repr__(self) -> str:
        return f"KernelCache({str(self.root)!r})"

    # ------------------------------------------------------------------ keys and paths

    @staticmethod
    def key(
        source: str,
        arch: str,
        flags: Sequence[str] = (),
        *,
        compiler: str | None = None,
        version: str | None = None,
    ) -> str:
        """sha256 (hex) over source, arch, compiler identity, flags and pigeon version.

        ``compiler`` defaults to :func:`pigeon.runtime.build.compiler_identity` (the full
        ``nvcc --version`` text, or the NVRTC version when only NVRTC is there).
        """
        if isinstance(flags, (str, bytes)):
            raise TypeError("flags must be a sequence of strings, not a single string")
        if compiler is None:
            from .toolchain import compiler_identity

            compiler = compiler_identity()
        if version is None:
            version = pigeon_version()
        payload = json.dumps(
            {
                "format": CACHE_FORMAT,
                "source": source,
                "arch": arch,
                "compiler": compiler,
                "flags": [str(f) for f in flags],
                "pigeon": version,
            },
            sort_keys=True,
            ensure_ascii=True,
        )
        return _sha256(payload.encode("utf-8"))

    def entry_dir(self, key: str, root: Path | None = None) -> Path:
        self._check_key(key)
        return (self.root if root is None else root) / key[:2] / key

    @property
    def failed_dir(self) -> Path:
        """Where the sources and logs of failed builds are kept (under :attr:`write_root`)."""
        return self.write_root / "failed"

    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"not a cache key (64 lowercase hex digits): {key!r}")

    # ------------------------------------------------------------------ read

    def get(self, key: str) -> CacheEntry | None:
        """The valid entry for ``key``, or None. A corrupted entry is removed and None returned."""
        for root in self._roots():
            path = self.entry_dir(key, root)
            try:
                if not path.exists():
                    continue
            except OSError:   # e.g. a root under an unreadable directory
                continue
            entry, problem = self._validate(key, path)
            if entry is not None:
                return entry
            self._discard(path, reason=problem)
        return None

    def _validate(self, key: str, path: Path) -> tuple[CacheEntry | None, str]:
        meta_path = path / META_NAME
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, "meta.json missing"
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return None, f"meta.json unreadable: {e}"
        if not isinstance(meta, dict):
            return None, "meta.json is not an object"
        if meta.get("key") != key:
            return None, "meta.json names another key"
        checksums = meta.get("files")
        main = _main_name(checksums) if isinstance(checksums, dict) else None
        if main is None:
            return None, "meta.json lacks file checksums"
        if meta.get("cubin_sha256") != checksums.get(main):
            return None, "cubin checksum fields disagree"
        for name, digest in checksums.items():
            if not isinstance(name, str) or not _FILE_NAME_RE.match(name):
                return None, f"bad file name in meta.json: {name!r}"
            try:
                data = (path / name).read_bytes()
            except OSError as e:
                return None, f"{name} unreadable: {e}"
            if _sha256(data) != digest:
                return None, f"{name} checksum mismatch"
        return CacheEntry(path=path, cubin_path=path / main, meta=meta), ""

    def _discard(self, path: Path, reason: str = "") -> None:
        """Remove a (corrupted) entry: rename it out of the way first, so the final name frees at once."""
        trash = path.parent / f"{_TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return  # another process removed it already
        except OSError:
            trash = path
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ write

    def put(self, key: str, files: Mapping[str, bytes], meta: Mapping[str, Any] | None = None) -> CacheEntry:
        """Write an entry atomically and return it (or the entry another process wrote first).

        ``files`` maps file names (``kernel.cubin`` required, ``kernel.cu`` customary) to bytes;
        ``meta`` is merged into meta.json together with the key, checksums and a timestamp.
        """
        self._check_key(key)
        main = _main_name(files)
        if main is None:
            raise ValueError(f"a cache entry needs {CUBIN_NAME!r} (or {LIBRARY_NAME!r})")
        for name, data in files.items():
            if not _FILE_NAME_RE.match(name) or name == META_NAME:
                raise ValueError(f"bad file name for a cache entry: {name!r}")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"{name}: expected bytes, got {type(data).__name__}")

        full_meta: dict[str, Any] = dict(meta or {})
        checksums = {name: _sha256(bytes(data)) for name, data in files.items()}
        now = time.time()
        full_meta.update(
            key=key,
            files=checksums,
            cubin_sha256=checksums[main],
            timestamp=now,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        )
        meta_bytes = json.dumps(full_meta, indent=2, sort_keys=True, default=str).encode("utf-8")

        root = self.write_root
        try:
            return self._install(key, root, files, full_meta, meta_bytes)
        except CacheWriteError:
            raise
        except OSError as e:
            if e.errno not in _UNWRITABLE:
                raise
            first = e
        if root == self.root:   # e.g. the disk filled up after the probe: try the fallback once
            fallback = self._fall_back(root, _describe(first))
            try:
                return self._install(key, fallback, files, full_meta, meta_bytes)
            except OSError as e:
                raise CacheWriteError(e.errno, f"cannot write kernel cache entry {key[:16]}: {_describe(first)} "
                                      f"in {root}, and {_describe(e)} in the fallback {fallback}; free space "
                                      f"or set PIGEON_CACHE_DIR to a writable directory") from e
        raise CacheWriteError(first.errno, f"cannot write kernel cache entry {key[:16]} in {root}: "
                              f"{_describe(first)}; free space or set PIGEON_CACHE_DIR to a writable "
                              f"directory") from first

    def _install(self, key: str, root: Path, files: Mapping[str, bytes], full_meta: dict[str, Any],
                 meta_bytes: bytes) -> CacheEntry:
        """Write the entry into a temporary directory under ``root`` and rename it into place; on any
        error the temporary directory is removed, so no half entry is ever visible or left behind."""
        final = self.entry_dir(key, root)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key[:16]}-", dir=final.parent))
        try:
            for name, data in files.items():
                _write_file(tmp / name, bytes(data))
            _write_file(tmp / META_NAME, meta_bytes)  # last: an entry with meta.json is complete
            _fsync_dir(tmp)
            for _attempt in range(3):
                try:
                    os.rename(tmp, final)
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EACCES, errno.EPERM):
                        raise
                    # Another process got there first. Use its entry if valid; if it is corrupted,
                    # get() removes it and we try our rename again.
                    if e.errno in (errno.EACCES, errno.EPERM) and not final.exists():
                        raise   # nothing in the way: the directory refuses the rename itself
                    existing = self.get(key)
                    if existing is not None:
                        return existing
                    continue
                else:
                    _fsync_dir(final.parent)
                    return CacheEntry(path=final, cubin_path=final / _main_name(files), meta=full_meta)
            raise OSError(f"could not install cache entry {final} (kept being replaced)")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def get_or_build(
        self,
        source: str,
        arch: str,
        flags: Sequence[str],
        build_fn: Callable[[], tuple[Mapping[str, bytes], Mapping[str, Any]]],
        *,
        compiler: str | None = None,
        version: str | None = None,
    ) -> CacheEntry:
        """Return the cached entry for this kernel, building it with ``build_fn`` on a miss.

        ``build_fn()`` returns ``(files, meta)`` as for :meth:`put`; ``kernel.cu`` is added from
        ``source`` when missing. If ``build_fn`` raises, nothing is written.
        """
        key = self.key(source, arch, flags, compiler=compiler, version=version)
        entry = self.get(key)
        if entry is not None:
            return entry
        files, meta = build_fn()
        files = dict(files)
        files.setdefault(SOURCE_NAME, source.encode("utf-8"))
        meta = dict(meta)
        meta.setdefault("arch", arch)
        meta.setdefault("flags", list(flags))
        if compiler is not None:
            meta.setdefault("compiler", compiler)
        meta.setdefault("pigeon_version", version if version is not None else pigeon_version())
        return self.put(key, files, meta)

    # ------------------------------------------------------------------ records

    def record_path(self, key: str, root: Path | None = None) -> Path:
        self._check_key(key)
        return (self.root if root is None else root) / "records" / f"{key}.json"

    def get_record(self, key: str) -> dict | None:
        """The JSON record stored under ``key`` (a caller's sha256), or None (unreadable: None)."""
        for root in self._roots():
            try:
                data = json.loads(self.record_path(key, root).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            if isinstance(data, dict) and data.get("key") == key:
                return data
        return None

    def put_record(self, key: str, record: Mapping[str, Any]) -> Path:
        """Write ``record`` (JSON-able) under ``key`` atomically (temporary file, then rename)."""
        data = json.dumps({**record, "key": key}, indent=1, sort_keys=True).encode("utf-8")
        path = self.record_path(key, self.write_root)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, data)

    # ------------------------------------------------------------------ maintenance

    def entries(self) -> list[Path]:
        """Final entry directories present (not validated)."""
        if not self.root.is_dir():
            return []
        out = []
        for shard in sorted(self.root.iterdir()):
            if shard.is_dir() and re.fullmatch(r"[0-9a-f]{2}", shard.name):
                out.extend(p for p in sorted(shard.iterdir()) if p.is_dir() and _KEY_RE.match(p.name))
        return out

    def prune_temp(self, max_age_s: float = 3600.0) -> int:
        """Remove temporary/trash directories older than ``max_age_s`` (left by crashed writers)."""
        if not self.root.is_dir():
            return 0
        n = 0
        now = time.time()
        for shard in self.root.iterdir():
            if not (shard.is_dir() and re.fullmatch(r"[0-9a-f]{2}", shard.name)):
                continue
            for p in shard.iterdir():
                if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                    try:
                        if now - p.stat().st_mtime >= max_age_s:
                            shutil.rmtree(p, ignore_errors=True)
                            n += 1
                    except FileNotFoundError:
                        pass
        return n

    def clear(self) -> None:
        """Remove every entry, temporary directory and kept failed source under the root.

        Only names this cache creates are touched (two-hex-digit shards, ``failed/``, ``records/``), so a root
        pointed at a directory holding other files loses none of them.
        """
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.is_dir() and (re.fullmatch(r"[0-9a-f]{2}", p.name) or p.name in ("failed", "records")):
                shutil.rmtree(p, ignore_errors=True)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
