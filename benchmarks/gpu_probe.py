"""Probe: where one decoder layer of Llama-3.1-8B's shapes spends a LoRA training step on one GPU.

Each row is one measurement of forward + backward on packed rows of ``--seq`` tokens (documents of
random lengths, so the document-causal rule matters), printed as soon as it is taken; a part that fails
or is unavailable prints one line saying why and the next part still runs:

- ``attention``: the trainer's own attention paths (``forward_logits``) on a one-layer model with a small
  vocabulary: sdpa with the dense ``[B,1,S,S]`` mask, FlexAttention with the document-causal block mask,
  flash-attn's varlen kernel (where installed);
- ``recompute``: the same layer with LoRA r16 on every linear layer and ``off`` / ``selective`` / ``full``
  recompute (time and peak memory: what ``train.activation_checkpointing: auto`` trades);
- ``loss``: the LM head and the float32 cross-entropy over the full vocabulary for one row, from the whole
  row's logits and chunk by chunk (``fsdp.chunked_loss``);
- ``fsdp``: one LoRA layer step without FSDP2, and under ``fully_shard`` on one rank with and without
  resharding after forward (the cost the trainer avoids at a data-parallel world of 1).

    python benchmarks/gpu_probe.py [--seq 4096] [--iters 5]
    python benchmarks/gpu_probe.py --tiny      # small shapes on CPU: checks the script itself

Times are milliseconds per iteration after one warm-up; peak memory is CUDA's allocator peak during the
timed iterations (n/a on the CPU).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# This folder holds a tokenize.py, which must not shadow the standard library's module of that name.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != _HERE]

import argparse  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

# (hidden, MLP, heads, KV heads, vocabulary): Llama-3.1-8B, and a tiny shape for checking on the CPU.
LLAMA_31_8B = (4096, 14336, 32, 8, 128256)
TINY = (128, 256, 4, 2, 512)
PROBE_VOCAB = 1024  # the attention / recompute / fsdp probes' model: the layer, not the LM head, dominates


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _config(shape: tuple[int, ...], seq: int, vocab: int, attn: str) -> Any:
    from transformers import LlamaConfig

    hidden, mlp, heads, kv_heads, _ = shape
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max(seq, 8192),
        rope_theta=500000.0, tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = attn
    return config


def packed_batch(seq: int, vocab: int, device: str, seed: int = 0) -> dict[str, Any]:
    """One row of ``seq`` tokens packed from documents of 64 to seq / 4 tokens, as the trainer's batch."""
    import numpy as np
    import torch

    from trnft.common.training.data import packed_varlen

    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < seq:
        lengths.append(int(min(rng.integers(64, max(65, seq // 4)), seq - sum(lengths))))
    position_ids = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int64)
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int64)
    cu, longest = packed_varlen(position_ids)
    ids = rng.integers(0, vocab, size=(1, seq))
    return {
        "input_ids": torch.from_numpy(ids).to(device),
        "labels": torch.from_numpy(ids).to(device),
        "position_ids": torch.from_numpy(position_ids).to(device),
        "segment_ids": torch.from_numpy(segment_ids).to(device),
        "cu_seq_lens": torch.from_numpy(cu).to(device),
        "max_length": longest,
    }


def measure(step: Callable[[], None], iters: int, device: str) -> tuple[float, float | None]:
    """Milliseconds per call of ``step`` after one warm-up call, and the allocator's peak GiB (CUDA)."""
    import torch

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1000 / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return ms, peak


def _model(shape: tuple[int, ...], seq: int, attn: str, device: str, *, lora: bool, vocab: int = PROBE_VOCAB):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(_config(shape, seq, vocab, attn), dtype=torch.bfloat16)
    model.config.use_cache = False
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
        )
    model.train()
    return model


def _train_step(model: Any, batch: dict[str, Any], attn: str) -> Callable[[], None]:
    from trnft.common.fsdp.trainer import forward_logits
    from trnft.common.training.data import summed_token_loss

    def step() -> None:
        summed_token_loss(forward_logits(model, batch, attn), batch["labels"]).backward()
        model.zero_grad(set_to_none=True)

    return step


def probe_attention(shape, seq, iters, device) -> list[tuple[str, float, float | None]]:
    rows = []
    for attn in ("sdpa", "flex_attention", "flash_attention_2"):
        if attn == "flash_attention_2" and not _has_flash_attn():
            rows.append((f"attention {attn} (flash_attn not installed)", float("nan"), None))
            continue
        if attn == "flex_attention" and device != "cuda":
            # torch has no FlexAttention backward on the CPU (the trainer refuses it there too)
            rows.append((f"attention {attn} (no backward on the CPU)", float("nan"), None))
            continue
        model = _model(shape, seq, attn, device, lora=True)
        batch = packed_batch(seq, PROBE_VOCAB, device)
        ms, peak = measure(_train_step(model, batch, attn), iters, device)
        rows.append((f"attention {attn}", ms, peak))
        del model
    return rows


def probe_recompute(shape, seq, iters, device, attn) -> list[tuple[str, float, float | None]]:
    from trnft.common.fsdp import parallel
    from trnft.common.training.recompute import checkpoint_layers

    rows = []
    for mode in ("off", "selective", "full"):
        model = _model(shape, seq, attn, device, lora=True)
        checkpoint_layers(parallel.decoder_layers(model), mode)
        ms, peak = measure(_train_step(model, packed_batch(seq, PROBE_VOCAB, device), attn), iters, device)
        rows.append((f"recompute {mode}", ms, peak))
        del model
    return rows


def probe_loss(shape, seq, iters, device) -> list[tuple[str, float, float | None]]:
    import torch

    from trnft.common.config.run_config import FsdpSection
    from trnft.common.training.chunked_loss import chunked_token_loss, supervised_positions
    from trnft.common.training.data import summed_token_loss

    hidden, vocab = shape[0], shape[4]
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=torch.bfloat16)
    states = torch.randn(1, seq, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, seq), device=device)

    def step() -> None:
        summed_token_loss(head(states), labels).backward()
        states.grad = None

    ms, peak = measure(step, iters, device)
    rows = [(f"loss lm_head + float32 cross-entropy, vocabulary {vocab:,}", ms, peak)]
    # fsdp.chunked_loss's path at its default chunk: every position supervised here (its worst case).
    chunk = FsdpSection.__dataclass_fields__["loss_chunk_tokens"].default
    positions, targets = supervised_positions(labels.cpu().numpy())
    positions, targets = torch.from_numpy(positions).to(device), torch.from_numpy(targets).to(device)

    def chunked() -> None:
        chunked_token_loss(states, head.weight, None, positions, targets, chunk).backward()
        states.grad = None

    ms, peak = measure(chunked, iters, device)
    return [*rows, (f"loss chunked, {chunk} tokens a chunk (fsdp.chunked_loss)", ms, peak)]


def probe_fsdp(shape, seq, iters, device, attn) -> list[tuple[str, float, float | None]]:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from trnft.common.fsdp import parallel

    started = not dist.is_initialized()
    if started:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29577")
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh(device, (1,))
        rows = []
        for name, reshard in (
            ("without FSDP2", None),
            ("fully_shard, reshard", True),
            ("fully_shard, kept", False),
        ):
            model = _model(shape, seq, attn, device, lora=True)
            if reshard is not None:
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                for layer in parallel.decoder_layers(model):
                    fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
                fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
            ms, peak = measure(
                _train_step(model, packed_batch(seq, PROBE_VOCAB, device), attn), iters, device
            )
            rows.append((f"fsdp one rank: {name}", ms, peak))
            del model
        return rows
    finally:
        if started:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--parts", nargs="+", default=["attention", "recompute", "loss", "fsdp"],
                        choices=["attention", "recompute", "loss", "fsdp"])  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="Small shapes on CPU, to check the script.")
    args = parser.parse_args(argv)

    import torch

    if args.tiny:
        shape, device, seq, iters = TINY, "cpu", min(args.seq, 512), min(args.iters, 2)
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_probe: needs a CUDA GPU (or --tiny to check the script on CPU)")
        shape, device, seq, iters = LLAMA_31_8B, "cuda", args.seq, args.iters
    # The recompute and fsdp parts use the attention the trainer's auto would pick here.
    attn = "sdpa" if device != "cuda" else ("flash_attention_2" if _has_flash_attn() else "flex_attention")
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"probe: {name}; torch {torch.__version__}; seq {seq}; one decoder layer; bf16; {iters} iterations")
    parts = {
        "attention": lambda: probe_attention(shape, seq, iters, device),
        "recompute": lambda: probe_recompute(shape, seq, iters, device, attn),
        "loss": lambda: probe_loss(shape, seq, iters, device),
        "fsdp": lambda: probe_fsdp(shape, seq, iters, device, attn),
    }
    failed = 0
    for part in args.parts:
        try:
            for label, ms, peak in parts[part]():
                memory = f"{peak:.2f} GiB" if peak is not None else "n/a"
                shown = "unavailable" if ms != ms else f"{ms:10.1f} ms"
                print(f"probe: {label:55} {shown}  peak {memory}", flush=True)
        except Exception as exc:  # one part's failure is its line; the next part still runs
            failed += 1
            traceback.print_exc(file=sys.stderr)
            print(f"probe: {part} FAILED: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
