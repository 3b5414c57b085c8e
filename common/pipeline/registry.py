"""The pipeline's stages, in order, each defined by one module.

Stage name = CLI subcommand = output folder = Kubernetes job-name suffix. Each entry names where the stage's
:class:`~trnft.common.pipeline.stages.StageSpec` lives (``module:ATTRIBUTE``); a stage shared by every
platform defines ``run(cfg, *, force, log)`` in that same module, a platform stage (``by_platform``) is run
by the platform's :class:`~trnft.common.pipeline.backend.Backend`. Adding a stage: write its module, add
its line here; the CLI, ``trnft status``, upstream checks and the rendered job specs take it from here.

Modules are imported on first use, so this table imports nothing itself (the stage modules import the
stage machinery, which reads this table).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trnft.common.config.run_config import RunConfig
    from trnft.common.pipeline.stages import StageSpec

STAGE_MODULES: dict[str, str] = {
    "tokenize": "trnft.common.tokenize:SPEC",
    "compile": "trnft.common.pipeline.platform_stages:COMPILE",
    "train": "trnft.common.pipeline.platform_stages:TRAIN",
    "consolidate": "trnft.common.pipeline.platform_stages:CONSOLIDATE",
    "merge": "trnft.common.merge:SPEC",
    "evaluate": "trnft.common.evaluate:SPEC",
}


def names() -> tuple[str, ...]:
    """Every stage, in pipeline order."""
    return tuple(STAGE_MODULES)


def spec(name: str) -> StageSpec:
    """The spec of stage ``name`` (importing its module)."""
    module, attribute = STAGE_MODULES[name].split(":")
    found = getattr(importlib.import_module(module), attribute)
    if found.name != name:
        raise AssertionError(f"{STAGE_MODULES[name]} is stage {found.name!r}, registered as {name!r}")
    return found


def runner(name: str, cfg: RunConfig) -> Callable[..., Any]:
    """The ``run(cfg, *, force, log)`` of stage ``name`` for ``cfg``'s platform."""
    stage = spec(name)
    if stage.by_platform:
        from trnft.common.pipeline import backend

        platform = backend.of(cfg)

        def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> Any:
            return platform.run_stage(name, cfg, force=force, log=log)

        return run
    return importlib.import_module(STAGE_MODULES[name].split(":")[0]).run
