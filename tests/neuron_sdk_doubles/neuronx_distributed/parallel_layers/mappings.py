"""NxD 0.15's tensor- and sequence-parallel regions (``parallel_layers/mappings.py``), as autograd functions.

Forward and backward pairs as NxD defines them: copy (identity / all-reduce), reduce (all-reduce / identity),
scatter (split the last dim / all-gather it), gather (all-gather the last dim / split it); the sequence-parallel
forms act on ``sequence_dimension``: scatter (split / all-gather), gather (all-gather / reduce-scatter, or split
when ``to_model_parallel`` is false), reduce-scatter (reduce-scatter / all-gather). Collectives go through
``torch_xla.core.xla_model`` over the tensor-parallel replica groups, as NxD's do; at tp = 1 every region is the
identity.
"""

from __future__ import annotations

from typing import Any

import torch

from .._limits import placeholder_getattr as _placeholder_getattr
from . import parallel_state


def _tp() -> tuple[int, int, list[list[int]]]:
    return (
        parallel_state.get_tensor_model_parallel_size(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_replica_groups(),
    )


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group **in place** and return it, as NxD does: ``_reduce`` calls
    ``comm.all_reduce``, which wraps a single tensor in a list, and torch-xla reduces a list in place
    (NxD v2.26.0 ``parallel_layers/mappings.py`` ``_reduce``, ``parallel_layers/comm.py`` ``all_reduce``).
    Callers that drop the return value (optimum-neuron's ``allreduce_sequence_parallel_gradients``) rely
    on it."""
    size, _, groups = _tp()
    if size == 1:
        return x
    import torch_xla.core.xla_model as xm

    xm.all_reduce(xm.REDUCE_SUM, [x], groups=groups)
    return x


def _split(x: torch.Tensor, dim: int) -> torch.Tensor:
    size, rank, _ = _tp()
    if size == 1:
        return x
    return torch.chunk(x, size, dim=dim)[rank].contiguous()


def _gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    size, _, groups = _tp()
    if size == 1:
        return x
    import torch_xla.core.xla_model as xm

    return xm.all_gather(x.contiguous(), dim=dim % x.dim(), groups=groups)


def _reduce_scatter(x: torch.Tensor, dim: int) -> torch.Tensor:
    size, _, groups = _tp()
    if size == 1:
        return x
    import torch_xla.core.xla_model as xm

    return xm.reduce_scatter(xm.REDUCE_SUM, x.contiguous(), 1.0, dim % x.dim(), size, groups=groups)


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g)


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = _all_reduce(x)
        if out is x and _tp()[0] > 1:
            ctx.mark_dirty(x)  # reduced in place
        return out

    @staticmethod
    def backward(ctx, g):
        return g


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x, -1)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, -1)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather(x, -1)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1)


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _split(x, dim)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim), None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, to_model_parallel):
        ctx.dim, ctx.to_model_parallel = dim, to_model_parallel
        return _gather(x, dim)

    @staticmethod
    def backward(ctx, g):
        if ctx.to_model_parallel:
            return _reduce_scatter(g, ctx.dim), None, None
        return _split(g, ctx.dim), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim), None


def copy_to_tensor_model_parallel_region(x, process_group: Any = None):
    return _Copy.apply(x)


def reduce_from_tensor_model_parallel_region(x, process_group: Any = None):
    if not torch.is_grad_enabled() or not x.requires_grad:
        return _all_reduce(x)  # a gradient (optimum's sequence-parallel sum) or an inference activation
    return _Reduce.apply(x)


def scatter_to_tensor_model_parallel_region(x, process_group: Any = None):
    return _Scatter.apply(x)


def gather_from_tensor_model_parallel_region(x, process_group: Any = None):
    return _Gather.apply(x)


def scatter_to_sequence_parallel_region(x, sequence_dimension: int = 0, process_group: Any = None):
    return _ScatterSequence.apply(x, sequence_dimension)


def gather_from_sequence_parallel_region(
    x, sequence_dimension: int = 0, to_model_parallel: bool = True, process_group: Any = None, tile_cc=False
):
    return _GatherSequence.apply(x, sequence_dimension, to_model_parallel)


def reduce_scatter_to_sequence_parallel_region(
    x, sequence_dimension: int = 0, process_group: Any = None, dtype: Any = None
):
    return _ReduceScatterSequence.apply(x, sequence_dimension)


__getattr__ = _placeholder_getattr(__name__)
