"""torch-xla's multi-process collectives on the CPU device, carried over gloo (a test double).

torch-xla 2.8's CPU client is one process wide: under ``torchrun --nproc_per_node 2`` every process reports
``xr.world_size() == 1`` and an ``xm.all_reduce`` reduces over itself alone (checked on this machine). On a
Trainium node the same calls run over the Neuron collectives. So that optimum-neuron's real trainer and the NxD
doubles can run two processes here, :func:`install` replaces exactly the torch-xla entry points they use:

- ranks: ``xr.world_size``, ``xr.global_ordinal``, ``xr.local_ordinal``, ``xr.local_process_count`` (from
  torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``); ``xm.get_ordinal``,
  ``xm.is_master_ordinal`` and ``xm.save`` read them through ``xr``;
- collectives: ``xm.all_reduce`` (in place for a list, a new tensor for one tensor, as torch-xla),
  ``xm.all_gather``, ``xm.reduce_scatter``, ``xm.collective_broadcast``, ``xm.rendezvous``, ``xm.mesh_reduce``.
  torch-xla's ``ProcessGroupXla`` (the ``xla`` backend optimum-neuron starts) calls these with its mesh, so
  ``torch.distributed.all_reduce(t, group=tp_group)`` on an XLA tensor goes through them too.

A collective moves the XLA tensors to the host (running their graph), reduces them over a gloo group of the
same replica group, and puts the result back on the device. Half-precision values are reduced in float32 and cast
back. Replica groups are the lists torch-xla takes (``[[0, 1]]``, ``[[0], [1]]``); a rank alone in its group
does no communication. Gloo groups are created the first time a replica-group list is used, by every rank (all
ranks reach every collective in the same order, as on the device).

Installed by the ``neuronx_distributed`` double when ``PJRT_DEVICE=CPU`` and ``WORLD_SIZE > 1``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
import torch.distributed as dist

_GROUPS: dict[tuple[tuple[int, ...], ...], Any] = {}


def wanted() -> bool:
    return os.environ.get("PJRT_DEVICE") == "CPU" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def global_ordinal() -> int:
    return int(os.environ.get("RANK", "0"))


def local_ordinal() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_process_count() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def _replica_groups(groups: Any) -> list[list[int]]:
    if not groups:
        return [list(range(world_size()))]
    return [sorted(int(r) for r in g) for g in groups]


def _my_group(groups: Any) -> tuple[list[int], Any]:
    """This rank's replica group and its gloo group (None when it is alone in it)."""
    replica = _replica_groups(groups)
    me = global_ordinal()
    mine = next((g for g in replica if me in g), None)
    if mine is None:
        raise RuntimeError(f"xla_multiprocess_cpu: rank {me} is in none of the replica groups {replica}")
    if len(mine) == 1:
        return mine, None
    key = tuple(tuple(g) for g in replica)
    if key not in _GROUPS:
        created = {}
        for g in replica:
            if len(g) > 1:
                created[tuple(g)] = dist.new_group(g, backend="gloo")
        _GROUPS[key] = created
    return mine, _GROUPS[key][tuple(mine)]


_OPS = {
    "sum": dist.ReduceOp.SUM,
    "mul": dist.ReduceOp.PRODUCT,
    "min": dist.ReduceOp.MIN,
    "max": dist.ReduceOp.MAX,
    "and": dist.ReduceOp.BAND,
    "or": dist.ReduceOp.BOR,
}


def _host(t: torch.Tensor) -> torch.Tensor:
    c = t.detach().to("cpu")
    if c.dtype in (torch.bfloat16, torch.float16):
        c = c.float()
    return c.contiguous().clone()


def _reduced(t: torch.Tensor, reduce_type: str, scale: float, group: Any) -> torch.Tensor:
    c = _host(t)
    if group is not None:
        dist.all_reduce(c, op=_OPS[reduce_type], group=group)
    if scale != 1.0:
        c = c * scale
    return c.to(t.dtype)


def all_reduce(
    reduce_type: str, inputs: Any, scale: float = 1.0, groups: Any = None, pin_layout: bool = True
):
    _, group = _my_group(groups)
    if isinstance(inputs, torch.Tensor):
        return _reduced(inputs, reduce_type, scale, group).to(inputs.device)
    with torch.no_grad():
        for t in inputs:
            t.copy_(_reduced(t, reduce_type, scale, group).to(t.device))
    return inputs


def _gathered(t: torch.Tensor, dim: int, members: list[int], group: Any) -> torch.Tensor:
    c = _host(t)
    if group is None:
        parts = [c]
    else:
        parts = [torch.empty_like(c) for _ in members]
        dist.all_gather(parts, c, group=group)
    return torch.cat(parts, dim=dim).to(t.dtype).to(t.device)


def _each(value: Any, compute: Any, output: Any) -> Any:
    """``compute`` over one tensor or a list of them, as torch-xla returns it: into ``output`` when given."""
    single = isinstance(value, torch.Tensor)
    results = [compute(v) for v in ([value] if single else value)]
    if output is None:
        return results[0] if single else results
    with torch.no_grad():
        for o, r in zip([output] if single else output, results):
            o.copy_(r)
    return output


def all_gather(
    value: Any, dim: int = 0, groups: Any = None, output: Any = None, pin_layout: bool = True, **kw
):
    members, group = _my_group(groups)
    return _each(value, lambda t: _gathered(t, dim, members, group), output)


def reduce_scatter(
    reduce_type: str,
    input: Any,
    scale: float,
    scatter_dim: int,
    shard_count: int,
    groups: Any = None,
    output: Any = None,
    pin_layout: bool = True,
    **kw,
):
    members, group = _my_group(groups)
    position = members.index(global_ordinal())

    def one(t: torch.Tensor) -> torch.Tensor:
        full = _reduced(t, reduce_type, scale, group)
        return torch.chunk(full, shard_count, dim=scatter_dim)[position].contiguous().to(t.device)

    return _each(input, one, output)


def collective_broadcast(
    tensors: list[torch.Tensor], root_ordinal: int = 0, groups: Any = None, pin_layout=True
):
    members, group = _my_group(groups)
    if group is None:
        return
    with torch.no_grad():
        for t in tensors:
            c = _host(t)
            dist.broadcast(
                c, src=members[root_ordinal] if root_ordinal < len(members) else root_ordinal, group=group
            )
            t.copy_(c.to(t.dtype).to(t.device))


def rendezvous(tag: str, payload: bytes = b"", replicas: list[int] | None = None) -> list[bytes]:
    """Every rank waits for the others; returns every rank's payload, as torch-xla does."""
    _, group = _my_group(None)
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, payload, group=group)
    return out


def mesh_reduce(tag: str, data: Any, reduce_fn: Any) -> Any:
    _, group = _my_group(None)
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, pickle.dumps(data), group=group)
    return reduce_fn([pickle.loads(o) for o in out])


def install() -> None:
    import torch_xla.core.xla_model as xm
    import torch_xla.runtime as xr

    if getattr(xm, "_trnft_multiprocess_cpu", False):
        return
    xr.world_size = world_size
    xr.global_ordinal = global_ordinal
    xr.local_ordinal = local_ordinal
    xr.local_process_count = local_process_count
    xm.all_reduce = all_reduce
    xm.all_gather = all_gather
    xm.reduce_scatter = reduce_scatter
    xm.collective_broadcast = collective_broadcast
    xm.rendezvous = rendezvous
    xm.mesh_reduce = mesh_reduce
    xm._trnft_multiprocess_cpu = True
