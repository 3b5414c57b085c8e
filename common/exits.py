"""How a trnft process ends: one line for what a user can act on, a traceback only when asked for.

Every command (the ``trnft`` CLI, the trial run under ``neuron_parallel_compile``) runs its work through
:func:`run_command`, which turns a :class:`~trnft.common.errors.TrnftError` into one line on stderr and
its ``exit_code``. With ``--debug`` or ``TRNFT_DEBUG=1`` the full traceback, including the library error a
``TrnftError`` was raised from, is printed before that line. Anything else escaping is a bug and keeps
Python's traceback.
"""

from __future__ import annotations

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


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
