"""Gradient all-reduce over data-parallel ranks and global-norm clipping (NxD parallel_layers.grads)."""

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


def clip_grad_norm(
    parameters, max_norm, norm_type=2, zero1_optimizer=False, zero1_optimizer_groups=None, force_spmd=True
):
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before clipping."""
    if zero1_optimizer:
        from .._limits import unsupported

        raise unsupported("ZeRO-1 gradient clipping")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    if norm_type == float("inf"):
        total = torch.stack([g.detach().abs().max() for g in grads]).max()
    else:
        total = torch.stack([torch.linalg.vector_norm(g.detach().float(), norm_type) for g in grads])
        total = torch.linalg.vector_norm(total, norm_type)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coefficient.to(g.dtype))
    return total


__getattr__ = _placeholder_getattr(__name__)
