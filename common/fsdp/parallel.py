"""How the FSDP2 trainer (gpu and neuron-native platforms) spreads a model over its processes: one device mesh, tensor parallelism on the
decoder layers, FSDP2 over the data-parallel ranks, and weights that reach each rank as its own shard.

Only standard ``torch.distributed`` APIs (``DeviceMesh``, DTensor, ``fully_shard``, the distributed
checkpoint), with the device type as a parameter: CUDA with NCCL on GPU nodes, native Neuron (device and
backend ``neuron``) on Trainium 2/3, the CPU with gloo in the tests.

- **Mesh**: ``world = dp x tp`` processes on the ``(data_parallel, tensor_parallel)`` mesh Lightning's
  ``ModelParallelStrategy`` builds. Ranks of one tensor-parallel group read the same batch.
- **Tensor parallelism**: the decoder projections split as :mod:`trnft.common.training.tensor_parallel`
  says (q/k/v/gate/up column-parallel, o/down row-parallel, LoRA A/B following their base layer), as
  DTensor ``ColwiseParallel``/``RowwiseParallel``. Embeddings and norms are not split. An untied,
  un-adapted lm_head splits along the vocabulary (loss parallelism, :func:`loss_parallel_head`): each
  tensor-parallel rank computes only its part of the logits and the cross-entropy is reduced across them.
- **FSDP2**: ``fully_shard`` on every decoder layer and on the root, over ``dp``. Every parameter stays a
  DTensor of its own shape (so weight-decay groups see matrices as matrices), mixed precision casts
  parameters and never buffers (RoPE's ``inv_freq`` stays fp32), and gradients are *summed* over ranks:
  each rank's loss is already divided by the supervised tokens of the whole global batch.
- **Memory**: the model is built with its parameters on the meta device, sharded, then each rank reads only
  its own slices of the safetensors files (memory-mapped), so host memory does not grow with the number
  of ranks. LoRA weights are initialised from a seed per tensor, so every layout starts from the same
  adapter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError, TrnftError
from ..training.lora import lora_init
from ..training.tensor_parallel import DECODER_SPLITS, projection_kind

# Path segments PEFT puts around the base model's modules: dropping them gives the Hugging Face name.
PEFT_PREFIX = ("base_model", "model")
PEFT_WRAPPER = "base_layer"


# --------------------------------------------------------------------------------------------------
# Processes and the mesh


@dataclass(frozen=True)
class World:
    """This process's place: device, ranks, and the (data-parallel, tensor-parallel) mesh.

    The mesh is the one Lightning's ``ModelParallelStrategy`` builds (dimensions ``data_parallel`` and
    ``tensor_parallel``, the latter of size 1 without tensor parallelism).
    """

    device: torch.device
    rank: int
    size: int
    tp: int
    mesh: Any  # DeviceMesh
    # HSDP: the (replicate, shard, tensor_parallel) mesh over the same ranks; None: plain FSDP over dp.
    hsdp_mesh: Any = None
    # A gloo group of every rank for what the hosts agree on between steps (a stop signal, compile
    # counts): a collective of the device's backend would make the host wait for the device's queue.
    # None on the CPU, where the default group is gloo.
    host_group: Any = None

    @property
    def dp(self) -> int:
        return self.size // self.tp

    @property
    def replicate(self) -> int:
        return 1 if self.hsdp_mesh is None else self.hsdp_mesh.size(0)

    @property
    def shard_ranks(self) -> int:
        """How many ranks FSDP2 splits each parameter over (dp, or dp / replicate under HSDP)."""
        return self.dp // self.replicate

    @property
    def fsdp_mesh(self) -> Any:
        """What FSDP2 shards over: the dp mesh, or HSDP's 2-D (replicate, shard) mesh."""
        if self.hsdp_mesh is None:
            return self.dp_mesh
        return self.hsdp_mesh[(REPLICATE_DIM, SHARD_DIM)]

    @property
    def dp_mesh(self) -> Any:
        return self.mesh[DP_DIM]

    @property
    def tp_mesh(self) -> Any:
        # Under HSDP the tensor-parallel mesh must come from the same root mesh as FSDP2's.
        return (self.mesh if self.hsdp_mesh is None else self.hsdp_mesh)[TP_DIM]

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def dp_group(self) -> Any:
        return self.dp_mesh.get_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# The mesh dimension names of Lightning's ModelParallelStrategy.
DP_DIM = "data_parallel"
TP_DIM = "tensor_parallel"


# HSDP's data-parallel dimensions: replica groups, and the ranks one group shards over.
REPLICATE_DIM = "dp_replicate"
SHARD_DIM = "dp_shard"


def world_of(mesh: Any, device: torch.device, replicate: int = 1) -> World:
    """The :class:`World` of a process group Lightning has started, with its device mesh.

    ``replicate > 1`` adds HSDP's ``(replicate, shard, tensor_parallel)`` mesh over the same ranks in the
    same order (data-parallel index ``r = replica * shard + s``), so Lightning's data-parallel rank and
    group still describe every rank.
    """
    size, tp = dist.get_world_size(), mesh[TP_DIM].size()
    host_group = dist.new_group(backend="gloo") if device.type != "cpu" and size > 1 else None
    world = World(device, dist.get_rank(), size, tp, mesh, host_group=host_group)
    if replicate == 1:
        return world
    from torch.distributed.device_mesh import init_device_mesh

    shape = (replicate, world.dp // replicate, tp)
    hsdp = init_device_mesh(device.type, shape, mesh_dim_names=(REPLICATE_DIM, SHARD_DIM, TP_DIM))
    return World(device, world.rank, size, tp, mesh, hsdp, host_group)


def replica_groups(configured: int | None, *, lora: bool, dp: int, nodes: int) -> int:
    """How many HSDP replica groups: ``parallel.replicate``, or by default one per node for LoRA (when the
    nodes split the data-parallel ranks evenly) and 1 for full fine-tuning. Raises ConfigError for a
    value that does not divide the data-parallel ranks."""
    if configured is None:
        return nodes if lora and nodes > 1 and dp % nodes == 0 else 1
    if dp % configured:
        raise ConfigError(
            f"parallel.replicate: {configured} does not divide the {dp} data-parallel ranks (processes / parallel.tp); "
            f"use a divisor of {dp}"
        )
    return configured


def start_world(tp: int, platform: Any) -> World:
    """Join torchrun's process group and build the mesh Lightning's strategy builds, for tools that shard
    a model without the trainer (``benchmarks/gpu_host_memory.py``). ``platform``: a DevicePlatform."""
    from torch.distributed.device_mesh import init_device_mesh

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = platform.device(local)
    if not dist.is_initialized():
        dist.init_process_group(platform.process_group_backend)
    size = dist.get_world_size()
    check_world(size, tp)
    mesh = init_device_mesh(platform.device_type, (size // tp, tp), mesh_dim_names=(DP_DIM, TP_DIM))
    return world_of(mesh, device)


def stop_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class RankLayout:
    """How one run's ranks divide, computed once (:func:`rank_layout`) and handed to every part of the
    trainer: ``tp`` ranks per tensor-parallel group, ``dp`` = world / tp data-parallel ranks, split into
    ``replicate`` HSDP groups."""

    world: int
    tp: int
    replicate: int

    @property
    def dp(self) -> int:
        return self.world // self.tp


def rank_layout(cfg: Any, world: int, *, nodes: int) -> RankLayout:
    """The layout of ``world`` ranks under ``cfg.parallel`` (a RunConfig), or a ConfigError naming the key
    that does not divide them."""
    tp = cfg.parallel.tp
    check_world(world, tp)
    replicate = replica_groups(cfg.parallel.replicate, lora=cfg.lora.enabled, dp=world // tp, nodes=nodes)
    return RankLayout(world=world, tp=tp, replicate=replicate)


def check_world(size: int, tp: int) -> None:
    """Refuse a ``parallel.tp`` that does not divide the number of training processes."""
    if size % tp:
        raise ConfigError(
            f"parallel.tp: {tp} does not divide the {size} training processes; use a divisor of {size} "
            "or set fsdp.devices"
        )


# --------------------------------------------------------------------------------------------------
# Building on the meta device


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create modules with their parameters on the meta device and their buffers where they are.

    Buffers such as RoPE's ``inv_freq`` are computed from the config when a module is built and are not
    in the checkpoint, so they must stay real; parameters are filled later, shard by shard.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Any) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def hf_name(fqn: str) -> str:
    """The Hugging Face checkpoint name of a parameter of the (possibly PEFT-wrapped) model."""
    parts = fqn.split(".")
    if tuple(parts[: len(PEFT_PREFIX)]) == PEFT_PREFIX:
        parts = parts[len(PEFT_PREFIX) :]
    return ".".join(p for p in parts if p != PEFT_WRAPPER)


def decoder_layers(model: Any) -> list[nn.Module]:
    """The model's own decoder blocks (``_no_split_modules`` classes), in order.

    Nothing is imported by name, so any family that declares its block class works.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise TrnftError(
            f"model.name_or_path: {type(base).__name__} declares no decoder-layer class (_no_split_modules), "
            "so it cannot be sharded per layer"
        )
    return layers


# --------------------------------------------------------------------------------------------------
# Tensor parallelism


def tensor_parallel_plan(layer: nn.Module) -> dict[str, Any]:
    """DTensor styles for one decoder layer's projections, derived from ``DECODER_SPLITS``.

    A linear layer whose weight splits on dim 0 (output features) is ``ColwiseParallel``, on dim 1 (input
    features) ``RowwiseParallel``; for a LoRA-wrapped projection the base layer and the LoRA part that
    splits get that style, the other LoRA part stays whole on every rank.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    style = {0: ColwiseParallel, 1: RowwiseParallel}
    plan: dict[str, Any] = {}
    for name, module in layer.named_modules():
        kind = projection_kind(name.rsplit(".", 1)[-1])
        if kind is None:
            continue
        splits = DECODER_SPLITS[kind]
        if isinstance(module, nn.Linear):
            plan[name] = style[splits["weight"]]()
            continue
        if getattr(module, PEFT_WRAPPER, None) is None:
            continue  # not a layer type we know how to split
        plan[f"{name}.{PEFT_WRAPPER}"] = style[splits["weight"]]()
        for part in ("lora_A", "lora_B"):
            if splits[part] is not None:
                for adapter in getattr(module, part):
                    plan[f"{name}.{part}.{adapter}"] = style[splits[part]]()
    return plan


def loss_parallel_head(model: Any) -> nn.Linear | None:
    """The output layer to split along the vocabulary under tensor parallelism, or None to keep it whole.

    Only a plain ``nn.Linear`` that is not the input embedding's weight (tied, as in GPT-2 or small Llama
    variants): splitting a tied matrix would split the embedding too, and a LoRA-adapted lm_head has its own
    A/B layout. With a 128k vocabulary the whole logits are the largest activation of a step, so every
    tensor-parallel rank computing them all is what this avoids.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear:
        return None
    embedding = base.get_input_embeddings()
    if embedding is not None and head.weight is getattr(embedding, "weight", None):
        return None
    return head


def split_output_head(model: Any, tp_mesh: Any) -> bool:
    """Split :func:`loss_parallel_head` along the vocabulary over ``tp_mesh``; False when there is none.

    Its logits stay a DTensor sharded on the last dimension (each rank holds vocabulary / tp columns), so
    the cross-entropy and its backward must run under ``torch.distributed.tensor.parallel.loss_parallel``.
    """
    head = loss_parallel_head(model)
    if head is None:
        return False
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    vocabulary_split = ColwiseParallel(
        input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False
    )
    parallelize_module(head, tp_mesh, vocabulary_split)
    return True


def check_tensor_parallel(config: Any, tp: int) -> None:
    """Refuse a ``parallel.tp`` that does not divide the heads and the MLP width."""
    if tp == 1:
        return
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    for what, n in (
        ("attention heads", heads),
        ("key/value heads", kv),
        ("MLP width", config.intermediate_size),
    ):
        if n % tp:
            raise ConfigError(
                f"parallel.tp: {tp} does not divide the model's {n} {what}; use a divisor of {n}"
            )


# --------------------------------------------------------------------------------------------------
# Sharding


@dataclass(frozen=True)
class ShardSettings:
    tp: int
    bf16: bool
    reshard_after_forward: bool
    cpu_offload: bool
    compile_backend: str | None = None  # torch.compile each decoder block with this backend; None: eager


def reshard_after_forward(settings: ShardSettings, world: World) -> bool:
    """``fsdp.reshard_after_forward``, except where FSDP2 splits parameters over one rank (a
    data-parallel world of 1, or HSDP replica groups of one rank each): then the unsharded layers are kept
    from forward to backward (what was resharded would be the whole parameter again)."""
    return settings.reshard_after_forward and world.shard_ranks > 1


def shard(model: Any, world: World, settings: ShardSettings) -> None:
    """Compile (when asked) and tensor-parallelise the decoder layers (and the lm_head along the vocabulary,
    :func:`loss_parallel_head`), then FSDP2-shard each of them and the root over ``dp``."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    layers = decoder_layers(model)
    if settings.compile_backend is not None:
        # Per block, as torchtitan does: one graph per decoder-layer class, reused by every layer, and
        # FSDP2's all-gathers stay outside the compiled region.
        for layer in layers:
            layer.compile(backend=settings.compile_backend)
    if settings.tp > 1:
        from torch.distributed.tensor.parallel import parallelize_module

        trainable = {n: p.requires_grad for n, p in model.named_parameters()}
        for layer in layers:
            parallelize_module(layer, world.tp_mesh, tensor_parallel_plan(layer))
        split_output_head(model, world.tp_mesh)
        # parallelize_module makes new Parameters that require grad; frozen base weights stay frozen.
        for name, param in model.named_parameters():
            param.requires_grad_(trainable[name])
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if settings.bf16 else None, reduce_dtype=torch.float32
    )
    kwargs: dict[str, Any] = {"mesh": world.fsdp_mesh, "mp_policy": policy}
    if settings.cpu_offload:
        # Pinned host memory makes the copies to a GPU asynchronous; there is nothing to pin for on a CPU.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=world.device.type == "cuda")
    # With one shard there is nothing to gather back in the backward pass: resharding after forward would
    # only free each layer's unsharded copy and copy it in again (a world-of-1 all-gather) per layer.
    reshard = reshard_after_forward(settings, world)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=reshard, **kwargs)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            # Sum, do not average: each rank's loss is already divided by the global batch's tokens.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


# --------------------------------------------------------------------------------------------------
# Weights


def local_part(param: Any, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` (the whole tensor, possibly a memory-mapped view) as a view of it.

    For a DTensor the slice follows its placements (``Shard`` dims cut, ``Replicate`` dims whole), computed
    on the host, so only this rank's bytes ever leave the file and reach the device.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]


def _local_copy(param: Any, full: torch.Tensor) -> None:
    """Copy this rank's part of ``full`` into ``param`` (a DTensor's local shard, or a whole tensor)."""
    from torch.distributed.tensor import DTensor

    target = param.to_local() if isinstance(param, DTensor) else param
    target.copy_(local_part(param, full))  # copy_ converts the dtype and moves to the parameter's device


def _as_torch(array: Any) -> torch.Tensor:
    """A zero-copy, read-only torch view of a tensor_io Array (bf16 arrives as uint16 bits)."""
    import warnings

    data = np.asarray(array.data)
    with warnings.catch_warnings():  # a read-only mapping: it is only ever read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if array.dtype == "BF16":
            return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(data)


def load_base_weights(model: Any, model_dir: Path, device: torch.device) -> int:
    """Fill every non-LoRA parameter with this rank's slice of the safetensors in ``model_dir``.

    The files are memory-mapped and only the local slice of each tensor is copied, one tensor at a time.
    Returns the number of tensors loaded. Raises TrnftError for a tensor the files lack.
    """
    from ..io.tensor_io import open_safetensors_model

    files = open_safetensors_model(model_dir)
    loaded = 0
    with torch.no_grad():
        for fqn, param in model.named_parameters():
            if ".lora_" in fqn:
                continue
            name = hf_name(fqn)
            array = files.tensor(name)
            if array is None:
                raise TrnftError(f"{model_dir}: has no tensor {name}; is it the model the config names?")
            full = _as_torch(array)
            if tuple(full.shape) != tuple(param.shape):
                raise TrnftError(
                    f"{model_dir}: tensor {name} has shape {list(full.shape)}, the model expects {list(param.shape)}"
                )
            _local_copy(param, full)  # sliced on the host: only this rank's part is read and sent
            loaded += 1
    files.release()
    return loaded


def init_lora_weights(model: Any, seed: int, device: torch.device) -> int:
    with torch.no_grad():
        count = 0
        for fqn, param in model.named_parameters():
            if ".lora_" in fqn:
                _local_copy(param, lora_init(fqn, tuple(param.shape), seed))
                count += 1
    return count


def materialize(
    model: Any, device: torch.device, buffers: dict[str, torch.Tensor], *, cpu_offload: bool
) -> None:
    """Allocate the sharded parameters and put back the buffers computed at build time.

    Parameters go to ``device``, or to the CPU under FSDP2's CPU offload (it keeps the sharded parameters,
    their gradients and the optimizer state in host memory and copies each layer in for its compute);
    buffers (RoPE's ``inv_freq``) are not FSDP's and always go to ``device``.
    """
    model.to_empty(device=torch.device("cpu") if cpu_offload else device)
    with torch.no_grad():
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(device)
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])


# --------------------------------------------------------------------------------------------------
# Gradient norm over shards


def _local_grads(params: list[Any], world: World) -> list[tuple[torch.Tensor, int]]:
    """Each parameter's local gradient with the number of ranks holding an identical copy of it: a
    DTensor on the dp mesh only is repeated on every tensor-parallel rank, and a Replicate placement
    repeats it over that mesh dimension."""
    from torch.distributed.tensor import DTensor, Replicate

    out = []
    for p in params:
        if p.grad is None:
            continue
        g, copies = p.grad, world.size
        if isinstance(g, DTensor):
            copies = world.size // g.device_mesh.size()
            for dim, placement in enumerate(g.placements):
                if isinstance(placement, Replicate):
                    copies *= g.device_mesh.size(dim)
            g = g.to_local()
        out.append((g, copies))
    return out


def grad_norm(params: list[Any], world: World) -> torch.Tensor:
    """The global L2 norm of the gradients of ``params``, the same number on every rank.

    Each rank adds the squared norms of its local shards, weighted by 1 / copies, one ``_foreach_norm``
    per (device, dtype, copies) group rather than a kernel per parameter; gradients may live on another
    device than the world's (the CPU under cpu_offload). One all-reduce.
    """
    groups: dict[tuple[torch.device, torch.dtype, int], list[torch.Tensor]] = {}
    for g, copies in _local_grads(params, world):
        groups.setdefault((g.device, g.dtype, copies), []).append(g.detach())
    total = torch.zeros((), dtype=torch.float32, device=world.device)
    for (_, _, copies), grads in groups.items():
        norms = torch.stack(torch._foreach_norm(grads)).float()
        total += (norms.pow(2).sum() / copies).to(world.device)
    dist.all_reduce(total)
    return total.sqrt()


def clip_gradients(params: list[Any], world: World, max_norm: float, norm: torch.Tensor) -> None:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)): one ``_foreach_mul_`` per (device, dtype)
    group of local shards, the factor moved to each group's device (no host sync)."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g, _ in _local_grads(params, world):
        groups.setdefault((g.device, g.dtype), []).append(g)
    with torch.no_grad():
        for (device, dtype), grads in groups.items():
            torch._foreach_mul_(grads, coef.to(device, dtype))
