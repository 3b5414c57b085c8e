"""The GPU platform: FSDP2 and tensor-parallel training over torch.distributed (NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.cluster.instances import InstanceType, Layout
from ..common.config.run_config import RunConfig
from ..common.pipeline.backend import StageModules


@dataclass(frozen=True)
class GpuBackend(StageModules):
    platform: str = "gpu"
    config_section: str = "fsdp"
    compiles_graphs: bool = False
    accelerator: str = "gpu"

    def check_config(self, cfg: RunConfig) -> None:
        from ..common.fsdp import check_parallel_settings
        from ..common.training.families import check_fsdp_family

        check_parallel_settings(cfg)
        check_fsdp_family(cfg.model.name_or_path)

    def model_parallel(self, cfg: RunConfig) -> tuple[int, int]:
        return cfg.parallel.tp, 1  # FSDP2 shards over the data-parallel ranks; no pipeline parallelism

    def launch_env(self, cfg: RunConfig, inst: InstanceType, layout: Layout) -> dict[str, str]:
        # A failed or stuck collective aborts the process (a retryable exit) instead of hanging the job.
        env = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
        if layout.nodes > 1:
            # Between nodes NCCL goes over EFA through the aws-ofi-nccl plugin of the GPU image
            # (containers/Dockerfile.gpu); its bootstrap sockets avoid the loopback and container bridges.
            env["NCCL_SOCKET_IFNAME"] = "^lo,docker"
        return env

    def shared_volume_paths(self, cfg: RunConfig) -> list[tuple[str, str]]:
        return []

    def owns_checkpoint(self, path: Path) -> bool:
        from ..common.fsdp.consolidate import holds_gpu_checkpoints

        return holds_gpu_checkpoints(path)

    def consolidate_standalone(self, args: Any, log: Any) -> int:
        from ..common.fsdp.consolidate import standalone

        return standalone(args, log)


BACKEND = GpuBackend(package=__package__)
