"""How a trnft process ends: one line for what a user can act on, a traceback only when asked for.

Every command (the ``trnft`` CLI, the trial run under ``neuron_parallel_compile``) runs its work through
:func:`run_command`, which turns a :class:`~trnft.common.errors.TrnftError`, or a storage error a user can
fix (a full disk, a read-only or unwritable path, a file where a folder must be), into one line on stderr
and a non-zero exit code. With ``--debug`` or ``TRNFT_DEBUG=1`` the full traceback, including the library
error a ``TrnftError`` was raised from, is printed before that line. Anything else escaping is a bug and
keeps Python's traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable

from trnft.common.errors import TrnftError

DEBUG_ENV = "TRNFT_DEBUG"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


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
    except KeyboardInterrupt:
        print(f"trnft {command}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`trnft status | head -1`): what it read is all it wanted.
        _silence_stdout()
        return 0
    except OSError as exc:
        line = storage_error_line(exc)
        if line is None:
            raise  # not a storage problem a user can fix by choosing a path: a bug, keep its traceback
        if debug_requested(debug):
            traceback.print_exc()
        print(f"trnft {command}: error: {line}", file=sys.stderr, flush=True)
        return EXIT_STORAGE


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


def storage_error_line(exc: OSError) -> str | None:
    """The one line for a storage error (naming the path when the OS says which), else None."""
    advice = STORAGE_ERRORS.get(exc.errno)  # type: ignore[arg-type]
    if advice is None:
        return None
    where = exc.filename or exc.filename2
    return f"{where}: {advice}" if where else advice[0].upper() + advice[1:]


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
