"""What the FSDP2 trainer relies on from Lightning 2.5.6 (pinned in pyproject.toml), read from its source:
lightning/fabric/strategies/model_parallel.py (_setup_device_mesh) and
lightning/fabric/utilities/distributed.py (_set_num_threads_if_needed)."""

from __future__ import annotations

import inspect
import os

import lightning
import torch

from trnft.common.fsdp.parallel import DP_DIM, TP_DIM


def test_the_pinned_release():
    assert lightning.__version__ == "2.5.6"


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
