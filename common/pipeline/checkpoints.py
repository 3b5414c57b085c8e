"""Training checkpoints on disk: which are complete, which is newest, atomic saves and retention.

A checkpoint is ``<train dir>/checkpoint-<step>/``. A Neuron one counts as complete when every NxD tag
folder in it (``shards/``, ``adapter_shards/``, ``adapter_<name>/adapter_shards/``) has its ``done``
marker; a GPU one (distributed-checkpoint folders) when the checkpoint folder has its own ``done`` marker;
and, for checkpoints trnft writes, when it is no longer a staging folder. trnft writes a checkpoint into
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

from trnft.common.pipeline.atomic import swap_into_place

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging-"
TRNFT_STATE = "trnft_state"
DONE = "done"


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
    for tag in tags:  # NxD: every tag folder has its own marker
        if not (tag / DONE).is_file():
            return CheckpointInfo(path, step, False, f"{tag.relative_to(path)} has no '{DONE}' marker")
    if tags or (path / DONE).is_file():  # a GPU checkpoint: one marker for the folder
        return CheckpointInfo(path, step, True, "")
    return CheckpointInfo(path, step, False, f"no '{DONE}' marker and no shards/ or adapter_shards/ folder")


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
    staged = staging_dir(train_dir, step)
    staged.mkdir(parents=True)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    commit(train_dir, staged, step)


def write_done(folder: Path) -> None:
    """The ``done`` marker of a trnft (GPU) checkpoint: written last, flushed to disk."""
    path = folder / DONE
    with open(path, "w") as fh:
        fh.write("1")
        fh.flush()
        os.fsync(fh.fileno())


def staging_dir(train_dir: Path, step: int) -> Path:
    """A fresh staging folder name for checkpoint ``step`` (not created)."""
    return train_dir / f"checkpoint-{step}{STAGING}{uuid.uuid4().hex[:8]}"


def commit(train_dir: Path, staged: Path, step: int) -> None:
    """Rename a fully written staging folder to ``checkpoint-<step>`` (replacing an older save of it)."""
    swap_into_place(staged, train_dir / f"checkpoint-{step}")


def fault_point(where: str, step: int | str) -> None:
    """Fault injection for tests: ``TRNFT_FAULT=kill-during-<where>:<step>`` SIGKILLs this process there.

    Trainers call it mid-save (``save``, when a checkpoint is fully written, shards and ``done`` marker, but
    still a staging folder: the case a marker-only reader would wrongly accept) and after a step
    (``step``); every stage calls it as ``<stage>:started``, ``<stage>:written`` (the body returned) and
    ``<stage>:manifest`` (the manifest is written, the folder not yet renamed into place).

    ``TRNFT_FAULT=term-during-<where>:<step>`` sends SIGTERM instead (an eviction), to the rank named by
    ``TRNFT_FAULT_RANK`` when set (the others must learn of it from that rank), else to every rank;
    ``stall-during-<where>:<step>`` sleeps there for ``TRNFT_FAULT_STALL_S`` seconds (default a minute; a test
    then signals the process or races another one). Standalone commands call it as ``output:staged`` once
    they hold their output's lock.
    """
    fault = os.environ.get("TRNFT_FAULT", "")
    if fault == f"stall-during-{where}:{step}":
        import time

        time.sleep(float(os.environ.get("TRNFT_FAULT_STALL_S", "60")))
        return
    if fault not in (f"kill-during-{where}:{step}", f"term-during-{where}:{step}"):
        return
    only = os.environ.get("TRNFT_FAULT_RANK")
    if only is not None and os.environ.get("RANK", "0") != only:
        return
    import signal

    os.kill(os.getpid(), signal.SIGKILL if fault.startswith("kill-") else signal.SIGTERM)


def resume_point(train_dir: Path, fingerprint: str, log: Callable[[str], None]) -> Path | None:
    """The newest complete checkpoint written with these settings; reports and removes what cannot be used.

    Raises TrnftError when the newest complete checkpoint has no trnft state or other settings (resuming
    it would silently train something else).
    """
    import json

    from trnft.common.errors import TrnftError

    for leftover in staging_leftovers(train_dir):
        log(f"train: removing {leftover.name}, an interrupted save")
        shutil.rmtree(leftover, ignore_errors=True)
    for info in list_checkpoints(train_dir):
        if not info.complete:
            log(f"train: ignoring {info.path.name}: incomplete ({info.reason})")
    newest = newest_complete(train_dir)
    if newest is None:
        return None
    state_file = newest.path / TRNFT_STATE / "state.json"
    if not state_file.is_file():
        raise TrnftError(
            f"{newest.path}: has no {TRNFT_STATE}/state.json, so trnft cannot resume from it; pass --force to start over"
        )
    state = json.loads(state_file.read_text())
    if state.get("fingerprint") != fingerprint:
        raise TrnftError(
            f"{newest.path}: was written with other settings than this run's; pass --force to start train over"
        )
    return newest.path


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
