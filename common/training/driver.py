"""One step driver: what happens around each optimizer step, the same for every trainer loop.

A trainer computes a step (its micro-batches, backward, the update); :class:`StepDriver` does everything
else, so the FSDP2 trainer (through :class:`trnft.common.training.lightning_policy.PolicyCallback`) and the
CPU-XLA rehearsal (:mod:`trnft.neuron.train`) cannot drift apart:

- :meth:`StepDriver.before_update`: the non-finite refusal, before a step's update is applied or saved
  (where the trainer's figures are host numbers);
- :meth:`StepDriver.after_step`: throughput (the first step of a run, which includes start-up, is left
  out), graphs compiled after the first step (``train.on_recompile``), the log line and the metrics
  (TensorBoard / W&B through the trainer's sink), validation and early stopping, saving on the cadence and
  committing background saves, a stop signal (save the step, then stop), the progress record;
- :meth:`StepDriver.end` / :meth:`StepDriver.raise_if_stopped`: the last save on disk, and the stop
  signal that ended the run as :class:`trnft.common.stop.Stopped`.

A trainer gives the driver a :class:`StepTarget` (what it can do when asked) and, per step,
:class:`FinishedStep` (what the step measured). The rules themselves (schedule, cadence, patience,
refusals) are :mod:`trnft.common.training.policy`'s.

**Figures left on the device.** A trainer whose device skips a non-finite step's update by itself (AdamW's
fused kernel with ``found_inf``) gives its loss and gradient norm as device tensors. The host then never
waits for a step: the driver reads them in one transfer only where it needs numbers (a step that logs,
validates or saves, a stop signal, the last step) and refuses the first non-finite one there, before any
later step is saved, so the last checkpoint on disk is always one of finite steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import stop
from ..errors import TrnftError
from ..pipeline import checkpoints
from ..pipeline.stages import StageContext
from .optim import lr_at
from .policy import Cadence, EarlyStopping, on_recompile, refuse_non_finite

MetricSink = Callable[[dict[str, float], int], None]  # scalars at the run's own step (rank 0 writes them)


class StepTarget(Protocol):
    """What the driver asks of the trainer it drives (on every rank)."""

    step_count: int  # optimizer steps finished
    is_main: bool  # the rank that logs and writes the progress record

    def validate(self) -> float:
        """The validation loss now (every rank gets the same value)."""
        ...

    def save(self) -> str:
        """Start saving a checkpoint of the current step; its folder name."""
        ...

    def commit_written(self, *, wait: bool) -> str | None:
        """Make a save whose files are written visible (waiting for them when ``wait``); its name, or None
        when no save was pending or its files are still being written."""
        ...

    def agreed_stop(self) -> int:
        """The stop signal every rank has agreed on after this step, or 0."""
        ...


@dataclass(frozen=True)
class FinishedStep:
    """What a trainer measured for one finished optimizer step (1-based ``step``; global figures).

    ``loss`` and ``grad_norm`` are host numbers, or 0-d device tensors where the device skipped the
    update of a non-finite step itself (see the module docstring); the driver hands on host numbers only.
    """

    step: int
    loss: Any  # float, or a 0-d tensor on the device
    grad_norm: Any
    tokens: int  # non-pad tokens of the step, all ranks
    seconds: float


def host_numbers(values: Sequence[Any]) -> list[float]:
    """``values`` (host numbers and 0-d device tensors, mixed) as host floats, with one device-to-host
    transfer for all the tensors (what "reading a step's figures" costs: it waits for the device)."""
    import torch

    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


@dataclass
class RunRecord:
    """What the driver counts while a run goes; the trainer reports it."""

    start: int
    resumed_from: str | None
    saved: list[str] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    stopped_by: int = 0  # a stop signal (SIGTERM, ...) ended the run after saving; 0 when none did
    # Compile counts (None where nothing is watched): graphs the device had compiled when the run started,
    # those compiled during its first step (0: every graph was a cache hit), and those compiled after it
    # (shapes or graphs that changed between steps).
    graphs_at_start: int | None = None
    graphs_first_step: int | None = None
    graphs_after_first_step: int | None = None

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class StepDriver:
    """The cadence, refusals, logging, validation, early stopping, saving, stop handling and progress of
    one run. ``graph_counter`` (given to :meth:`start`): how many graphs the device has compiled so far,
    the same on every rank, or None where the device compiles nothing to watch."""

    def __init__(self, ctx: StageContext, record: RunRecord) -> None:
        self.ctx = ctx
        self.train = ctx.cfg.train
        self.cadence = Cadence.of(self.train)
        self.early = EarlyStopping(self.train.early_stopping_patience)
        self.record = record
        self.target: StepTarget | None = None
        self.sink: MetricSink | None = None
        self.graph_counter: Callable[[], int] | None = None
        self.pending: list[FinishedStep] = []  # steps whose figures are still on the device
        self.last_loss = self.last_grad_norm = float("nan")  # the newest figures read on the host

    def start(
        self,
        target: StepTarget,
        sink: MetricSink | None = None,
        graph_counter: Callable[[], int] | None = None,
    ) -> None:
        """Before the run's first step (after any resume)."""
        self.target, self.sink, self.graph_counter = target, sink, graph_counter
        self.record.start = target.step_count
        if graph_counter is not None:
            self.record.graphs_at_start = graph_counter()

    # -- before the update -------------------------------------------------------------------------
    def before_update(self, step: int, loss: float, grad_norm: float | None) -> None:
        """Refuse a non-finite step ``step`` (1-based) before its update; a finished background save is
        committed first, so the last good checkpoint survives the refusal."""
        try:
            refuse_non_finite(step, loss, grad_norm)
        except TrnftError:
            self._committed(self._target.commit_written(wait=True))
            raise

    # -- after the update --------------------------------------------------------------------------
    def after_step(self, done: FinishedStep) -> bool:
        """Everything after step ``done.step``; True when the run must stop now (early stop or a stop
        signal), with that step saved."""
        target, record, step = self._target, self.record, done.step
        if step > record.start + 1:  # the first step of a run includes start-up (allocation, compilation)
            record.tokens += done.tokens
            record.seconds += done.seconds
        checkpoints.fault_point("step", step)
        compiled = self._watch_graphs(step)
        self.pending.append(done)
        signum = target.agreed_stop()  # every rank, every step: the same answer everywhere
        validates = self.cadence.validates(step)
        reads = (
            self.cadence.logs(step, record.start + 1)
            or validates
            or self.cadence.saves(step, stopping=False)
            or bool(signum)
            or step >= self.train.max_steps
        )
        if reads:
            self._read_figures(step)
        lr = lr_at(step - 1, self.train)
        if reads and target.is_main and self.cadence.logs(step, record.start + 1):
            self.ctx.log(
                f"train: step {step}/{self.train.max_steps} loss {self.last_loss:.4f} lr {lr:.2e} "
                f"grad_norm {self.last_grad_norm:.3f} tokens/s {record.rate():,.0f}"
                + (f" compiles {compiled}" if compiled is not None else "")
            )
        if reads and record.seconds:
            self._metrics({"train/tokens_per_second": record.rate()}, step)
        if validates:
            self._validate(step)
        saved_now = self.cadence.saves(step, stopping=record.stopped_early)
        if saved_now and self.pending:  # an early stop saves a step the cadence did not read
            self._read_figures(step)
        # A background save commits at the first step end its writes are done; before a new save, it must.
        self._committed(target.commit_written(wait=saved_now))
        if saved_now:
            record.saved.append(target.save())
            self._committed(target.commit_written(wait=False))
        if signum and step < self.train.max_steps:
            record.stopped_by = signum
            if not saved_now:
                self._committed(target.commit_written(wait=True))
                record.saved.append(target.save())
            self._committed(target.commit_written(wait=True))  # on disk before the run stops
            if target.is_main:
                self.ctx.log(
                    f"train: {stop.signal.Signals(signum).name} received; stopping after step {step} "
                    f"with {record.saved[-1]} saved"
                )
        if target.is_main:
            self.ctx.rundir.write_progress(
                "train", {"summary": f"step {step} of {self.train.max_steps}", "step": step}
            )
        return record.stopped_early or bool(record.stopped_by)

    def _read_figures(self, step: int) -> None:
        """The pending steps' figures on the host (one transfer), each refused if non-finite, then their
        metrics at their own steps. Called at step ``step``, before anything of it is saved."""
        pending, self.pending = self.pending, []
        numbers = host_numbers([x for done in pending for x in (done.loss, done.grad_norm)])
        for i, done in enumerate(pending):
            loss, grad_norm = numbers[2 * i], numbers[2 * i + 1]
            try:
                refuse_non_finite(done.step, loss, grad_norm, read_at=step)
            except TrnftError:
                self._committed(self._target.commit_written(wait=True))
                raise
            self.last_loss, self.last_grad_norm = loss, grad_norm
            lr = lr_at(done.step - 1, self.train)
            self._metrics(
                {"train/loss": loss, "train/learning_rate": lr, "train/grad_norm": grad_norm}, done.step
            )

    def end(self) -> None:
        """After the last step: the last save on disk."""
        if self.target is not None:
            self._committed(self.target.commit_written(wait=True))

    def raise_if_stopped(self) -> None:
        """A stop signal ended the run (after saving): stop the stage as that signal asks."""
        if self.record.stopped_by:
            raise stop.Stopped(
                self.record.stopped_by, f"{self.record.saved[-1]} saved; the rerun resumes there"
            )

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def _target(self) -> StepTarget:
        if self.target is None:
            raise RuntimeError("StepDriver.start() was not called before the first step")
        return self.target

    def _validate(self, step: int) -> None:
        loss = self._target.validate()
        if self._target.is_main:
            self.ctx.log(f"train: step {step} validation loss {loss:.4f}")
        self._metrics({"val/loss": loss}, step)
        if self.early.update(loss):
            self.record.stopped_early = True
            if self._target.is_main:
                self.ctx.log(
                    f"train: early stop at step {step}: {self.early.patience} validations without improvement"
                )

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.sink is not None:
            self.sink(metrics, step)

    def _committed(self, name: str | None) -> None:
        if name is not None and self._target.is_main:
            self.ctx.log(f"train: saved {name}")

    def _watch_graphs(self, step: int) -> int | None:
        """Graphs compiled so far in this run (None when not watched); a graph compiled after the run's
        first step goes to ``train.on_recompile``."""
        record = self.record
        if self.graph_counter is None or record.graphs_at_start is None:
            return None
        compiled = self.graph_counter() - record.graphs_at_start
        if step == record.start + 1:
            record.graphs_first_step, record.graphs_after_first_step = compiled, 0
            return compiled
        assert record.graphs_first_step is not None and record.graphs_after_first_step is not None
        new = compiled - record.graphs_first_step - record.graphs_after_first_step
        if new > 0:
            record.graphs_after_first_step += new
            on_recompile(
                self.ctx.cfg, self.ctx.rundir.manifest("compile") is not None, step, new, self.ctx.log
            )
        return compiled
