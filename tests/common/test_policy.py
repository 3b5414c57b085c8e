"""The one training policy: schedule, non-finite refusal, cadence, early stopping, recompile watch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from trnft.common.config.run_config import TrainSection
from trnft.common.errors import TrnftError
from trnft.common.training.lightning_policy import PolicyCallback, RunRecord
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


def test_graphs_compiled_after_the_first_step_follow_on_recompile(tmp_path):
    """The counter reads a real folder of .neff files (as the Neuron compile cache holds them)."""
    from trnft.neuron.native.device import NeffCacheWatch

    logged: list[str] = []
    cfg = SimpleNamespace(train=TrainSection(max_steps=4, on_recompile="fail"))
    rundir = SimpleNamespace(manifest=lambda stage: {"stage": stage})  # a compile stage ran
    ctx = SimpleNamespace(cfg=cfg, rundir=rundir, log=logged.append)
    record = RunRecord(start=0, resumed_from=None)
    counted: list[int] = []
    watch = NeffCacheWatch(tmp_path)

    def counter() -> int:
        counted.append(watch())
        return counted[-1]

    policy = PolicyCallback(ctx, record, graph_counter=counter)
    rank0 = SimpleNamespace(is_main=True, device=None)

    def compile_graph(name: str) -> None:
        (tmp_path / f"{name}.neff").write_text("x")

    compile_graph("warm")  # in the cache before the run: a hit, not a compile
    policy.on_train_start(None, rank0)
    compile_graph("step1-a")
    compile_graph("step1-b")
    policy._watch_graphs(1, rank0)
    policy._watch_graphs(2, rank0)
    assert (record.graphs_at_start, record.graphs_first_step, record.graphs_after_first_step) == (1, 2, 0)
    compile_graph("late")
    with pytest.raises(TrnftError, match=r"1 graph\(s\) compiled at step 3, after the first step"):
        policy._watch_graphs(3, rank0)
    assert record.graphs_after_first_step == 1
    # only rank 0 reads the cache (one process alone shares its count with itself)
    calls = len(counted)
    policy._watch_graphs(4, SimpleNamespace(is_main=False, device=None))
    assert len(counted) == calls
