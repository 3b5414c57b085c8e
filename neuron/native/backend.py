"""The ``neuron-native`` platform: Trainium 2 and 3 on native PyTorch (TorchNeuron), through the FSDP2
trainer on Lightning that the gpu platform uses.

Settings: the FSDP2 trainer's (``parallel.tp``, ``parallel.replicate``, ``fsdp.devices``, ``fsdp.reshard_after_forward``,
``fsdp.compile``, ``train.activation_checkpointing``) and, from the ``neuron`` section, only what native
Neuron shares with the XLA path: ``neuron.cache_dir`` (the persistent compile cache on the shared volume)
and ``neuron.logical_nc_config``. Everything else is refused by
:func:`check_settings` in one line before any stage runs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...common.cluster.instances import InstanceType, Layout, instance
from ...common.config.run_config import NeuronSection, RunConfig
from ...common.errors import ConfigError
from ...common.pipeline.backend import StageModules
from .. import launch
from . import torchneuron

# neuron.* keys native Neuron honours; any other neuron.* key at a non-default value is the XLA path's.
SHARED_NEURON_KEYS = ("cache_dir", "logical_nc_config")
# What to do instead, per XLA-only key.
_INSTEAD = {
    "backend": "the device is chosen by the platform (Neuron when /dev/neuron* and torch-neuronx exist, else CPU)",
    "cpu_devices": "on CPU the processes are fsdp.devices",
    "kv_size_multiplier": "GQA key/value heads are split by DTensor with parallel.tp dividing them",
    "fuse_qkv": "NxD's fused projections are the XLA path's",
    "attention": "attention is fsdp.attn_implementation (sdpa or eager on Neuron)",
    "checkpoint_format": "checkpoints are torch.distributed checkpoints",
    "parallel_compile_workers": "there is no neuron_parallel_compile; the compile stage is a trial run",
    "compiler_flags": "TorchNeuron documents no NEURON_CC_FLAGS; it compiles with its own settings",
}


def check_settings(cfg: RunConfig) -> None:
    """Refuse what neuron-native cannot honour: a non-Trainium-2/3 instance, XLA-only keys, CUDA-only keys.

    Raises:
        ConfigError: one line naming the key, why, and what to use instead.
    """
    from ...common.fsdp import check_parallel_settings
    from ...common.training.families import check_fsdp_family

    check_parallel_settings(cfg)
    check_fsdp_family(cfg.model.name_or_path)
    inst = instance(cfg.cluster.instance_type)
    if inst.accelerator != "neuron" or inst.target not in torchneuron.TARGETS:
        instead = (
            "model.platform: neuron (the PyTorch/XLA path)"
            if inst.target == "trn1"
            else "model.platform: gpu"
        )
        raise ConfigError(
            f"cluster.instance_type: {inst.name} cannot run model.platform neuron-native (native PyTorch on "
            f"Neuron supports {' and '.join(torchneuron.TARGETS)} only); use {instead} for it, or a trn2/trn3 "
            "instance type"
        )
    defaults = NeuronSection()
    for f in dataclasses.fields(NeuronSection):
        if f.name in SHARED_NEURON_KEYS:
            continue
        value = getattr(cfg.neuron, f.name)
        if value != getattr(defaults, f.name):
            raise ConfigError(
                f"neuron.{f.name}: {value!r} is a setting of model.platform neuron (PyTorch/XLA), which "
                f"neuron-native cannot honour ({_INSTEAD.get(f.name, 'remove it')}); remove it"
            )
    if cfg.fsdp.attn_implementation == "flash_attention_2":
        raise ConfigError(
            "fsdp.attn_implementation: flash_attention_2 is CUDA's flash-attn package; on neuron-native use "
            "auto, sdpa or eager"
        )
    if cfg.fsdp.cpu_offload:
        raise ConfigError(
            "fsdp.cpu_offload: FSDP2 CPU offload is not supported on neuron-native (its optimizer step would "
            "run on the host, away from the NeuronCores); set fsdp.cpu_offload=false and add nodes or parallel.tp"
        )


def neuron_native_env(cfg: RunConfig, inst: InstanceType, layout: Layout) -> dict[str, str]:
    """Environment of the compile and train processes (the same for both, so both hit one cache)."""
    return {
        torchneuron.NEFF_CACHE_ENV: launch.cache_dir(cfg),
        # glibc arenas grow host memory per thread (the same cap as the XLA path).
        "MALLOC_ARENA_MAX": "64",
        # One process per logical NeuronCore: the runtime groups physical cores by this (trn2/trn3).
        "NEURON_LOGICAL_NC_CONFIG": str(cfg.neuron.logical_nc_config),
    }


@dataclass(frozen=True)
class NeuronNativeBackend(StageModules):
    platform: str = "neuron-native"
    config_section: str = "fsdp"
    compiles_graphs: bool = True
    accelerator: str = "neuron"

    def check_config(self, cfg: RunConfig) -> None:
        check_settings(cfg)

    def model_parallel(self, cfg: RunConfig) -> tuple[int, int]:
        return cfg.parallel.tp, 1

    def launch_env(self, cfg: RunConfig, inst: InstanceType, layout: Layout) -> dict[str, str]:
        return neuron_native_env(cfg, inst, layout)

    def process_env(self, cfg: RunConfig) -> dict[str, str]:
        # torch loads torch-neuronx when it is imported (PyTorch's device-backend autoload), and the NEFF
        # cache location is read then: a stage started by hand must have it before, as the pods do. Where
        # it is set (the pods, or the compile stage's trial run, which trains into the run's cache), it stays.
        if torchneuron.NEFF_CACHE_ENV in os.environ:
            return {}
        return {torchneuron.NEFF_CACHE_ENV: launch.cache_dir(cfg)}

    def shared_volume_paths(self, cfg: RunConfig) -> list[tuple[str, str]]:
        return [("neuron.cache_dir", launch.cache_dir(cfg))]

    def owns_checkpoint(self, path: Path) -> bool:
        from ...common.fsdp.consolidate import holds_gpu_checkpoints

        return holds_gpu_checkpoints(path)

    def consolidate_standalone(self, args: Any, log: Any) -> int:
        from ...common.fsdp.consolidate import standalone

        return standalone(args, log)


BACKEND = NeuronNativeBackend(package=__package__)
