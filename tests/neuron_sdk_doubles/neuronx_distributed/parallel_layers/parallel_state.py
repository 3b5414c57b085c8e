"""Process groups of NxD 0.15: tensor parallel, data parallel and kv-shared, pipeline-parallel size 1.

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


_KV_GROUP_SIZE: int | None = None
_KV_GROUPS: list[list[int]] | None = None


def arrange_kv_groups(
    num_tensor_model_parallel_groups: int = 1,
    tensor_model_parallel_size: int = 1,
    kv_shared_group_size: int = 1,
    sequential_ranks_in_group: bool = False,
    platform: str = "trn1",
) -> list[list[int]]:
    """The ranks holding copies of the same KV heads (NxD ``arrange_kv_groups``): on trn2 adjacent ranks
    (copies made with ``repeat_interleave``); on trn1 every ``tp / kv_shared_group_size``-th rank of a tensor
    group (copies made with ``repeat``), or adjacent ranks when ``sequential_ranks_in_group``."""
    tp, size = tensor_model_parallel_size, kv_shared_group_size
    groups = []
    for i in range(num_tensor_model_parallel_groups):
        base = i * tp
        if platform == "trn2" or sequential_ranks_in_group:
            groups += [[base + k * size + j for j in range(size)] for k in range(tp // size)]
        else:
            groups += [list(range(base + j, base + tp, tp // size)) for j in range(tp // size)]
    return groups


def initialize_kv_group(kv_shared_group_size: int = 1, sequential_ranks_in_group: bool = False) -> None:
    """Made once, by the first GQA layer every rank builds; one size for every layer (as NxD)."""
    global _KV_GROUP_SIZE, _KV_GROUPS
    from torch_neuronx.utils import get_platform_target

    if _KV_GROUPS is not None:
        if kv_shared_group_size != _KV_GROUP_SIZE:
            raise AssertionError("Currently the library supports only single KV size for all layers")
        return
    tp = get_tensor_model_parallel_size()
    if tp % kv_shared_group_size:
        raise AssertionError(
            f"kv_shared_group_size: {kv_shared_group_size}, should divide tensor model parallel group {tp} "
        )
    groups = arrange_kv_groups(
        _world() // tp, tp, kv_shared_group_size, sequential_ranks_in_group, get_platform_target()
    )
    _KV_GROUP_SIZE, _KV_GROUPS = kv_shared_group_size, groups
    if dist.is_initialized():
        me = _rank()
        for ranks in groups:
            group = dist.new_group(ranks, pg_options={"xla_pg_options": {"mesh": groups}})
            if me in ranks:
                _GROUP["kv_shared"] = group


def get_kv_shared_replica_groups() -> list[list[int]]:
    if _KV_GROUPS is None:
        raise AssertionError("kv_shared parallel group is not initialized")
    return [list(g) for g in _KV_GROUPS]


def get_kv_shared_group(as_list: bool = False):
    if as_list:
        return get_kv_shared_replica_groups()
    if _KV_GROUPS is None:
        raise AssertionError("kv_shared parallel group is not initialized")
    return _GROUP.get("kv_shared", SingleRankGroup())


def get_kv_shared_group_size() -> int:
    if _KV_GROUP_SIZE is None:
        raise AssertionError("kv_shared parallel group is not initialized")
    return _KV_GROUP_SIZE


def destroy_kv_group() -> None:
    global _KV_GROUP_SIZE, _KV_GROUPS
    _KV_GROUP_SIZE = _KV_GROUPS = None
    _GROUP.pop("kv_shared", None)


def model_parallel_is_initialized() -> bool:
    return _INITIALIZED


def destroy_model_parallel() -> None:
    global _INITIALIZED
    _INITIALIZED = False
    destroy_kv_group()
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
