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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..common import stop
from ..common.config.run_config import RunConfig
from ..common.errors import ConfigError, TrnftError
from ..common.pipeline import checkpoints
from ..common.pipeline.platform_stages import TRAIN
from ..common.pipeline.stages import StageContext, StageOutcome, StageResult, run_stage
from ..common.training.data import TokenizeOutput
from ..common.training.driver import RunRecord, StepDriver
from ..common.training.policy import TrainFigures
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


class _XlaTarget:
    """The CPU-XLA trainer as the step driver's target: one process (SPMD over its devices), so a stop
    signal needs no agreement and a save is written before :meth:`save` returns."""

    is_main = True

    def __init__(self, ctx: StageContext, trainer: Any, tokenized: TokenizeOutput) -> None:
        self.ctx, self.trainer, self.tokenized = ctx, trainer, tokenized
        self._written: str | None = None

    @property
    def step_count(self) -> int:
        return self.trainer.step

    def validate(self) -> float:
        # Never reached: train.eval_steps is refused for this trainer before any stage runs
        # (trnft.neuron.backend); the rehearsal's graphs are its training step's only.
        raise TrnftError("train.eval_steps: the CPU-XLA trainer does not validate; set train.eval_steps=0")

    def save(self) -> str:
        ctx = self.ctx
        path = self.trainer.save(ctx.out_dir, ctx.fingerprint, self.tokenized.tokenizer_dir)
        checkpoints.prune(ctx.out_dir, ctx.cfg.train.keep_checkpoints, ctx.log)
        self._written = path.name
        return path.name

    def commit_written(self, *, wait: bool) -> str | None:
        name, self._written = self._written, None
        return name

    def agreed_stop(self) -> int:
        return stop.requested()


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
    record = RunRecord(start=trainer.step, resumed_from=resume.name if resume else None)
    driver = StepDriver(ctx, record)
    writer = _tensorboard(ctx.out_dir)
    sink = None if writer is None else lambda metrics, step: _write_scalars(writer, metrics, step)
    previous = stop.install_cooperative_keeping()  # a stop signal ends the run after its step, saved
    try:
        driver.start(_XlaTarget(ctx, trainer, tokenized), sink, compile_count)
        while trainer.step < cfg.train.max_steps:
            done = trainer.train_step()
            # The update is in the step's graph; refused here, before anything of the step is saved.
            driver.before_update(done.step, done.loss, done.grad_norm)
            if driver.after_step(done):
                break
        driver.end()
        driver.raise_if_stopped()
    finally:
        stop.restore(previous)
        if writer is not None:
            writer.close()
    return _cpu_report(ctx, trainer, record)


def _cpu_report(ctx: StageContext, trainer: Any, record: RunRecord) -> StageOutcome:
    from .xla_trainer import persistent_cache_counters

    end = ctx.cfg.train.max_steps
    final = checkpoints.newest_complete(ctx.out_dir)
    if final is None or final.step != end:
        raise TrnftError(f"train: ended at step {trainer.step} without checkpoint-{end}")
    losses = trainer.history
    figures = XlaTrainFigures(
        steps_this_run=trainer.step - record.start,
        resumed_from=record.resumed_from,
        start_step=record.start,
        end_step=trainer.step,
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        losses=losses,
        tokens_per_second=round(record.rate(), 1) if record.seconds else None,
        xla_compiles_first_step=record.graphs_first_step or 0,
        xla_compiles_after_first_step=record.graphs_after_first_step or 0,
        persistent_cache=persistent_cache_counters(),
        compile_stage_ran=ctx.rundir.manifest("compile") is not None,
        checkpoints_saved=record.saved,
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


def _write_scalars(writer: Any, metrics: dict[str, float], step: int) -> None:
    for name, value in metrics.items():
        writer.add_scalar(name, value, step)


def _tensorboard(train_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(train_dir / "tensorboard"), flush_secs=30)
