"""The run directory: the only interface between stages.

Layout::

    <run.root>/
      <stage>/                 complete output of a stage, with manifest.json written last
      <stage>.staging-<id>/    a stage at work (renamed to <stage>/ when complete)
      .trnft/<stage>.failed.json   the last failure of a stage, removed by its next success
      .trnft/<stage>.lock      held while a stage runs

A stage's output is complete exactly when ``<stage>/manifest.json`` exists. The manifest holds the
stage's fingerprint (the config keys that decide its output plus the digests of its upstream outputs),
the inputs with content hashes, library versions, the file list and key figures.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TrnftError
from .atomic import swap_into_place
from .hashing import file_sha256, list_files

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
MANIFEST_VERSION = 1


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so readers see the old file or the whole new one, never a prefix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def describe_files(root: Path) -> list[dict[str, Any]]:
    """File list of a stage output: relative path, size and sha256 of the whole file (manifest excluded)."""
    out = []
    for rel in list_files(root):
        if rel.name in (MANIFEST, PROGRESS):
            continue
        p = root / rel
        out.append({"path": str(rel), "bytes": p.stat().st_size, "digest": file_sha256(p)})
    return out


def verify_files(stage_dir: Path, manifest: dict[str, Any], under: str = "") -> tuple[int, int]:
    """Check that the files a stage's manifest lists (those below ``under``) are still the bytes it wrote.

    Returns (files, bytes) checked. Raises TrnftError naming the first file that is missing, has another
    size or another sha256: it was changed or damaged after the stage wrote it.
    """
    stage = manifest.get("stage", stage_dir.name)
    prefix = f"{under.rstrip('/')}/" if under else ""
    files = checked = 0
    for entry in manifest.get("files", []):
        rel = entry["path"]
        if under and not (rel == under or rel.startswith(prefix)):
            continue
        path = stage_dir / rel
        rerun = f"rerun `trnft {stage} --config <run.yaml> --force`"
        if not path.is_file():
            raise TrnftError(f"{path}: listed in the {stage} manifest but missing; {rerun}")
        if path.stat().st_size != entry["bytes"]:
            raise TrnftError(
                f"{path}: {path.stat().st_size} bytes, the {stage} manifest recorded {entry['bytes']}; "
                f"the file changed after {stage} wrote it; {rerun}"
            )
        digest = entry.get("digest", "")
        if digest.startswith("sha256:") and file_sha256(path) != digest:
            raise TrnftError(
                f"{path}: its sha256 differs from the one the {stage} manifest recorded; the file is corrupt "
                f"or was changed after {stage} wrote it; {rerun}"
            )
        files += 1
        checked += entry["bytes"]
    return files, checked


def _record_holder(fh: Any) -> None:
    """Write who holds a lock (pid, host, since when) into its open lock file, for the refusal line."""
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}\n")
    fh.flush()


@dataclass(frozen=True)
class StageState:
    """What ``trnft status`` shows for one stage."""

    name: str
    state: str  # complete | stale | incomplete | failed | missing | corrupt
    finished_at: str | None
    summary: str
    manifest: dict[str, Any] | None
    reason: str = ""  # why it is stale or corrupt


class RunDir:
    """Paths, manifests, staging and locks of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.meta = self.root / ".trnft"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def manifest_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / MANIFEST

    def manifest(self, stage: str) -> dict[str, Any] | None:
        """The stage's manifest if the stage is complete, else None."""
        path = self.manifest_path(stage)
        if not path.is_file():
            return None
        try:
            data = read_json(path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else f"{type(exc).__name__}: {str(exc)[:80]}"
            raise TrnftError(
                f"{path}: unreadable manifest ({reason}); rerun `trnft {stage}` with --force"
            ) from exc
        if not isinstance(data, dict):
            raise TrnftError(
                f"{path}: holds a JSON {type(data).__name__}, not a manifest; rerun `trnft {stage}` with --force"
            )
        if data.get("status") != "complete":
            return None
        return data

    def failure(self, stage: str) -> dict[str, Any] | None:
        """The stage's last failure record (``error``, ``at``), or None. A record that cannot be read (cut
        off, not JSON, another shape) still says the stage failed, and why the reason is unknown."""
        path = self.meta / f"{stage}.failed.json"
        if not path.is_file():
            return None
        try:
            data = read_json(path)
        except (OSError, ValueError, UnicodeDecodeError):
            return {"error": f"failed; its failure record {path} cannot be read", "at": None}
        if not isinstance(data, dict):
            return {"error": f"failed; its failure record {path} is not a JSON object", "at": None}
        error = data.get("error")
        return {"error": str(error) if error else "failed (no reason recorded)", "at": data.get("at")}

    def record_failure(self, stage: str, message: str) -> None:
        with contextlib.suppress(OSError):
            write_json_atomic(
                self.meta / f"{stage}.failed.json",
                {"stage": stage, "error": message, "at": now_iso(), "host": socket.gethostname()},
            )

    def clear_failure(self, stage: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.meta / f"{stage}.failed.json").unlink()

    def staging_dirs(self, stage: str) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob(f"{stage}.staging-*") if p.is_dir())

    def progress(self, stage: str) -> dict[str, Any] | None:
        path = self.stage_dir(stage) / PROGRESS
        try:
            data = read_json(path) if path.is_file() else None
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    @contextlib.contextmanager
    def lock(self, stage: str) -> Iterator[None]:
        """Hold ``.trnft/<stage>.lock`` while a stage runs; a second runner gets a clear error."""
        self.meta.mkdir(parents=True, exist_ok=True)
        path = self.meta / f"{stage}.lock"
        fh = open(path, "a+")  # noqa: SIM115 (held open for the whole stage; closed in finally)
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise TrnftError(
                    f"stage {stage} is already running in {self.root} ({holder}); wait for it or stop it first"
                ) from exc
            _record_holder(fh)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    @contextlib.contextmanager
    def staging(self, stage: str) -> Iterator[Path]:
        """A fresh sibling folder for a stage's output; removed again if the body raises.

        The caller renames it into place with :meth:`commit`. Leftovers of crashed runs (other
        ``<stage>.staging-*`` folders) are removed first; call this only while holding the lock.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        for old in self.staging_dirs(stage):
            shutil.rmtree(old, ignore_errors=True)
        tmp = self.root / f"{stage}.staging-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def commit(self, stage: str, staged: Path) -> Path:
        """Rename a staging folder to ``<stage>/``, replacing an older output."""
        return swap_into_place(staged, self.stage_dir(stage))

    def write_manifest(self, out_dir: Path, manifest: dict[str, Any]) -> None:
        write_json_atomic(out_dir / MANIFEST, manifest)

    def write_progress(self, stage: str, data: dict[str, Any]) -> None:
        write_json_atomic(self.stage_dir(stage) / PROGRESS, {**data, "at": now_iso()})


def output_digest(files: list[dict[str, Any]]) -> str:
    """Digest of a stage's file list; downstream fingerprints include it."""
    import hashlib

    h = hashlib.sha256()
    for entry in files:
        h.update(f"{entry['path']}\0{entry['digest']}\n".encode())
    return f"sha256:{h.hexdigest()}"


def into_new_folder(out: Path, work: Callable[[Path], Any], log: Callable[[str], None] = print) -> Any:
    """Run ``work(staging)`` and rename the staging folder to ``out`` when it returns.

    ``out`` must not exist or be empty (a standalone command never mixes into earlier output); on any
    error the staging folder is removed, so ``out`` either appears complete or not at all. Staging
    folders a killed earlier run left beside ``out`` are removed first, and said so.
    """
    if out.exists() and not out.is_dir():
        raise TrnftError(f"--output: {out} is a file; name a new folder")
    if out.exists() and any(out.iterdir()):
        raise TrnftError(f"--output: {out} exists and is not empty; choose a new folder")
    if out.parent.exists() and not out.parent.is_dir():
        raise TrnftError(f"--output: {out.parent} is a file, so {out.name} cannot be made in it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _output_lock(out):
        for pattern in (f".{out.name}.staging-*", f".{out.name}.replaced-*"):
            for leftover in sorted(out.parent.glob(pattern)):
                owner = _owner_gone(leftover)
                if owner is None:
                    log(
                        f"keeping {leftover}: its writer ({_read_owner(leftover)}) may still run on another host; "
                        "remove it yourself once that run is gone"
                    )
                    continue
                log(f"removing {leftover}, left by an interrupted run ({owner})")
                shutil.rmtree(leftover, ignore_errors=True)
        staging = out.with_name(f".{out.name}.staging-{uuid.uuid4().hex[:8]}")
        staging.mkdir(parents=True)
        (staging / OWNER_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        try:
            from .checkpoints import fault_point

            fault_point("output", "staged")
            result = work(staging)
            (staging / OWNER_FILE).unlink()
            swap_into_place(staging, out)  # ``out`` is absent or an empty folder here
            return result
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


# Who writes a standalone staging folder: "<pid> <host>", removed just before the folder is renamed.
OWNER_FILE = ".trnft-owner"


def _read_owner(folder: Path) -> str:
    try:
        return (folder / OWNER_FILE).read_text().strip() or "unknown writer"
    except OSError:
        return "unknown writer"


def _owner_gone(folder: Path) -> str | None:
    """Why ``folder``'s writer is provably gone (its pid is not alive on this host, or it recorded none),
    or None when it may still be running (another host)."""
    owner = _read_owner(folder).split()
    if len(owner) != 2 or not owner[0].isdigit():
        return "no writer recorded"
    pid, host = int(owner[0]), owner[1]
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} on {host} has exited"
    except PermissionError:
        return None  # alive, another user's
    return None if pid != os.getpid() else "this process"


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``<parent>/.<name>.lock`` while one standalone command writes ``out``; a second
    writer of the same output is refused in one line, and the first is left alone. The lock file is removed
    at the end; a lock taken on a file another process already removed is taken again."""
    path = out.with_name(f".{out.name}.lock")
    while True:
        fh = open(path, "a+")  # noqa: SIM115 (held for the whole write; closed below)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise TrnftError(
                f"--output: {out} is being written by another trnft ({holder}); wait for it or choose another folder"
            ) from exc
        try:
            same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    try:
        _record_holder(fh)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        fh.close()
