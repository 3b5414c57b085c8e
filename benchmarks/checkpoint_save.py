"""Benchmark of how long a save stops training: synchronous DCP writes vs fsdp.async_checkpoint.

Two torchrun processes (gloo on the CPU, or NCCL on 2 GPUs with --device cuda) hold an FSDP2-sharded stack
of linear layers with AdamW state (full fine-tuning's trained state: weights + two moments) and save it
with ``trnft.common.fsdp.checkpoint.save_sharded`` (the trainer's own code), both ways:

  sync    the writes inside the step: training waits for every byte
  async   a host copy of this rank's state, then background writes: training waits for the copy only;
          "written" is when every rank's writes (and the metadata) are on disk

and prints, per mode, the time training is blocked, the time until written, and the bytes written.

    python benchmarks/checkpoint_save.py [--params-m 200] [--device cpu|cuda] [--workdir DIR]

Goal (issue 25): async blocks training for a small fraction of the synchronous save.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from trnft.common.fsdp import checkpoint as ckpt

    params_m, device_type, work = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    width = 2048
    layers = max(1, round(params_m * 1e6 / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.ones(4, width, device=device)).sum().backward()
    optimizer.step()
    writers = ckpt.BackgroundWriters.create()

    def sync():
        if device_type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    figures = {}
    for i, mode in enumerate(("sync", "async", "sync", "async")):  # each twice: the second is reported
        staged = work / f"{mode}-{i}"
        if rank == 0:
            staged.mkdir()
        sync()
        t0 = time.perf_counter()
        futures = ckpt.save_sharded(staged, model, optimizer, writers if mode == "async" else None)
        blocked = time.perf_counter() - t0
        ckpt.wait_written(futures)
        sync()
        written = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in staged.rglob("*") if f.is_file())
        figures[mode] = {"blocked_s": blocked, "written_s": written, "bytes": size}
    blocked = torch.tensor([figures[m]["blocked_s"] for m in ("sync", "async")], device=device)
    dist.all_reduce(blocked, op=dist.ReduceOp.MAX)
    if rank == 0:
        out = {m: {**figures[m], "blocked_s": float(b)} for m, b in zip(("sync", "async"), blocked.tolist())}
        out["parameters"] = layers * width * width
        print("RESULT " + json.dumps(out))
    dist.destroy_process_group()
    """
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-m", type=int, default=200, help="trained parameters, millions")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        script = work / "worker.py"
        script.write_text(WORKER)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
        proc = subprocess.run(
            [*cmd, str(args.params_m), args.device, str(work)], capture_output=True, text=True, env=env
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"checkpoint_save: the workers failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        result = json.loads(lines[-1][len("RESULT ") :])
    sync, background = result["sync"], result["async"]
    print(
        f"device {args.device}, 2 ranks, {result['parameters'] / 1e6:.0f}M trained parameters "
        f"(fp32 weights + AdamW moments), {sync['bytes'] / 2**20:,.0f} MiB per save"
    )
    print(f"{'mode':6} {'training blocked s':>18} {'written s':>10}")
    for name, row in (("sync", sync), ("async", background)):
        print(f"{name:6} {row['blocked_s']:18.2f} {row['written_s']:10.2f}")
    print(
        f"async blocks training for {background['blocked_s'] / sync['blocked_s']:.0%} of the synchronous save"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
