"""Test-session setup shared by every test (tests/gpu/conftest.py adds the GPU skip on top).

Kernel builds are cached on disk: ``PIGEON_CACHE_DIR`` (nvcc/NVRTC cubins, pigeon/runtime/cache.py,
default ``~/.cache/pigeon``) and ``PIGEON_EMULATE_CACHE`` (host builds of the CUDA emulator,
pigeon/runtime/emulate.py).  The test session must not fill the user's own caches, so each one
left unset is pointed at a fresh temporary directory, set in ``os.environ`` before any test module is
imported (subprocesses such as the CLI tests inherit it) and removed when the session ends.  A cache
the caller set explicitly is kept: scripts/gpu_session.sh points ``PIGEON_CACHE_DIR`` at prebuilt cubins.
"""
from __future__ import annotations

import os
import shutil
import tempfile

CACHE_VARS = ("PIGEON_CACHE_DIR", "PIGEON_EMULATE_CACHE")
_session_dirs: list[str] = []


def pytest_configure(config):
    unset = [v for v in CACHE_VARS if not os.environ.get(v)]
    if not unset:
        return
    base = tempfile.mkdtemp(prefix="pigeon-test-cache-")
    _session_dirs.append(base)
    for var in unset:
        path = os.path.join(base, var.lower())
        os.makedirs(path)
        os.environ[var] = path
    os.environ["PIGEON_TEST_SESSION_CACHE"] = base


def pytest_unconfigure(config):
    while _session_dirs:
        base = _session_dirs.pop()
        for var in CACHE_VARS:
            if os.environ.get(var, "").startswith(base + os.sep):
                del os.environ[var]
        os.environ.pop("PIGEON_TEST_SESSION_CACHE", None)
        shutil.rmtree(base, ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _grad_mode_is_left_on():
    """Grad mode is thread state: a test that leaves it off fails every later test that trains (CI at
    139be11: one timed-out bench peer switched it off for 172 tests). The test that leaves it off
    fails here, by name, and the mode is put back for the rest."""
    import torch
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left torch's grad mode off", pytrace=False)
