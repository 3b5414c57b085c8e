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

    def device(self, local_rank: int) -> torch.device:
        if self.device_of is not None:
            return self.device_of(local_rank)
        return torch.device(self.device_type)

    def lightning_accelerator(self) -> Any:
        return self.accelerator if isinstance(self.accelerator, str) else self.accelerator()


CPU = DevicePlatform(
    name="cpu", device_type="cpu", process_group_backend="gloo", compile_backend=None, accelerator="cpu"
)

CUDA = DevicePlatform(
    name="cuda",
    device_type="cuda",
    process_group_backend="nccl",
    compile_backend="inductor",
    accelerator="cuda",
    count_devices=lambda: torch.cuda.device_count(),
    device_of=lambda i: torch.device("cuda", i),
)
