"""The pipeline's stages, in order, each defined by one module.

Stage name = CLI subcommand = output folder = Kubernetes job-name suffix. Each entry names where the stage's
:class:`StageSpec` lives (``module:ATTRIBUTE``); a stage shared by every
platform defines ``run(cfg, *, force, log)`` in that same module, a platform stage (``by_platform``) is run
by the platform's :class:`~trnft.common.pipeline.backend.Backend`. :class:`StageSpec` is defined here, so
this module imports no stage and nothing imports it back in a loop. Adding a stage: write its module, add
its line here; the CLI, ``trnft status``, upstream checks and the rendered job specs take it from here.

Stage modules are imported on first use (they import the stage machinery, which reads this table).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config.run_config import RunConfig


# The Kubernetes template of a stage that runs as a plain Job (one pod, CPU unless the stage asks for more).
JOB_TEMPLATE = "job.yaml.j2"


@dataclass(frozen=True)
class StageSpec:
    """A stage: what it reads, which config keys decide its output, and how it is run and deployed.

    A stage is one module holding its ``StageSpec`` (and, when it is shared by every platform, its
    ``run(cfg, *, force, log)``), listed once in :mod:`trnft.common.pipeline.registry`."""

    name: str
    help: str  # the CLI subcommand's one-line help
    needs: Callable[[RunConfig], tuple[str, ...]]
    config_keys: Callable[[RunConfig], tuple[str, ...]]
    # Run by the platform's backend (``Backend.run_stage``) rather than by the module's own run().
    by_platform: bool = False
    # Kubernetes template per model.platform (jobspecs/*.j2); platforms not named run it as a plain Job.
    templates: dict[str, str] = field(default_factory=dict)
    # Reads only the run directory and the model cache earlier stages filled (runs with HF_HUB_OFFLINE=1).
    offline: bool = False
    # How long `trnft submit --wait` waits for it by default in the generated apply script.
    wait_timeout: str = "2h"
    # Writes into its final folder as it goes (train: checkpoints) instead of a staging sibling.
    in_place: bool = False
    # Redo automatically when config or inputs changed; False refuses without --force (train: hours of work).
    redo_on_change: bool = True
    # Content digests of external inputs (dataset files, local model/tokenizer folders); part of the fingerprint.
    inputs: Callable[[RunConfig], list[dict[str, Any]]] = lambda cfg: []


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
        from . import backend

        platform = backend.of(cfg)

        def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> Any:
            return platform.run_stage(name, cfg, force=force, log=log)

        return run
    return importlib.import_module(STAGE_MODULES[name].split(":")[0]).run
