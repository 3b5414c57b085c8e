"""Where the FSDP2 trainer runs: the device, its process-group backend, its compile backend and the
Lightning accelerator that drives it.

The trainer never names a device itself: the ``gpu`` platform hands it :data:`CUDA` (or :data:`CPU` on a
machine without one), the ``neuron-native`` platform its Neuron platform (``trnft.neuron.native``) or
:data:`CPU`. On the CPU the same Lightning trainer runs over gloo, which is how every sharded path is tested.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class DevicePlatform:
    """One kind of training device as the FSDP2 trainer and Lightning see it."""

    name: str  # what the figures and log lines call it: cuda, neuron, cpu
    device_type: str  # torch device type: cuda, neuron, cpu
    process_group_backend: str  # torch.distributed backend: nccl, neuron, gloo
    # torch.compile backend for the decoder blocks when compilation is on; None: this device runs eager only.
    compile_backend: str | None
    # Lightning's accelerator: a registered name or a factory of an Accelerator instance.
    accelerator: str | Callable[[], Any]
    # How many devices this node offers (processes `trnft train` starts outside torchrun).
    count_devices: Callable[[], int] = field(default=lambda: 1)
    # The torch.device of local rank ``i``.
    device_of: Callable[[int], torch.device] | None = None
    # Whether ``init_process_group`` gets ``device_id`` (Lightning passes the rank's device for every
    # non-CPU device). The Neuron backend is started with none, the device untouched until it exists.
    process_group_device_id: bool = True
    # AdamW's fused kernel exists for this device: one kernel per parameter group, and a step with a
    # non-finite loss or gradient norm is skipped on the device (its ``found_inf`` input), so the host
    # never waits for a step's figures. Without it (Neuron: not measured) the host checks them before
    # the update.
    fused_optimizer: bool = False

    def device(self, local_rank: int) -> torch.device:
        if self.device_of is not None:
            return self.device_of(local_rank)
        return torch.device(self.device_type)

    def lightning_accelerator(self) -> Any:
        return self.accelerator if isinstance(self.accelerator, str) else self.accelerator()

    def lightning_strategy(self, **kwargs: Any) -> Any:
        """Lightning's ``ModelParallelStrategy`` for this device (``kwargs`` are its own)."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self.process_group_device_id:
            return ModelParallelStrategy(**kwargs)
        return _strategy_without_device_id()(**kwargs)


def _strategy_without_device_id() -> type:
    """``ModelParallelStrategy`` that joins the process group without ``device_id`` and hands the accelerator
    its device only once the group exists.

    Lightning 2.6.6's ``ModelParallelStrategy._setup_distributed`` passes ``device_id=root_device`` for any
    non-CPU device, after ``Strategy.setup_environment`` has called ``accelerator.setup_device`` (pinned in
    tests/common/test_lightning_contract.py). The Neuron process group must be created before the runtime
    is initialised and without a device (AWS's torch.distributed guide for TorchNeuron), so this override
    keeps Lightning's steps minus ``device_id``; the accelerator ignores ``setup_device`` until then.
    """
    from lightning.fabric.utilities.distributed import _init_dist_connection
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import ModelParallelStrategy

    class ModelParallelStrategyWithoutDeviceId(ModelParallelStrategy):
        def _setup_distributed(self) -> None:
            reset_seed()
            self.set_world_ranks()
            self._process_group_backend = self._get_process_group_backend()
            assert self.cluster_environment is not None
            _init_dist_connection(
                self.cluster_environment, self._process_group_backend, timeout=self._timeout
            )
            assert self.accelerator is not None
            self.accelerator.setup_device(self.root_device)  # now that the process group exists

    return ModelParallelStrategyWithoutDeviceId


CPU = DevicePlatform(
    name="cpu",
    device_type="cpu",
    process_group_backend="gloo",
    compile_backend=None,
    accelerator="cpu",
    fused_optimizer=True,
)

CUDA = DevicePlatform(
    name="cuda",
    device_type="cuda",
    process_group_backend="nccl",
    compile_backend="inductor",
    accelerator="cuda",
    count_devices=lambda: torch.cuda.device_count(),
    device_of=lambda i: torch.device("cuda", i),
    fused_optimizer=True,
)
