"""NxD's ``save_checkpoint`` (synchronous) in the on-disk layout of neuronx-distributed 0.15.

``<dir>/<tag>/checkpoint`` first, ``model/dp_rank_00_tp_rank_00_pp_rank_00.pt`` (a plain ``torch.save`` dict,
or with ``use_xser`` a dict of ``TensorReference`` plus ``.pt.tensors/tensor_<tid>.pt`` and ``.pt.info.pt``),
optionally ``optim/dp_rank_..pt``, and ``done`` last. Only data-parallel rank 0 writes model files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._limits import placeholder_getattr as _placeholder_getattr
from ..parallel_layers import parallel_state


class _IOState:
    """optimum-neuron reads ``g_iostate`` to wait for asynchronous saves; saves here are synchronous."""

    def wait_save(self, *args: Any, **kwargs: Any) -> None:
        return None

    def wait_all(self, *args: Any, **kwargs: Any) -> None:
        return None


g_iostate = _IOState()


def _shard_name(dp: int) -> str:
    tp = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_rank()
    return f"dp_rank_{dp:02d}_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt"


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            out[name] = value.detach().cpu().clone()
        elif isinstance(value, dict):
            out[name] = _to_cpu(value)
        else:
            out[name] = value
    return out


def _write(path: Path, state: dict[str, Any], use_xser: bool) -> None:
    if not use_xser:
        torch.save(state, path)
        return
    from torch_xla.utils.serialization import TensorReference

    tensors_dir = Path(str(path) + ".tensors")
    tensors_dir.mkdir(parents=True, exist_ok=True)
    refs: dict[str, Any] = {}
    info: dict[int, dict[str, Any]] = {}
    for tid, (name, tensor) in enumerate(state.items()):
        torch.save(tensor, tensors_dir / f"tensor_{tid}.pt")
        refs[name] = TensorReference(tid)
        info[tid] = {"dtype": tensor.dtype, "shape": tuple(tensor.shape), "expert_model_parallel": False}
    torch.save(info, str(path) + ".info.pt")
    torch.save(refs, path)


def _mark(path: Path) -> None:
    with open(path, "w") as fh:
        fh.write("1")
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(
    checkpoint_dir_str: str,
    tag: str,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    user_content: Any = None,
    num_workers: int = 8,
    use_xser: bool = False,
    num_kept_ckpts: int | None = None,
    async_save: bool = False,
    zero1_optimizer: bool = False,
    **kwargs: Any,
) -> None:
    if async_save:
        from .._limits import unsupported

        raise unsupported("async_save")
    folder = Path(checkpoint_dir_str) / tag
    dp_rank = parallel_state.get_data_parallel_rank()
    if dp_rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        _mark(folder / "checkpoint")
    if model is not None and dp_rank == 0:
        state = model if isinstance(model, dict) else model.state_dict()
        (folder / "model").mkdir(exist_ok=True)
        _write(folder / "model" / _shard_name(0), _to_cpu(state), use_xser)
    if optimizer is not None and dp_rank == 0:
        (folder / "optim").mkdir(exist_ok=True)
        torch.save(_to_cpu(optimizer.state_dict()), folder / "optim" / _shard_name(0))
    if scheduler is not None and dp_rank == 0:
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    if user_content is not None and dp_rank == 0:
        torch.save(user_content, folder / "user_content.pt")
    if dp_rank == 0:
        _mark(folder / "done")


__getattr__ = _placeholder_getattr(__name__)
