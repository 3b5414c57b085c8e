"""Compile stage on the Neuron path: fill the compile cache with exactly the graphs training will run.

Trainium: ``neuron_parallel_compile`` around torchrun with the train job's layout and environment
(:func:`trnft.common.cluster.launch.torchrun_argv`), running the trial run of
:mod:`trnft.neuron.precompile`: the train stage's model, optimizer and data for ``train.compile_steps``
steps. Both use the cache in
``NEURON_CC_FLAGS=--cache_dir=<neuron.cache_dir>`` (absolute, no '.'). In a multi-node PyTorchJob every pod
runs ``trnft compile``: each node traces its graphs into the shared cache, and only the Master (``RANK`` 0)
writes the stage output.

CPU: the same step graphs run for ``train.compile_steps`` steps on torch-xla's CPU device with its
persistent compilation cache in ``<cache_dir>/xla_cpu``. torch-xla 2.8's CPU client cannot load cached
executables back (it reports a deserialize failure), so on CPU the stage proves the graphs trace and are
static (no compilation after the first step), and training compiles its graphs once at step 1.

The manifest records the graphs compiled, the time and the cache path.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..common.cluster.instances import instance, training_layout
from ..common.cluster.launch import rendezvous_endpoint, torchrun_argv
from ..common.config.run_config import RunConfig, dump_config
from ..common.errors import ProcessFailed, TrnftError
from ..common.exits import exit_code_of_process
from ..common.pipeline.figures import Figures
from ..common.pipeline.platform_stages import COMPILE
from ..common.pipeline.rundir import RunDir
from ..common.pipeline.stages import (
    StageContext,
    StageOutcome,
    StageResult,
    is_main_process,
    run_stage,
    upstream_manifests,
)
from ..common.training.data import TokenizeOutput
from . import launch, precompile
from .backend import device, preflight_or_fail, require_trn1_line
from .train import cpu_cache_dir


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult | None:
    """The compile stage; on a Worker pod of a multi-node Trainium job, only this node's share of it.

    The PyTorchJob operator starts ``trnft compile`` in every pod with ``RANK`` = the pod's index. Every
    node must trace its graphs (its torchrun joins the same rendezvous), but only the Master (RANK 0)
    owns the stage output, so a Worker runs ``neuron_parallel_compile`` and returns None.
    """
    require_trn1_line("compile")
    launch.cache_dir(cfg)  # validated before anything compiles
    if device(cfg) == "trainium" and not is_main_process():
        compile_worker(cfg, log)
        return None
    return run_stage(COMPILE, cfg, _body, force=force, log=log)


def _body(ctx: StageContext) -> StageOutcome:
    ctx.verify_upstream("tokenize")
    if device(ctx.cfg) == "trainium":
        return compile_trainium(ctx)
    return compile_cpu(ctx)


def _cache_files(path: Path) -> int:
    return sum(1 for _ in path.rglob("*") if _.is_file()) if path.is_dir() else 0


@dataclass(frozen=True)
class XlaCompileFigures(Figures):
    KIND: ClassVar[str] = "compile/cpu-xla"

    graphs_compiled: int
    compiles_per_step: list[int]
    seconds: float
    cache_path: str
    cache_files_written: int
    persistent_cache: dict[str, int]
    cache_reusable_across_processes: bool
    note: str


@dataclass(frozen=True)
class TrainiumCompileFigures(Figures):
    KIND: ClassVar[str] = "compile/trainium"

    neff_files: int
    cache_files_written: int
    seconds: float
    cache_path: str
    command: list[str]


def compile_cpu(ctx: StageContext) -> StageOutcome:
    from .xla_trainer import XlaTrainer, compile_count, persistent_cache_counters

    cfg, log = ctx.cfg, ctx.log
    cache = Path(cpu_cache_dir(cfg))
    files_before = _cache_files(cache)
    t0 = time.perf_counter()
    trainer = XlaTrainer(cfg, TokenizeOutput(ctx.upstream_dir("tokenize")), log)
    trainer.setup(cache_dir=str(cache))
    per_step = []
    start = compile_count()
    for _ in range(cfg.train.compile_steps):
        before = compile_count()
        trainer.train_step()
        per_step.append(compile_count() - before)
    seconds = time.perf_counter() - t0
    graphs = compile_count() - start
    if any(per_step[1:]):
        raise TrnftError(
            f"compile: graphs were compiled after the first step ({per_step}); training would recompile every step"
        )
    log(f"compile: {graphs} graph(s) in {cfg.train.compile_steps} steps ({per_step}), cache {cache}")
    figures = XlaCompileFigures(
        graphs_compiled=graphs,
        compiles_per_step=per_step,
        seconds=round(seconds, 2),
        cache_path=str(cache),
        cache_files_written=_cache_files(cache) - files_before,
        persistent_cache=persistent_cache_counters(),
        cache_reusable_across_processes=False,
        note="torch-xla's CPU client cannot deserialize cached executables; train compiles at its first step",
    )
    return StageOutcome(
        summary=f"{graphs} graphs, none after step 1, {seconds:.1f}s (cpu-xla, cache {cache})",
        figures=figures,
        layout={"tp": trainer.tp, "dp": trainer.dp},
    )


def parallel_compile_command(cfg: RunConfig, config_path: str) -> tuple[list[str], dict[str, str]]:
    """``neuron_parallel_compile`` around the train stage's torchrun command, and its environment."""
    layout = training_layout(cfg)
    endpoint = rendezvous_endpoint(os.environ)
    rdzv_id = os.environ.get("TRNFT_JOB_NAME", f"{cfg.run.name}-compile")
    argv = [
        "neuron_parallel_compile",
        *torchrun_argv(
            layout,
            rdzv_endpoint=endpoint,
            rdzv_id=rdzv_id,
            config_path=config_path,
            entry=(precompile.MODULE,),
        ),
    ]
    if cfg.neuron.parallel_compile_workers:
        argv.insert(1, f"--num_parallel={cfg.neuron.parallel_compile_workers}")
    env = dict(os.environ)
    env.update(launch.neuron_env(cfg, instance(cfg.cluster.instance_type), layout))
    return argv, env


def _run_parallel_compile(cfg: RunConfig, log: Callable[[str], None]) -> tuple[list[str], float]:
    """Run this node's ``neuron_parallel_compile``; the config goes to a node-local file (same on every node)."""
    from .trainium import check_settings

    check_settings(cfg)  # refuse what training would refuse before the compile job spends any time
    preflight_or_fail()
    with tempfile.TemporaryDirectory(prefix="trnft-compile-") as tmp:
        config_path = Path(tmp) / "run.yaml"
        config_path.write_text(dump_config(cfg))
        argv, env = parallel_compile_command(cfg, str(config_path))
        log(f"compile: {' '.join(argv)}")
        t0 = time.perf_counter()
        try:
            code = subprocess.call(argv, env=env)
        except FileNotFoundError as exc:
            raise TrnftError(
                "compile: neuron_parallel_compile is not on PATH; run the compile stage in the Neuron image "
                "(containers/Dockerfile.neuron)"
            ) from exc
        seconds = time.perf_counter() - t0
    if code != 0:
        # The same class as training: a killed or lost process is retried by the cluster, an error is not.
        code = exit_code_of_process(code)
        raise ProcessFailed(f"compile: neuron_parallel_compile exited with {code}; see its log above", code)
    return argv, seconds


def compile_worker(cfg: RunConfig, log: Callable[[str], None]) -> None:
    """A Worker pod's part: trace this node's graphs into the shared cache; write no stage output."""
    rank = os.environ.get("RANK", "?")
    upstream_manifests(COMPILE, cfg, RunDir(cfg.run.root))  # refuses a missing or stale tokenize
    _, seconds = _run_parallel_compile(cfg, log)
    log(
        f"compile: worker rank {rank} traced its graphs into {launch.cache_dir(cfg)} in {seconds:.0f}s; "
        "the master (RANK 0) writes the stage output"
    )


def compile_trainium(ctx: StageContext) -> StageOutcome:
    """The Master's part: run ``neuron_parallel_compile`` around the train command and record the cache."""
    cfg = ctx.cfg
    layout = training_layout(cfg)
    cache = Path(launch.cache_dir(cfg))
    before = _cache_files(cache)
    argv, seconds = _run_parallel_compile(cfg, ctx.log)
    neffs = sum(1 for _ in cache.rglob("*.neff")) if cache.is_dir() else 0
    return StageOutcome(
        summary=f"{neffs} NEFFs in {cache}, {seconds:.0f}s",
        figures=TrainiumCompileFigures(
            neff_files=neffs,
            cache_files_written=_cache_files(cache) - before,
            seconds=round(seconds, 1),
            cache_path=str(cache),
            command=argv,
        ),
        layout={"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world": layout.world},
    )
