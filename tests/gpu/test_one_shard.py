"""FSDP2 over one rank: layers are not resharded after forward (nothing to gather back in backward), and
the step computes what resharding computes. In this process, on a gloo world of one."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from trnft.common.fsdp import parallel


@pytest.fixture
def world_of_one():
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=(parallel.DP_DIM, parallel.TP_DIM))
        yield parallel.world_of(mesh, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def _sharded_model(model_dir, world, reshard: bool):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = parallel.ShardSettings(
        tp=1, bf16=False, reshard_after_forward=reshard, cpu_offload=False, compile_backend=None
    )
    layers = parallel.decoder_layers(model)
    parallel.shard(model, world, settings)
    return model, layers, settings


def _kept_after_forward(layer) -> bool:
    """FSDP2 (torch 2.14, _fsdp_param_group.FSDPParamGroup): ``post_forward_mesh_info`` is None when the
    group stays unsharded after forward (``reshard_after_forward=False``)."""
    return layer._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is None


def test_one_shard_keeps_layers_unsharded_from_forward_to_backward_and_trains_the_same(
    tiny_llama, world_of_one
):
    grads = {}
    for configured in (True, False):
        model, layers, settings = _sharded_model(tiny_llama, world_of_one, configured)
        assert world_of_one.shard_ranks == 1 and not parallel.reshard_after_forward(settings, world_of_one)
        assert layers and all(_kept_after_forward(layer) for layer in layers)
        ids = torch.arange(3, 67).reshape(2, 32)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[configured] = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
    for name, grad in grads[True].items():
        assert torch.equal(grad, grads[False][name]), name


def test_more_shards_follow_the_setting():
    settings = parallel.ShardSettings(
        tp=1, bf16=False, reshard_after_forward=True, cpu_offload=False, compile_backend=None
    )
    two = parallel.World(torch.device("cpu"), 0, 2, 1, None)  # dp 2, plain FSDP
    hsdp_of_singles = parallel.World(torch.device("cpu"), 0, 2, 1, None, hsdp_mesh=_Replicas(2))
    assert two.shard_ranks == 2 and parallel.reshard_after_forward(settings, two)
    assert hsdp_of_singles.shard_ranks == 1 and not parallel.reshard_after_forward(settings, hsdp_of_singles)


class _Replicas:
    """An HSDP mesh's shape as World reads it (size of the replicate dimension)."""

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas

    def size(self, dim: int) -> int:
        assert dim == 0
        return self.replicas
