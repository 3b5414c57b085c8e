"""The FSDP2 trainer's step path never waits for the device, except at steps that log, validate or save.

On CUDA a host read of a device value (``.item()``, ``float()``, ``bool()``, ``.tolist()``, ``.cpu()``, a
copy from pageable memory) makes the host wait for everything queued before it, so the GPU idles while the
host prepares the next step. The CPU has no queue to wait for, so this test counts the reads themselves:
every torch call that brings a tensor's value to the host, made anywhere in a step (the trainer, its
Lightning hooks, the step driver, FSDP2, the model), seen through a ``TorchFunctionMode`` around each step.
"""

from __future__ import annotations

import os
import traceback

import torch
from helpers import ok
from torch.overrides import TorchFunctionMode

from trnft.common.fsdp.trainer import ShardedTrainFigures
from trnft.common.training.lightning_policy import PolicyCallback

# Tensor methods that return a tensor's value on the host (each a wait for the device on CUDA).
_HOST_READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "__array__"}
# Reads of tensors that live on the host whatever the device, so they wait for nothing, by (file, function):
# a DeviceMesh keeps its table of ranks as a CPU tensor (torch/distributed/device_mesh.py; its rank lookups
# read it), and a background save's "written yet?" flag goes over its own gloo group as a CPU tensor.
_HOST_RESIDENT = {("torch/distributed/device_mesh.py", None), ("common/fsdp/checkpoint.py", "commit_written")}


def _host_resident(frame: traceback.FrameSummary) -> bool:
    return any(
        frame.filename.endswith(path) and function in (None, frame.name) for path, function in _HOST_RESIDENT
    )


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values, with where each came from."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _HOST_READS:
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/overrides" not in f.filename]
            if _host_resident(frames[-1]):
                return func(*args, **(kwargs or {}))
            self.seen.append(f"{func.__name__} at {frames[-1].filename}:{frames[-1].lineno}")
        return func(*args, **(kwargs or {}))


def _count_reads_per_step(monkeypatch) -> dict[int, list[str]]:
    """Host reads of each optimizer step (1-based), from the start of its batch to the end of the step
    driver's work after it."""
    per_step: dict[int, list[str]] = {}
    start, end = PolicyCallback.on_train_batch_start, PolicyCallback.on_train_batch_end

    def started(self, trainer, pl_module, batch, batch_idx):
        self._reads = HostReads()
        self._reads.__enter__()
        start(self, trainer, pl_module, batch, batch_idx)

    def ended(self, trainer, pl_module, outputs, batch, batch_idx):
        try:
            end(self, trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._reads.__exit__(None, None, None)
            per_step[pl_module.step_count] = self._reads.seen

    monkeypatch.setattr(PolicyCallback, "on_train_batch_start", started)
    monkeypatch.setattr(PolicyCallback, "on_train_batch_end", ended)
    return per_step


def test_only_steps_that_log_validate_or_save_read_device_values(make_run, monkeypatch):
    per_step = _count_reads_per_step(monkeypatch)
    run = make_run(
        platform="gpu",
        train={"max_steps": 9, "logging_steps": 4, "save_steps": 6, "eval_steps": 0, "max_grad_norm": 1.0, "warmup_steps": 2,
               "gradient_accumulation_steps": 2},
    )  # fmt: skip
    ok(run.stage("train"))
    assert sorted(per_step) == list(range(1, 10))
    # Steps 1 and 4 and 8 log, 6 saves, 9 is the last: they read. Every other step reads nothing.
    reading = {1, 4, 6, 8, 9}
    for step, reads in per_step.items():
        if step not in reading:
            assert reads == [], (step, sorted(set(reads)))
    # Where figures are read, the pending steps' losses and norms come back in one transfer.
    assert per_step[4] and len([r for r in per_step[4] if "driver.py" in r]) == 1, per_step[4]
    figures = run.figures("train", ShardedTrainFigures)
    assert len(figures.losses) == len(figures.grad_norms) == 9
    assert all(isinstance(x, float) for x in figures.losses + figures.grad_norms)


def test_fused_adamw_skips_a_step_whose_found_inf_is_set_on_fsdp2_parameters(one_rank_group):
    """The upstream behaviour the trainer relies on (torch.optim.AdamW, ``fused=True``, the ``found_inf``
    attribute GradScaler sets; torch/optim/adam.py ``_fused_adam``): a step with found_inf = 1 leaves the
    parameters, both moments and the step count as they were, on FSDP2's DTensor parameters on the CPU; one
    with found_inf = 0 is the plain step (equal to foreach AdamW within float32 rounding)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model, plain = (torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)) for _ in range(2))
    plain.load_state_dict(model.state_dict())
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    fused = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    foreach = torch.optim.AdamW(plain.parameters(), lr=1e-2, foreach=True)
    x = torch.randn(4, 8)

    def step(found_inf: float) -> None:
        for module in (model, plain):
            module(x).square().sum().backward()
        fused.found_inf = torch.tensor(found_inf)
        fused.step()
        fused.zero_grad()
        if found_inf == 0.0:
            foreach.step()
        foreach.zero_grad()

    step(0.0)
    before = [
        (p.full_tensor().clone(), {k: v.clone() for k, v in fused.state[p].items()})
        for p in model.parameters()
    ]
    step(1.0)
    for p, (value, state) in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.full_tensor(), value)
        for key, kept in state.items():
            now = fused.state[p][key]
            assert torch.equal(
                now.full_tensor() if hasattr(now, "full_tensor") else now,
                kept.full_tensor() if hasattr(kept, "full_tensor") else kept,
            ), key
    step(0.0)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.full_tensor(), q, rtol=1e-6, atol=1e-7)


def _agree_over_the_host_group(rank: int, port: int, out: str) -> None:
    """One of two ranks: a world whose host group is a gloo group of its own (as on CUDA or Neuron, where
    the default group is the device's), rank 1 with a stop signal, rank 0 with 3 compiled graphs."""
    import json
    import types

    import torch.distributed as dist

    from trnft.common import stop
    from trnft.common.training.lightning_policy import _agreed_count, _host_collective

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    host_group = dist.new_group(backend="gloo")
    world = types.SimpleNamespace(host_group=host_group)
    module = types.SimpleNamespace(world=world, device=torch.device("meta"), is_main=rank == 0)
    stop.reset()
    if rank == 1:
        stop._remember(15, None)
    device, group = _host_collective(module)
    result = {
        "device": str(device),
        "group_is_host_group": group is host_group,
        "stop": stop.agreed_stop(device, group),
        "graphs": _agreed_count(lambda: 3, module),
    }
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


def test_ranks_agree_on_a_stop_and_compile_counts_over_the_host_group(tmp_path):
    """Where a world has a host group (every non-CPU device), the stop signal and the compiled-graph count
    are agreed over it with CPU tensors: never on the device (here a meta device, which no collective could
    use, so a device collective would fail), and every rank gets rank 1's stop and rank 0's count."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_agree_over_the_host_group, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"device": "cpu", "group_is_host_group": True, "stop": 15, "graphs": 3}, (
            rank,
            result,
        )
