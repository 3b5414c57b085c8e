"""The step driver (:mod:`trnft.common.training.driver`) as a Lightning callback.

The FSDP2 trainer's ``LightningModule`` only computes: the micro-batch losses, their backward, the global
gradient norm and clipping, the optimizer step, validation and a checkpoint when asked. This callback
hands each step to the one :class:`~trnft.common.training.driver.StepDriver`, at the hooks Lightning calls
on every rank:

- ``on_before_optimizer_step`` (inside ``optimizer.step()``, before any parameter moves): sets the learning
  rate of the step from the one schedule and lets the driver refuse a non-finite loss or gradient norm
  (where they are host numbers; device tensors are read and checked by the driver later);
- ``on_train_batch_end``: the driver's after-step work; Lightning is told to stop when the driver says so.

The module it drives implements :class:`PolicyTarget`.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import lightning as L

from .. import stop
from ..pipeline.stages import StageContext
from .driver import FinishedStep, RunRecord, StepDriver
from .optim import lr_at

__all__ = ["PolicyCallback", "PolicyTarget", "RunRecord"]


class PolicyTarget(Protocol):
    """What the callback needs from the module it drives (every rank); beyond the driver's
    :class:`~trnft.common.training.driver.StepTarget`, the figures of the step being applied."""

    step_count: int  # optimizer steps finished (the step being applied is step_count + 1)
    # The global loss of the step being applied (set before optimizer.step()) and its gradient norm before
    # clipping: host floats, or 0-d device tensors where the device skips a non-finite update itself.
    step_loss: Any
    step_grad_norm: Any
    step_tokens: int  # non-pad tokens of the finished step, all ranks
    is_main: bool
    device: Any
    world: Any  # parallel.World: its host group carries what the hosts agree on

    def validate(self) -> float: ...

    def save(self) -> str: ...

    def commit_written(self, *, wait: bool) -> str | None: ...


class _LightningTarget:
    """The module as the driver's target: the module's own methods, and the stop every rank agrees on."""

    def __init__(self, module: Any) -> None:
        self.module = module

    @property
    def step_count(self) -> int:
        return self.module.step_count

    @property
    def is_main(self) -> bool:
        return self.module.is_main

    def validate(self) -> float:
        return self.module.validate()

    def save(self) -> str:
        return self.module.save()

    def commit_written(self, *, wait: bool) -> str | None:
        return self.module.commit_written(wait=wait)

    def agreed_stop(self) -> int:
        return stop.agreed_stop(*_host_collective(self.module))


class PolicyCallback(L.Callback):
    """Drives one run's steps through :class:`~trnft.common.training.driver.StepDriver`.

    ``graph_counter``: a function returning how many graphs the device has compiled so far (the native
    Neuron compile cache; called on rank 0 only), or None on devices without one.
    """

    def __init__(self, ctx: StageContext, record: RunRecord, graph_counter: Any = None) -> None:
        self.driver = StepDriver(ctx, record)
        self.train = ctx.cfg.train
        self.graph_counter = graph_counter
        self._started = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        # Replaces Lightning's own SIGTERM handler (which broadcasts from inside the handler, wherever the
        # main thread is): from here a stop signal only sets a flag, read after each step (stop.agreed_stop).
        stop.install_cooperative()

        def sink(metrics: dict[str, float], step: int) -> None:
            for logger in trainer.loggers:  # at the run's own step (Lightning's restarts at 0 on resume)
                logger.log_metrics(metrics, step=step)  # rank-zero only inside Lightning's loggers

        counter = None
        if self.graph_counter is not None:
            counter = lambda: _agreed_count(self.graph_counter, pl_module)  # noqa: E731
        self.driver.start(_LightningTarget(pl_module), sink, counter)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        step = pl_module.step_count
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, self.train)
        if isinstance(pl_module.step_loss, float):  # else the driver reads and checks it later
            self.driver.before_update(step + 1, pl_module.step_loss, pl_module.step_grad_norm)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done = FinishedStep(
            step=pl_module.step_count,
            loss=pl_module.step_loss,
            grad_norm=pl_module.step_grad_norm,
            tokens=pl_module.step_tokens,
            seconds=time.perf_counter() - self._started,
        )
        stopping = self.driver.after_step(done)
        if trainer.progress_bar_callback is not None:  # a terminal: the newest loss read on the host
            pl_module.log("loss", self.driver.last_loss, prog_bar=True, logger=False, batch_size=1)
        if stopping:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.driver.end()


def _host_collective(pl_module: Any) -> tuple[Any, Any]:
    """The (device, group) of a collective among the hosts: the world's gloo group on the CPU where the
    default group is a device's (whose collective would wait for the device's queue)."""
    world = pl_module.world
    if world is not None and world.host_group is not None:
        import torch

        return torch.device("cpu"), world.host_group
    return pl_module.device, None


def _agreed_count(counter: Any, pl_module: Any) -> int:
    """Rank 0 counts the compiled graphs; every rank gets its count (so all decide the same)."""
    import torch
    import torch.distributed as dist

    mine = counter() if pl_module.is_main else 0
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    device, group = _host_collective(pl_module)
    count = torch.tensor([mine], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return int(count.item())
