"""Process groups of NxD at tensor- and pipeline-parallel size 1: every rank is a data-parallel rank."""

from __future__ import annotations

import torch.distributed as dist

from .._limits import placeholder_getattr as _placeholder_getattr
from .._limits import unsupported

_INITIALIZED = False


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, **kwargs
) -> None:
    global _INITIALIZED
    if tensor_model_parallel_size != 1:
        raise unsupported(f"tensor_model_parallel_size={tensor_model_parallel_size}")
    if pipeline_model_parallel_size != 1:
        raise unsupported(f"pipeline_model_parallel_size={pipeline_model_parallel_size}")
    if kwargs.get("context_parallel_size", 1) not in (1, None):
        raise unsupported("context parallelism")
    _INITIALIZED = True


def model_parallel_is_initialized() -> bool:
    return _INITIALIZED


def destroy_model_parallel() -> None:
    global _INITIALIZED
    _INITIALIZED = False


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_tensor_model_parallel_size() -> int:
    return 1


def get_tensor_model_parallel_rank() -> int:
    return 0


def get_pipeline_model_parallel_size() -> int:
    return 1


def get_pipeline_model_parallel_rank() -> int:
    return 0


def get_context_model_parallel_size() -> int:
    return 1


def get_expert_model_parallel_size() -> int:
    return 1


def get_data_parallel_size() -> int:
    return _world()


def get_data_parallel_rank() -> int:
    return _rank()


def get_data_parallel_replica_groups() -> list[list[int]]:
    return [list(range(_world()))]


def get_tensor_model_parallel_replica_groups() -> list[list[int]]:
    return [[r] for r in range(_world())]


def get_pipeline_model_parallel_replica_groups() -> list[list[int]]:
    return [[r] for r in range(_world())]


def get_data_parallel_group(as_list: bool = False):
    return get_data_parallel_replica_groups() if as_list else dist.group.WORLD


class SingleRankGroup:
    """The tensor-parallel group of a rank at tp=1: itself. Layers only ask it for ``size()`` and ``rank()``."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


_TP_GROUP = SingleRankGroup()


def get_tensor_model_parallel_group(as_list: bool = False):
    if as_list:
        return get_tensor_model_parallel_replica_groups()
    return _TP_GROUP


__getattr__ = _placeholder_getattr(__name__)
