"""How a trnft process ends: one line for what a user can act on, a traceback only when asked for.

Every command (the ``trnft`` CLI, the trial run under ``neuron_parallel_compile``) runs its work through
:func:`run_command`, which turns a :class:`~trnft.common.errors.TrnftError`, or a storage error a user can
fix (a full disk, a read-only or unwritable path, a file where a folder must be), into one line on stderr
and a non-zero exit code. With ``--debug`` or ``TRNFT_DEBUG=1`` the full traceback, including the library
error a ``TrnftError`` was raised from, is printed before that line. Anything else escaping is a bug and
keeps Python's traceback.

Exit codes come in two classes that Kubernetes acts on (the PyTorchJob ``ExitCode`` restart policy of
training-operator v1.9 and the Jobs' ``podFailurePolicy``, both rendered by :mod:`trnft.jobspecs.render`):

* **permanent, 1-127**: the same job would fail the same way again (a config or input error, a full or
  read-only volume, out of device memory, a bug). The job fails at once and frees its nodes.
* **retryable, 128 and above**: the infrastructure failed (a process killed by a signal, e.g. the OOM
  killer's SIGKILL as 137 or an eviction's SIGTERM as 143; a lost peer, a collective or rendezvous timeout,
  a Neuron runtime error, a network file system that went away). The operator restarts the job, which
  resumes from its newest complete checkpoint. Failures Python sees are reported as ``EXIT_RETRYABLE``.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback
from collections.abc import Callable

from .errors import TrnftError
from .stop import Stopped

DEBUG_ENV = "TRNFT_DEBUG"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
# An infrastructure failure seen by Python. Above every 128 + signal number (signals stop at 64), so a
# log reader can tell it from a process killed by a signal.
EXIT_RETRYABLE = 200
FIRST_RETRYABLE = 128  # training-operator's IsRetryableExitCode: exitCode >= 128


def is_retryable(code: int) -> bool:
    """True for the exit codes the cluster should retry (see the module docstring)."""
    return code >= FIRST_RETRYABLE


def exit_code_of_process(returncode: int) -> int:
    """A child's exit status as a shell reports it: a signal N becomes 128 + N (SIGKILL is 137)."""
    return 128 - returncode if returncode < 0 else returncode


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(command: str, work: Callable[[], int], *, debug: bool = False) -> int:
    """Run ``work`` and return the process exit code; prints the one-line error of ``trnft <command>``."""
    try:
        return work()
    except TrnftError as exc:
        if debug_requested(debug):
            traceback.print_exc()
        print(f"trnft {command}: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Stopped as exc:
        print(
            f"trnft {command}: {exc}; exiting {exc.exit_code}, which the cluster retries (the rerun resumes)",
            file=sys.stderr,
            flush=True,
        )
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"trnft {command}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`trnft status | head -1`): what it read is all it wanted.
        _silence_stdout()
        return 0
    except Exception as exc:
        return _storage_infrastructure_or_bug(command, exc, debug)
    except BaseException as exc:
        # torch.distributed.checkpoint's CheckpointException derives from BaseException; it carries each
        # rank's own exception (a full volume, a lost peer).
        if type(exc).__name__ != "CheckpointException":
            raise
        return _storage_infrastructure_or_bug(command, exc, debug)


def _storage_infrastructure_or_bug(command: str, exc: BaseException, debug: bool) -> int:
    line = storage_failure(exc)
    if line is not None:
        if debug_requested(debug):
            traceback.print_exception(exc)
        print(f"trnft {command}: error: {line}", file=sys.stderr, flush=True)
        return EXIT_STORAGE
    return _infrastructure_or_bug(command, exc)


def _infrastructure_or_bug(command: str, exc: BaseException) -> int:
    """Retryable exit for an infrastructure failure (traceback kept: an operator reads it); else re-raise."""
    if out_of_device_memory(exc):
        print(
            f"trnft {command}: error: out of accelerator memory ({_first_line(exc)}); lower "
            "train.micro_batch_size or dataset.max_seq_length, or set train.activation_checkpointing=full",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_OUT_OF_DEVICE_MEMORY
    what = infrastructure_failure(exc)
    if what is None:
        raise exc  # a bug: Python prints its traceback and exits 1, which is permanent
    traceback.print_exc()
    print(
        f"trnft {command}: error: {what} ({type(exc).__name__}: {_first_line(exc)}); "
        f"exiting with {EXIT_RETRYABLE} so the cluster retries the job, which resumes from its last checkpoint",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_RETRYABLE


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"


# Exceptions that mean the infrastructure failed, by class name (so torch need not be imported to tell):
# torch.distributed's errors for a collective backend (NCCL, gloo), its network and its key-value store, and
# torch elastic's rendezvous errors.
INFRASTRUCTURE_EXCEPTIONS = {
    "DistBackendError": "a collective failed (a peer was lost or timed out)",
    "DistNetworkError": "the network between the processes failed",
    "DistStoreError": "the rendezvous store timed out or went away",
    "RendezvousError": "the rendezvous of the nodes failed",
    "RendezvousTimeoutError": "not every node joined the rendezvous in time",
    "RendezvousClosedError": "the rendezvous was closed by another node",
    "ConnectionError": "a connection between the processes failed",
    "TimeoutError": "an operation timed out",
}
# Words in a RuntimeError's message that mean the same (the runtime libraries raise plain RuntimeErrors):
# NCCL's watchdog and communicator errors; the Neuron runtime (NRT), its collectives (CCOM) and driver
# (TDRV) errors and its execution timeout.
INFRASTRUCTURE_MESSAGES = {
    "NCCL error": "a collective failed (NCCL)",
    "Watchdog caught collective operation timeout": "a collective timed out (NCCL watchdog)",
    "ncclRemoteError": "a peer failed during a collective (NCCL)",
    "ncclSystemError": "the network or a device failed during a collective (NCCL)",
    "NRT_": "the Neuron runtime failed",
    "nrt_": "the Neuron runtime failed",
    "CCOM": "a Neuron collective failed",
    "TDRV:": "the Neuron device driver reported an error",
    "NEURON_RT_EXEC_TIMEOUT": "a Neuron execution timed out",
}
# Storage errors that go away by themselves on a network file system (FSx, EFS) or after a reconnect.
TRANSIENT_STORAGE_ERRNOS = {
    errno.EIO: "an I/O error on the volume",
    errno.ESTALE: "a stale network file handle",
    errno.ETIMEDOUT: "the volume or a peer timed out",
    errno.ECONNRESET: "a connection was reset",
    errno.ENETUNREACH: "the network is unreachable",
    errno.EHOSTUNREACH: "a host is unreachable",
}
EXIT_OUT_OF_DEVICE_MEMORY = 3  # permanent: the same batch on the same device runs out again


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc``, the exceptions it was raised from, and (a distributed-checkpoint failure) each rank's own."""
    found: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or any(current is f for f in found):
            continue
        found.append(current)
        pending += [current.__cause__ or current.__context__]
        failures = (
            getattr(current, "failures", None) if type(current).__name__ == "CheckpointException" else None
        )
        if isinstance(failures, dict):
            pending += [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()]
    return [f for f in found if isinstance(f, BaseException)]


def infrastructure_failure(exc: BaseException) -> str | None:
    """What failed, when ``exc`` (or an exception it was raised from) is an infrastructure failure."""
    for current in _causes(exc):
        names = {cls.__name__ for cls in type(current).__mro__}
        for name, what in INFRASTRUCTURE_EXCEPTIONS.items():
            if name in names:
                return what
        if isinstance(current, OSError) and current.errno in TRANSIENT_STORAGE_ERRNOS:
            where = current.filename
            return TRANSIENT_STORAGE_ERRNOS[current.errno] + (f" at {where}" if where else "")
        if isinstance(current, RuntimeError):
            message = str(current)
            for marker, what in INFRASTRUCTURE_MESSAGES.items():
                if marker in message:
                    return what
    return None


def out_of_device_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error for an accelerator (CUDA raises torch.OutOfMemoryError)."""
    return any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__)


# Storage errors a user fixes by freeing space or choosing another path, with what to do. Every writer
# stages its output and removes the staging folder on failure, so an earlier output is still intact.
STORAGE_ERRORS = {
    errno.ENOSPC: "no space left on the device; free space or write elsewhere (nothing half-written was kept)",
    errno.EDQUOT: "the disk quota is used up; free space or write elsewhere (nothing half-written was kept)",
    errno.EROFS: "the file system is read-only; choose a writable path",
    errno.EACCES: "permission denied; choose a path this user may write, or fix its permissions",
    errno.EPERM: "operation not permitted; choose a path this user may write",
    errno.ENOTDIR: "a file is in the way where a folder must be; choose another path",
    errno.EISDIR: "a folder is in the way where a file must be; choose another path",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
}
EXIT_STORAGE = 1  # permanent: retrying the same job on the same volume cannot help


# numpy's tofile/save on a full volume: "<n> requested and <m> written", with no errno.
SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


# Writers that report a storage error without an OSError: Rust libraries (safetensors, tokenizers) put the
# OS error number in their message; torch.save's zip writer fails a short write with a position check.
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
TORCH_SHORT_WRITE = ("PytorchStreamWriter failed writing", "unexpected pos ")


def storage_failure(exc: BaseException) -> str | None:
    """The one line for a storage error a user fixes (full volume, read-only, permissions...), found in
    ``exc``, what it was raised from, or a distributed checkpoint's per-rank failures; else None."""
    for current in _causes(exc):
        if isinstance(current, OSError) and (line := storage_error_line(current)) is not None:
            return line
        message = str(current)
        if (m := RUST_OS_ERROR.search(message)) and int(m.group(1)) in STORAGE_ERRORS:
            advice = STORAGE_ERRORS[int(m.group(1))]
            return f"{type(current).__name__}: {advice[0].upper() + advice[1:]}"
        if isinstance(current, RuntimeError) and any(marker in message for marker in TORCH_SHORT_WRITE):
            return (
                "A torch file write stopped short: the volume is most likely full; free space or write "
                "elsewhere (nothing half-written was kept)"
            )
    return None


def storage_error_line(exc: OSError) -> str | None:
    """The one line for a storage error (naming the path when the OS says which), else None."""
    advice = STORAGE_ERRORS.get(exc.errno)  # type: ignore[arg-type]
    if advice is None and exc.errno is None and (short := SHORT_WRITE.search(str(exc))):
        advice = (
            f"a write stopped short ({short.group(2)} of {short.group(1)} bytes): the volume is most likely "
            "full; free space or write elsewhere (nothing half-written was kept)"
        )
    if advice is None:
        return None
    where = exc.filename or exc.filename2
    return f"{where}: {advice}" if where else advice[0].upper() + advice[1:]


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
