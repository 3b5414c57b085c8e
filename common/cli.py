"""The ``trnft`` command: one subcommand per stage plus ``status``, ``jobspec``, ``submit``, ``wait``,
``torchrun`` and ``smoke``.

Every stage subcommand takes ``--config FILE`` and ``key.sub=value`` overrides and calls the stage's
``run(cfg)``. Errors a user can act on print one line and exit non-zero (:mod:`trnft.common.exits`;
``--debug`` adds the traceback); nothing here calls ``sys.exit`` except the ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import stop
from .config.run_config import load_config
from .env import set_process_defaults
from .errors import TrnftError
from .exits import DEBUG_ENV, run_command
from .io.tensor_io import DEFAULT_MAX_SHARD_SIZE
from .pipeline import backend, registry
from .pipeline.stages import format_status

# Stages that also run without a run config, on paths given on the command line: the flags they need.
STANDALONE = {
    "consolidate": ("checkpoint", "output"),
    "merge": ("base", "adapter", "output"),
}


def _add_config_args(p: argparse.ArgumentParser, *, config_required: bool = True) -> None:
    p.add_argument(
        "--config",
        required=config_required,
        action="append",
        metavar="FILE",
        help="Run config YAML; repeat to layer files (later ones win), e.g. a dataset preset.",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="Config overrides, e.g. train.max_steps=100 dataset.max_seq_length=1024.",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trnft",
        description="Fine-tune Hugging Face causal LMs on Trainium (or GPUs): "
        "tokenize -> compile -> train -> consolidate -> merge -> evaluate.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"On an error, print the full traceback before its one line (also {DEBUG_ENV}=1).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in registry.names():
        text = registry.spec(stage).help
        p = sub.add_parser(stage, help=text, description=text)
        _add_config_args(p, config_required=stage not in ("consolidate", "merge"))
        p.add_argument("--force", action="store_true", help="Redo the stage even if it is complete.")
        if stage == "consolidate":
            g = p.add_argument_group("standalone (no run config)")
            g.add_argument("--checkpoint", metavar="PATH", help="Run, train, checkpoint-N or shards folder.")
            g.add_argument("--output", metavar="DIR", help="Output folder (must not exist).")
            g.add_argument(
                "--max-shard-size",
                default=DEFAULT_MAX_SHARD_SIZE,
                help="Largest output safetensors file (e.g. 2GB).",
            )
        if stage == "merge":
            g = p.add_argument_group("standalone (no run config)")
            g.add_argument("--base", metavar="DIR", help="Base model folder (HF safetensors).")
            g.add_argument("--adapter", metavar="DIR", help="PEFT adapter folder.")
            g.add_argument("--output", metavar="DIR", help="Output folder (must not exist).")
            g.add_argument(
                "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="Largest output safetensors file."
            )

    p = sub.add_parser("status", help="Show every stage of a run.", description="Show every stage of a run.")
    _add_config_args(p)

    p = sub.add_parser(
        "jobspec",
        help="Render (and validate) the Kubernetes specs of every stage.",
        description="Render one Kubernetes spec per stage into OUTDIR and print the kubectl apply lines.",
    )
    _add_config_args(p)
    p.add_argument("--out", metavar="OUTDIR", default="jobspecs-out", help="Folder for the rendered specs.")
    p.add_argument("--validate", action="store_true", help="Validate every rendered document offline.")
    p.add_argument(
        "--runtimes",
        action="store_true",
        help="Render the ClusterTrainingRuntime the run's TrainJobs use instead (cluster-scoped: applied once "
        "per cluster by an admin).",
    )
    p.add_argument(
        "--files", nargs="*", metavar="YAML", help="Validate these rendered files instead of rendering."
    )

    for name, what in (
        (
            "submit",
            "Apply a rendered stage spec; a finished job of the same name, or one that never started, is "
            "deleted first. With --wait, exits as wait does.",
        ),
        (
            "wait",
            "Wait for a submitted stage: exit 0 when it succeeds, 1 as soon as it fails (or cannot start), "
            "124 when --timeout passes (each kubectl call is bounded by it), 69 when kubectl cannot reach or "
            "authenticate to the cluster.",
        ),
    ):
        p = sub.add_parser(name, help=what, description=what)
        p.add_argument(
            "file", metavar="SPEC", help="A file `trnft jobspec` wrote, e.g. jobspecs-out/03-train.yaml."
        )
        if name == "submit":
            p.add_argument("--wait", action="store_true", help="Then wait for it, as `trnft wait` does.")
        p.add_argument("--timeout", default="24h", help="Stop waiting after this long (45s, 30m, 2h, 1d).")
        p.add_argument("--interval", default="20s", help="Time between two looks at the job's status.")

    p = sub.add_parser(
        "torchrun",
        help="torchrun, exiting with the failed worker's own code (what the train pods run).",
        description="Run torchrun with the given flags and command. Unlike torchrun, which exits 1 when a "
        "worker fails, exit with the first failed worker's code (a signal as 128 + its number), so the "
        "cluster retries infrastructure failures and not configuration errors.",
    )
    p.add_argument("torchrun_args", nargs=argparse.REMAINDER, metavar="TORCHRUN_ARGS")

    p = sub.add_parser(
        "ray",
        help="Run compile or train as Ray Train workers (what a RayJob's entrypoint runs).",
        description="Start a Ray Train TorchTrainer on the Ray cluster at RAY_ADDRESS (a local one without it) "
        "whose workers run `trnft STAGE` as torchrun's processes would; Ray restarts them up to "
        "cluster.backoff_limit times for a retryable failure, never for a permanent one (exit 1-127).",
    )
    p.add_argument("stage", choices=("compile", "train"))
    p.add_argument("--config", required=True, help="Run config YAML.")
    p.add_argument("--workers", type=int, default=None, help="Ranks (default: fsdp.devices, else 1).")
    p.add_argument(
        "--per-worker",
        action="append",
        metavar="RESOURCE=N",
        help="Ray resources of one worker, e.g. GPU=1 or neuron_cores=2 (repeatable; default CPU=1).",
    )
    p.add_argument(
        "--max-failures", type=int, default=None, help="Ray's retry budget (default: cluster.backoff_limit)."
    )
    p.add_argument("--force", action="store_true", help="Redo the stage even if it is complete.")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="Config overrides.")

    p = sub.add_parser(
        "smoke",
        help="Run the whole pipeline locally on a bundled tiny model and dataset.",
        description="Build a tiny Llama and tokenizer, then run every stage on CPU with the bundled data.",
    )
    p.add_argument("--root", default="trnft-smoke", help="Run directory (default ./trnft-smoke).")
    p.add_argument(
        "--platform",
        choices=sorted(backend.REGISTRY),
        default=None,
        help="Training path to exercise (default: neuron in the trn1 line's environment, gpu elsewhere).",
    )
    p.add_argument("--force", action="store_true", help="Redo every stage.")
    p.add_argument(
        "--chat",
        action="store_true",
        help="Train on the bundled conversations with the tiny tokenizer's chat template (assistant-only loss).",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="Overrides of the smoke config.")
    return parser


def _run_stage_command(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    stage = args.command
    if stage in STANDALONE and args.config is None:
        missing = [f"--{f.replace('_', '-')}" for f in STANDALONE[stage] if getattr(args, f) is None]
        if missing:
            raise TrnftError(f"pass --config FILE, or {' and '.join(missing)} for a standalone {stage}")
        if stage == "consolidate":
            return backend.for_checkpoint(args.checkpoint).consolidate_standalone(args, log)
        from .merge import standalone

        return standalone(args, log)
    cfg = load_config(args.config, args.overrides)
    platform = backend.of(cfg)
    platform.check_config(cfg)
    for name, value in platform.process_env(cfg).items():  # before the stage imports torch
        os.environ.setdefault(name, value)
    run = registry.runner(stage, cfg)
    run(cfg, force=args.force, log=log)
    return 0


def _jobspec_command(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from ..jobspecs.render import command

    return command(args, log)


def _smoke_command(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from . import smoke

    # The XLA path needs the trn1 line (torch-xla); the current line's default is the FSDP2 trainer.
    platform = args.platform or ("neuron" if importlib.util.find_spec("torch_xla") is not None else "gpu")
    return smoke.run_smoke(
        args.root, platform=platform, force=args.force, overrides=args.overrides, log=log, chat=args.chat
    )


def _submit_command(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from ..jobspecs.operate import submit_command

    return submit_command(args, log)


def _wait_command(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from ..jobspecs.operate import wait_command

    return wait_command(args, log)


def _torchrun_command(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from .cluster.launch import run_torchrun

    return run_torchrun(args.torchrun_args)


def _ray_command(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    from .cluster import ray_train

    cfg = load_config(args.config, args.overrides)
    return ray_train.run(
        args.stage,
        cfg,
        workers=args.workers if args.workers is not None else (cfg.fsdp.devices or 1),
        per_worker=ray_train.parse_resources(args.per_worker),
        max_failures=args.max_failures,
        force=args.force,
        log=log,
    )


def _log(message: str) -> None:
    print(message, flush=True)


def _status_command(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    cfg = load_config(args.config, args.overrides)
    backend.of(cfg).check_config(cfg)  # a config that every stage refuses is refused here the same way
    root = Path(cfg.run.root)
    if root.exists() and not root.is_dir():
        raise TrnftError(f"run.root: {root} is a file, not a run directory; check run.root in {args.config}")
    if not root.exists():
        raise TrnftError(
            f"run.root: {root} does not exist: no stage of run {cfg.run.name} has run there (check run.root, "
            "or run `trnft tokenize` first)"
        )
    print(format_status(cfg), flush=True)
    return 0


Command = Callable[[argparse.Namespace, Callable[[str], None]], int]
COMMANDS: dict[str, Command] = {
    "status": _status_command,
    "jobspec": _jobspec_command,
    "smoke": _smoke_command,
    "torchrun": _torchrun_command,
    "ray": _ray_command,
    "submit": _submit_command,
    "wait": _wait_command,
}


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, but ``key=value`` overrides may also follow an option (``--force
    train.max_steps=10``): argparse takes the positional overrides only before the first option after them."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trnft`` console script; returns the process exit code."""
    set_process_defaults()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "torchrun" in argv and all(a == "--debug" for a in argv[: argv.index("torchrun")]):
        # Everything after `torchrun` is torchrun's (argparse would claim its --flags).
        split = argv.index("torchrun")
        args = parser.parse_args([*argv[:split], "torchrun"])
        args.torchrun_args = argv[split + 1 :]
    else:
        args = parse_args(parser, argv)
    command = COMMANDS.get(args.command) or _run_stage_command  # every other subcommand is a stage
    if os.environ.get(stop.DIE_WITH_PARENT_ENV) == "1":
        stop.die_with_parent()  # a worker `trnft train` started locally: it ends with that process
    previous = (
        stop.install_raising()
    )  # SIGTERM / SIGHUP: clean up, exit 143 / 129 (the train loop saves first)
    try:
        return run_command(args.command, lambda: command(args, _log), debug=args.debug)
    finally:
        stop.restore(previous)


def end_torchrun_worker(code: int) -> None:
    """End a process torchrun started (``python -m trnft.common.cli`` with ``TORCHELASTIC_RUN_ID`` set) with
    ``code``, skipping the interpreter's C++ teardown.

    On torch 2.14 a rank whose stage had finished sometimes aborted in that teardown ("terminate called
    without an active exception", exit 134: a gloo thread still running while static objects are destroyed),
    and torchrun then reported the whole finished job as failed (seen twice in 2-rank CPU runs, rank 1 both
    times, after its manifest-writing peer). Everything the stage promises is on disk by now; Python's own
    exit handlers (loggers, W&B) still run, then the process ends with the stage's exit code.
    """
    import atexit
    import contextlib

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more to say there
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = main()
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        end_torchrun_worker(exit_code)
    sys.exit(exit_code)
