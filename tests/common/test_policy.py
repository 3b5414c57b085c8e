"""The one training policy and its step driver: schedule, non-finite refusal, cadence, early stopping,
recompile watch, saving and stop handling around each step."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from trnft.common import stop
from trnft.common.config.run_config import TrainSection
from trnft.common.errors import TrnftError
from trnft.common.training.driver import FinishedStep, RunRecord, StepDriver
from trnft.common.training.lightning_policy import _agreed_count
from trnft.common.training.optim import lr_at
from trnft.common.training.policy import Cadence, EarlyStopping, lr_factor, refuse_non_finite


def test_one_schedule_as_value_and_as_factor():
    train = TrainSection(learning_rate=2e-4, min_lr=2e-5, warmup_steps=4, max_steps=20)
    for step in range(20):
        assert lr_factor(step, train) * train.learning_rate == pytest.approx(lr_at(step, train), rel=1e-12)
    assert lr_at(0, train) == pytest.approx(5e-5) and lr_at(19, train) > train.min_lr


@pytest.mark.parametrize(
    ("loss", "norm", "what"), [(math.nan, 1.0, "loss"), (1.0, math.inf, "gradient norm")]
)
def test_a_non_finite_step_is_one_line_naming_the_step(loss, norm, what):
    with pytest.raises(TrnftError) as err:
        refuse_non_finite(7, loss, norm)
    assert str(err.value).startswith(f"train: step 7 has a non-finite {what}")
    refuse_non_finite(7, 1.0, None)  # a trainer without a gradient norm at this step


def test_cadence_logs_the_first_and_last_step_and_saves_on_early_stop():
    cadence = Cadence(max_steps=10, logging_steps=4, eval_steps=3, save_steps=5)
    assert [s for s in range(1, 11) if cadence.logs(s, first_of_run=3)] == [3, 4, 8, 10]
    assert [s for s in range(1, 11) if cadence.validates(s)] == [3, 6, 9]
    assert [s for s in range(1, 11) if cadence.saves(s)] == [5, 10]
    assert cadence.saves(7, stopping=True)
    assert not Cadence(10, 4, 0, 5).validates(3)


def test_early_stopping_counts_validations_without_a_new_best():
    early = EarlyStopping(patience=2)
    assert [early.update(x) for x in (3.0, 2.0, 2.5, 2.0, 1.0, 1.5, 1.5)] == [
        False, False, False, True, False, False, True,
    ]  # fmt: skip
    never = EarlyStopping(patience=0)
    assert not any(never.update(x) for x in (1.0, 2.0, 3.0))


def _ctx(tmp_path, **train):
    logged: list[str] = []
    progress: list[dict] = []
    cfg = SimpleNamespace(train=TrainSection(**train))
    rundir = SimpleNamespace(
        manifest=lambda stage: {"stage": stage},  # a compile stage ran
        write_progress=lambda stage, record: progress.append(record),
    )
    return SimpleNamespace(cfg=cfg, rundir=rundir, log=logged.append), logged, progress


class _Target:
    """A trainer as the driver sees it: counts its steps, saves synchronously, a stop when told."""

    def __init__(self, validation: list[float] = (), stop_after: int = 0, is_main: bool = True) -> None:
        self.step_count, self.is_main = 0, is_main
        self.validation, self.stop_after = list(validation), stop_after
        self.saves: list[int] = []
        self._written: str | None = None

    def validate(self) -> float:
        return self.validation.pop(0)

    def save(self) -> str:
        self.saves.append(self.step_count)
        self._written = f"checkpoint-{self.step_count}"
        return self._written

    def commit_written(self, *, wait: bool) -> str | None:
        name, self._written = self._written, None
        return name

    def agreed_stop(self) -> int:
        return 15 if self.stop_after and self.step_count >= self.stop_after else 0


def _run(driver: StepDriver, target: _Target, steps: int) -> int:
    for step in range(1, steps + 1):
        target.step_count = step
        driver.before_update(step, 2.0 / step, 1.0)
        if driver.after_step(FinishedStep(step, 2.0 / step, 1.0, tokens=100, seconds=0.5)):
            break
    driver.end()
    return target.step_count


def test_the_driver_logs_saves_and_records_progress_on_the_cadence(tmp_path):
    ctx, logged, progress = _ctx(tmp_path, max_steps=6, logging_steps=4, save_steps=4)
    record = RunRecord(start=0, resumed_from=None)
    driver, target, metrics = StepDriver(ctx, record), _Target(), []
    driver.start(target, lambda m, step: metrics.append((step, sorted(m))))
    assert _run(driver, target, 6) == 6
    assert [line.split()[2] for line in logged if " loss " in line] == ["1/6", "4/6", "6/6"]
    assert [line for line in logged if "saved" in line] == [
        "train: saved checkpoint-4",
        "train: saved checkpoint-6",
    ]
    assert target.saves == [4, 6] and record.saved == ["checkpoint-4", "checkpoint-6"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5, 6]
    # the first step of the run (start-up) is left out of the throughput
    assert (record.tokens, record.seconds, record.rate()) == (500, 2.5, 200.0)
    assert metrics[0] == (1, ["train/grad_norm", "train/learning_rate", "train/loss"])
    # every step's figures at its own step; the throughput where the figures are read (not at step 1)
    assert [s for s, names in metrics if "train/loss" in names] == [1, 2, 3, 4, 5, 6]
    assert [s for s, names in metrics if names == ["train/tokens_per_second"]] == [4, 6]
    driver.raise_if_stopped()  # no stop signal: nothing to raise


def test_the_driver_validates_stops_early_and_saves_the_step_it_stops_at(tmp_path):
    ctx, logged, _ = _ctx(tmp_path, max_steps=10, eval_steps=2, save_steps=5, early_stopping_patience=2)
    record = RunRecord(start=0, resumed_from=None)
    driver, target = StepDriver(ctx, record), _Target(validation=[3.0, 2.0, 2.5, 2.4])
    driver.start(target)
    assert _run(driver, target, 10) == 8
    assert record.stopped_early and target.saves == [5, 8]
    assert "train: early stop at step 8: 2 validations without improvement" in logged


def test_a_stop_signal_saves_the_step_it_came_in_and_stops(tmp_path):
    ctx, logged, _ = _ctx(tmp_path, max_steps=10, save_steps=4)
    record = RunRecord(start=0, resumed_from=None)
    driver, target = StepDriver(ctx, record), _Target(stop_after=6)
    driver.start(target)
    assert _run(driver, target, 10) == 6
    assert target.saves == [4, 6] and record.stopped_by == 15
    assert "train: SIGTERM received; stopping after step 6 with checkpoint-6 saved" in logged
    with pytest.raises(stop.Stopped):
        driver.raise_if_stopped()


def test_a_non_finite_step_commits_the_last_save_before_it_is_refused(tmp_path):
    ctx, logged, _ = _ctx(tmp_path, max_steps=10, save_steps=2)
    driver, target = StepDriver(ctx, RunRecord(start=0, resumed_from=None)), _Target()
    driver.start(target)
    target.step_count = 2
    target.save()  # a background save whose files are written but not yet committed
    with pytest.raises(TrnftError, match="train: step 3 has a non-finite loss"):
        driver.before_update(3, math.nan, 1.0)
    assert logged == ["train: saved checkpoint-2"]


def test_figures_left_on_the_device_are_read_where_needed_and_the_first_non_finite_one_is_refused(tmp_path):
    """Steps whose loss and norm are device tensors (the device skipped a non-finite update itself): read
    at the steps that log or save; a non-finite step 3 is refused when step 4 reads it, before step 4 is
    saved, and the save of step 2 is committed."""
    import torch

    ctx, logged, _ = _ctx(tmp_path, max_steps=10, save_steps=2, logging_steps=4)
    driver, target, metrics = StepDriver(ctx, RunRecord(start=0, resumed_from=None)), _Target(), []
    driver.start(target, lambda m, step: metrics.append((step, m)))
    losses = [2.0, 1.5, math.nan, 1.2]
    with pytest.raises(TrnftError) as err:
        for step, loss in enumerate(losses, start=1):
            target.step_count = step
            done = FinishedStep(step, torch.tensor(loss), torch.tensor(1.0), tokens=10, seconds=0.1)
            driver.after_step(done)
    assert str(err.value).startswith("train: step 3 has a non-finite loss (nan); its update was skipped")
    assert "stopped at step 4, where the figures were read, with no checkpoint of step 3 or later" in str(
        err.value
    )
    assert target.saves == [2] and "train: saved checkpoint-2" in logged
    read = [(s, m["train/loss"]) for s, m in metrics if "train/loss" in m]
    assert read == [(1, 2.0), (2, 1.5)] and all(type(v) is float for _, v in read)
    assert logged[0].startswith("train: step 1/10 loss 2.0000")


def test_only_the_main_rank_logs_and_writes_progress(tmp_path):
    ctx, logged, progress = _ctx(tmp_path, max_steps=4, save_steps=2)
    driver, target = StepDriver(ctx, RunRecord(start=0, resumed_from=None)), _Target(is_main=False)
    driver.start(target)
    assert _run(driver, target, 4) == 4 and target.saves == [2, 4]
    assert logged == [] and progress == []


def test_graphs_compiled_after_the_first_step_follow_on_recompile(tmp_path):
    """The counter reads a real folder of .neff files (as the Neuron compile cache holds them)."""
    from trnft.neuron.native.device import NeffCacheWatch

    ctx, _, _ = _ctx(tmp_path, max_steps=4, on_recompile="fail")
    record = RunRecord(start=0, resumed_from=None)
    cache = tmp_path / "cache"
    cache.mkdir()
    counted: list[int] = []
    watch = NeffCacheWatch(cache)

    def counter() -> int:
        counted.append(watch())
        return counted[-1]

    def compile_graph(name: str) -> None:
        (cache / f"{name}.neff").write_text("x")

    compile_graph("warm")  # in the cache before the run: a hit, not a compile
    driver = StepDriver(ctx, record)
    driver.start(_Target(), graph_counter=counter)
    compile_graph("step1-a")
    compile_graph("step1-b")
    assert driver._watch_graphs(1) == 2 and driver._watch_graphs(2) == 2
    assert (record.graphs_at_start, record.graphs_first_step, record.graphs_after_first_step) == (1, 2, 0)
    compile_graph("late")
    with pytest.raises(TrnftError, match=r"1 graph\(s\) compiled at step 3, after the first step"):
        driver._watch_graphs(3)
    assert record.graphs_after_first_step == 1


def test_only_rank_0_reads_the_compile_cache():
    calls: list[int] = []
    # one process alone shares its count with itself; another rank's own count is never read
    assert _agreed_count(lambda: calls.append(1) or 7, SimpleNamespace(is_main=True, device=None)) == 7
    assert _agreed_count(lambda: calls.append(1) or 7, SimpleNamespace(is_main=False, device=None)) == 0
    assert len(calls) == 1


def test_torch_compile_recompiles_after_the_first_step_are_watched(tmp_path):
    """Where the FSDP2 trainer compiles its blocks, Dynamo's graph count is the driver's counter: a new
    shape after the first step is one more graph, reported as train.on_recompile says."""
    import torch

    from trnft.common.fsdp.trainer import compiled_graphs

    ctx, logged, _ = _ctx(tmp_path, max_steps=3, on_recompile="warn")
    record = RunRecord(start=0, resumed_from=None)
    block = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    driver = StepDriver(ctx, record)
    driver.start(_Target(), graph_counter=compiled_graphs)
    block(torch.ones(3))
    assert driver._watch_graphs(1) == 1
    block(torch.ones(3))
    assert driver._watch_graphs(2) == 1 and not [line for line in logged if "compiled at" in line]
    block(torch.ones(5))  # another shape: a recompile
    driver._watch_graphs(3)
    assert record.graphs_after_first_step == 1
    assert "warning: train: 1 graph(s) compiled at step 3, after the first step" in logged[-1]
