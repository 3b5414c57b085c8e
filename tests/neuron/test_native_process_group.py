"""The neuron-native trainer joins the Neuron process group the way AWS's torch.distributed guide does:
nothing touches the device before the group exists, and the group gets no ``device_id``. Lightning's own
order (device first, then the group with ``device_id``) is pinned in tests/common/test_lightning_contract.py.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies.strategy import Strategy

from trnft.neuron.native import device as neuron_device
from trnft.neuron.native import torchneuron


def test_the_accelerator_touches_the_device_only_after_the_process_group_without_device_id(monkeypatch):
    from lightning.fabric.plugins.environments import LightningEnvironment

    # torch-neuronx names PyTorch's PrivateUse1 device "neuron" when it loads; without it, do the naming
    # only (no kernels), so torch.device("neuron", i) exists as on a Trainium node.
    if torch._C._get_privateuse1_backend_name() != torchneuron.DEVICE_TYPE:
        torch.utils.rename_privateuse1_backend(torchneuron.DEVICE_TYPE)

    events: list[tuple] = []
    group = {"up": False}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: group["up"])
    monkeypatch.setattr(neuron_device, "_load_runtime", lambda: events.append(("runtime",)))
    monkeypatch.setattr(torch.accelerator, "set_device_index", lambda i: events.append(("device", i)))

    def init_dist_connection(environment, backend, **kwargs):
        events.append(("process_group", backend, tuple(sorted(kwargs))))
        group["up"] = True

    monkeypatch.setattr("lightning.fabric.utilities.distributed._init_dist_connection", init_dist_connection)
    strategy = neuron_device.NEURON.lightning_strategy(
        data_parallel_size=1, tensor_parallel_size=1, process_group_backend=torchneuron.PROCESS_GROUP_BACKEND
    )
    strategy.accelerator = neuron_device.NEURON.lightning_accelerator()
    strategy.parallel_devices = [torch.device(torchneuron.DEVICE_TYPE, 3)]
    strategy.cluster_environment = LightningEnvironment()
    monkeypatch.setattr(type(strategy), "local_rank", property(lambda self: 0))

    # Lightning's order: Strategy.setup_environment, then _setup_distributed
    Strategy.setup_environment(strategy)
    assert events == []  # the device is not touched before the group
    strategy._setup_distributed()
    assert events == [("process_group", "neuron", ("timeout",)), ("runtime",), ("device", 3)]


def test_the_other_platforms_keep_lightnings_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from trnft.common.fsdp.platform import CPU, CUDA

    for platform in (CPU, CUDA):
        assert (
            type(platform.lightning_strategy(data_parallel_size=1, tensor_parallel_size=1))
            is ModelParallelStrategy
        )
    assert torchneuron.PROCESS_GROUP_TAKES_DEVICE_ID is False


def test_a_stage_started_by_hand_has_the_neff_cache_location_before_torch_loads(tmp_path, tiny_llama):
    """torch loads torch-neuronx on import, which reads TORCH_NEURONX_NEFF_CACHE_DIR then: `trnft train` sets
    the run's cache (as the pods' env does) before the stage module, and so torch, is imported."""
    import json
    import os
    import subprocess
    import sys

    from helpers import smoke_raw, write_config

    config = write_config(
        tmp_path / "run.yaml", smoke_raw(tmp_path / "run", tiny_llama, platform="neuron-native")
    )
    script = f"""
import json, os, sys
from trnft.common import cli
from trnft.common.pipeline import registry
seen = {{}}
def resolve(stage, cfg):
    seen.update(torch="torch" in sys.modules, cache=os.environ.get("{torchneuron.NEFF_CACHE_ENV}"))
    return lambda cfg, force, log: None
registry.runner = resolve
assert cli.main(["train", "--config", {str(config)!r}]) == 0
print(json.dumps(seen))
"""
    env = {k: v for k, v in os.environ.items() if k != torchneuron.NEFF_CACHE_ENV}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"torch": False, "cache": str(tmp_path / "run" / "neuron_cache")}
