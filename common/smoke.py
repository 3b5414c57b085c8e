"""``trnft smoke``: the whole pipeline on CPU with the bundled tiny model and dataset.

Builds a tiny Llama (GQA) with a locally trained tokenizer under ``<root>/base-model`` (once), writes the
resolved run config to ``<root>/run.yaml`` and runs every stage as its own process, exactly as the
Kubernetes jobs do (``trnft <stage> --config run.yaml``), then prints ``trnft status``. Rerunning skips
complete stages; ``--force`` redoes them.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from .config.run_config import NeuronSection, ParallelSection, dump_config, load_config, with_overrides
from .pipeline import registry
from .pipeline.stages import format_status
from .testing.fixtures import build_tiny_model, bundled_chat_path, bundled_dataset_path

# What a platform needs beyond the smoke config: neuron-native trains on trn2/trn3 instance types only (the
# local run uses the CPU all the same; the instance type matters to the specs it would render).
PLATFORM_OVERRIDES = {"neuron-native": ("cluster.instance_type=trn2.48xlarge",)}
# The smoke config's parallel and neuron sections set up the XLA path's CPU rehearsal (model.platform neuron); the other
# platforms start from the sections' defaults (neuron-native refuses XLA-only settings).
XLA_PLATFORM = "neuron"


def smoke_config_path() -> Path:
    return Path(str(resources.files("trnft.examples") / "smoke.yaml"))


def prepare(
    root: str | Path, *, platform: str = "neuron", overrides: Sequence[str] = (), chat: bool = False
) -> Path:
    """Build the tiny base model (if missing) and write ``<root>/run.yaml``; return its path. ``chat``: the
    bundled conversations, rendered with the tiny tokenizer's chat template, loss on assistant turns."""
    root = Path(root).resolve()
    model_dir = root / "base-model"
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir, "llama")
    cfg = load_config(
        smoke_config_path(),
        [
            f"run.root={root}",
            f"model.name_or_path={model_dir}",
            f"dataset.files=[{bundled_chat_path() if chat else bundled_dataset_path()}]",
            f"model.platform={platform}",
            *(["dataset.messages_field=messages"] if chat else []),
        ],
    )
    if platform != XLA_PLATFORM:
        cfg = dataclasses.replace(cfg, neuron=NeuronSection(), parallel=ParallelSection())
    cfg = with_overrides(cfg, [*PLATFORM_OVERRIDES.get(platform, ()), *overrides])
    run_yaml = root / "run.yaml"
    run_yaml.write_text("# Written by `trnft smoke`; every stage reads it.\n" + dump_config(cfg))
    return run_yaml


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PJRT_DEVICE", "CPU")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_smoke(
    root: str | Path,
    *,
    platform: str = "neuron",
    force: bool = False,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
    chat: bool = False,
) -> int:
    """Run every stage in order, each in its own process; return the first non-zero exit code or 0."""
    run_yaml = prepare(root, platform=platform, overrides=overrides, chat=chat)
    cfg = load_config(run_yaml)
    log(f"smoke: run config {run_yaml}")
    for stage in registry.names():
        cmd = [sys.executable, "-m", "trnft.common.cli", stage, "--config", str(run_yaml)]
        if force:
            cmd.append("--force")
        log(f"smoke: $ trnft {stage} --config {run_yaml}{' --force' if force else ''}")
        code = subprocess.call(cmd, env=stage_env())
        if code != 0:
            log(f"smoke: {stage} failed with exit code {code}")
            return code
    log(format_status(cfg))
    return 0
