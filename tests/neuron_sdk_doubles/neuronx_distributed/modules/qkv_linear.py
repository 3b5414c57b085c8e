"""NxD 0.15's GQA QKV layer (``modules/qkv_linear.py``, ``modules/qkv_linear_utils.py``), any tp.

optimum-neuron builds it when kv heads < tp or kv heads % tp != 0 (``modeling_llama.py``), with
``kv_size_multiplier`` = tp // kv heads copies of every KV head spread over the tensor-parallel ranks; its LoRA
layer for it (``peft/tuners/lora/layer.py``) uses one as ``lora_B``. What this double keeps from NxD:

- attributes optimum reads: ``q_output_size_per_partition``, ``kv_output_size_per_partition``
  (``output_sizes[1] * kv_size_multiplier / tp``), ``kv_size_multiplier``, ``fuse_qkv``, ``gather_output``,
  ``sequence_parallel_enabled``, ``dtype``, ``arg_init_method``; parameters ``weight_q/k/v`` (each marked
  tensor-parallel on dim 0) or, fused, ``weight_qkv`` = [q_r; k_r; v_r] made as a new Parameter after the
  split, so it carries no tensor-parallel attributes (as NxD's does not);
- initialisation: each of q, k, v drawn whole in float32 by the init method, the KV ones repeated
  ``kv_size_multiplier`` times along the heads (trn1: ``repeat``, K0 K1 K0 K1; trn2: ``repeat_interleave``,
  K0 K0 K1 K1), then rank r's slice as ``create_local_weight`` takes it;
- the kv-shared groups of ``parallel_state.initialize_kv_group`` (made by the first layer);
- forward: the input gathered along the sequence (sequence parallel) or copied to the region, then the three
  matmuls (one fused matmul split in three when fused), outputs gathered when ``gather_output``;
- a fused weight that takes no gradient (LoRA's frozen base) fails in backward, as NxD 0.15's does;
- backward (``GQAQKVLinearWithAsyncCommunication.backward``): the K and V output gradients summed over the
  kv-shared group first, so every copy of a head gets the gradient of all its copies; the input gradient is
  ``gq Wq + (gk Wk + gv Wv) / kv_size_multiplier`` (fused: the K and V parts scaled before the matmul); weight
  gradients from the summed output gradients; then the input gradient reduced over tp (the gather's or the
  copy's backward).

Not doubled: biases (optimum builds every GQA layer and its LoRA B without one; NxD 0.15 would fail on one
anyway: it passes ``shared_tp`` to ``set_tensor_model_parallel_attributes``, which has no such argument),
``keep_master_weight``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._limits import placeholder_getattr as _placeholder_getattr
from .._limits import unsupported
from ..parallel_layers import mappings, parallel_state
from ..parallel_layers.layers import BaseParallelLinear, create_local_weight
from ..parallel_layers.utils import divide, set_tensor_model_parallel_attributes


def _platform() -> str:
    from torch_neuronx.utils import get_platform_target

    return get_platform_target()


def _replicate_heads(master: torch.Tensor, copies: int) -> torch.Tensor:
    """The KV weight repeated along its output rows as NxD lays copies out on each platform."""
    if copies == 1:
        return master
    if _platform() == "trn2":
        return torch.repeat_interleave(master, copies, dim=0)
    return master.repeat(copies, 1)


class _GQAQKVLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, total_input, weight_q, weight_k, weight_v, kv_size_multiplier, kv_groups, frozen_fused):
        ctx.save_for_backward(total_input, weight_q, weight_k, weight_v)
        ctx.kv_size_multiplier = kv_size_multiplier
        ctx.kv_groups = kv_groups
        ctx.frozen_fused = frozen_fused
        return total_input @ weight_q.t(), total_input @ weight_k.t(), total_input @ weight_v.t()

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        if ctx.frozen_fused:
            # NxD v2.26.0 qkv_linear_utils.py _qkvlinear_autograd_base_setup_bwd: without a weight gradient
            # it takes `weight_qkv = ctx.saved_tensors[:1]`, a tuple, and the input-gradient matmul fails.
            raise TypeError(
                "matmul(): argument 'other' (position 1) must be Tensor, not tuple (NxD 0.15 GQA QKV backward "
                "of a frozen fused weight_qkv)"
            )
        total_input, weight_q, weight_k, weight_v = ctx.saved_tensors
        m = ctx.kv_size_multiplier
        if m > 1:
            import torch_xla.core.xla_model as xm

            dtype = grad_k.dtype
            summed = xm.all_reduce(
                xm.REDUCE_SUM, [grad_k.float(), grad_v.float()], scale=1.0, groups=ctx.kv_groups
            )
            grad_k, grad_v = summed[0].to(dtype), summed[1].to(dtype)
        grad_input = grad_q @ weight_q + (grad_k @ weight_k + grad_v @ weight_v) / m
        flat_input = total_input.reshape(-1, total_input.shape[-1])

        def weight_grad(grad_output: torch.Tensor) -> torch.Tensor:
            return grad_output.reshape(-1, grad_output.shape[-1]).t() @ flat_input

        return grad_input, weight_grad(grad_q), weight_grad(grad_k), weight_grad(grad_v), None, None, None


class GQAQKVColumnParallelLinear(BaseParallelLinear):
    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = True,
        gather_output: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        init_method: Callable[..., Any] | None = None,
        sequence_parallel_enabled: bool = False,
        keep_master_weight: bool = False,
        kv_size_multiplier: int = 1,
        fuse_qkv: bool = True,
        reduce_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(device=device)
        if bias:
            raise unsupported("GQAQKVColumnParallelLinear with a bias")
        if keep_master_weight:
            raise unsupported("GQAQKVColumnParallelLinear(keep_master_weight=True)")
        tp = parallel_state.get_tensor_model_parallel_size()
        if tp % kv_size_multiplier:
            raise AssertionError("tp_world_size should be divisible by kv_size_multiplier")
        if (output_sizes[1] * kv_size_multiplier) % tp:
            raise AssertionError("kv_output_dim*kv_size_multiplier should be divisible by tp_world_size")
        parallel_state.initialize_kv_group(kv_size_multiplier)
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.gather_output = gather_output
        self.arg_init_method = init_method
        self.kv_size_multiplier = kv_size_multiplier
        self.q_output_size_per_partition = divide(output_sizes[0], tp)
        self.kv_output_size_per_partition = divide(output_sizes[1] * kv_size_multiplier, tp)
        self.dtype = dtype
        self.keep_master_weight = keep_master_weight
        self.device = device
        self.use_bias = False
        self.fuse_qkv = fuse_qkv
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.async_tensor_model_parallel_allreduce = not sequence_parallel_enabled and tp > 1
        self.reduce_dtype = reduce_dtype
        self._create_and_initialize_weights()
        for name in ("bias_q", "bias_k", "bias_v", "bias_qkv"):
            self.register_parameter(name, None)

    def _local(self, size: int, per_partition: int, copies: int) -> torch.Tensor:
        """This rank's slice of one projection, drawn whole in float32 (NxD ``_initialize_affine_weight``)."""
        weight = nn.Parameter(
            torch.empty(per_partition, self.input_size, dtype=self.dtype, device=self.device)
        )
        tp = parallel_state.get_tensor_model_parallel_size()
        set_tensor_model_parallel_attributes(weight, True, 0, 1, tp)
        if weight.device.type != "meta":
            master = torch.empty(size, self.input_size, dtype=torch.float32)
            self._init_weight(master)
            create_local_weight(
                _replicate_heads(master, copies).to(self.dtype), 0, per_partition, 1, out_weight=weight
            )
        return weight

    def _create_and_initialize_weights(self) -> None:
        q = self._local(self.output_sizes[0], self.q_output_size_per_partition, 1)
        k = self._local(self.output_sizes[1], self.kv_output_size_per_partition, self.kv_size_multiplier)
        v = self._local(self.output_sizes[1], self.kv_output_size_per_partition, self.kv_size_multiplier)
        if self.fuse_qkv:
            with torch.no_grad():
                self.weight_qkv = nn.Parameter(torch.cat([q, k, v], dim=0))
        else:
            self.weight_q, self.weight_k, self.weight_v = q, k, v

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fuse_qkv:
            sizes = [self.q_output_size_per_partition, *[self.kv_output_size_per_partition] * 2]
            return tuple(torch.split(self.weight_qkv, sizes, dim=0))
        return self.weight_q, self.weight_k, self.weight_v

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.sequence_parallel_enabled:
            total_input = mappings.gather_from_sequence_parallel_region(input, 0)
        else:
            total_input = mappings.copy_to_tensor_model_parallel_region(input)
        weight_q, weight_k, weight_v = self._weights()
        outputs = _GQAQKVLinear.apply(
            total_input,
            weight_q,
            weight_k,
            weight_v,
            self.kv_size_multiplier,
            parallel_state.get_kv_shared_replica_groups(),
            self.fuse_qkv and not self.weight_qkv.requires_grad,
        )
        if self.gather_output:
            outputs = tuple(mappings.gather_from_tensor_model_parallel_region(o) for o in outputs)
        return outputs


__getattr__ = _placeholder_getattr(__name__)
