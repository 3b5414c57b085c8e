"""Gradient all-reduce over data-parallel ranks and global-norm clipping (NxD 0.15 parallel_layers.grads).

``clip_grad_norm`` follows NxD's ``get_grad_norm`` with ``force_spmd=True`` (its default): a parameter marked
``tensor_model_parallel`` contributes its local shard's ``norm ** p`` on every tp rank; a parameter every tp rank
holds whole (norms, LoRA matrices of the unsplit side) contributes ``norm ** p / tp`` on every rank; parameters
marked ``shared`` do not count; the sum is all-reduced over the tensor-parallel group, then ``** (1/p)``. Every
gradient is scaled by ``min(1, max_norm / (norm + 1e-6))``. The inf-norm takes the max over the same sets.
"""

from __future__ import annotations

import torch

from .._limits import placeholder_getattr as _placeholder_getattr
from . import parallel_state


def bucket_allreduce_gradients(grads_list, reduce_over_ep_group: bool = False) -> None:
    """Average gradients over the data-parallel ranks, in place (NxD sums with scale 1/dp)."""
    dp = parallel_state.get_data_parallel_size()
    if dp == 1 or not grads_list:
        return
    import torch_xla.core.xla_model as xm

    xm.all_reduce(
        xm.REDUCE_SUM, grads_list, scale=1.0 / dp, groups=parallel_state.get_data_parallel_replica_groups()
    )


def _tp_all_reduce(value: torch.Tensor, reduce_type: str) -> torch.Tensor:
    if parallel_state.get_tensor_model_parallel_size() == 1:
        return value
    import torch_xla.core.xla_model as xm

    return xm.all_reduce(reduce_type, value, groups=parallel_state.get_tensor_model_parallel_replica_groups())


def get_grad_norm(
    parameters, norm_type=2, zero1_optimizer=False, zero1_optimizer_groups=None, force_spmd=True
):
    if zero1_optimizer:
        from .._limits import unsupported

        raise unsupported("ZeRO-1 gradient norm")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    sharded, whole = [], []
    for p in parameters:
        if p.grad is None or getattr(p, "shared", False):
            continue
        (sharded if getattr(p, "tensor_model_parallel", False) else whole).append(p.grad.detach())
    device = parameters[0].device if parameters else torch.device("cpu")
    norm_type = float(norm_type)
    tp = parallel_state.get_tensor_model_parallel_size()
    if norm_type == float("inf"):
        local = [g.abs().max().float() for g in sharded + whole] or [torch.zeros((), device=device)]
        return _tp_all_reduce(torch.stack(local).max().reshape(1), "max")[0]
    total = torch.zeros(1, dtype=torch.float32, device=device)
    for g in whole:
        total = total + torch.linalg.vector_norm(g.float(), norm_type) ** norm_type
    total = total / tp
    for g in sharded:
        total = total + torch.linalg.vector_norm(g.float(), norm_type) ** norm_type
    total = _tp_all_reduce(total, "sum")
    return torch.pow(total, 1.0 / norm_type)[0]


def clip_grad_norm(
    parameters, max_norm, norm_type=2, zero1_optimizer=False, zero1_optimizer_groups=None, force_spmd=True
):
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before clipping."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = get_grad_norm(parameters, norm_type, zero1_optimizer, zero1_optimizer_groups, force_spmd)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coefficient.to(g.dtype))
    return total


__getattr__ = _placeholder_getattr(__name__)
