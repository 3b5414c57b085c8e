"""Process groups of NxD 0.15: tensor parallel and data parallel, pipeline-parallel size 1.

Rank layout as NxD's ``initialize_model_parallel`` (no expert or context parallelism): the world's ranks
reshaped row-major to ``[PP, DP, TP]``, so tensor-parallel ranks are contiguous (``tp_groups`` = rows) and a
data-parallel group takes one rank of every tensor-parallel group (``dp_groups`` = columns). Groups are torch-xla
``xla`` process groups whose mesh is the full replica-group list (NxD's ``_build_and_assign_groups`` passes
``pg_options={"xla_pg_options": {"mesh": mesh}}``); every rank takes part in creating every group (NxD's CPU
mode does the same). Without a started process group (one process, no torchrun) every size is 1.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from .._limits import placeholder_getattr as _placeholder_getattr
from .._limits import unsupported

_INITIALIZED = False
_TP = 1
_TP_GROUPS: list[list[int]] = [[0]]
_DP_GROUPS: list[list[int]] = [[0]]
_PP_GROUPS: list[list[int]] = [[0]]
_GROUP: dict[str, Any] = {}


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def replica_groups(world: int, tp: int) -> tuple[list[list[int]], list[list[int]]]:
    """(tp_groups, dp_groups) of NxD's ``[PP=1, DP, TP]`` rank grid."""
    if world % tp:
        raise ValueError(f"world size {world} is not divisible by tensor_model_parallel_size {tp}")
    dp = world // tp
    tp_groups = [[d * tp + t for t in range(tp)] for d in range(dp)]
    dp_groups = [[d * tp + t for d in range(dp)] for t in range(tp)]
    return tp_groups, dp_groups


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, **kwargs
) -> None:
    global _INITIALIZED, _TP, _TP_GROUPS, _DP_GROUPS, _PP_GROUPS
    if pipeline_model_parallel_size != 1:
        raise unsupported(f"pipeline_model_parallel_size={pipeline_model_parallel_size}")
    if kwargs.get("context_parallel_size", 1) not in (1, None):
        raise unsupported("context parallelism")
    if kwargs.get("expert_model_parallel_size", 1) not in (1, None):
        raise unsupported("expert parallelism")
    world = _world()
    _TP = tensor_model_parallel_size
    _TP_GROUPS, _DP_GROUPS = replica_groups(world, _TP)
    _PP_GROUPS = [[r] for r in range(world)]
    _GROUP.clear()
    if dist.is_initialized():
        me = _rank()
        for name, mesh in (("world", [list(range(world))]), ("tp", _TP_GROUPS), ("dp", _DP_GROUPS)):
            for ranks in mesh:
                group = dist.new_group(ranks, pg_options={"xla_pg_options": {"mesh": mesh}})
                if me in ranks:
                    _GROUP[name] = group
        # A gloo group of the world for the checkpoint writer's meeting points (monitored_barrier), made
        # here because creating a group needs every rank, which a meeting point cannot assume.
        _GROUP["gloo_world"] = dist.new_group(backend="gloo")
    _INITIALIZED = True


def model_parallel_is_initialized() -> bool:
    return _INITIALIZED


def destroy_model_parallel() -> None:
    global _INITIALIZED
    _INITIALIZED = False
    _GROUP.clear()


def _position(groups: list[list[int]]) -> tuple[int, int]:
    me = _rank()
    for g in groups:
        if me in g:
            return g.index(me), len(g)
    raise RuntimeError(f"neuronx_distributed double: rank {me} is in none of {groups}")


def get_tensor_model_parallel_size() -> int:
    return _position(_TP_GROUPS)[1] if _INITIALIZED else 1


def get_tensor_model_parallel_rank() -> int:
    return _position(_TP_GROUPS)[0] if _INITIALIZED else 0


def get_pipeline_model_parallel_size() -> int:
    return 1


def get_pipeline_model_parallel_rank() -> int:
    return 0


def get_context_model_parallel_size() -> int:
    return 1


def get_expert_model_parallel_size() -> int:
    return 1


def get_data_parallel_size() -> int:
    return _position(_DP_GROUPS)[1] if _INITIALIZED else _world()


def get_data_parallel_rank() -> int:
    return _position(_DP_GROUPS)[0] if _INITIALIZED else _rank()


def get_data_parallel_replica_groups() -> list[list[int]]:
    return [list(g) for g in _DP_GROUPS] if _INITIALIZED else [list(range(_world()))]


def get_tensor_model_parallel_replica_groups() -> list[list[int]]:
    return [list(g) for g in _TP_GROUPS] if _INITIALIZED else [[r] for r in range(_world())]


def get_pipeline_model_parallel_replica_groups() -> list[list[int]]:
    return [[r] for r in range(_world())]


class SingleRankGroup:
    """The group of a rank alone (no process group started). Layers only ask it for ``size()`` and ``rank()``."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def get_data_parallel_group(as_list: bool = False):
    if as_list:
        return get_data_parallel_replica_groups()
    return _GROUP.get("dp", dist.group.WORLD if dist.is_initialized() else SingleRankGroup())


def get_tensor_model_parallel_group(as_list: bool = False):
    if as_list:
        return get_tensor_model_parallel_replica_groups()
    return _GROUP.get("tp", SingleRankGroup())


def gloo_world_group() -> Any:
    """The double's own gloo group of every rank (not an NxD function)."""
    return _GROUP["gloo_world"]


def get_pipeline_model_parallel_group(as_list: bool = False):
    if as_list:
        return get_pipeline_model_parallel_replica_groups()
    return SingleRankGroup()


__getattr__ = _placeholder_getattr(__name__)
