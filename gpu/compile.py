"""Compile stage on the GPU path: nothing to precompile, recorded as such.

CUDA kernels are compiled (or loaded) by the libraries at run time, so there is no ahead-of-time graph
cache to fill. The stage still exists so that both platforms have the same six stages, the same run
directory and the same job specs; its manifest says it was a no-op and what would have run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..common.config.run_config import RunConfig
from ..common.pipeline.figures import Figures
from ..common.pipeline.platform_stages import COMPILE
from ..common.pipeline.stages import StageContext, StageOutcome, StageResult, run_stage


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    return run_stage(COMPILE, cfg, _body, force=force, log=log)


@dataclass(frozen=True)
class NoCompileFigures(Figures):
    """The GPU path's compile stage: nothing was compiled, on purpose."""

    KIND: ClassVar[str] = "compile/none"

    graphs: int = 0


def _body(ctx: StageContext) -> StageOutcome:
    ctx.log("compile: the GPU path compiles nothing ahead of time; recording a no-op")
    return StageOutcome(
        summary="no-op on GPU (nothing to precompile)",
        figures=NoCompileFigures(),
    )
