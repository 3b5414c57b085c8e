"""Compile stage on the Neuron path: fill the compile cache with exactly the graphs training will run.

Trainium: ``neuron_parallel_compile`` around the very command and environment of the train stage
(:func:`trnft.neuron.launch.torchrun_argv`); the train stage sees the precompilation environment and
runs ``train.compile_steps`` steps instead of ``train.max_steps``. Both use the cache in
``NEURON_CC_FLAGS=--cache_dir=<neuron.cache_dir>`` (absolute, no '.').

CPU: the same step graphs run for ``train.compile_steps`` steps on torch-xla's CPU device with its
persistent compilation cache in ``<cache_dir>/xla_cpu``. torch-xla 2.8's CPU client cannot load cached
executables back (it reports a deserialize failure), so on CPU the stage proves the graphs trace and are
static (no compilation after the first step), and training compiles its graphs once at step 1.

The manifest records the graphs compiled, the time and the cache path.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from trnft.common.config import RunConfig
from trnft.common.data import TokenizeOutput
from trnft.common.errors import TrnftError
from trnft.common.instances import training_layout
from trnft.common.stages import SPECS, StageContext, StageOutcome, StageResult, run_stage
from trnft.neuron import launch
from trnft.neuron.train import cpu_cache_dir, select_backend


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    return run_stage(SPECS["compile"], cfg, _body, force=force, log=log)


def _body(ctx: StageContext) -> StageOutcome:
    launch.cache_dir(ctx.cfg)  # validated before anything compiles
    if select_backend(ctx.cfg) == "trainium":
        return compile_trainium(ctx)
    return compile_cpu(ctx)


def _cache_files(path: Path) -> int:
    return sum(1 for _ in path.rglob("*") if _.is_file()) if path.is_dir() else 0


def compile_cpu(ctx: StageContext) -> StageOutcome:
    from trnft.neuron.xla_trainer import XlaTrainer, compile_count, persistent_cache_counters

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
    figures = {
        "backend": "cpu-xla",
        "graphs_compiled": graphs,
        "compiles_per_step": per_step,
        "seconds": round(seconds, 2),
        "cache_path": str(cache),
        "cache_files_written": _cache_files(cache) - files_before,
        "persistent_cache": persistent_cache_counters(),
        "cache_reusable_across_processes": False,
        "note": "torch-xla's CPU client cannot deserialize cached executables; train compiles at its first step",
    }
    return StageOutcome(
        summary=f"{graphs} graphs, none after step 1, {seconds:.1f}s (cpu-xla, cache {cache})",
        figures=figures,
        layout={"tp": trainer.tp, "dp": trainer.dp},
    )


def compile_trainium(ctx: StageContext) -> StageOutcome:
    """Run ``neuron_parallel_compile`` around the train command (one pod per node in Kubernetes)."""
    cfg, log = ctx.cfg, ctx.log
    from trnft.neuron.preflight import run as preflight

    problems = preflight()
    if problems:
        raise TrnftError(f"Neuron preflight: {problems[0]}")
    layout = training_layout(cfg)
    config_path = ctx.rundir.meta / "run.yaml"
    from trnft.common.config import dump_config

    config_path.write_text(dump_config(cfg))
    endpoint = f"{os.environ.get('MASTER_ADDR', 'localhost')}:{os.environ.get('MASTER_PORT', '29500')}"
    rdzv_id = os.environ.get("TRNFT_JOB_NAME", f"{cfg.run.name}-compile")
    argv = [
        "neuron_parallel_compile",
        *launch.torchrun_argv(layout, rdzv_endpoint=endpoint, rdzv_id=rdzv_id, config_path=str(config_path)),
    ]
    env = dict(os.environ)
    from trnft.common.instances import instance

    env.update(launch.neuron_env(cfg, instance(cfg.cluster.instance_type), layout))
    if cfg.neuron.parallel_compile_workers:
        argv.insert(1, f"--num_parallel={cfg.neuron.parallel_compile_workers}")
    cache = Path(launch.cache_dir(cfg))
    before = _cache_files(cache)
    log(f"compile: {' '.join(argv)}")
    t0 = time.perf_counter()
    code = subprocess.call(argv, env=env)
    seconds = time.perf_counter() - t0
    if code != 0:
        raise TrnftError(f"compile: neuron_parallel_compile exited with {code}; see its log above")
    neffs = sum(1 for _ in cache.rglob("*.neff")) if cache.is_dir() else 0
    return StageOutcome(
        summary=f"{neffs} NEFFs in {cache}, {seconds:.0f}s",
        figures={
            "backend": "trainium",
            "neff_files": neffs,
            "cache_files_written": _cache_files(cache) - before,
            "seconds": round(seconds, 1),
            "cache_path": str(cache),
            "command": argv,
        },
        layout={"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world": layout.world},
    )
