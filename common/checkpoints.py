"""Training checkpoints on disk: which are complete, which is newest, atomic saves and retention.

A checkpoint is ``<train dir>/checkpoint-<step>/``. It counts as complete when every NxD tag folder in it
(``shards/``, ``adapter_shards/``, ``adapter_<name>/adapter_shards/``) has its ``done`` marker and, for
checkpoints trnft writes, when it is no longer a staging folder. trnft writes a checkpoint into
``checkpoint-<step>.staging-<id>/`` (``checkpoint`` marker first, ``done`` last) and renames it into place,
so a reader never sees half of one. Downstream stages always take the newest complete checkpoint; nothing
names ``checkpoint-<max_steps>``.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging-"
TRNFT_STATE = "trnft_state"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    complete: bool
    reason: str  # why it is incomplete ("" when complete)


def tag_dirs(checkpoint: Path) -> list[Path]:
    """The NxD tag folders of a checkpoint (model shards and adapter shards)."""
    found = []
    if (checkpoint / "shards").is_dir():
        found.append(checkpoint / "shards")
    if (checkpoint / "adapter_shards").is_dir():
        found.append(checkpoint / "adapter_shards")
    found += sorted(
        p / "adapter_shards" for p in checkpoint.glob("adapter_*") if (p / "adapter_shards").is_dir()
    )
    return found


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    m = CHECKPOINT_DIR.match(path.name)
    step = int(m.group(1)) if m else -1
    tags = tag_dirs(path)
    if not tags:
        return CheckpointInfo(path, step, False, "no shards/ or adapter_shards/ folder")
    for tag in tags:
        if not (tag / "done").is_file():
            return CheckpointInfo(path, step, False, f"{tag.relative_to(path)} has no 'done' marker")
    return CheckpointInfo(path, step, True, "")


def list_checkpoints(train_dir: Path) -> list[CheckpointInfo]:
    """Every ``checkpoint-<step>`` folder, oldest first, with its completeness."""
    if not train_dir.is_dir():
        return []
    infos = [
        inspect_checkpoint(p) for p in train_dir.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name)
    ]
    return sorted(infos, key=lambda i: i.step)


def newest_complete(train_dir: Path) -> CheckpointInfo | None:
    complete = [i for i in list_checkpoints(train_dir) if i.complete]
    return complete[-1] if complete else None


def staging_leftovers(train_dir: Path) -> list[Path]:
    """Staging folders of interrupted saves (never valid checkpoints)."""
    if not train_dir.is_dir():
        return []
    return sorted(
        p
        for p in train_dir.iterdir()
        if p.is_dir() and STAGING in p.name and p.name.startswith("checkpoint-")
    )


@contextmanager
def atomic_checkpoint(train_dir: Path, step: int) -> Iterator[Path]:
    """A staging folder for checkpoint ``step``, renamed to ``checkpoint-<step>`` when the body returns.

    On an exception the staging folder is removed. A process killed inside the body leaves only a
    staging folder, which :func:`list_checkpoints` never reports.
    """
    final = train_dir / f"checkpoint-{step}"
    staged = train_dir / f"checkpoint-{step}{STAGING}{uuid.uuid4().hex[:8]}"
    staged.mkdir(parents=True)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if final.exists():
        # A previous save of the same step (a resumed run saving again); replace it whole.
        trash = train_dir / f".checkpoint-{step}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        os.rename(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staged, final)
    fd = os.open(train_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(train_dir: Path, keep: int, log: Callable[[str], None] = print) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, incomplete ones older than the newest
    complete, and staging leftovers. Returns what was removed."""
    infos = list_checkpoints(train_dir)
    complete = [i for i in infos if i.complete]
    newest = complete[-1].step if complete else -1
    remove = [i.path for i in complete[:-keep]] if keep > 0 else []
    remove += [i.path for i in infos if not i.complete and i.step < newest]
    remove += staging_leftovers(train_dir)
    for path in remove:
        shutil.rmtree(path, ignore_errors=True)
        log(f"checkpoints: removed {path.name}")
    return remove
