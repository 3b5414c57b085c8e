"""The FSDP2 + tensor-parallel trainer on Lightning, shared by the ``gpu`` and ``neuron-native`` platforms.

A platform hands the trainer a :class:`~trnft.common.fsdp.platform.DevicePlatform` (device, process-group
backend, compile backend, Lightning accelerator); everything else (sharding, checkpoints, consolidation, the
Lightning module) is the same code on CUDA, native Neuron and the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config.run_config import RunConfig


def check_parallel_settings(cfg: RunConfig) -> None:
    """Refuse the ``parallel`` keys this trainer does not have (ConfigError, one line): pipeline stages."""
    from ..errors import ConfigError

    if cfg.parallel.pp > 1:
        raise ConfigError(
            f"parallel.pp: {cfg.parallel.pp}, but the FSDP2 trainer has no pipeline parallelism (model.platform "
            f"{cfg.model.platform}); set parallel.pp=1 and use parallel.tp and data parallelism"
        )
