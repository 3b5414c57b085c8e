"""Benchmark: host memory of the GPU trainer's model set-up per node, at 1 and 2 ranks.

Writes a synthetic bf16 Llama (safetensors) and, for 1 and 2 ranks (torchrun, gloo on CPU), builds the
model the way each approach does and measures the peak growth of every rank's anonymous memory (RssAnon:
heap and tensors; the page cache of the memory-mapped files is shared by all ranks of a node and counted
by neither):

  trnft      the GPU trainer's set-up (:mod:`trnft.common.fsdp.parallel`): parameters on the meta device, FSDP2
             sharding over the ranks, then each rank copies only its own slices out of the mapped files
  per-rank   what the Lightning sample (and trnft before FSDP2) did: every rank ``from_pretrained``-loads
             the whole model, then FSDP shards it

in two modes: ``full`` (full fine-tuning: fp32 trainable weights from the bf16 files, so every loaded
tensor is a new copy) and ``lora`` (a bf16 base that transformers can keep memory-mapped, plus LoRA). It
prints, per mode, approach and rank count, the largest rank, the node total, and the ratio of the 2-rank
node total to the 1-rank one (goal: about 1 for trnft; per-rank gives about 2 in full mode).

    python benchmarks/gpu_host_memory.py [--hidden 1024] [--layers 8] [--check]

``--check`` exits 1 when trnft's 2-rank node total is above 1.35x its 1-rank total in either mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != _HERE] + [str(_HERE)]

import measure  # noqa: E402

RANK_SCRIPT = r"""
import json, os, sys, threading, time
from pathlib import Path

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0

peak = [0.0]
def sample():
    while True:
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.005)

import torch, torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM
from trnft.common.config.run_config import config_from_dict
from trnft.common.training.lora import apply_lora
from trnft.common.fsdp import parallel
from trnft.common.fsdp.platform import CPU

model_dir, approach, mode, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
lora = mode == "lora"
dtype = torch.bfloat16 if lora else torch.float32
world = parallel.start_world(1, CPU)
cfg = config_from_dict({"run": {"name": "m", "root": "/tmp/unused"}, "model": {"name_or_path": str(model_dir),
      "platform": "gpu", "dtype": "bfloat16"}, "dataset": {"name": "x/y"}})
config = AutoConfig.from_pretrained(model_dir)
dist.barrier()
before = anon_mb()
threading.Thread(target=sample, daemon=True).start()
if approach == "trnft":
    with parallel.parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if lora:
            model = apply_lora(model, cfg, ["q_proj", "v_proj"])
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    parallel.shard(model, world, parallel.ShardSettings(tp=1, bf16=True, reshard_after_forward=True, cpu_offload=False))
    parallel.materialize(model, world.device, buffers, cpu_offload=False)
    parallel.load_base_weights(model, model_dir, world.device)
    if lora:
        parallel.init_lora_weights(model, 0, world.device)
else:
    from torch.distributed.fsdp import fully_shard
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, low_cpu_mem_usage=True)
    if lora:
        model = apply_lora(model, cfg, ["q_proj", "v_proj"])
    for layer in parallel.decoder_layers(model):
        fully_shard(layer, mesh=world.dp_mesh)
    fully_shard(model, mesh=world.dp_mesh)
time.sleep(0.05)
after = anon_mb()
dist.barrier()
report = {"rank": world.rank, "growth_mb": after - before, "peak_growth_mb": max(peak[0], after) - before}
(out / f"rank{world.rank}.json").write_text(json.dumps(report))
parallel.stop_world()
"""


def write_model(folder: Path, hidden: int, layers: int) -> int:
    import torch  # noqa: F401
    from safetensors.torch import save_file

    config = {
        **measure.TINYLLAMA,
        "hidden_size": hidden,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": max(1, hidden // 256),
        "intermediate_size": int(hidden * 2.75),
        "num_hidden_layers": layers,
    }
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {}
    for name, shape in measure.llama_shapes(config).items():
        tensors[name] = measure.seeded_tensor(name, shape)
    save_file(tensors, folder / "model.safetensors")
    return (folder / "model.safetensors").stat().st_size


def measure_ranks(model_dir: Path, approach: str, mode: str, ranks: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "rank.py"
        script.write_text(RANK_SCRIPT)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(script), str(model_dir), approach, mode, tmp]  # fmt: skip
        env = {**os.environ, "PJRT_DEVICE": "CPU", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        if proc.returncode != 0:
            raise SystemExit(f"{approach} {mode} x{ranks}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--check", action="store_true", help="Fail when trnft's 2-rank node total exceeds 1.35x.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="trnft-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        size = write_model(model_dir, args.hidden, args.layers)
        rows = [("mode", "approach", "ranks", "largest rank (MB)", "node total (MB)", "node total / file")]
        totals: dict[tuple[str, str, int], float] = {}
        for mode in ("full", "lora"):
            for approach in ("trnft", "per-rank"):
                for ranks in (1, 2):
                    reports = measure_ranks(model_dir, approach, mode, ranks)
                    total = sum(r["peak_growth_mb"] for r in reports)
                    totals[(mode, approach, ranks)] = total
                    rows.append((mode, approach, str(ranks), f"{max(r['peak_growth_mb'] for r in reports):.0f}",
                                 f"{total:.0f}", f"{total / (size / 2**20):.2f}"))  # fmt: skip
    print(f"model: {size / 2**20:.0f} MB of bf16 safetensors (hidden {args.hidden}, {args.layers} layers)")
    print(measure.table(rows))
    worst = 0.0
    for mode in ("full", "lora"):
        ratios = {a: totals[(mode, a, 2)] / totals[(mode, a, 1)] for a in ("trnft", "per-rank")}
        worst = max(worst, ratios["trnft"])
        print(
            f"{mode}: node total at 2 ranks / at 1 rank: trnft {ratios['trnft']:.2f}, per-rank {ratios['per-rank']:.2f}"
        )
    if args.check and worst > 1.35:
        print(f"FAIL: trnft's node memory grows with the ranks ({worst:.2f}x > 1.35x)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
