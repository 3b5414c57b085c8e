"""A bounded retry budget per stage, kept in the run directory.

training-operator v1.9 does not bound retries under the ``ExitCode`` restart policy: it forces the pods to
``restartPolicy: Never`` and ``backoffLimit`` only counts container restarts of running pods, so it never trips
(kubeflow/trainer#2045, closed unfixed). A stage that fails the same retryable way every time would loop
forever on expensive nodes. So each start of a stage in a cluster job (``TRNFT_JOB_NAME`` is set in every
rendered pod) is recorded in ``.trnft/<stage>.attempts.json`` with the progress it starts from (train: the
newest complete checkpoint's step; other stages have none). A successful end removes the record. When
``cluster.backoff_limit`` earlier attempts started from the current progress and none finished, the next start
refuses with a permanent exit and names the last recorded failure. Progress (a new checkpoint) restarts the
count, so an eviction that saved its step never uses the budget up. ``--force`` clears it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import TrnftError
from .rundir import now_iso, write_json_atomic

JOB_ENV = "TRNFT_JOB_NAME"


def _path(meta: Path, stage: str) -> Path:
    return meta / f"{stage}.attempts.json"


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # missing or damaged: no evidence of earlier attempts
    attempts = data.get("attempts") if isinstance(data, dict) else None
    return [a for a in attempts if isinstance(a, dict)] if isinstance(attempts, list) else []


def begin(meta: Path, stage: str, *, progress: int | None, limit: int, last_failure: str | None) -> None:
    """Record this start, or refuse it when ``limit`` attempts already started from ``progress``."""
    if not os.environ.get(JOB_ENV):
        return  # a local run: the person rerunning it is the retry policy
    path = _path(meta, stage)
    attempts = _read(path)
    stuck = [a for a in attempts if a.get("progress") == progress]
    if len(stuck) >= max(limit, 1):  # backoff_limit 0 (no restarts) still lets the first attempt run
        where = f"checkpoint-{progress}" if progress is not None else "the start"
        raise TrnftError(
            f"{stage}: {len(stuck)} attempts since {where} made no progress (cluster.backoff_limit {limit}); "
            f"last failure: {last_failure or 'none recorded (killed)'}; read the failed pods' logs, fix the "
            f"cause, then rerun with --force or delete {path}"
        )
    attempts.append({"started_at": now_iso(), "progress": progress, "host": socket.gethostname()})
    meta.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"stage": stage, "attempts": attempts})


def clear(meta: Path, stage: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _path(meta, stage).unlink()
