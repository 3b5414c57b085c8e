"""Train stage of the gpu platform: the shared FSDP2 trainer on Lightning, on CUDA (NCCL) or, on a machine
without a GPU, on the CPU over gloo (how the tests run it)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..common.config.run_config import RunConfig
from ..common.fsdp import trainer
from ..common.fsdp.platform import CPU, CUDA, DevicePlatform
from ..common.pipeline.stages import StageResult


def device_platform() -> DevicePlatform:
    """CUDA when this machine has a GPU, else the CPU."""
    return CUDA if torch.cuda.is_available() else CPU


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    return trainer.run(cfg, device_platform(), force=force, log=log)
