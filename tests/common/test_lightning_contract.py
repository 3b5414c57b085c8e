"""What the FSDP2 trainer relies on from Lightning 2.6.6 (the current line, containers/constraints/current.txt), read from its source:
lightning/fabric/strategies/model_parallel.py (_setup_device_mesh) and
lightning/fabric/utilities/distributed.py (_set_num_threads_if_needed)."""

from __future__ import annotations

import inspect
import os

import lightning
import torch

from trnft.common.fsdp.parallel import DP_DIM, TP_DIM


def test_the_pinned_release():
    assert lightning.__version__ == "2.6.6"


def test_model_parallel_strategy_names_the_mesh_dimensions_the_trainer_slices():
    from lightning.fabric.strategies.model_parallel import _setup_device_mesh

    source = inspect.getsource(_setup_device_mesh)
    assert f'mesh_dim_names=("{DP_DIM}", "{TP_DIM}")' in source
    assert "mesh_shape=(data_parallel_size, tensor_parallel_size)" in source


def test_the_launcher_leaves_threads_alone_when_omp_num_threads_is_set(monkeypatch):
    """The trainer names OMP_NUM_THREADS so Lightning does not call torch.set_num_threads (which changed
    CPU summation order and so one-process results)."""
    from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    _set_num_threads_if_needed(num_processes=1)
    assert calls == []
    monkeypatch.delenv("OMP_NUM_THREADS")
    _set_num_threads_if_needed(num_processes=1)
    assert len(calls) == 1 and os.environ["OMP_NUM_THREADS"] == str(calls[0])


def test_model_parallel_strategy_sets_the_device_up_before_the_process_group_and_passes_device_id():
    """Lightning 2.6.6 (lightning/pytorch/strategies/model_parallel.py, strategy.py): setup_environment runs
    Strategy.setup_environment (accelerator.setup_device) and then _setup_distributed, whose
    init_process_group gets device_id for a non-CPU device. The neuron platform's strategy replaces exactly
    _setup_distributed (common/fsdp/platform.py); these are the lines it stands in for."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning.pytorch.strategies.strategy import Strategy

    assert "self.accelerator.setup_device(self.root_device)" in inspect.getsource(Strategy.setup_environment)
    setup = inspect.getsource(ModelParallelStrategy.setup_environment)
    assert setup.index("super().setup_environment()") < setup.index("self._setup_distributed()")
    distributed = inspect.getsource(ModelParallelStrategy._setup_distributed)
    for line in (
        "reset_seed()",
        "self.set_world_ranks()",
        "self._process_group_backend = self._get_process_group_backend()",
        'kwargs["device_id"] = self.root_device if self.root_device.type != "cpu" else None',
        "_init_dist_connection(self.cluster_environment, self._process_group_backend, **kwargs)",
    ):
        assert line in distributed, line
