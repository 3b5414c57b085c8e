"""Stage figures: a typed value goes into the manifest as JSON and comes back equal, or is refused by name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from trnft.common.errors import TrnftError
from trnft.common.pipeline.figures import Figures


@dataclass(frozen=True)
class Point:
    step: int
    loss: float


@dataclass(frozen=True)
class RunFigures(Figures):
    KIND: ClassVar[str] = "test/run"

    name: str
    best: Point | None
    history: list[Point]
    counts: dict[str, int]
    note: str | None = None


def _figures() -> RunFigures:
    return RunFigures("r", Point(3, 0.5), [Point(1, 2.0), Point(2, 1.0)], {"a": 1}, None)


def test_round_trip_through_json_gives_the_same_typed_value():
    figures = _figures()
    data = json.loads(json.dumps(figures.to_json()))
    assert data["kind"] == "test/run" and data["history"][1] == {"step": 2, "loss": 1.0}
    again = RunFigures.from_json(data)
    assert again == figures and isinstance(again.history[0], Point) and again.best.step == 3
    assert RunFigures.of({"stage": "train", "figures": data}) == figures
    assert RunFigures.from_json({**data, "best": None}).best is None


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d.update(kind="train/gpu"),
            r"train manifest figures: holds 'train/gpu' figures, not 'test/run'",
        ),
        (lambda d: d.pop("counts"), r"no field 'counts' for RunFigures"),
        (lambda d: d.update(extra=1), r"unknown field 'extra' for RunFigures"),
        (lambda d: d["history"][0].pop("loss"), r"figures\.history\[0\]: no field 'loss' for Point"),
        (lambda d: d.update(best=[1, 2]), r"figures\.best: expected an object, found list"),
    ],
)
def test_figures_of_another_shape_are_refused_naming_the_field(mutate, message):
    data = json.loads(json.dumps(_figures().to_json()))
    mutate(data)
    with pytest.raises(TrnftError, match=message):
        RunFigures.of({"stage": "train", "figures": data})


def test_a_manifest_without_figures_is_refused():
    with pytest.raises(TrnftError, match="holds 'NoneType' figures"):
        RunFigures.of({"stage": "merge"})
