"""Compile stage of neuron-native: a trial run that fills the persistent NEFF cache before training.

TorchNeuron compiles every graph just in time, per shape, and keeps the result in its persistent cache
(``TORCH_NEURONX_NEFF_CACHE_DIR``; there is no ``neuron_parallel_compile`` on this path). The stage runs the
real trainer, on the train job's layout, for ``train.compile_steps`` optimizer steps that meet every
distinct shape the run will use: the training step with its gradient accumulation, a validation pass
(when ``train.eval_steps`` is on) and a checkpoint save. The trial writes into ``<run.root>/compile.trial``
(removed afterwards) and the cache into ``neuron.cache_dir`` on the shared volume, where the train job finds
it. The figures report how many graphs the cache gained.

Without a Neuron device the same trial runs on the CPU: it checks that the settings train, and its figures
say that there was no cache to fill.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ...common.config.run_config import RunConfig
from ...common.errors import TrnftError
from ...common.fsdp import trainer
from ...common.pipeline.figures import Figures
from ...common.pipeline.platform_stages import COMPILE
from ...common.pipeline.stages import StageContext, StageOutcome, StageResult, run_stage
from .. import launch
from . import preflight, torchneuron
from .device import NEURON, cache_dir_of, cached_graphs, device_platform

TRIAL_DIR = "compile.trial"
# How long rank 0 waits for the other ranks to finish the trial before removing it.
TRIAL_WAIT_S = 600


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    return run_stage(COMPILE, cfg, _body, force=force, log=log)


@dataclass(frozen=True)
class NativeCompileFigures(Figures):
    """What the trial run compiled into the persistent cache."""

    KIND: ClassVar[str] = "compile/neuron-native"

    device: str  # neuron | cpu
    trial_steps: int
    validated: bool
    saved: bool
    cache_dir: str | None  # None: no compile cache on this device
    graphs_before: int | None
    graphs_cached: int | None  # graphs the trial added to the cache
    wall_s: float

    def summary(self) -> str:
        if self.graphs_cached is None:
            return f"trial of {self.trial_steps} steps on {self.device}: no compile cache to fill"
        return f"{self.graphs_cached} graphs cached in {self.cache_dir} ({self.trial_steps} trial steps)"


def trial_config(cfg: RunConfig, root: Path) -> RunConfig:
    """The run config of the trial: same model, data, layout and batch; ``train.compile_steps`` steps that
    validate and save once, in its own run directory."""
    steps = cfg.train.compile_steps
    train = dataclasses.replace(
        cfg.train,
        max_steps=steps,
        save_steps=steps,
        eval_steps=steps if cfg.train.eval_steps else 0,
        early_stopping_patience=0,
        keep_checkpoints=1,
        warmup_steps=min(cfg.train.warmup_steps, steps),
    )
    run = dataclasses.replace(cfg.run, root=str(root))
    return dataclasses.replace(cfg, run=run, train=train)


def _link_tokenize(ctx: StageContext, trial_root: Path) -> None:
    """The trial reads the run's tokenized data where the train stage reads it."""
    trial_root.mkdir(parents=True, exist_ok=True)
    link = trial_root / "tokenize"
    if not link.exists():
        link.symlink_to(ctx.upstream_dir("tokenize").resolve(), target_is_directory=True)


def _body(ctx: StageContext) -> StageOutcome:
    cfg = ctx.cfg
    platform = device_platform()
    cache = None
    if platform is NEURON:
        preflight.require()  # the trial run compiles on the device: the same check as train
        os.environ.setdefault(torchneuron.NEFF_CACHE_ENV, launch.cache_dir(cfg))
        cache = cache_dir_of()
    before = cached_graphs(cache) if cache is not None else None
    trial_root = ctx.rundir.root / TRIAL_DIR
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if ctx.is_main:
        shutil.rmtree(trial_root, ignore_errors=True)  # what an interrupted trial left
        _link_tokenize(ctx, trial_root)
    else:
        _wait_for(trial_root / "tokenize", f"rank 0 to prepare {trial_root}")
    ctx.log(f"compile: trial run of {cfg.train.compile_steps} steps on {platform.name} in {trial_root}")
    t0 = time.perf_counter()
    trainer.run(trial_config(cfg, trial_root), platform, force=True, log=ctx.log)
    wall = time.perf_counter() - t0
    (trial_root / f"finished-rank-{rank}").touch()
    if ctx.is_main:
        for r in range(world):
            _wait_for(trial_root / f"finished-rank-{r}", f"rank {r} to finish the trial")
        shutil.rmtree(trial_root)
    after = cached_graphs(cache) if cache is not None else None
    figures = NativeCompileFigures(
        device=platform.name,
        trial_steps=cfg.train.compile_steps,
        validated=bool(cfg.train.eval_steps),
        saved=True,
        cache_dir=str(cache) if cache is not None else None,
        graphs_before=before,
        graphs_cached=None if after is None or before is None else after - before,
        wall_s=round(wall, 2),
    )
    ctx.log(f"compile: {figures.summary()}")
    return StageOutcome(summary=figures.summary(), figures=figures)


def _wait_for(path: Path, what: str) -> None:
    deadline = time.monotonic() + TRIAL_WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TrnftError(f"compile: waited {TRIAL_WAIT_S}s for {what} ({path} is missing)")
        time.sleep(0.5)
