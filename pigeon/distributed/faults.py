"""Failing fast when a rank dies or stalls.

Every process group pigeon.distributed starts has a timeout (``init_from_env(timeout_s=...)`` ->
``init_process_group(timeout=timedelta(seconds=...))``): a gloo collective or send/recv that a peer never joins
raises after it instead of hanging; a peer whose process exited closes its sockets and the others' pending
operations raise at once.  :func:`guard` turns those errors into one :class:`RankFailure` that says which rank
saw it, in which step, and what the likely cause is."""
from __future__ import annotations

import contextlib

import torch.distributed as dist

__all__ = ["RankFailure", "guard"]


class RankFailure(RuntimeError):
    """A collective failed because another rank exited or stopped answering within the timeout."""


@contextlib.contextmanager
def guard(what: str, timeout_s: float | None = None):
    try:
        yield
    except RankFailure:
        raise
    except (RuntimeError, dist.DistError) as e:          # DistBackendError et al. derive from RuntimeError
        rank = dist.get_rank() if dist.is_initialized() else "?"
        world = dist.get_world_size() if dist.is_initialized() else "?"
        t = f" (process-group timeout {timeout_s:g} s)" if timeout_s is not None else ""
        raise RankFailure(f"rank {rank}/{world}: {what} failed: another rank exited or did not answer within the "
                          f"timeout{t}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
