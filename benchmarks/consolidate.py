"""Benchmark of consolidation: a TP=8 optimum-neuron checkpoint of a 1.1B Llama -> HF safetensors.

Writes a synthetic full-model checkpoint with TinyLlama-1.1B's dimensions in bf16 (4 KV heads < TP 8, so
attention is a GQA ``qkv_proj`` with KV replication and the query / o_proj head permutation; MLP is the
fused ``gate_up_proj``) in optimum-neuron 0.4.x's layout, then measures, each in its own process:

  copy       a plain copy of the checkpoint's bytes, every file fsynced (as our outputs are)
  cp -r      the same without fsync (the page cache may hold part of it when it returns)
  reference  the usual approach: load every rank file whole, concatenate each tensor along its partition
             dim, split the fused tensors, save with safetensors in 5 GB shards. It does the memory and I/O
             work of that approach; it does not undo the GQA permutation (it is a cost baseline only)
  trnft      ``trnft consolidate --checkpoint ... --output ...`` (it checks the CRC32 of every storage it reads)
  crc32, sha256  the integrity checks alone: the CRC32 above, and the sha256 of the checkpoint and of the
             output that the pipeline's consolidate stage adds (manifest digests checked and written)

and prints wall time and peak RSS of each, our ratio to the copy, and then the same at twice the layers
(peak memory must stay flat). Our output is checked bit for bit against the generator's tensors.

    python benchmarks/consolidate.py [--layers 22] [--encoding plain|xser] [--no-double] [--workdir DIR]

Goals (issue 6): wall <= 2x the copy, peak RSS <= 0.6 GB, flat when the model doubles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# benchmarks/tokenize.py would shadow the stdlib module of that name from the front of sys.path: move
# this folder to the back, where it still provides `measure`.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != _HERE] + [str(_HERE)]

import measure  # noqa: E402

REFERENCE = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from huggingface_hub import split_torch_state_dict_into_shards
tag, out = Path(sys.argv[1]), Path(sys.argv[2])
meta = json.loads((tag / "mp_metadata_pp_rank_0.json").read_text())["parameters"]
files = sorted((tag / "model").glob("dp_rank_*_tp_rank_*_pp_rank_*.pt"))
ranks = [torch.load(f, weights_only=True) for f in files]
full = {}
for name in ranks[0]:
    info = meta.get(name, {})
    if info.get("tensor_model_parallel"):
        t = torch.cat([r[name] for r in ranks], dim=info["partition_dim"])
    else:
        t = ranks[0][name]
    if ".gate_up_proj." in name:  # rank r holds [gate_r; up_r]
        halves = [r[name].chunk(2) for r in ranks]
        full[name.replace("gate_up_proj", "gate_proj")] = torch.cat([h[0] for h in halves])
        full[name.replace("gate_up_proj", "up_proj")] = torch.cat([h[1] for h in halves])
    else:
        full[name] = t
del ranks
out.mkdir()
split = split_torch_state_dict_into_shards(full, max_shard_size="5GB")
for filename, names in split.filename_to_tensors.items():
    save_file({n: full[n].contiguous() for n in names}, out / filename)
"""


def write_checkpoint(ckpt: Path, config: dict, tp: int, encoding: str) -> int:
    """A full-model checkpoint-N folder in optimum-neuron 0.4.x's layout; returns the weight bytes."""
    import torch  # noqa: F401  (the writer needs it; the measured steps import what they need themselves)

    from trnft.neuron import nxd_format
    from trnft.neuron.parallel_layout import ModelDims, NeuronLayout, parameter_metadata, shard_state_dict

    class _Cfg:  # ModelDims.from_config reads attributes
        def __init__(self, d: dict) -> None:
            self.__dict__.update(d)

    layout = NeuronLayout.for_model(ModelDims.from_config(_Cfg(config)), tp)
    shapes = measure.llama_shapes(config)
    ranks: list[dict] = [{} for _ in range(tp)]
    layer_of = {}
    for name in shapes:
        layer_of.setdefault(name.split(".self_attn.")[0].split(".mlp.")[0], []).append(name)
    total = 0
    for group in layer_of.values():  # one layer at a time bounds the generator's own memory
        full = {n: measure.seeded_tensor(n, shapes[n]) for n in group}
        total += sum(t.numel() * 2 for t in full.values())
        for r in range(tp):
            ranks[r].update(shard_state_dict(full, layout, r))
    metadata = parameter_metadata(list(shapes), layout, peft=False)
    nxd_format.write_tag(ckpt / nxd_format.MODEL_SHARDS, ranks, metadata, encoding=encoding)
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    return total


def verify(out: Path, config: dict) -> None:
    """Every output tensor equals the generator's (bit for bit), and nothing is missing or extra."""
    import torch
    from safetensors import safe_open

    shapes = measure.llama_shapes(config)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    if set(index) != set(shapes):
        raise SystemExit(f"verify: output names differ: {sorted(set(index) ^ set(shapes))[:5]}")
    for filename in sorted(set(index.values())):
        with safe_open(out / filename, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if not torch.equal(f.get_tensor(name), measure.seeded_tensor(name, shapes[name])):
                    raise SystemExit(f"verify: {name} differs from the generated tensor")


def one_size(work: Path, layers: int, tp: int, encoding: str, check: bool) -> dict:
    config = {**measure.TINYLLAMA, "num_hidden_layers": layers}
    ckpt = work / f"train-{layers}L" / "checkpoint-1"
    t0 = time.perf_counter()
    weights = write_checkpoint(ckpt, config, tp, encoding)
    print(f"[{layers} layers] wrote TP={tp} {encoding} checkpoint, {weights / 1e9:.2f} GB of weights "
          f"({measure.tree_bytes(ckpt) / 1e9:.2f} GB on disk) in {time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    measure.warm(ckpt)
    tag = ckpt / "shards"
    results = {
        "copy": measure.run_measured("copy", measure.copy_argv(tag, work / "copy")),
        "cp -r": measure.run_measured("cp -r", ["cp", "-r", str(tag), str(work / "cp")]),
    }
    measure.drop_tree(work / "copy")
    measure.drop_tree(work / "cp")
    if encoding == "plain":
        results["reference"] = measure.run_measured(
            "reference", [*measure.python(REFERENCE), str(tag), str(work / "reference")]
        )
        measure.drop_tree(work / "reference")
    results["trnft"] = measure.run_measured(
        "trnft", measure.trnft("consolidate", "--checkpoint", str(ckpt), "--output", str(work / "trnft"))
    )
    # The integrity checks alone: the CRC32 trnft consolidate checks on every storage it reads (part of
    # its wall time above), and the sha256 of the checkpoint and of the output that the pipeline stage adds
    # (the train manifest's digests checked before reading, the consolidate manifest's written after).
    results["crc32 (in trnft)"] = measure.run_measured("crc32", measure.crc32_argv(ckpt))
    results["sha256 in+out (stage)"] = measure.run_measured("sha256", measure.sha256_argv(ckpt))
    out_sha = measure.run_measured("sha256 out", measure.sha256_argv(work / "trnft"))
    results["sha256 in+out (stage)"].wall_s += out_sha.wall_s
    out_bytes = measure.tree_bytes(work / "trnft")
    if check:
        verify(work / "trnft", config)
        print(f"[{layers} layers] verified: output equals the generated tensors bit for bit", flush=True)
    measure.drop_tree(work / "trnft")
    measure.drop_tree(ckpt.parent)
    return {"layers": layers, "weights_gb": weights / 1e9, "out_gb": out_bytes / 1e9, **results}


def report(sizes: list[dict]) -> None:
    rows = [("model", "step", "wall s", "peak RSS GB", "wall / fastest copy")]
    for s in sizes:
        copy = min(s["copy"].wall_s, s["cp -r"].wall_s)
        for key in ("copy", "cp -r", "reference", "trnft", "crc32 (in trnft)", "sha256 in+out (stage)"):
            if key in s:
                m = s[key]
                rows.append((f"{s['layers']}L {s['weights_gb']:.2f} GB", key, f"{m.wall_s:.2f}",
                             f"{m.peak_rss_gb:.3f}", f"{m.wall_s / copy:.2f}x"))  # fmt: skip
    print()
    print(measure.table(rows))
    first = sizes[0]
    fastest_copy = min(first["copy"].wall_s, first["cp -r"].wall_s)
    print(f"\ntrnft consolidate: {first['trnft'].wall_s / fastest_copy:.2f}x the fastest copy (goal <= 2x), "
          f"peak RSS {first['trnft'].peak_rss_gb:.3f} GB (goal <= 0.6)")  # fmt: skip
    crc, sha = first["crc32 (in trnft)"].wall_s, first["sha256 in+out (stage)"].wall_s
    print(f"integrity: CRC32 of every storage {crc:.2f} s ({crc / first['trnft'].wall_s:.0%} of trnft's wall); "
          f"the stage adds sha256 of its input and output, {sha:.2f} s: "
          f"{(first['trnft'].wall_s + sha) / fastest_copy:.2f}x the fastest copy in all")  # fmt: skip
    if "reference" in first:
        ref = first["reference"]
        print(f"reference: {ref.wall_s:.2f} s, {ref.peak_rss_gb:.2f} GB; trnft is "
              f"{ref.wall_s / first['trnft'].wall_s:.1f}x faster with {ref.peak_rss_gb / first['trnft'].peak_rss_gb:.0f}x less memory")  # fmt: skip
    if len(sizes) > 1:
        a, b = sizes[0]["trnft"].peak_rss_gb, sizes[1]["trnft"].peak_rss_gb
        print(f"model x{sizes[1]['weights_gb'] / sizes[0]['weights_gb']:.1f}: trnft peak RSS {a:.3f} -> {b:.3f} GB "
              f"(x{b / a:.2f}); wall {sizes[0]['trnft'].wall_s:.2f} -> {sizes[1]['trnft'].wall_s:.2f} s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--encoding", choices=["plain", "xser"], default="plain")
    ap.add_argument("--no-double", action="store_true", help="Skip the run at twice the layers.")
    ap.add_argument("--no-verify", action="store_true", help="Skip the bit-for-bit output check.")
    ap.add_argument(
        "--workdir", help="Scratch folder (default: a temporary one; needs ~3x the model on disk)."
    )
    args = ap.parse_args()
    sizes = measure.at_two_sizes(
        args.workdir,
        args.layers,
        not args.no_double,
        lambda work, layers, verify: one_size(
            work, layers, args.tp, args.encoding, verify and not args.no_verify
        ),
    )
    report(sizes)


if __name__ == "__main__":
    main()
