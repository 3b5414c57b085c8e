"""NxD's ``save_checkpoint`` (synchronous) in the on-disk layout of neuronx-distributed 0.15, any tp and dp.

Every rank must call it (NxD meets in ``xm.rendezvous`` several times; here the meeting points are gloo
``monitored_barrier`` calls, so a rank that does not call makes the others raise, naming it, instead of
hanging). Rank 0 creates ``<dir>/<tag>/checkpoint`` first and ``done`` last, after every rank has written.
Model files are ``model/dp_rank_00_tp_rank_XX_pp_rank_00.pt`` for each tensor-parallel rank. Without ``use_xser``
the first rank of each data-parallel group writes its tensor rank's file (``torch.save``); with ``use_xser`` the
file is a dict of ``TensorReference`` plus ``.pt.info.pt`` written by data-parallel rank 0, and the tensor files
``.pt.tensors/tensor_<tid>.pt`` are spread over the data-parallel ranks: tensors sorted by byte size (stable),
each put into the bin with the smallest total so far, bin ``i`` written by data-parallel rank ``i``
(NxD's ``_assign_tensors_to_bins``). An optimizer, when passed, goes to ``optim/`` from data-parallel rank 0.
"""

from __future__ import annotations

import datetime
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


def _meet(what: str) -> None:
    """Every rank reaches this point, or the ones that did raise naming the ones that did not."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    seconds = float(os.environ.get("NXD_DOUBLE_SAVE_TIMEOUT_S", "120"))
    try:
        dist.monitored_barrier(
            group=parallel_state.gloo_world_group(), timeout=datetime.timedelta(seconds=seconds)
        )
    except RuntimeError as exc:
        raise RuntimeError(
            f"neuronx_distributed.trainer.save_checkpoint ({what}) must be called by every rank: {exc}"
        ) from exc


def assign_tensors_to_bins(sizes: list[int], bin_count: int) -> list[list[int]]:
    """Tensor indices per bin: ascending byte size, each into the currently smallest bin (NxD 0.15)."""
    bins: list[list[int]] = [[] for _ in range(bin_count)]
    totals = [0] * bin_count
    for index, size in sorted(enumerate(sizes), key=lambda pair: pair[1]):
        target = totals.index(min(totals))
        bins[target].append(index)
        totals[target] += size
    return bins


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


def _write_model(path: Path, state: dict[str, Any], use_xser: bool) -> None:
    """This rank's part of the model file of its tensor-parallel rank (see the module docstring)."""
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_size()
    if not use_xser:
        if dp_rank == 0:
            torch.save(_to_cpu(state), path)
        return
    from torch_xla.utils.serialization import TensorReference

    names = [n for n, v in state.items() if isinstance(v, torch.Tensor)]
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    mine = set(assign_tensors_to_bins(sizes, dp_size)[dp_rank])
    tensors_dir = Path(str(path) + ".tensors")
    tensors_dir.mkdir(parents=True, exist_ok=True)
    refs: dict[str, Any] = {}
    info: dict[int, dict[str, Any]] = {}
    for tid, name in enumerate(names):
        tensor = state[name]
        if tid in mine:
            torch.save(tensor.detach().cpu().clone(), tensors_dir / f"tensor_{tid}.pt")
        refs[name] = TensorReference(tid)
        info[tid] = {"dtype": tensor.dtype, "shape": tuple(tensor.shape), "expert_model_parallel": False}
    if dp_rank == 0:
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
    import torch.distributed as dist

    folder = Path(checkpoint_dir_str) / tag
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    dp_rank = parallel_state.get_data_parallel_rank()
    _meet("start")
    if rank0:
        folder.mkdir(parents=True, exist_ok=True)
        _mark(folder / "checkpoint")
        (folder / "model").mkdir(exist_ok=True)
        if optimizer is not None:
            (folder / "optim").mkdir(exist_ok=True)
    _meet("folders created")
    if optimizer is not None and dp_rank == 0:
        torch.save(_to_cpu(optimizer.state_dict()), folder / "optim" / _shard_name(0))
    if model is not None:
        state = model if isinstance(model, dict) else model.state_dict()
        _write_model(folder / "model" / _shard_name(0), state, use_xser)
    if scheduler is not None and rank0:
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    if user_content is not None and rank0:
        torch.save(user_content, folder / "user_content.pt")
    _meet("files written")
    if rank0:
        _mark(folder / "done")
    _meet("done marked")


__getattr__ = _placeholder_getattr(__name__)
