from __future__ import annotations

from enum import IntEnum

import torch

from .._limits import placeholder_getattr as _placeholder_getattr

_PARALLEL_ATTRIBUTES = (
    "tensor_model_parallel",
    "partition_dim",
    "partition_stride",
    "num_partitions",
    "sequence_parallel_enabled",
)


class LogicalNCConfig(IntEnum):
    LNC_1 = 1
    LNC_2 = 2


def get_platform_lnc() -> LogicalNCConfig:
    """trn1 has one physical NeuronCore per logical core."""
    return LogicalNCConfig.LNC_1


def move_model_to_device(model: torch.nn.Module, device: torch.device) -> None:
    """``model.to(device)`` keeping NxD's tensor-parallel attributes and shared weights (NxD does the same)."""
    saved = {
        name: {a: getattr(p, a) for a in _PARALLEL_ATTRIBUTES if hasattr(p, a)}
        for name, p in model.named_parameters(remove_duplicate=False)
    }
    model.to(device)
    for name, p in model.named_parameters(remove_duplicate=False):
        for attr, value in saved.get(name, {}).items():
            setattr(p, attr, value)


__getattr__ = _placeholder_getattr(__name__)
