"""Helpers of NxD's parallel_layers.utils used by optimum-neuron."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._limits import placeholder_getattr as _placeholder_getattr


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def set_tensor_model_parallel_attributes(
    tensor: torch.Tensor, is_parallel: bool, dim: int, stride: int = 1, num_partitions: int = 1
):
    tensor.tensor_model_parallel = is_parallel
    tensor.partition_dim = dim
    tensor.partition_stride = stride
    tensor.num_partitions = num_partitions


def copy_tensor_model_parallel_attributes(destination: torch.Tensor, source: torch.Tensor) -> None:
    for name in ("tensor_model_parallel", "partition_dim", "partition_stride", "num_partitions"):
        if hasattr(source, name):
            setattr(destination, name, getattr(source, name))


class EmbeddingUtility:
    @staticmethod
    def range_from_per_partition_vocab_size(
        per_partition_vocab_size: int, rank: int, world_size: int
    ) -> Sequence[int]:
        first = rank * per_partition_vocab_size
        return first, first + per_partition_vocab_size

    @staticmethod
    def range_from_global_vocab_size(global_vocab_size: int, rank: int, world_size: int) -> Sequence[int]:
        per = divide(global_vocab_size, world_size)
        return EmbeddingUtility.range_from_per_partition_vocab_size(per, rank, world_size)


def get_local_world_size() -> int:
    import torch_xla.runtime as xr

    return xr.local_process_count()


def move_all_tensor_to_cpu(data: Any, convert: bool = True) -> Any:
    """Every XLA tensor in a nested structure moved to the CPU (others unchanged)."""
    if isinstance(data, torch.Tensor):
        return data.cpu() if data.device.type == "xla" else data
    if isinstance(data, dict):
        return type(data)((k, move_all_tensor_to_cpu(v, convert)) for k, v in data.items())
    if isinstance(data, (list, tuple)):
        return type(data)(move_all_tensor_to_cpu(v, convert) for v in data)
    return data


def move_model_to_device(model: torch.nn.Module, device: torch.device) -> None:
    from ..utils.model_utils import move_model_to_device as move

    move(model, device)


__getattr__ = _placeholder_getattr(__name__)
