"""NxD's parallel layers: column-parallel, row-parallel and vocabulary-parallel embedding, any tp.

Shapes, attribute names and the tensor-parallel metadata (``tensor_model_parallel``, ``partition_dim``,
``partition_stride``, ``num_partitions``) follow neuronx-distributed 0.15 ``parallel_layers/layers.py``, because
optimum-neuron reads them to write ``mp_metadata_pp_rank_*.json`` and to adapt state dicts. Forward passes as
NxD's: column = copy-to-region (or the sequence-parallel gather), local matmul, optional gather of the output;
row = optional scatter of the input, local matmul, all-reduce (or reduce-scatter under sequence parallelism),
then the bias, which is not split; embedding = this rank's vocabulary range, other ids masked to zero rows,
all-reduce. ``create_local_weight`` takes rank ``r``'s stride pieces ``r::tp`` as NxD does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._limits import placeholder_getattr as _placeholder_getattr
from . import mappings, parallel_state
from .utils import divide, set_tensor_model_parallel_attributes


def create_local_weight(
    full_weight: torch.Tensor,
    partition_dim: int,
    per_partition_size: int,
    stride: int,
    out_weight: torch.Tensor | None = None,
    return_master_weight: bool = False,
):
    """This rank's slice of ``full_weight``: split into pieces of ``per_partition_size / stride`` along
    ``partition_dim``, rank r keeps pieces ``r::tp`` (NxD 0.15), written into ``out_weight`` if given."""
    world = parallel_state.get_tensor_model_parallel_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    if full_weight.shape[partition_dim] != per_partition_size * world:
        raise ValueError(
            f"create_local_weight: dim {partition_dim} of {tuple(full_weight.shape)} is not {per_partition_size} x {world}"
        )
    pieces = torch.split(full_weight, divide(per_partition_size, stride), dim=partition_dim)
    local = torch.cat(pieces[rank::world], dim=partition_dim)
    if out_weight is not None:
        with torch.no_grad():
            out_weight.copy_(local)
        local = out_weight
    return (local, full_weight) if return_master_weight else local


class BaseParallelLayer(nn.Module):
    def __init__(self, device: torch.device | None = None):
        super().__init__()
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("neuronx_distributed: initialize_model_parallel() has not been called")
        self.tensor_parallel_group = parallel_state.get_tensor_model_parallel_group()
        self.tensor_model_parallel_group = self.tensor_parallel_group


class BaseParallelLinear(BaseParallelLayer):
    """Weight and bias creation shared by the two linear layers (NxD ``initialize_weight_and_bias``)."""

    weight_shape: tuple[int, int]
    weight_partition_dim: int
    bias_shape: tuple[int] | None
    bias_is_parallel: bool

    def initialize_weight_and_bias(self) -> None:
        self.weight = nn.Parameter(torch.empty(*self.weight_shape, dtype=self.dtype, device=self.device))
        self.device = self.weight.device
        tp = parallel_state.get_tensor_model_parallel_size()
        set_tensor_model_parallel_attributes(self.weight, True, self.weight_partition_dim, self.stride, tp)
        if self.weight.device.type != "meta":
            with torch.no_grad():
                self._init_weight(self.weight)
        if self.bias_shape is None:
            self.register_parameter("bias", None)
            return
        self.bias = nn.Parameter(torch.empty(*self.bias_shape, dtype=self.dtype, device=self.device))
        if self.bias_is_parallel:
            set_tensor_model_parallel_attributes(self.bias, True, 0, self.stride, tp)
        if self.bias.device.type != "meta":
            with torch.no_grad():
                self.bias.zero_()

    def _init_weight(self, weight: torch.Tensor) -> None:
        if self.arg_init_method is None:
            nn.init.kaiming_uniform_(weight, a=5**0.5)
        else:
            self.arg_init_method(weight)


class ColumnParallelLinear(BaseParallelLinear):
    """Y = X A^T + b with A split along its output rows (``partition_dim`` 0)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        stride: int = 1,
        init_method: Callable[[Any], Any] | None = None,
        sequence_parallel_enabled: bool = False,
        sequence_dimension: int | None = None,
        keep_master_weight: bool = False,
        skip_bias_add: bool = False,
        pad: bool = False,
        **kwargs: Any,
    ):
        super().__init__(device)
        self.input_size = input_size
        self.output_size = output_size
        self.add_bias = bias
        self.gather_output = gather_output
        self.arg_init_method = init_method
        self.output_size_per_partition = divide(output_size, parallel_state.get_tensor_model_parallel_size())
        self.dtype = dtype
        self.stride = stride
        self.pad = pad
        self.keep_master_weight = keep_master_weight
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dimension = sequence_dimension
        self.device = device
        self.weight_shape = (self.output_size_per_partition, input_size)
        self.weight_partition_dim = 0
        self.bias_shape = (self.output_size_per_partition,) if bias else None
        self.bias_is_parallel = not gather_output
        self.initialize_weight_and_bias()

    def forward(
        self, input: torch.Tensor, *args: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        if self.sequence_parallel_enabled:
            input = mappings.gather_from_sequence_parallel_region(input, self.sequence_dimension or 0)
        else:
            input = mappings.copy_to_tensor_model_parallel_region(input)
        output = F.linear(input, self.weight, None if self.skip_bias_add else self.bias)
        if self.gather_output:
            output = mappings.gather_from_tensor_model_parallel_region(output)
        return (output, self.bias) if self.skip_bias_add else output


class RowParallelLinear(BaseParallelLinear):
    """Y = X A^T + b with A split along its input columns (``partition_dim`` 1); the bias is not split."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        stride: int = 1,
        init_method: Callable[..., Any] | None = None,
        sequence_parallel_enabled: bool = False,
        sequence_dimension: int | None = None,
        keep_master_weight: bool = False,
        skip_bias_add: bool = False,
        pad: bool = False,
        reduce_output: bool = True,
        **kwargs: Any,
    ):
        super().__init__(device)
        self.input_size = input_size
        self.output_size = output_size
        self.add_bias = bias
        self.input_is_parallel = input_is_parallel
        self.arg_init_method = init_method
        self.input_size_per_partition = divide(input_size, parallel_state.get_tensor_model_parallel_size())
        self.dtype = dtype
        self.stride = stride
        self.pad = pad
        self.keep_master_weight = keep_master_weight
        self.skip_bias_add = skip_bias_add
        self.reduce_output = reduce_output
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dimension = sequence_dimension
        self.device = device
        self.weight_shape = (output_size, self.input_size_per_partition)
        self.weight_partition_dim = 1
        self.bias_shape = (output_size,) if bias else None
        self.bias_is_parallel = False
        self.initialize_weight_and_bias()

    def forward(self, input: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        if not self.input_is_parallel:
            input = mappings.scatter_to_tensor_model_parallel_region(input)
        output = F.linear(input, self.weight)
        if self.sequence_parallel_enabled:
            output = mappings.reduce_scatter_to_sequence_parallel_region(output, self.sequence_dimension or 0)
        elif self.reduce_output:
            output = mappings.reduce_from_tensor_model_parallel_region(output)
        if self.skip_bias_add:
            return output, self.bias
        return output if self.bias is None else output + self.bias


class ParallelEmbedding(BaseParallelLayer):
    """Embedding with the vocabulary split in contiguous ranges (``partition_dim`` 0)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        init_method: Callable[[Any], Any] = nn.init.normal_,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        shard_across_embedding: bool = False,
        pad: bool = False,
        sequence_parallel_enabled: bool = False,
        **kwargs: Any,
    ):
        super().__init__(device)
        if shard_across_embedding:
            from .._limits import unsupported

            raise unsupported("shard_across_embedding")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = sparse
        self.shard_across_embedding = False
        self.stride = 1
        self.pad = pad
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.tensor_model_parallel_size = parallel_state.get_tensor_model_parallel_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        per_partition = divide(num_embeddings, self.tensor_model_parallel_size)
        self.start_index, self.end_index = rank * per_partition, (rank + 1) * per_partition
        self.num_embeddings_per_partition = per_partition
        self.embedding_dim_per_partition = embedding_dim
        self.per_partition_size = per_partition
        self.weight_partition_dim = 0
        self.init_method = init_method
        self.dtype = dtype
        self.weight = nn.Parameter(torch.empty(per_partition, embedding_dim, dtype=dtype, device=device))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1, self.tensor_model_parallel_size)
        if self.weight.device.type != "meta":
            with torch.no_grad():
                init_method(self.weight)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        sharded = self.tensor_model_parallel_size > 1
        if sharded:
            in_range = (input_ >= self.start_index) & (input_ < self.end_index)
            input_ = torch.mul(input_.clone() - self.start_index, in_range.long())
        output = F.embedding(
            input_.long(),
            self.weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
        if not sharded:
            return output
        output = torch.mul(output, in_range.unsqueeze(-1).to(output.dtype))
        if self.sequence_parallel_enabled:
            # NxD moves the sequence first ([batch, seq, hidden] -> [seq, batch, hidden]) before splitting it.
            return mappings.reduce_scatter_to_sequence_parallel_region(output.transpose(0, 1).contiguous(), 0)
        return mappings.reduce_from_tensor_model_parallel_region(output)


__getattr__ = _placeholder_getattr(__name__)
