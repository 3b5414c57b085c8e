"""Outputs that appear whole or not at all: the one swap every writer of a folder goes through."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_into_place(staged: Path, final: Path) -> Path:
    """Rename the fully written folder ``staged`` to ``final``, replacing an existing ``final`` whole.

    A reader sees the old folder or the new one, never a mix: the old one is first renamed aside (to a hidden
    ``.<name>.replaced-<id>`` sibling), the new one takes its name, then the old one is deleted. The parent
    directory is synced so the rename survives a crash.
    """
    trash = None
    if final.exists():
        trash = final.with_name(f".{final.name}.replaced-{uuid.uuid4().hex[:8]}")
        os.rename(final, trash)
    os.rename(staged, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(final.parent)
    return final
