"""What a stage is (:class:`StageSpec`) and the machinery every stage runs through; the stages themselves
are listed in :mod:`trnft.common.pipeline.registry`.

A stage module exposes ``run(cfg, *, force=False, log=print) -> StageResult`` and implements its work as a
``body(ctx) -> StageOutcome`` passed to :func:`run_stage`, which:

1. refuses to start while an upstream stage is not complete, naming the command to run first;
2. skips the stage when its manifest exists with the same fingerprint (``--force`` redoes it);
3. runs the body in a staging folder, writes ``manifest.json`` last and renames the folder into place;
4. on failure leaves no visible output and records the error for ``trnft status``.

Stage name = module name = CLI subcommand = output folder = Kubernetes job-name suffix.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.run_config import RunConfig, current_names, fingerprint_names, select, stable_hash
from ..errors import TrnftError, UpstreamError
from . import attempts, checkpoints, registry
from .figures import Figures
from .hashing import library_versions
from .registry import StageSpec
from .rundir import (
    MANIFEST_VERSION,
    RunDir,
    StageState,
    describe_files,
    now_iso,
    output_digest,
    verify_files,
)


@dataclass
class StageOutcome:
    """What a stage body reports; the framework adds files, hashes and versions to the manifest."""

    summary: str
    figures: Figures
    inputs: list[dict[str, Any]] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    """The manifest of the stage's output and whether this call skipped the work."""

    stage: str
    skipped: bool
    manifest: dict[str, Any]
    path: Path


@dataclass
class StageContext:
    """Everything a stage body may use."""

    cfg: RunConfig
    spec: StageSpec
    rundir: RunDir
    out_dir: Path
    upstream: dict[str, dict[str, Any]]
    fingerprint: str
    log: Callable[[str], None]
    is_main: bool = True

    def upstream_dir(self, stage: str) -> Path:
        return self.rundir.stage_dir(stage)

    def verify_upstream(self, stage: str, *under: str) -> None:
        """Refuse to read upstream files that are not the bytes its manifest recorded (sha256 of each):
        every file of ``stage``, or those at or below the relative paths ``under``. The main process
        checks; the other ranks of a job read what it checked."""
        if not self.is_main:
            return
        t0 = time.perf_counter()
        files = size = 0
        for part in under or ("",):
            n, b = verify_files(self.upstream_dir(stage), self.upstream[stage], part)
            files, size = files + n, size + b
        if size > 1 << 30:
            self.log(
                f"{self.spec.name}: verified {files} file(s) of {stage}, {size / 1e9:.1f} GB, in "
                f"{time.perf_counter() - t0:.1f}s"
            )


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (or a plain process) owns manifests, renames and locks (torchrun sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


def upstream_manifests(spec: StageSpec, cfg: RunConfig, rundir: RunDir) -> dict[str, dict[str, Any]]:
    """The manifests of the stages ``spec`` reads, once everything upstream of it is complete and current.

    Raises:
        UpstreamError: naming the first stage (in pipeline order) of everything ``spec`` depends on,
            directly or not, that is missing, incomplete, failed, corrupt or stale, and the command that
            redoes it. ``--force`` of the downstream stage does not get past this: it would rebuild on an
            old or broken input.
    """
    chain = upstream_chain(spec, cfg)
    states = {row.name: row for row in _states(cfg, rundir, chain)}
    for name in chain:
        row = states[name]
        if row.state == "complete":
            continue
        where = rundir.stage_dir(name)
        what = {
            "missing": "does not exist",
            "incomplete": "is incomplete",
            "failed": "failed",
            "corrupt": "has an unreadable manifest",
            "stale": f"is stale: {row.reason}",
        }[row.state]
        redo = registry.spec(name).redo_on_change
        force = " --force" if row.state in ("stale", "corrupt") and not redo else ""
        raise UpstreamError(
            f"{spec.name} needs a complete {name} stage ({where} {what}); "
            f"run `trnft {name} --config <run.yaml>{force}` first"
        )
    return {name: states[name].manifest for name in spec.needs(cfg)}  # type: ignore[misc]


def upstream_chain(spec: StageSpec, cfg: RunConfig) -> list[str]:
    """Every stage ``spec`` depends on, directly or through others, in pipeline order."""
    found: set[str] = set()
    todo = list(spec.needs(cfg))
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(registry.spec(name).needs(cfg))
    return [name for name in registry.names() if name in found]


def fingerprint_of(
    spec: StageSpec, cfg: RunConfig, upstream: dict[str, dict[str, Any]], external: list[dict[str, Any]]
) -> tuple[str, dict]:
    """The stage fingerprint (config subset, upstream outputs, external input digests) and the subset."""
    subset = select(cfg, spec.config_keys(cfg))
    data = {
        "stage": spec.name,
        # hashed under the keys' names before settings moved to parallel/fsdp: older runs keep their hashes
        "config": fingerprint_names(subset, cfg.model.platform),
        "upstream": {name: m.get("output_digest") for name, m in sorted(upstream.items())},
        "inputs": sorted((e["name"], e["digest"]) for e in external),
    }
    return stable_hash(data), subset


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config subsets."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = key if not prefix else (key if key.startswith(prefix) else f"{prefix}.{key}")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(changed_keys(a, b, path))
        elif a != b:
            out.append(path)
    return out


def _describe_change(
    previous: dict[str, Any],
    subset: dict[str, Any],
    upstream: dict[str, dict],
    external: list[dict[str, Any]],
) -> str:
    keys = changed_keys(current_names(previous.get("config", {})), subset)
    old_up = previous.get("upstream", {})
    ups = [n for n, m in upstream.items() if old_up.get(n) != m.get("output_digest")]
    old_inputs = {
        (e.get("name"), e.get("path")): e.get("digest") for e in previous.get("external_inputs", [])
    }
    files = [e["path"] for e in external if old_inputs.get((e["name"], e["path"])) != e["digest"]]
    parts = []
    if keys:
        parts.append("config changed: " + ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else ""))
    if ups:
        parts.append("newer output of " + ", ".join(ups))
    if files:
        parts.append("input changed: " + ", ".join(files[:3]) + (", ..." if len(files) > 3 else ""))
    return "; ".join(parts) or "fingerprint changed"


def current_manifest(spec: StageSpec, cfg: RunConfig) -> dict[str, Any] | None:
    """The stage's manifest when its output is complete and was made with these settings and inputs."""
    rundir = RunDir(cfg.run.root)
    try:
        previous = rundir.manifest(spec.name)
        if previous is None:
            return None
        upstream = upstream_manifests(spec, cfg, rundir)
    except TrnftError:  # an unreadable manifest, or an upstream that is not complete: not current
        return None
    fingerprint, _ = fingerprint_of(spec, cfg, upstream, spec.inputs(cfg))
    return previous if previous.get("fingerprint") == fingerprint else None


def run_stage(
    spec: StageSpec,
    cfg: RunConfig,
    body: Callable[[StageContext], StageOutcome],
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> StageResult:
    """Run one stage body with skip, upstream checks, staging, manifest and failure records."""
    rundir = RunDir(cfg.run.root)
    if rundir.root.exists() and not rundir.root.is_dir():
        raise TrnftError(f"run.root: {rundir.root} is a file, not a folder; choose another run directory")
    upstream = upstream_manifests(spec, cfg, rundir)
    external = spec.inputs(cfg)
    fingerprint, subset = fingerprint_of(spec, cfg, upstream, external)
    final = rundir.stage_dir(spec.name)
    main = is_main_process()
    try:
        previous = rundir.manifest(spec.name)
    except TrnftError as exc:  # an unreadable manifest is no proof of a complete output: redo it
        log(f"{spec.name}: {exc}; redoing the stage")
        previous = None

    if previous is not None and not force:
        if previous.get("fingerprint") == fingerprint:
            log(
                f"{spec.name}: already complete ({previous.get('finished_at')}, {previous.get('summary', '')}); "
                "use --force to redo"
            )
            return StageResult(spec.name, True, previous, final)
        change = _describe_change(previous, subset, upstream, external)
        if not spec.redo_on_change:
            raise TrnftError(
                f"{spec.name}: {final} was made with other settings ({change}); "
                f"pass --force to start {spec.name} over"
            )
        log(f"{spec.name}: redoing, {change}")

    plan = _Plan(external=external, subset=subset, started=time.time(), started_at=now_iso())

    def execute(out_dir: Path) -> tuple[StageOutcome, dict[str, Any]]:
        ctx = StageContext(
            cfg=cfg,
            spec=spec,
            rundir=rundir,
            out_dir=out_dir,
            upstream=upstream,
            fingerprint=fingerprint,
            log=log,
            is_main=main,
        )
        return _execute(ctx, body, plan)

    with _LockOrNothing(rundir, spec.name, main):
        if main:
            if force:
                attempts.clear(rundir.meta, spec.name)
            try:
                failed = rundir.failure(spec.name)
            except (OSError, ValueError):  # a damaged failure record only loses the reason in the message
                failed = None
            attempts.begin(
                rundir.meta,
                spec.name,
                progress=_progress(rundir, spec.name),
                limit=cfg.cluster.backoff_limit,
                last_failure=(failed or {}).get("error") if isinstance(failed, dict) else None,
            )
        try:
            if spec.in_place:
                if main and force and final.exists():
                    shutil.rmtree(final)
                if main and (final / "manifest.json").exists():
                    (final / "manifest.json").unlink()
                final.mkdir(parents=True, exist_ok=True)
                outcome, manifest = execute(final)
            elif main:
                with rundir.staging(spec.name) as staged:
                    outcome, manifest = execute(staged)
                    rundir.commit(spec.name, staged)
            else:
                # Another rank of a stage every rank runs (neuron-native's compile trial under torchrun or
                # Ray): it does the body's collective work and writes none of the output, which rank 0
                # stages and commits.
                outcome, manifest = execute(final)
        except TrnftError as exc:
            if main:
                rundir.record_failure(spec.name, str(exc))
            raise
        except BaseException as exc:
            if main and not isinstance(exc, KeyboardInterrupt):
                rundir.record_failure(spec.name, f"{type(exc).__name__}: {exc}")
            raise
        if main:
            rundir.clear_failure(spec.name)
            attempts.clear(rundir.meta, spec.name)
    if main:
        log(f"{spec.name}: complete in {manifest['duration_s']:.1f}s, {outcome.summary}")
    return StageResult(spec.name, False, manifest, final)


@dataclass(frozen=True)
class _Plan:
    """Facts fixed before a stage body runs that go into its manifest."""

    external: list[dict[str, Any]]
    subset: dict[str, Any]
    started: float
    started_at: str


def _progress(rundir: RunDir, stage: str) -> int | None:
    """How far a stage has got that a retry keeps: train's newest complete checkpoint step."""
    if stage != "train":
        return None
    newest = checkpoints.newest_complete(rundir.stage_dir(stage))
    return newest.step if newest else None


class _LockOrNothing:
    """The stage lock on the main process; other ranks of a torchrun job take no lock."""

    def __init__(self, rundir: RunDir, stage: str, main: bool) -> None:
        self._cm = rundir.lock(stage) if main else None

    def __enter__(self) -> None:
        if self._cm is not None:
            self._cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)


def _execute(
    ctx: StageContext, body: Callable[[StageContext], StageOutcome], plan: _Plan
) -> tuple[StageOutcome, dict[str, Any]]:
    """Run the body and, on the main process, write the manifest last."""
    cfg, spec = ctx.cfg, ctx.spec
    checkpoints.fault_point(spec.name, "started")
    outcome = body(ctx)
    checkpoints.fault_point(spec.name, "written")
    manifest: dict[str, Any] = {}
    if ctx.is_main:
        files = describe_files(ctx.out_dir)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "stage": spec.name,
            "status": "complete",
            "run": cfg.run.name,
            "platform": cfg.model.platform,
            "fingerprint": ctx.fingerprint,
            "config_hash": stable_hash(cfg),
            "config": plan.subset,
            "upstream": {name: m.get("output_digest") for name, m in sorted(ctx.upstream.items())},
            "external_inputs": plan.external,
            "inputs": outcome.inputs,
            "versions": library_versions(),
            "layout": outcome.layout,
            "figures": outcome.figures.to_json(),
            "summary": outcome.summary,
            "files": files,
            "output_digest": output_digest(files),
            "started_at": plan.started_at,
            "finished_at": now_iso(),
            "duration_s": round(time.time() - plan.started, 3),
            "host": socket.gethostname(),
            **outcome.extra,
        }
        ctx.rundir.write_manifest(ctx.out_dir, manifest)
        checkpoints.fault_point(spec.name, "manifest")
    return outcome, manifest


# --------------------------------------------------------------------------------------------------
# Dispatch and status


def stage_states(cfg: RunConfig) -> list[StageState]:
    """One row per stage: complete / stale / incomplete / failed / missing / corrupt, when, key figure."""
    return _states(cfg, RunDir(cfg.run.root), registry.names())


def _states(cfg: RunConfig, rundir: RunDir, names: Sequence[str]) -> list[StageState]:
    """The rows of ``names`` (and of everything they depend on, which decides them), in pipeline order.

    A stage with a manifest is stale when its own fingerprint changed (config, inputs, an upstream output)
    or when anything it depends on is not complete: staleness propagates down the pipeline.
    """
    wanted = set(names)
    for name in names:
        wanted.update(upstream_chain(registry.spec(name), cfg))
    rows: dict[str, StageState] = {}
    for name in registry.names():
        if name in wanted:
            rows[name] = _state(cfg, rundir, registry.spec(name), rows)
    return [rows[name] for name in registry.names() if name in names]


def _state(cfg: RunConfig, rundir: RunDir, spec: StageSpec, rows: dict[str, StageState]) -> StageState:
    name = spec.name
    try:
        manifest = rundir.manifest(name)
    except TrnftError as exc:
        return StageState(name, "corrupt", None, str(exc), None, "its manifest cannot be read")
    if manifest is not None:
        when, summary = manifest.get("finished_at"), manifest.get("summary", "")
        upstream = {u: rows[u] for u in spec.needs(cfg)}
        behind = [u for u, row in upstream.items() if row.state != "complete"]
        if behind:
            reason = f"upstream {behind[0]} is {upstream[behind[0]].state}"
            return StageState(name, "stale", when, f"{summary}; stale: {reason}", manifest, reason)
        up = {u: row.manifest for u, row in upstream.items()}
        external = spec.inputs(cfg)
        fingerprint, subset = fingerprint_of(spec, cfg, up, external)  # type: ignore[arg-type]
        if fingerprint != manifest.get("fingerprint"):
            reason = _describe_change(manifest, subset, up, external)  # type: ignore[arg-type]
            return StageState(name, "stale", when, f"{summary}; stale: {reason}", manifest, reason)
        return StageState(name, "complete", when, summary, manifest)
    failure = rundir.failure(name)
    progress = rundir.progress(name)
    if rundir.stage_dir(name).exists() or rundir.staging_dirs(name):
        summary = (progress or {}).get("summary", "started, no manifest yet")
        if failure:
            return StageState(name, "failed", failure.get("at"), f"{summary}; {failure['error']}", None)
        return StageState(name, "incomplete", (progress or {}).get("at"), summary, None)
    if failure:
        return StageState(name, "failed", failure.get("at"), failure["error"], None)
    return StageState(name, "missing", None, "", None)


def format_status(cfg: RunConfig) -> str:
    rows = stage_states(cfg)
    lines = [f"run {cfg.run.name}  root {cfg.run.root}  platform {cfg.model.platform}"]
    lines.append(f"{'stage':<12} {'state':<11} {'when':<26} key figure")
    for row in rows:
        lines.append(f"{row.name:<12} {row.state:<11} {(row.finished_at or '-'):<26} {row.summary or '-'}")
    return "\n".join(lines)
