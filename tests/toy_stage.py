"""A stage that is not part of trnft, for tests/common/test_registry.py: it counts the training rows that
tokenize wrote. A real stage is written the same way: this module and one line in the registry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from trnft.common.pipeline.figures import Figures
from trnft.common.pipeline.registry import StageSpec
from trnft.common.pipeline.stages import StageContext, StageOutcome, run_stage
from trnft.common.training.data import TEXT_FILES

SPEC = StageSpec(
    name="toy",
    help="Count the training rows tokenize wrote.",
    needs=lambda cfg: ("tokenize",),
    config_keys=lambda cfg: ("dataset.seed",),
    offline=True,
    wait_timeout="10m",
)


@dataclass(frozen=True)
class ToyFigures(Figures):
    KIND: ClassVar[str] = "toy"

    train_rows: int


def _body(ctx: StageContext) -> StageOutcome:
    rows = (ctx.upstream_dir("tokenize") / TEXT_FILES["train"]).read_text().splitlines()
    (ctx.out_dir / "count.json").write_text(json.dumps({"train_rows": len(rows)}))
    return StageOutcome(summary=f"{len(rows)} training rows", figures=ToyFigures(len(rows)))


def run(cfg, *, force=False, log=print):
    return run_stage(SPEC, cfg, _body, force=force, log=log)
