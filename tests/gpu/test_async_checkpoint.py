"""fsdp.async_checkpoint: shards written in the background hold the weights and optimizer state of the moment
the save started, even when training changes them at once (2 gloo ranks, FSDP2 on CPU), and load back as
a synchronous save of the same moment does.

Upstream facts relied on (torch 2.8.0, torch/distributed/checkpoint/state_dict_saver.py and staging.py):
``async_save`` needs a process group with a CPU backend, stages the state dict into new CPU tensors
(``_create_cpu_state_dict`` + ``_copy_state_dict``, CPU tensors included) before returning, and runs the
save, with its collectives, in a background thread. This test fails if any of that stops being true."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from trnft.common.fsdp import checkpoint as ckpt

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(sys.argv[1])

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(model, optimizer):
        model(torch.ones(3, 8) * (rank + 1)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    def snapshot(model, optimizer):
        weights = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
        moments = {n: optimizer.state[p]["exp_avg"].full_tensor().clone() for n, p in model.named_parameters()}
        return weights, moments

    model, optimizer = build()
    step(model, optimizer)
    at_save = snapshot(model, optimizer)
    background, synchronous = out / "background", out / "synchronous"
    if rank == 0:
        background.mkdir(), synchronous.mkdir()
    dist.barrier()
    assert ckpt.save_sharded(synchronous, model, optimizer) == []
    futures = ckpt.save_sharded(background, model, optimizer, ckpt.BackgroundWriters.create())
    assert futures
    for _ in range(3):  # training goes on while the shards are written
        step(model, optimizer)
    moved = snapshot(model, optimizer)
    ckpt.wait_written(futures)
    dist.barrier()

    result = {}
    for name, folder in (("background", background), ("synchronous", synchronous)):
        fresh, fresh_optimizer = build()
        step(fresh, fresh_optimizer)  # creates the optimizer state that loading overwrites
        step(fresh, fresh_optimizer)
        ckpt.load_sharded(folder, fresh, fresh_optimizer)
        loaded = snapshot(fresh, fresh_optimizer)
        result[name] = max(
            float((loaded[i][n] - at_save[i][n]).abs().max()) for i in (0, 1) for n in at_save[0]
        )
    result["training_moved"] = min(
        float((moved[i][n] - at_save[i][n]).abs().max()) for i in (0, 1) for n in at_save[0]
    )
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    """
)


def test_a_background_save_holds_the_state_of_its_step_while_training_moves_on(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["training_moved"] > 1e-4  # every tensor changed after the save started
    assert result == {**result, "background": 0.0, "synchronous": 0.0}
