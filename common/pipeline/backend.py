"""One interface for the training platforms, and the one registry every caller goes through.

A platform (``model.platform``: ``neuron`` for Trainium 1 on PyTorch/XLA, ``gpu`` for the FSDP2 trainer on
GPUs, ``neuron-native`` for the same FSDP2 trainer on Trainium 2/3 through native PyTorch) owns three stages
(compile, train, consolidate), the environment its training processes are launched with, and the
checkpoints it writes. Everything else (tokenize, merge, evaluate, the run directory, the config) is
shared and lives in ``trnft.common``.

Dependencies point one way: ``common`` <- platforms (``neuron``, ``gpu``) <- ``jobspecs`` and the CLI. So this
module imports no platform: :data:`REGISTRY` names each platform's ``backend`` module, which is imported on
first use. It is the only place in the code base where a platform is named by a string.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import TrnftError

if TYPE_CHECKING:
    from ..cluster.instances import InstanceType, Layout
    from ..config.run_config import RunConfig

REGISTRY: dict[str, str] = {
    "neuron": "trnft.neuron.backend",
    "gpu": "trnft.gpu.backend",
    "neuron-native": "trnft.neuron.native.backend",
}

Log = Callable[[str], None]


class Backend(Protocol):
    """What a training platform provides. Each platform's ``backend`` module defines ``BACKEND``."""

    platform: str
    # The trainer's config section (fsdp or neuron): its keys, with parallel's, decide the training output.
    config_section: str
    # True when the compile stage does work on the accelerator (a PyTorchJob); False for a no-op Job.
    compiles_graphs: bool
    # The instance table's accelerator kind this platform trains on ("neuron" or "gpu").
    accelerator: str

    def check_config(self, cfg: RunConfig) -> None:
        """Refuse settings this platform cannot honour (ConfigError, one line), before any stage runs."""

    def run_stage(self, stage: str, cfg: RunConfig, *, force: bool, log: Log) -> Any:
        """Run a stage whose spec is ``by_platform`` (:mod:`trnft.common.pipeline.platform_stages`); returns its
        StageResult (None where a process has no output)."""

    def model_parallel(self, cfg: RunConfig) -> tuple[int, int]:
        """(tensor-parallel, pipeline-parallel) degrees of training; data parallelism takes the rest."""

    def launch_env(self, cfg: RunConfig, inst: InstanceType, layout: Layout) -> dict[str, str]:
        """Environment variables of the compile/train processes on this platform's nodes."""

    def shared_volume_paths(self, cfg: RunConfig) -> list[tuple[str, str]]:
        """(config key, path) pairs of this platform that every pod must see on the shared volume."""

    def owns_checkpoint(self, path: Path) -> bool:
        """True when ``path`` (a run, train or checkpoint folder) holds checkpoints this platform wrote."""

    def consolidate_standalone(self, args: Any, log: Log) -> int:
        """``trnft consolidate --checkpoint PATH --output DIR`` for this platform's checkpoints."""

    def process_env(self, cfg: RunConfig) -> dict[str, str]:
        """Environment a stage process needs before torch is imported (defaults: values set win)."""


@dataclass(frozen=True)
class StageModules:
    """``run_stage`` for a platform package whose stage modules are named after the stages
    (``<package>.compile``, ``<package>.train``, ``<package>.consolidate``), imported on first use."""

    package: str

    def check_config(self, cfg: RunConfig) -> None:
        """Nothing to refuse beyond the config's own validation (platforms override)."""

    def process_env(self, cfg: RunConfig) -> dict[str, str]:
        return {}

    def run_stage(self, stage: str, cfg: RunConfig, *, force: bool, log: Log) -> Any:
        # registry.runner calls this only for the stages whose spec is by_platform
        return importlib.import_module(f"{self.package}.{stage}").run(cfg, force=force, log=log)


def get(platform: str) -> Backend:
    """The backend of ``model.platform`` (imported on first use)."""
    if platform not in REGISTRY:
        raise TrnftError(f"model.platform: no backend named {platform!r}; use one of {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[platform]).BACKEND


def of(cfg: RunConfig) -> Backend:
    return get(cfg.model.platform)


def for_checkpoint(path: str | Path) -> Backend:
    """The backend whose checkpoints ``path`` holds; the Neuron layout is the default when none claims it.

    (The Neuron consolidator reads NxD shard folders handed over from other tools too, and says what is
    missing when a path holds neither.)
    """
    for name in REGISTRY:
        backend = get(name)
        if backend.owns_checkpoint(Path(path)):
            return backend
    return get("neuron")
