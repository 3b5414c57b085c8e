"""Train stage on the Neuron path: Trainium through optimum-neuron, or the CPU-XLA rehearsal.

Devices (``neuron.backend``, decided by :func:`trnft.neuron.backend.device`): ``trainium`` drives
optimum-neuron's trainer (:mod:`trnft.neuron.trainium`); ``cpu`` runs
:class:`~trnft.neuron.xla_trainer.XlaTrainer` on torch-xla's CPU device; ``auto`` picks Trainium when a
Neuron device and optimum-neuron are present.

Restart is resume: the stage output ``<root>/train/`` holds ``checkpoint-<step>/`` folders, each complete
only with its ``done`` marker; on start the newest complete checkpoint written with the same settings is
resumed (weights, optimizer, step; the data order and dropout follow from the step), staging leftovers
of an interrupted save are removed and reported, and the newest ``train.keep_checkpoints`` are kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..common import stop
from ..common.config.run_config import RunConfig
from ..common.errors import ConfigError, TrnftError
from ..common.pipeline import checkpoints
from ..common.pipeline.platform_stages import TRAIN
from ..common.pipeline.stages import StageContext, StageOutcome, StageResult, run_stage
from ..common.training.data import TokenizeOutput
from ..common.training.policy import Cadence, TrainFigures, on_recompile, refuse_non_finite
from . import launch
from .backend import device, preflight_or_fail, require_trn1_line

CPU_CACHE_SUBDIR = "xla_cpu"


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    """The train stage (refused under ``neuron_parallel_compile``: the compile stage runs the trial run)."""
    require_trn1_line("train")
    if is_precompilation():
        raise ConfigError(
            "train: started under neuron_parallel_compile (NEURON_EXTRACT_GRAPHS_ONLY=1), where model outputs "
            "are not real; run `trnft compile` to fill the compile cache and `trnft train` without the wrapper"
        )
    return run_stage(TRAIN, cfg, _body, force=force, log=log)


def is_precompilation() -> bool:
    """True inside ``neuron_parallel_compile`` (it sets NEURON_EXTRACT_GRAPHS_ONLY=1)."""
    return os.environ.get("NEURON_EXTRACT_GRAPHS_ONLY") == "1"


def cpu_cache_dir(cfg: RunConfig) -> str:
    """torch-xla's persistent compilation cache of the CPU backend, inside the shared compile cache."""
    return str(Path(launch.cache_dir(cfg)) / CPU_CACHE_SUBDIR)


def _body(ctx: StageContext) -> StageOutcome:
    ctx.verify_upstream("tokenize")
    if device(ctx.cfg) == "trainium":
        from . import trainium

        preflight_or_fail()
        return trainium.train(ctx)
    return train_cpu(ctx)


@dataclass(frozen=True)
class XlaTrainFigures(TrainFigures):
    """The CPU-XLA rehearsal's training figures."""

    KIND: ClassVar[str] = "train/cpu-xla"

    xla_compiles_first_step: int
    xla_compiles_after_first_step: int
    persistent_cache: dict[str, int]
    compile_stage_ran: bool


@dataclass
class _CpuRun:
    """What the CPU training loop counts while it runs."""

    start: int
    compiles_at_start: int
    compiled_with_stage: bool
    first_step_compiles: int | None = None
    late_compiles: int = 0
    tokens: int = 0
    seconds: float = 0.0
    saved: list[str] = field(default_factory=list)

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train_cpu(ctx: StageContext) -> StageOutcome:
    """Run (or resume) training on torch-xla's CPU device: set up, loop over the steps, report."""
    from .xla_trainer import XlaTrainer, compile_count

    cfg, log = ctx.cfg, ctx.log
    tokenized = TokenizeOutput(ctx.upstream_dir("tokenize"))
    resume = checkpoints.resume_point(ctx.out_dir, ctx.fingerprint, log)
    trainer = XlaTrainer(cfg, tokenized, log)
    trainer.setup(cache_dir=cpu_cache_dir(cfg), resume=resume)
    if resume is not None:
        log(f"train: resumed from {resume.name} at step {trainer.step}")
    run = _CpuRun(trainer.step, compile_count(), ctx.rundir.manifest("compile") is not None)
    writer = _tensorboard(ctx.out_dir)
    previous = stop.install_cooperative_keeping()  # a stop signal ends the run after its step, saved
    try:
        while trainer.step < cfg.train.max_steps:
            _cpu_step(ctx, trainer, tokenized, run, writer)
            signum = stop.requested()  # one process (SPMD over its devices): nothing to agree on
            if signum and trainer.step < cfg.train.max_steps:
                if not run.saved or run.saved[-1] != f"checkpoint-{trainer.step}":
                    run.saved.append(trainer.save(ctx.out_dir, ctx.fingerprint, tokenized.tokenizer_dir).name)
                log(f"train: {stop.signal.Signals(signum).name} received; stopping after step {trainer.step} "
                    f"with {run.saved[-1]} saved")  # fmt: skip
                raise stop.Stopped(signum, f"{run.saved[-1]} saved; the rerun resumes there")
    finally:
        stop.restore(previous)
        if writer is not None:
            writer.close()
    return _cpu_report(ctx, trainer, resume, run)


def _cpu_step(ctx: StageContext, trainer: Any, tokenized: TokenizeOutput, run: _CpuRun, writer: Any) -> None:
    """One optimizer step: train, watch for recompilation, log, save on schedule, record progress."""
    cfg, log = ctx.cfg, ctx.log
    end = cfg.train.max_steps
    cadence = Cadence.of(cfg.train)
    record = trainer.train_step()
    refuse_non_finite(record.step, record.loss, record.grad_norm)
    checkpoints.fault_point("step", record.step)
    if run.first_step_compiles is None:
        run.first_step_compiles = record.compiles - run.compiles_at_start
    else:
        new = record.compiles - run.compiles_at_start - run.first_step_compiles - run.late_compiles
        if new > 0:
            run.late_compiles += new
            on_recompile(cfg, run.compiled_with_stage, record.step, new, log)
        run.tokens += record.tokens
        run.seconds += record.seconds
    if cadence.logs(record.step, run.start + 1):
        log(
            f"train: step {record.step}/{end} loss {record.loss:.4f} lr {record.lr:.2e} "
            f"grad_norm {record.grad_norm:.3f} tokens/s {run.rate():,.0f} "
            f"compiles {record.compiles - run.compiles_at_start}"
        )
    if writer is not None:
        writer.add_scalar("train/loss", record.loss, record.step)
        writer.add_scalar("train/learning_rate", record.lr, record.step)
        writer.add_scalar("train/grad_norm", record.grad_norm, record.step)
        if run.seconds:
            writer.add_scalar("train/tokens_per_second", run.rate(), record.step)
    if cadence.saves(record.step):
        path = trainer.save(ctx.out_dir, ctx.fingerprint, tokenized.tokenizer_dir)
        run.saved.append(path.name)
        checkpoints.prune(ctx.out_dir, cfg.train.keep_checkpoints, log)
        log(f"train: saved {path.name}")
    ctx.rundir.write_progress("train", {"summary": f"step {trainer.step} of {end}", "step": trainer.step})


def _cpu_report(ctx: StageContext, trainer: Any, resume: Path | None, run: _CpuRun) -> StageOutcome:
    from .xla_trainer import persistent_cache_counters

    end = ctx.cfg.train.max_steps
    final = checkpoints.newest_complete(ctx.out_dir)
    if final is None or final.step != end:
        raise TrnftError(f"train: ended at step {trainer.step} without checkpoint-{end}")
    losses = trainer.history
    figures = XlaTrainFigures(
        steps_this_run=trainer.step - run.start,
        resumed_from=resume.name if resume else None,
        start_step=run.start,
        end_step=trainer.step,
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        losses=losses,
        tokens_per_second=round(run.rate(), 1) if run.seconds else None,
        xla_compiles_first_step=run.first_step_compiles or 0,
        xla_compiles_after_first_step=run.late_compiles,
        persistent_cache=persistent_cache_counters(),
        compile_stage_ran=run.compiled_with_stage,
        checkpoints_saved=run.saved,
        final_checkpoint=final.path.name,
    )
    layout = {
        "tp": trainer.tp,
        "dp": trainer.dp,
        "devices": trainer.devices,
        "attention": trainer.layout.attention,
        "global_batch": trainer.global_batch,
    }
    return StageOutcome(summary=figures.summary(), figures=figures, layout=layout)


def _tensorboard(train_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(train_dir / "tensorboard"), flush_secs=30)
