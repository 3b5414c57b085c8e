"""The one training policy every trainer follows: schedule, non-finite refusal, cadence, early stopping.

Three loops train models in trnft (the Lightning FSDP2 trainer of the ``gpu`` and ``neuron-native``
platforms, the CPU-XLA trainer and optimum-neuron's ``NeuronTrainer`` subclass). None of them keeps its
own copy of these rules:

- :func:`lr_factor`: the learning rate of optimizer step ``s`` (0-based) as a factor of
  ``train.learning_rate`` (what ``LambdaLR`` wants); the value itself is
  :func:`trnft.common.training.optim.lr_at` (warmup + cosine), which every trainer calls.
- :func:`refuse_non_finite`: called at **every** optimizer step, before the update, with the step's loss
  and gradient norm; raises one line naming the step, so a non-finite state is never applied or saved.
- :class:`Cadence`: which steps log, validate and save (the last step always logs and saves; the first
  step of a run, resumed or not, logs).
- :class:`EarlyStopping`: patience over validation losses.
- :class:`TrainFigures`: the figures every trainer reports (each adds its own).
- :func:`on_recompile`: what graphs compiled after the first step mean (``train.on_recompile``).

:class:`trnft.common.training.driver.StepDriver` applies them around every step of the FSDP2 trainer
(through :class:`trnft.common.training.lightning_policy.PolicyCallback`) and of the CPU-XLA trainer; the
NeuronTrainer gets the same cadence and schedule as its ``TrainingArguments`` and its callbacks
(:mod:`trnft.neuron.trainium`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..config.run_config import RunConfig, TrainSection
from ..errors import TrnftError
from ..pipeline.figures import Figures
from .optim import lr_at


def lr_factor(step: int, train: TrainSection) -> float:
    """The same learning rate as a factor of ``train.learning_rate`` (for ``LambdaLR``)."""
    return lr_at(step, train) / train.learning_rate


def refuse_non_finite(step: int, loss: float, grad_norm: float | None, read_at: int | None = None) -> None:
    """Stop at a non-finite loss or gradient norm of optimizer step ``step`` (1-based).

    ``read_at``: None when the host checks the step before its update (nothing of it is applied); the step
    at which the figures were read when the device skipped the update itself and the host reads figures
    only now and then (the steps in between trained on, and none of them is saved).

    Raises:
        TrnftError: naming the step, the quantity and what to change; nothing of the step is saved.
    """
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
        if value is not None and not math.isfinite(float(value)):
            if read_at is None:
                happened = "stopped before the update, nothing of this step is saved"
            else:
                happened = (
                    f"its update was skipped on the device; stopped at step {read_at}, where the figures "
                    f"were read, with no checkpoint of step {step} or later saved"
                )
            raise TrnftError(
                f"train: step {step} has a non-finite {what} ({float(value)}); {happened}. "
                "Lower train.learning_rate or check the data"
            )


@dataclass(frozen=True)
class Cadence:
    """When a run logs, validates and saves. Steps are 1-based counts of finished optimizer steps."""

    max_steps: int
    logging_steps: int
    eval_steps: int
    save_steps: int

    @classmethod
    def of(cls, train: TrainSection) -> Cadence:
        return cls(train.max_steps, train.logging_steps, train.eval_steps, train.save_steps)

    def logs(self, step: int, first_of_run: int) -> bool:
        """Log every ``logging_steps``, the first step this run trained and the last step."""
        return step % self.logging_steps == 0 or step in (first_of_run, self.max_steps)

    def validates(self, step: int) -> bool:
        return bool(self.eval_steps) and step % self.eval_steps == 0

    def saves(self, step: int, *, stopping: bool = False) -> bool:
        """Save every ``save_steps``, at the last step, and at the step an early stop ends the run."""
        return step % self.save_steps == 0 or step == self.max_steps or stopping


@dataclass
class EarlyStopping:
    """Stop after ``patience`` validations in a row without a new best loss (0: never stop)."""

    patience: int
    best: float = math.inf
    without_improvement: int = 0

    def update(self, loss: float) -> bool:
        """Record one validation loss; True when the run must stop now."""
        if loss < self.best:
            self.best, self.without_improvement = loss, 0
        else:
            self.without_improvement += 1
        return bool(self.patience) and self.without_improvement >= self.patience


def on_recompile(
    cfg: RunConfig, compiled_with_stage: bool, step: int, count: int, log: Callable[[str], None]
) -> None:
    """Graphs compiled after the first step: the shapes or the graph changed between steps.

    With a compile stage behind the run, ``train.on_recompile`` decides: ``fail`` stops the run, ``warn``
    says so, ``ignore`` only logs it; without one, it is always only logged (every graph is new).
    """
    message = (
        f"train: {count} graph(s) compiled at step {step}, after the first step; shapes or graph structure "
        "changed between steps"
    )
    if not compiled_with_stage or cfg.train.on_recompile == "ignore":
        log(message)
        return
    if cfg.train.on_recompile == "fail":
        raise TrnftError(f"{message} (train.on_recompile=fail)")
    log(f"warning: {message}")


@dataclass(frozen=True)
class TrainFigures(Figures):
    """What every trainer reports about a train stage; each trainer's figures add their own fields."""

    steps_this_run: int
    resumed_from: str | None
    start_step: int
    end_step: int
    first_loss: float | None
    final_loss: float | None
    losses: list[float]
    tokens_per_second: float | None
    checkpoints_saved: list[str]
    final_checkpoint: str

    def summary(self) -> str:
        text = f"{self.end_step} steps"
        if self.losses:
            text += f", loss {self.losses[0]:.3f} -> {self.losses[-1]:.3f}"
        if getattr(self, "stopped_early", False):
            text += " (early stop)"
        return text + f", {self.final_checkpoint}"
