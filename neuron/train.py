"""Train stage on the Neuron path: Trainium through optimum-neuron, or the CPU-XLA rehearsal.

Devices (``neuron.backend``, decided by :func:`trnft.neuron.backend.device`): ``trainium`` drives
optimum-neuron's trainer (:mod:`trnft.neuron.trainium`); ``cpu`` runs
:class:`~trnft.neuron.xla_trainer.XlaTrainer` on torch-xla's CPU device; ``auto`` picks Trainium when a
Neuron device and optimum-neuron are present.

Restart is resume: the stage output ``<root>/train/`` holds ``checkpoint-<step>/`` folders, each complete
only with its ``done`` marker; on start the newest complete checkpoint written with the same settings is
resumed (weights, optimizer, step; the data order and dropout follow from the step), staging leftovers
of an interrupted save are removed and reported, and the newest ``train.keep_checkpoints`` are kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trnft.common.config.run_config import RunConfig
from trnft.common.errors import TrnftError
from trnft.common.pipeline import checkpoints
from trnft.common.pipeline.stages import SPECS, StageContext, StageOutcome, StageResult, run_stage
from trnft.common.training.data import TokenizeOutput
from trnft.neuron import launch
from trnft.neuron.backend import device, preflight_or_fail

CPU_CACHE_SUBDIR = "xla_cpu"


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult | None:
    """The train stage; under ``neuron_parallel_compile`` only the graphs are traced (see compile)."""
    if is_precompilation():
        from trnft.neuron import trainium

        trainium.precompile(cfg, log)
        return None
    return run_stage(SPECS["train"], cfg, _body, force=force, log=log)


def is_precompilation() -> bool:
    """True inside ``neuron_parallel_compile`` (it sets NEURON_EXTRACT_GRAPHS_ONLY=1)."""
    return os.environ.get("NEURON_EXTRACT_GRAPHS_ONLY") == "1"


def cpu_cache_dir(cfg: RunConfig) -> str:
    """torch-xla's persistent compilation cache of the CPU backend, inside the shared compile cache."""
    return str(Path(launch.cache_dir(cfg)) / CPU_CACHE_SUBDIR)


def _body(ctx: StageContext) -> StageOutcome:
    if device(ctx.cfg) == "trainium":
        from trnft.neuron import trainium

        preflight_or_fail()
        return trainium.train(ctx)
    return train_cpu(ctx)


def train_cpu(ctx: StageContext) -> StageOutcome:
    """Run (or resume) training on torch-xla's CPU device."""
    from trnft.neuron.xla_trainer import XlaTrainer, compile_count, persistent_cache_counters

    cfg, log = ctx.cfg, ctx.log
    train_dir = ctx.out_dir
    cache = cpu_cache_dir(cfg)
    tokenized = TokenizeOutput(ctx.upstream_dir("tokenize"))
    resume = checkpoints.resume_point(train_dir, ctx.fingerprint, log)
    trainer = XlaTrainer(cfg, tokenized, log)
    trainer.setup(cache_dir=cache, resume=resume)
    start = trainer.step
    if resume is not None:
        log(f"train: resumed from {resume.name} at step {start}")
    compiled_with_stage = ctx.rundir.manifest("compile") is not None
    end = cfg.train.max_steps
    writer = _tensorboard(train_dir)
    compiles_at_start = compile_count()
    first_step_compiles = None
    late_compiles = 0
    saved: list[str] = []
    tokens = seconds = 0
    while trainer.step < end:
        record = trainer.train_step()
        if first_step_compiles is None:
            first_step_compiles = record.compiles - compiles_at_start
        else:
            new = record.compiles - compiles_at_start - first_step_compiles - late_compiles
            if new > 0:
                late_compiles += new
                _on_recompile(cfg, compiled_with_stage, record.step, new, log)
            tokens += record.tokens
            seconds += record.seconds
        if record.step % cfg.train.logging_steps == 0 or record.step in (start + 1, end):
            rate = tokens / seconds if seconds else 0.0
            log(
                f"train: step {record.step}/{cfg.train.max_steps} loss {record.loss:.4f} lr {record.lr:.2e} "
                f"grad_norm {record.grad_norm:.3f} tokens/s {rate:,.0f} compiles {record.compiles - compiles_at_start}"
            )
        if writer is not None:
            writer.add_scalar("train/loss", record.loss, record.step)
            writer.add_scalar("train/learning_rate", record.lr, record.step)
            writer.add_scalar("train/grad_norm", record.grad_norm, record.step)
            if seconds:
                writer.add_scalar("train/tokens_per_second", tokens / seconds, record.step)
        if record.step % cfg.train.save_steps == 0 or record.step == end:
            path = trainer.save(train_dir, ctx.fingerprint, tokenized.tokenizer_dir)
            saved.append(path.name)
            checkpoints.prune(train_dir, cfg.train.keep_checkpoints, log)
            log(f"train: saved {path.name}")
        ctx.rundir.write_progress(
            "train", {"summary": f"step {trainer.step} of {cfg.train.max_steps}", "step": trainer.step}
        )
    if writer is not None:
        writer.close()
    final = checkpoints.newest_complete(train_dir)
    if final is None or final.step != cfg.train.max_steps:
        raise TrnftError(f"train: ended at step {trainer.step} without checkpoint-{cfg.train.max_steps}")
    losses = trainer.history
    figures = {
        "backend": "cpu-xla",
        "steps_this_run": trainer.step - start,
        "resumed_from": resume.name if resume else None,
        "start_step": start,
        "end_step": trainer.step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "xla_compiles_first_step": first_step_compiles or 0,
        "xla_compiles_after_first_step": late_compiles,
        "persistent_cache": persistent_cache_counters(),
        "compile_stage_ran": compiled_with_stage,
        "checkpoints_saved": saved,
        "final_checkpoint": final.path.name if final else None,
    }
    layout = {
        "tp": trainer.tp,
        "dp": trainer.dp,
        "devices": trainer.devices,
        "attention": trainer.layout.attention,
        "global_batch": trainer.global_batch,
    }
    if losses:
        summary = f"{trainer.step} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    else:
        summary = f"{trainer.step} steps"
    if final:
        summary += f", {final.path.name}"
    return StageOutcome(summary=summary, figures=figures, layout=layout)


def _on_recompile(
    cfg: RunConfig, compiled_with_stage: bool, step: int, count: int, log: Callable[[str], None]
) -> None:
    message = (
        f"train: {count} XLA graph(s) compiled at step {step}, after the first step; shapes or graph structure "
        "changed between steps"
    )
    if not compiled_with_stage or cfg.train.on_recompile == "ignore":
        log(message)
        return
    if cfg.train.on_recompile == "fail":
        raise TrnftError(f"{message} (train.on_recompile=fail)")
    log(f"warning: {message}")


def _tensorboard(train_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(train_dir / "tensorboard"), flush_secs=30)
