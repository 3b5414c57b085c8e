"""Benchmark of the LoRA merge: a 1.1B Llama in bf16 plus an r=16 adapter on every linear layer.

Writes a synthetic base model with TinyLlama-1.1B's dimensions (bf16 safetensors in 2 GB shards, config
and generation config) and a PEFT adapter (r=16, alpha=32, q/k/v/o/gate/up/down, fp32, as PEFT saves
one), then measures, each in its own process:

  copy            the base model's bytes copied, every file fsynced (as our outputs are)
  cp -r           the same without fsync
  reference       from_pretrained + PeftModel + merge_and_unload + save_pretrained, as the samples do
                  (transformers' default dtype, so the output is fp32: twice the input)
  reference-auto  the same with dtype="auto" (bf16 in, bf16 out)
  trnft           ``trnft merge --base ... --adapter ... --output ...``

and prints wall time, peak RSS and output size, then the same at twice the layers (peak memory must stay
flat). Our output is checked against the fp32 reference: each weight is the fp32 merge rounded to bf16
(within one bf16 ulp: numpy and torch may round the fp32 matmul differently).

    python benchmarks/merge.py [--layers 22] [--no-double] [--workdir DIR]

Goals (issue 6): wall <= 10 s, peak RSS <= 1.0 GB, output in the base dtype, flat when the model doubles.
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32

REFERENCE = r"""
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out, dtype = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, **({"dtype": "auto"} if dtype == "auto" else {}))
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out)
"""


def write_base(folder: Path, config: dict) -> int:
    """HF safetensors shards (2 GB), index, config and generation config; returns the weight bytes."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    shapes = measure.llama_shapes(config)
    folder.mkdir(parents=True)
    fake = {n: _Meta(s) for n, s in shapes.items()}  # the splitter needs only sizes
    split = split_torch_state_dict_into_shards(fake, max_shard_size="2GB")
    for filename, names in split.filename_to_tensors.items():
        save_file(
            {n: measure.seeded_tensor(n, shapes[n]) for n in names}, folder / filename, {"format": "pt"}
        )
    if split.is_sharded:
        index = {
            "metadata": {"total_size": split.metadata["total_size"]},
            "weight_map": split.tensor_to_filename,
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return sum(2 * _numel(s) for s in shapes.values())


class _Meta:
    """Stands in for a bf16 tensor in huggingface_hub's shard splitter (only its size matters)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        import torch

        self._t = torch.empty(shape, dtype=torch.bfloat16, device="meta")

    def __getattr__(self, name):
        return getattr(self._t, name)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_adapter(folder: Path, config: dict, base: Path) -> None:
    """A PEFT adapter as PEFT saves it: adapter_config.json and fp32 adapter_model.safetensors."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(folder)  # fmt: skip
    tensors = {}
    for name, shape in measure.llama_shapes(config).items():
        module, _, _ = name.rpartition(".")
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        out_features, in_features = shape
        for part, part_shape in (("lora_A", (RANK, in_features)), ("lora_B", (out_features, RANK))):
            key = f"base_model.model.{module}.{part}.weight"
            tensors[key] = measure.seeded_tensor(key, part_shape).to(torch.float32)
    save_file(tensors, folder / "adapter_model.safetensors", {"format": "pt"})


def verify(ours: Path, reference_fp32: Path) -> float:
    """Largest difference of our bf16 weights from the fp32 reference rounded to bf16, in bf16 ulps."""
    import torch
    from safetensors import safe_open

    def weight_map(folder: Path) -> dict[str, str]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return json.loads(index.read_text())["weight_map"]
        with safe_open(folder / "model.safetensors", "pt") as f:
            return dict.fromkeys(f.keys(), "model.safetensors")

    ours_map, ref_map = weight_map(ours), weight_map(reference_fp32)
    if set(ours_map) != set(ref_map):
        raise SystemExit(f"verify: tensor names differ: {sorted(set(ours_map) ^ set(ref_map))[:5]}")
    worst = 0.0
    for name, filename in ours_map.items():
        with safe_open(ours / filename, "pt") as a, safe_open(reference_fp32 / ref_map[name], "pt") as b:
            mine, exact = a.get_tensor(name), b.get_tensor(name)
        if mine.dtype != torch.bfloat16:
            raise SystemExit(f"verify: {name} is {mine.dtype}, not the base dtype bfloat16")
        rounded = exact.to(torch.bfloat16)
        ulp = torch.finfo(torch.bfloat16).eps * rounded.float().abs().clamp_min(2**-126)
        worst = max(worst, ((mine.float() - rounded.float()).abs() / ulp).max().item())
    if worst > 1.0:
        raise SystemExit(f"verify: a merged weight is {worst:.1f} bf16 ulps from the fp32 merge")
    return worst


def one_size(work: Path, layers: int, check: bool) -> dict:
    config = {**measure.TINYLLAMA, "num_hidden_layers": layers}
    base, adapter = work / f"base-{layers}L", work / f"adapter-{layers}L"
    t0 = time.perf_counter()
    weights = write_base(base, config)
    write_adapter(adapter, config, base)
    print(f"[{layers} layers] wrote a {weights / 1e9:.2f} GB bf16 base and an r={RANK} adapter "
          f"({measure.tree_bytes(adapter) / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    measure.warm(base)
    measure.warm(adapter)
    results = {
        "copy": measure.run_measured("copy", measure.copy_argv(base, work / "copy")),
        "cp -r": measure.run_measured("cp -r", ["cp", "-r", str(base), str(work / "cp")]),
    }
    measure.drop_tree(work / "copy")
    measure.drop_tree(work / "cp")
    sizes = {}
    for label, dtype in (("reference", "default"), ("reference-auto", "auto")):
        out = work / label
        results[label] = measure.run_measured(
            label, [*measure.python(REFERENCE), str(base), str(adapter), str(out), dtype]
        )
        sizes[label] = measure.tree_bytes(out) / 1e9
        if label != "reference" or not check:
            measure.drop_tree(out)
    out = work / "trnft"
    results["trnft"] = measure.run_measured(
        "trnft", measure.trnft("merge", "--base", str(base), "--adapter", str(adapter), "--output", str(out))
    )
    sizes["trnft"] = measure.tree_bytes(out) / 1e9
    # What the pipeline's merge stage adds to the standalone merge: the sha256 of the adapter it reads
    # (checked against the consolidate manifest) and of the model it writes (into its own manifest).
    results["sha256 in+out (stage)"] = measure.run_measured("sha256", measure.sha256_argv(adapter))
    results["sha256 in+out (stage)"].wall_s += measure.run_measured(
        "sha256 out", measure.sha256_argv(out)
    ).wall_s
    if check:
        worst = verify(out, work / "reference")
        print(f"[{layers} layers] verified: every weight is the fp32 merge rounded to bf16 "
              f"(largest difference {worst:.2f} ulp)", flush=True)  # fmt: skip
        measure.drop_tree(work / "reference")
    for folder in (out, base, adapter):
        measure.drop_tree(folder)
    return {"layers": layers, "weights_gb": weights / 1e9, "sizes": sizes, **results}


def report(runs: list[dict]) -> None:
    rows = [("model", "step", "wall s", "peak RSS GB", "output GB")]
    for r in runs:
        for key in ("copy", "cp -r", "reference", "reference-auto", "trnft", "sha256 in+out (stage)"):
            m = r[key]
            out = r["sizes"].get(key)
            rows.append((f"{r['layers']}L {r['weights_gb']:.2f} GB", key, f"{m.wall_s:.2f}",
                         f"{m.peak_rss_gb:.3f}", "" if out is None else f"{out:.2f}"))  # fmt: skip
    print()
    print(measure.table(rows))
    first = runs[0]
    ours, ref = first["trnft"], first["reference"]
    print(f"\ntrnft merge: {ours.wall_s:.2f} s (goal <= 10), peak RSS {ours.peak_rss_gb:.3f} GB (goal <= 1.0), "
          f"output {first['sizes']['trnft']:.2f} GB bf16 (input {first['weights_gb']:.2f} GB)")  # fmt: skip
    sha = first["sha256 in+out (stage)"].wall_s
    print(f"integrity: the stage's sha256 of the adapter it reads and the model it writes: {sha:.2f} s "
          f"({sha / ours.wall_s:.0%} on top of the merge; the safetensors layout checks are inside trnft's wall)")  # fmt: skip
    print(f"reference: {ref.wall_s:.2f} s, {ref.peak_rss_gb:.2f} GB, output {first['sizes']['reference']:.2f} GB; "
          f"trnft is {ref.wall_s / ours.wall_s:.1f}x faster with {ref.peak_rss_gb / ours.peak_rss_gb:.0f}x less memory")  # fmt: skip
    if len(runs) > 1:
        a, b = runs[0]["trnft"], runs[1]["trnft"]
        print(f"model x{runs[1]['weights_gb'] / first['weights_gb']:.1f}: trnft peak RSS {a.peak_rss_gb:.3f} -> "
              f"{b.peak_rss_gb:.3f} GB (x{b.peak_rss_gb / a.peak_rss_gb:.2f}); wall {a.wall_s:.2f} -> {b.wall_s:.2f} s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--no-double", action="store_true", help="Skip the run at twice the layers.")
    ap.add_argument("--no-verify", action="store_true", help="Skip the check against the fp32 reference.")
    ap.add_argument(
        "--workdir", help="Scratch folder (default: a temporary one; needs ~5x the model on disk)."
    )
    args = ap.parse_args()
    runs = measure.at_two_sizes(
        args.workdir,
        args.layers,
        not args.no_double,
        lambda work, layers, verify: one_size(work, layers, verify and not args.no_verify),
    )
    report(runs)


if __name__ == "__main__":
    main()
