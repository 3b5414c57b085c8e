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

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How long `trnft torchrun` lets its workers finish a step and save after forwarding a stop signal, before
# SIGKILL (torch's own default is 30 s). The train job's terminationGracePeriodSeconds is this plus a margin.
GRACE_ENV = "TRNFT_STOP_GRACE_S"
DEFAULT_GRACE_S = 300
# Set by a local `trnft train` for the workers it starts (see die_with_parent).
DIE_WITH_PARENT_ENV = "TRNFT_DIE_WITH_PARENT"

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


def install_raising(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> dict[int, Any]:
    """Stop signals raise :class:`Stopped`; returns the handlers they replace (for :func:`restore`).

    SIGINT keeps Python's KeyboardInterrupt (the CLI reports it as 130 already). Only the main thread may
    set handlers; elsewhere nothing changes.
    """
    previous: dict[int, Any] = {}
    for sig in signals:
        try:
            previous[sig] = signal.signal(sig, _raise)
        except ValueError:  # not the main thread
            break
    return previous


def restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def install_cooperative() -> None:
    """Stop signals set a flag that :func:`requested` and :func:`agreed_stop` read."""
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, _remember)
        except ValueError:
            return


def install_cooperative_keeping() -> dict[int, Any]:
    """:func:`install_cooperative`, returning the handlers it replaced (for :func:`restore`)."""
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    reset()
    install_cooperative()
    return previous


def requested() -> int:
    """The first stop signal received in this process since cooperative handling began, or 0."""
    return _requested[0] if _requested else 0


def agreed_stop(device: Any = None, group: Any = None) -> int:
    """The stop signal any rank received (the largest number), the same answer on every rank; 0 for none.

    Collective: every rank of the default process group must call it at the same point (after each optimizer
    step); ``group`` (default: the default group) may be a gloo group on CPU when the default one is a
    device's. Without a process group it is this process's own :func:`requested`.
    """
    import torch
    import torch.distributed as dist

    mine = requested()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    flag = torch.tensor([mine], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


def reset() -> None:
    """Forget a received signal (tests; a new run in the same process)."""
    _requested.clear()


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, even by SIGKILL (``prctl(PR_SET_PDEATHSIG)``).

    torch's launcher starts workers in their own sessions, so a local ``trnft train`` killed outright would
    leave them training; the workers it starts call this first.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def workers_get_grace(seconds: int, torchrun_args: Any = None) -> Iterator[None]:
    """While torch's elastic agent runs here, a stop signal gives its workers ``seconds`` (not torch's 30) to
    exit after it forwards the signal, before SIGKILL.

    The current line's torchrun has the option itself (torch 2.14: ``--shutdown-timeout``, which the agent
    passes to ``PContext.close``): it is set on ``torchrun_args`` unless the command line gave one. The trn1
    line's torch 2.8 has none; its agent calls ``PContext.close(death_sig)`` with the default ``timeout``
    (``close(self, death_sig=None, timeout=30)``), whose default is changed here. Both pinned in
    tests/common/test_stop.py.
    """
    if torchrun_args is not None and hasattr(torchrun_args, "shutdown_timeout"):
        if torchrun_args.shutdown_timeout is None:
            torchrun_args.shutdown_timeout = seconds
        yield
        return
    from torch.distributed.elastic.multiprocessing.api import PContext

    original = PContext.close

    def close(self: Any, death_sig: Any = None, timeout: int = seconds) -> None:
        original(self, death_sig, timeout)

    PContext.close = close  # type: ignore[method-assign]
    try:
        yield
    finally:
        PContext.close = original  # type: ignore[method-assign]


def _worker_starts_plain(initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> None:
    # Runs first in each forked worker: the stop handlers the parent installed are not the worker's (a
    # raising one prints a traceback from the worker, a cooperative one makes it ignore the pool's SIGTERM
    # and hang on the task-queue lock), so it takes the default action, then accepts the signals the
    # parent blocked around the fork.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def worker_pool(
    processes: int, initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = ()
) -> Iterator[Any]:
    """A ``multiprocessing`` pool of forked workers that never see trnft's stop handlers.

    Stop signals are blocked in this thread while the workers are forked (a signal that arrives then waits,
    and is handled here once they exist); each worker resets them to the default action before
    ``initializer`` runs. When the block ends normally the pool is closed and joined, so no signal is sent
    to a worker (``Pool.__exit__`` would ``terminate()`` them with SIGTERM); when it ends by an exception
    (a stop request included) the workers are terminated, which the default action makes immediate.
    """
    import multiprocessing

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pool = multiprocessing.get_context("fork").Pool(
            processes, initializer=_worker_starts_plain, initargs=(initializer, initargs)
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        yield pool
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


def signal_of_agent_exception(exc: BaseException) -> int | None:
    """The signal number of torch elastic's SignalException (the agent was told to stop), else None."""
    if type(exc).__name__ == "SignalException" and hasattr(exc, "sigval"):
        return int(exc.sigval)
    return None
