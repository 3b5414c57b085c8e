"""Benchmark: training throughput and MFU of the GPU trainer on one GPU, LoRA and full fine-tuning.

A synthetic model with Llama-3.1-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocabulary
128256; fewer decoder layers where one GPU cannot hold the whole model, ``--layers-lora`` and
``--layers-full``), random bf16 weights, and synthetic instruction data packed to ``--seq`` tokens. Each
mode runs the real stages (``trnft tokenize`` then ``trnft train``: FSDP2 on one rank, bf16, the
attention and recompute ``auto`` picks: flash-attn's varlen kernel where installed, else FlexAttention
with the document-causal block mask; recompute off where the estimate fits) and reads the trainer's own
tokens/s from the train manifest (steps after the first; start-up, compilation and saves excluded).
LoRA is r16 on every linear layer with dropout 0.

    python benchmarks/gpu_throughput.py [--modes lora full] [--seq 4096] [--steps 12]
    python benchmarks/gpu_throughput.py --tiny      # a small shape on CPU: checks the script itself

MFU counts model FLOPs, not recomputation (activation checkpointing is extra work the hardware does but
the model does not need): per token, a forward pass is 2·N matmul FLOPs (N = parameters of every linear
layer and the LM head; embedding lookups are free) plus 4·L·h·S for attention scores and values (L
layers, hidden h, sequence S, no causal discount). Full fine-tuning's backward pass costs twice its
forward (6·N + 12·L·h·S in all); LoRA's matmuls cost once (input gradients only; the adapters' own FLOPs
are below 1 percent and left out) but attention's backward is twice its forward either way: 4·N + 12·L·h·S. The peak is the GPU's dense bf16 rate (``--peak-tflops``
for a GPU not in the table).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# This folder holds a tokenize.py, which must not shadow the standard library's module of that name.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402

# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; sparsity not counted).
PEAK_BF16_TFLOPS = {
    "H100 80GB HBM3": 989.4,  # SXM
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.4,
    "A100-SXM4-80GB": 312.0,
    "A100-SXM4-40GB": 312.0,
    "L40S": 362.1,
    "A10G": 125.0,
}


class ModeFailed(Exception):
    """A mode's stage failed: the row says so in one line; the detail (stderr's tail) goes to stderr."""

    def __init__(self, line: str, detail: str) -> None:
        super().__init__(line)
        self.detail = detail


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    def linear_parameters(self, layers: int) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        return layers * (attention + mlp) + self.hidden * self.vocab  # + the LM head

    def model_bytes(self, layers: int) -> int:
        """bf16 safetensors of the model: every linear layer plus the embedding (not tied)."""
        return 2 * (self.linear_parameters(layers) + self.hidden * self.vocab)

    def full_layers_that_fit(self, wanted: int, device_bytes: int) -> int:
        """Decoder layers (at most ``wanted``) whose full fine-tuning state fits 80 % of the device: per
        parameter a float32 master, its gradient and two Adam moments (16 bytes) and the bf16 copy FSDP2
        gathers for compute (2 bytes); activations take the rest (recompute is chosen by auto)."""
        per_parameter = 18
        layers = wanted
        while layers > 1 and per_parameter * (self.linear_parameters(layers) + self.hidden * self.vocab) > (
            0.8 * device_bytes
        ):
            layers -= 1
        return layers

    def flops_per_token(self, layers: int, seq: int, full: bool) -> float:
        """Model FLOPs per token: forward 2N (matmuls) + 4·L·h·S (attention scores and values). Backward:
        the input gradients cost the forward again for every matmul (2N + 4·L·h·S); full fine-tuning adds
        the weight gradients (2N), while the attention's two products still need both operands' gradients
        (another 4·L·h·S) with or without LoRA. So full 6N + 12·L·h·S, LoRA 4N + 12·L·h·S."""
        matmuls = 2 * self.linear_parameters(layers)
        attention = 4 * layers * self.hidden * seq
        return matmuls * (3 if full else 2) + attention * 3


LLAMA_31_8B = Shape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
TINY = Shape(hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=512)


def build_model(folder: Path, shape: Shape, layers: int, seq: int, tokenizer, device: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(seq, 8192),
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    with torch.device(device):  # random init where it is fastest; written as bf16 safetensors
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model


def write_data(path: Path, texts: list[str], tokens_wanted: int, seq: int) -> None:
    """Instruction rows of shuffled words from the bundled texts, about a quarter of ``seq`` tokens each
    (so packing fills every sequence), ``tokens_wanted`` tokens in all and at least 60 rows."""
    words = " ".join(texts).split()
    rng = random.Random(0)
    per_row = max(16, seq // 4)
    rows: list[str] = []
    while len(rows) * per_row < tokens_wanted or len(rows) < 60:

        def pick(share: float) -> str:
            return " ".join(rng.choice(words) for _ in range(max(1, int(per_row * share * 0.6))))

        rows.append(json.dumps({"instruction": pick(0.1), "context": pick(0.55), "response": pick(0.35)}))
    path.write_text("\n".join(rows) + "\n")


def run_mode(work: Path, mode: str, shape: Shape, layers: int, args, device: str) -> dict:
    from trnft.common.testing.fixtures import bundled_texts, train_tokenizer

    folder = work / mode
    folder.mkdir()
    texts = bundled_texts()
    tokenizer = train_tokenizer(texts, vocab_size=min(shape.vocab, 8000))
    build_model(folder / "model", shape, layers, args.seq, tokenizer, device)
    data = folder / "data.jsonl"
    write_data(data, texts, tokens_wanted=int(args.seq * (args.steps + 2) * 1.5), seq=args.seq)
    raw = {
        "run": {"name": f"throughput-{mode}", "root": str(folder / "run")},
        "model": {"name_or_path": str(folder / "model"), "platform": "gpu", "dtype": "bfloat16"},
        "dataset": {
            "files": [str(data)],
            "input_template": "### Instruction:\n{instruction}\n### Input:\n{context}\n### Response:\n",
            "output_template": "{response}",
            "max_seq_length": args.seq,
            "packing": True,
            "train_ratio": 0.9,
            "validation_ratio": 0.05,
            "test_ratio": 0.05,
        },
        # Dropout 0 (PEFT's and torchtune's default; trnft's is 0.05): no mask per target to draw and keep,
        # 193 instead of 301 KiB of activations per token and layer (measured on the CPU).
        "lora": {"enabled": mode == "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "train": {
            "max_steps": args.steps,
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-4,
            "warmup_steps": 1,
            "bf16": True,
            "save_steps": args.steps,
            # The first and last step log (reading figures waits for the device; none in between).
            "logging_steps": args.steps,
            "eval_steps": 0,
            "activation_checkpointing": args.recompute,
        },
        "fsdp": {"devices": 1, "attn_implementation": "auto"},
    }
    config = folder / "run.yaml"
    config.write_text(json.dumps(raw))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for stage in ("tokenize", "train"):
        proc = subprocess.run(
            [sys.executable, "-m", "trnft.common.cli", stage, "--config", str(config)],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            raise ModeFailed(
                f"{stage} exited {proc.returncode}: {_last_line(proc.stderr)}", proc.stderr[-3000:]
            )
    manifest = json.loads((folder / "run" / "train" / "manifest.json").read_text())
    figures = manifest["figures"]
    disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    tokens_per_s = figures["tokens_per_second"] or 0.0
    flops = shape.flops_per_token(layers, args.seq, full=mode == "full") * tokens_per_s
    return {
        "mode": mode,
        "layers": layers,
        "trainable": figures["trainable_parameters"],
        "attention": figures["attention"],
        "tokens_per_s": tokens_per_s,
        "tflops": flops / 1e12,
        "peak_gb": figures["peak_device_memory_mb"] and figures["peak_device_memory_mb"] / 1024,
        "files_mb": disk / 2**20,
    }


def work_folder(needed: int, explicit: str | None) -> str:
    """Where a mode's model, data and run go: ``--work``, else shared memory (/dev/shm) when it has room,
    so the 16 GB model and a full fine-tuning checkpoint (fp32 weights and two Adam moments, 12 bytes per
    parameter) never reach the disk, else the temporary folder."""
    if explicit:
        return explicit
    for candidate in ("/dev/shm", tempfile.gettempdir()):
        try:
            free = shutil.disk_usage(candidate).free
        except OSError:
            continue
        if free >= 1.2 * needed:
            return candidate
    return tempfile.gettempdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument(
        "--recompute",
        choices=["auto", "off", "selective", "full"],
        default="auto",
        help="train.activation_checkpointing (auto: off when the estimate fits the GPU; see the train log).",
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layers-lora", type=int, default=32, help="Decoder layers for LoRA (8B has 32).")
    parser.add_argument(
        "--layers-full",
        type=int,
        default=16,
        help="Decoder layers for full fine-tuning (fp32 weights + Adam); fewer where they do not fit.",
    )
    parser.add_argument("--peak-tflops", type=float, help="Dense bf16 peak of this GPU, TFLOP/s.")
    parser.add_argument("--work", help="Folder for each mode's files (default: /dev/shm when it has room).")
    parser.add_argument("--tiny", action="store_true", help="A small shape on CPU, to check the script.")
    args = parser.parse_args(argv)

    import torch

    if args.tiny:
        shape, device, name = TINY, "cpu", "cpu"
        args.seq, args.steps, args.layers_lora, args.layers_full = (
            min(args.seq, 256),
            min(args.steps, 3),
            2,
            2,
        )
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_throughput: needs a CUDA GPU (or --tiny to check the script on CPU)")
        shape, device, name = LLAMA_31_8B, "cuda", torch.cuda.get_device_name(0)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    print(f"device: {name}; peak bf16 {peak or 'unknown'} TFLOP/s; seq {args.seq}; micro-batch 1; bf16")
    print(
        f"{'mode':6} {'layers':>6} {'trainable':>14} {'attention':>18} {'tokens/s/GPU':>13} {'TFLOP/s':>8} "
        f"{'MFU':>6} {'peak GB':>8} {'files MB':>9}",
        flush=True,
    )
    # Each row prints as soon as its mode is measured (and its folder is gone), so a run cut short still
    # reports what it measured; a failed mode prints one line and the next mode still runs.
    failed = 0
    for mode in args.modes:
        layers = args.layers_lora if mode == "lora" else args.layers_full
        if mode == "full" and device == "cuda":
            fits = shape.full_layers_that_fit(layers, torch.cuda.get_device_properties(0).total_memory)
            if fits < layers:
                print(f"full: {layers} layers do not fit this GPU's memory; measuring {fits}", flush=True)
                layers = fits
        needed = shape.model_bytes(layers) * (1 if mode == "lora" else 7)  # + fp32 weights and moments
        with tempfile.TemporaryDirectory(
            prefix=f"trnft-throughput-{mode}-", dir=work_folder(needed, args.work)
        ) as tmp:
            try:
                r = run_mode(Path(tmp), mode, shape, layers, args, device)
            except ModeFailed as exc:
                failed += 1
                print(exc.detail, file=sys.stderr)
                print(f"{mode:6} {layers:>6} FAILED: {exc}", flush=True)
                continue
        mfu = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
        memory = f"{r['peak_gb']:.1f}" if r["peak_gb"] else "n/a"  # CUDA's allocator only
        print(
            f"{r['mode']:6} {r['layers']:>6} {r['trainable']:>14,} {r['attention']:>18} "
            f"{r['tokens_per_s']:>13,.0f} {r['tflops']:>8.1f} {mfu:>6} {memory:>8} {r['files_mb']:>9,.1f}",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
