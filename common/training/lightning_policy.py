"""The training policy (:mod:`trnft.common.training.policy`) as a Lightning callback.

The FSDP2 trainer's ``LightningModule`` only computes: the micro-batch losses, their backward, the global
gradient norm and clipping, the optimizer step, validation and a checkpoint when asked. This callback
decides everything else, at the hooks Lightning calls on every rank:

- ``on_before_optimizer_step`` (inside ``optimizer.step()``, before any parameter moves): sets the learning
  rate of the step from the one schedule and refuses a non-finite loss or gradient norm;
- ``on_train_batch_end``: throughput, logging (the log line on rank 0, Lightning's loggers), validation,
  early stopping, saving, the progress record and, on the Neuron device, graphs compiled after step 1.

The module it drives implements :class:`PolicyTarget`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import lightning as L

from .. import stop
from ..errors import TrnftError
from ..pipeline import checkpoints
from ..pipeline.stages import StageContext
from .optim import lr_at
from .policy import Cadence, EarlyStopping, on_recompile, refuse_non_finite


class PolicyTarget(Protocol):
    """What the callback needs from the module it drives (every rank)."""

    step_count: int  # optimizer steps finished (the step being applied is step_count + 1)
    step_loss: float  # the global loss of the step being applied (set before optimizer.step())
    step_grad_norm: float  # its global gradient norm before clipping
    step_tokens: int  # non-pad tokens of the finished step, all ranks
    is_main: bool

    def validate(self) -> float: ...

    def save(self) -> str: ...


@dataclass
class RunRecord:
    """What the policy counts while a run goes; the trainer reports it."""

    start: int
    resumed_from: str | None
    saved: list[str] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    stopped_by: int = 0  # a stop signal (SIGTERM, ...) ended the run after saving; 0 when none did
    # Compile-cache counts (None where the device has no compile cache to watch): graphs in the cache when
    # the run started, compiled during its first step (0: every graph of the step was a cache hit), and
    # compiled after it (shapes or graphs that changed between steps).
    graphs_at_start: int | None = None
    graphs_first_step: int | None = None
    graphs_after_first_step: int | None = None

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class PolicyCallback(L.Callback):
    """The schedule, the non-finite refusal and the logging / validation / saving cadence of one run, and
    when a save is committed (``pl_module.save()`` starts one, ``pl_module.commit_written`` makes it visible).

    ``graph_counter``: a function returning how many graphs the device has compiled so far (the native
    Neuron compile cache), or None on devices without one; graphs compiled after the first step are
    reported and handled as ``train.on_recompile`` says.
    """

    def __init__(self, ctx: StageContext, record: RunRecord, graph_counter: Any = None) -> None:
        self.ctx = ctx
        self.train = ctx.cfg.train
        self.cadence = Cadence.of(self.train)
        self.early = EarlyStopping(self.train.early_stopping_patience)
        self.record = record
        self.graph_counter = graph_counter
        self._started = 0.0

    # -- inside optimizer.step(), before the update ------------------------------------------------
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        step = pl_module.step_count
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, self.train)
        try:
            refuse_non_finite(step + 1, pl_module.step_loss, pl_module.step_grad_norm)
        except TrnftError:
            # Every rank refuses alike (the loss and norm are global), so the last good checkpoint, if its
            # background writes are still going, can be committed before the run stops.
            self._log_committed(pl_module, pl_module.commit_written(wait=True))
            raise

    # -- after each optimizer step -----------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        # Replaces Lightning's own SIGTERM handler (which broadcasts from inside the handler, wherever the
        # main thread is): from here a stop signal only sets a flag, read after each step (stop.agreed_stop).
        stop.install_cooperative()
        if self.graph_counter is not None:
            self.record.graphs_at_start = self._graphs(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        record, step = self.record, pl_module.step_count
        if step > record.start + 1:  # the first step of a run includes start-up (allocations, compilation)
            record.tokens += pl_module.step_tokens
            record.seconds += time.perf_counter() - self._started
        checkpoints.fault_point("step", step)
        self._watch_graphs(step, pl_module)
        lr = lr_at(step - 1, self.train)
        if pl_module.is_main and self.cadence.logs(step, record.start + 1):
            self.ctx.log(
                f"train: step {step}/{self.train.max_steps} loss {pl_module.step_loss:.4f} lr {lr:.2e} "
                f"grad_norm {pl_module.step_grad_norm:.3f} tokens/s {record.rate():,.0f}"
            )
        metrics = {"train/loss": pl_module.step_loss, "train/learning_rate": lr}
        metrics["train/grad_norm"] = pl_module.step_grad_norm
        if record.seconds:
            metrics["train/tokens_per_second"] = record.rate()
        self._log_metrics(trainer, metrics, step)
        pl_module.log("loss", pl_module.step_loss, prog_bar=True, logger=False, batch_size=1)
        if self.cadence.validates(step):
            loss = pl_module.validate()
            if pl_module.is_main:
                self.ctx.log(f"train: step {step} validation loss {loss:.4f}")
            self._log_metrics(trainer, {"val/loss": loss}, step)
            if self.early.update(loss):
                record.stopped_early = True
                if pl_module.is_main:
                    self.ctx.log(
                        f"train: early stop at step {step}: {self.early.patience} validations without improvement"
                    )
        saved_now = self.cadence.saves(step, stopping=record.stopped_early)
        # A background save commits at the first step end its writes are done; before a new save, it must.
        self._log_committed(pl_module, pl_module.commit_written(wait=saved_now))
        if saved_now:
            record.saved.append(pl_module.save())
            self._log_committed(pl_module, pl_module.commit_written(wait=False))
        signum = stop.agreed_stop(pl_module.device)  # every rank, every step: the same answer everywhere
        if signum and step < self.train.max_steps:
            record.stopped_by = signum
            if not saved_now:
                self._log_committed(pl_module, pl_module.commit_written(wait=True))
                record.saved.append(pl_module.save())
            self._log_committed(pl_module, pl_module.commit_written(wait=True))  # on disk before we stop
            if pl_module.is_main:
                self.ctx.log(
                    f"train: {stop.signal.Signals(signum).name} received; stopping after step {step} "
                    f"with {record.saved[-1]} saved"
                )
        if pl_module.is_main:
            summary = f"step {step} of {self.train.max_steps}"
            self.ctx.rundir.write_progress("train", {"summary": summary, "step": step})
        if record.stopped_early or record.stopped_by:
            trainer.should_stop = True

    # -- helpers -----------------------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._log_committed(pl_module, pl_module.commit_written(wait=True))  # the last save, on disk

    def _log_committed(self, pl_module: Any, name: str | None) -> None:
        if name is not None and pl_module.is_main:
            self.ctx.log(f"train: saved {name}")

    @staticmethod
    def _log_metrics(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        """Scalars at the run's own step (Lightning's global_step restarts at 0 on resume)."""
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)  # rank-zero only inside Lightning's loggers

    def _graphs(self, pl_module: Any) -> int:
        """Rank 0 counts the compiled graphs; every rank gets its count (so all decide the same)."""
        import torch
        import torch.distributed as dist

        mine = self.graph_counter() if pl_module.is_main else 0
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return mine
        count = torch.tensor([mine], dtype=torch.int64, device=pl_module.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count.item())

    def _watch_graphs(self, step: int, pl_module: Any) -> None:
        record = self.record
        if self.graph_counter is None or record.graphs_at_start is None:
            return
        compiled = self._graphs(pl_module) - record.graphs_at_start
        if step == record.start + 1:
            record.graphs_first_step, record.graphs_after_first_step = compiled, 0
            return
        assert record.graphs_first_step is not None and record.graphs_after_first_step is not None
        new = compiled - record.graphs_first_step - record.graphs_after_first_step
        if new > 0:
            record.graphs_after_first_step += new
            on_recompile(
                self.ctx.cfg, self.ctx.rundir.manifest("compile") is not None, step, new, self.ctx.log
            )
