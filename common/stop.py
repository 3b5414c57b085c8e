"""Stop requests: what SIGTERM, SIGINT and SIGHUP do to a trnft process.

Kubernetes stops a pod (node drain, eviction, spot reclaim, a deleted job) with SIGTERM to its first process,
then SIGKILL after ``terminationGracePeriodSeconds``. In a pod that process is ``trnft torchrun``; torch's
elastic agent forwards the signal to the workers and waits for them (:func:`grace_seconds`) before SIGKILL.

Two behaviours:

- **raising** (every stage but train, and the CLI itself): the signal raises :class:`Stopped` where the
  process is; staging folders are removed on the way out (they are removed on any exception) and the process
  exits ``128 + signal`` (143 for SIGTERM), which the cluster's exit-code policy retries.
- **cooperative** (the train stage, while steps run): the signal only sets a flag. After each optimizer step
  the ranks agree whether any of them was signalled (:func:`agreed_stop`, one small all-reduce); if so every
  rank writes the checkpoint of that step, and the stage then raises :class:`Stopped`. The work lost to an
  eviction is the step in flight, never the steps since the last scheduled save.
"""

from __future__ import annotations

import os
import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How long `trnft torchrun` lets its workers finish a step and save after forwarding a stop signal, before
# SIGKILL (torch's own default is 30 s). The train job's terminationGracePeriodSeconds is this plus a margin.
GRACE_ENV = "TRNFT_STOP_GRACE_S"
DEFAULT_GRACE_S = 300

_requested: list[int] = []


class Stopped(BaseException):
    """A stop signal ended the work: exit ``128 + signum``. A BaseException, so that no ``except Exception``
    on the way records it as a failure of the code it interrupted."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}" + (f": {detail}" if detail else ""))


def grace_seconds() -> int:
    try:
        return max(1, int(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S)))
    except ValueError:
        return DEFAULT_GRACE_S


def _raise(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def _remember(signum: int, frame: Any) -> None:
    if not _requested:
        _requested.append(signum)


def install_raising() -> None:
    """Stop signals raise :class:`Stopped` (only from the main thread, where Python allows handlers)."""
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, _raise)
        except ValueError:  # not the main thread
            return


def install_cooperative() -> None:
    """Stop signals set a flag that :func:`requested` and :func:`agreed_stop` read."""
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, _remember)
        except ValueError:
            return


def requested() -> int:
    """The first stop signal received in this process since cooperative handling began, or 0."""
    return _requested[0] if _requested else 0


def agreed_stop(device: Any = None) -> int:
    """The stop signal any rank received (the largest number), the same answer on every rank; 0 for none.

    Collective: every rank of the default process group must call it at the same point (after each optimizer
    step). Without a process group it is this process's own :func:`requested`.
    """
    import torch
    import torch.distributed as dist

    mine = requested()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    flag = torch.tensor([mine], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def reset() -> None:
    """Forget a received signal (tests; a new run in the same process)."""
    _requested.clear()
