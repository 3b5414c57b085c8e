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

from .atomic import swap_into_place

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
    """Record every file's size and CRC-32 in the staging folder (:func:`write_checksums`), then rename it to
    ``checkpoint-<step>`` (replacing an older save of it)."""
    write_checksums(staged)
    swap_into_place(staged, train_dir / f"checkpoint-{step}")


# Per-file checksums of a committed checkpoint: a bit flipped on the volume after the save (same size, so
# no structural check sees it) is found before resume instead of failing deep inside a loader.
CHECKSUMS = "checksums.json"
_CRC_BLOCK = 8 << 20


def _crc32(file: Path) -> int:
    import zlib

    crc = 0
    with open(file, "rb") as fh:
        while block := fh.read(_CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(folder: Path) -> None:
    """``checksums.json``: size and CRC-32 of every file under ``folder``, flushed before the folder is
    renamed into place. It reads every byte once more, mostly from the page cache right after the save
    (cost measured by benchmarks/checkpoint_checksums.py)."""
    import json

    table = {
        str(f.relative_to(folder)): {"size": f.stat().st_size, "crc32": _crc32(f)} for f in _files(folder)
    }
    path = folder / CHECKSUMS
    with open(path, "w") as fh:
        json.dump({"algorithm": "crc32", "files": table}, fh, indent=0, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def _checksum_problem(path: Path) -> str:
    """Why the files differ from what :func:`write_checksums` recorded at the save ("" when they match, or
    for a checkpoint saved before checksums were written)."""
    import json

    listed = path / CHECKSUMS
    if not listed.is_file():
        return ""
    try:
        table = json.loads(listed.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{CHECKSUMS} is damaged (it does not parse)"
    for name, want in sorted(table.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing (the save recorded it)"
        if file.stat().st_size != want.get("size"):
            return f"{name} is {file.stat().st_size} bytes, the save wrote {want.get('size')}"
        if _crc32(file) != want.get("crc32"):
            return f"{name} has changed since it was saved (CRC-32 differs: damaged on the volume)"
    return ""


def _step_problem(path: Path) -> str:
    """Whether the step in the folder name, trnft's state and the trainer's state agree (a copied or
    swapped file would resume at another step and train steps twice)."""
    import json

    m = CHECKPOINT_DIR.match(path.name)
    if not m:
        return ""
    step = int(m.group(1))
    state = json.loads((path / TRNFT_STATE / "state.json").read_text())
    if isinstance(state, dict) and "step" in state and state["step"] != step:
        return f"{TRNFT_STATE}/state.json says step {state['step']}, the folder step {step}"
    trainer = path / "trainer_state.json"
    if trainer.is_file():
        recorded = json.loads(trainer.read_text())
        if isinstance(recorded, dict) and "global_step" in recorded and recorded["global_step"] != step:
            return f"trainer_state.json says step {recorded['global_step']}, the folder step {step}"
    return ""


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
    they hold their output's lock. With ``TRNFT_FAULT_ONCE=<file>`` a kill or term fires only for the process
    that creates that file (a restarted worker, which inherits the environment, then runs through).
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
    once = os.environ.get("TRNFT_FAULT_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    import signal

    os.kill(os.getpid(), signal.SIGKILL if fault.startswith("kill-") else signal.SIGTERM)


UNUSABLE = ".unusable"


def _file_problem(file: Path) -> str:
    """Why one checkpoint file cannot be what its writer left (empty string when it looks whole).

    Cheap structural checks only, never a full read: a zero-byte file (a crash between create and write,
    or a full volume), JSON that does not parse, a torch zip whose central directory is gone (truncated),
    a safetensors header that points past the end, a distributed-checkpoint index whose byte ranges do
    not fit in its data files.
    """
    import json
    import zipfile

    size = file.stat().st_size
    if size == 0:
        return "is 0 bytes"
    with open(file, "rb") as fh:
        head = fh.read(8)
    try:
        if file.suffix == ".json":
            json.loads(file.read_text())
        elif head[:4] == b"PK\x03\x04":  # torch.save's zip container
            with zipfile.ZipFile(file):
                pass
        elif file.suffix == ".safetensors":
            header = int.from_bytes(head, "little")
            if size < 8 + header:
                return f"is cut short ({size} bytes, its header alone needs {8 + header})"
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile):
        return "is damaged or cut short (it does not parse)"
    if file.name == ".metadata":
        return _dcp_problem(file.parent)
    return ""


def _dcp_problem(folder: Path) -> str:
    """Whether every byte range a distributed-checkpoint index names lies inside its data file."""
    import pickle

    try:
        with open(folder / ".metadata", "rb") as fh:
            metadata = pickle.load(fh)
        ranges = list((metadata.storage_data or {}).values())
    except Exception:  # any unpickling failure means an unusable index, whatever its type
        return "is a distributed-checkpoint index that does not load"
    for info in ranges:
        data = folder / info.relative_path
        if not data.is_file():
            return f"names {info.relative_path}, which is missing"
        if data.stat().st_size < info.offset + info.length:
            return f"needs {info.offset + info.length} bytes of {info.relative_path}, which has {data.stat().st_size}"
    return ""


def verify_checkpoint(path: Path) -> str:
    """Why a complete checkpoint cannot be resumed from (empty string when every file looks whole).

    ``complete`` (markers present) says the writer finished; this says the bytes survived: a volume that
    filled up, a node that lost power before its page cache reached the file server, or a hand edit can
    leave a marked checkpoint with empty or cut files. Then the step the folder, trnft's state and the
    trainer's state record must agree, and every file must match the size and CRC-32 recorded at commit.
    """
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        problem = _file_problem(file)
        if problem:
            return f"{file.relative_to(path)} {problem}"
    if (path / TRNFT_STATE / "state.json").is_file():
        problem = _step_problem(path)
        if problem:
            return problem
    return _checksum_problem(path)


def _state_fingerprint(path: Path) -> str | None:
    import json

    state = json.loads((path / TRNFT_STATE / "state.json").read_text())
    return state.get("fingerprint") if isinstance(state, dict) else None


def resume_point(train_dir: Path, fingerprint: str, log: Callable[[str], None]) -> Path | None:
    """The newest complete checkpoint that verifies and was written with these settings.

    Reports and removes staging leftovers; reports incomplete checkpoints; a complete checkpoint that does
    not verify (:func:`verify_checkpoint`) is reported, renamed ``checkpoint-<step>.unusable`` (kept for a
    look, out of every reader's way, removed by :func:`prune` once a newer checkpoint exists) and the next
    older one is tried. Returns None when none is left (training starts at step 0, which the log says).

    Raises TrnftError when the newest complete checkpoint has no trnft state (not ours: another tool's
    output, never set aside) or the newest verifying one other settings (resuming it would silently train
    something else; falling back past it would drop work the user may want).
    """
    from ..errors import TrnftError

    for leftover in staging_leftovers(train_dir):
        log(f"train: removing {leftover.name}, an interrupted save")
        shutil.rmtree(leftover, ignore_errors=True)
    skipped: list[str] = []
    for info in reversed(list_checkpoints(train_dir)):
        if not info.complete:
            log(f"train: ignoring {info.path.name}: incomplete ({info.reason})")
            continue
        if not (info.path / TRNFT_STATE / "state.json").is_file():
            raise TrnftError(
                f"{info.path}: has no {TRNFT_STATE}/state.json, so trnft cannot resume from it; pass --force to start over"
            )
        problem = verify_checkpoint(info.path)
        if problem:
            aside = info.path.with_name(info.path.name + UNUSABLE)
            shutil.rmtree(aside, ignore_errors=True)
            info.path.rename(aside)
            log(f"train: skipping {info.path.name}: {problem}; moved it to {aside.name}")
            skipped.append(info.path.name)
            continue
        if _state_fingerprint(info.path) != fingerprint:
            raise TrnftError(
                f"{info.path}: was written with other settings than this run's; pass --force to start train over"
            )
        if skipped:
            log(f"train: resuming from {info.path.name}, the newest checkpoint that verifies")
        return info.path
    if skipped:
        log(f"train: no checkpoint verifies (skipped {', '.join(skipped)}); training starts at step 0")
    return None


def _unusable_step(path: Path) -> int:
    m = CHECKPOINT_DIR.match(path.name.removesuffix(UNUSABLE))
    return int(m.group(1)) if m else 1 << 62


def prune(train_dir: Path, keep: int, log: Callable[[str], None] = print) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, incomplete ones older than the newest
    complete, and staging leftovers. Returns what was removed."""
    infos = list_checkpoints(train_dir)
    complete = [i for i in infos if i.complete]
    newest = complete[-1].step if complete else -1
    remove = [i.path for i in complete[:-keep]] if keep > 0 else []
    remove += [i.path for i in infos if not i.complete and i.step < newest]
    remove += staging_leftovers(train_dir)
    if complete:  # set-aside unusable checkpoints go once a checkpoint that verified came after them
        remove += [p for p in train_dir.glob(f"checkpoint-*{UNUSABLE}") if _unusable_step(p) < newest]
    for path in remove:
        shutil.rmtree(path, ignore_errors=True)
        log(f"checkpoints: removed {path.name}")
    return remove
