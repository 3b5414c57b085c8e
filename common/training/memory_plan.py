"""``train.activation_checkpointing: auto`` for the FSDP2 trainer: recompute only where memory needs it.

LoRA's backward has no weight-gradient matmuls for the frozen base, so recomputing the forward costs far
more, relative to the step, than it does in full fine-tuning (about 45 % more model FLOPs). ``auto`` keeps
every activation (``off``) when one rank's estimated peak fits its device, else ``selective``, else
``full``; the estimate and the choice go to the train log and manifest.

The estimate, per rank (every count in bytes):

- **weights**: the frozen base in ``model.dtype`` and the trained parameters in fp32, split over the tensor-
  and data-parallel ranks FSDP2 shards over; FSDP2 gathers each layer whole for its forward and backward
  (two layers at once with prefetch), and with one shard per parameter the gathered copy is kept from
  forward to backward (:func:`trnft.common.fsdp.parallel.reshard_after_forward`);
- **training state**: each trained parameter's gradient and two Adam moments (fp32), and LoRA's fp32
  weights;
- **activations** per token per decoder layer of a Llama-style block (hidden ``h``, MLP ``i``, query and
  K/V widths ``q`` and ``kv``), in the compute dtype: ``6h + 4q + 3kv + 4i`` with nothing recomputed (the
  norms' inputs and outputs, q/k/v before and after RoPE, the attention output, the MLP's four
  intermediates); LoRA dropout above 0 adds each target's dropped input and its mask. This is within 3-4 % of
  the 193 KiB/token (dropout 0) and 301 KiB/token (dropout 0.05) per layer measured for Llama-3.1-8B shapes
  in bf16 (over, not under). ``selective`` keeps about half of that (every other matmul's output and the attention output),
  ``full`` one hidden state per layer plus one layer's activations while it is recomputed;
- **logits**: the micro-batch's fp32 logits and their gradient (split over tp with loss parallelism); with
  the chunked loss (``fsdp.chunked_loss``), one chunk's logits in the compute dtype and fp32, and their
  gradient.

The budget is the device's memory less a margin (:data:`MARGIN_FRACTION` of it and :data:`MARGIN_BYTES`
for the runtime, the allocator's fragmentation and what the estimate leaves out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30
MARGIN_FRACTION = 0.10
MARGIN_BYTES = 2 * GIB
ORDER = ("off", "selective", "full")  # cheapest in compute first


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of the model (from its config and its parameter counts)."""

    layers: int
    hidden: int
    intermediate: int
    query_width: int  # attention heads x head dim
    kv_width: int  # K/V heads x head dim
    vocab: int
    base_parameters: int  # every parameter of the base model
    largest_layer_parameters: int
    trained_parameters: int
    lora_targets_per_layer: tuple[str, ...]  # the projections LoRA wraps (empty for full fine-tuning)


@dataclass(frozen=True)
class RankSetup:
    """How one rank trains: its split and its batch."""

    tp: int
    shard_ranks: int  # FSDP2's shards per parameter (data-parallel ranks, per replica group under HSDP)
    micro_batch: int
    sequence: int
    base_bytes: int  # bytes per element of the frozen base (model.dtype); 4 for full fine-tuning
    activation_bytes: int  # 2 in bf16, 4 in fp32
    lora_dropout: float
    loss_parallel: bool
    loss_chunk_tokens: int | None = None  # fsdp.chunked_loss: tokens whose logits exist at once; None: all


@dataclass(frozen=True)
class RecomputePlan:
    """The choice and the estimate behind it (peak bytes of one rank per mode)."""

    choice: str
    configured: str
    device_bytes: int | None
    budget_bytes: int | None
    peak_bytes: dict[str, int]

    def summary(self) -> str:
        estimates = ", ".join(f"{mode} {self.peak_bytes[mode] / GIB:.1f}" for mode in ORDER)
        budget = f" of {self.budget_bytes / GIB:.1f} GiB usable" if self.budget_bytes else ""
        how = "auto" if self.configured == "auto" else "as configured"
        return f"activation checkpointing {self.choice} ({how}; estimated GiB per rank: {estimates}{budget})"

    def to_json(self) -> dict[str, Any]:
        return {
            "choice": self.choice,
            "configured": self.configured,
            "device_gib": round(self.device_bytes / GIB, 2) if self.device_bytes else None,
            "budget_gib": round(self.budget_bytes / GIB, 2) if self.budget_bytes else None,
            "estimated_peak_gib": {mode: round(b / GIB, 2) for mode, b in self.peak_bytes.items()},
        }


def activation_bytes_per_token_layer(shape: ModelShape, rank: RankSetup, mode: str) -> float:
    """Activation bytes one token keeps in one decoder layer on one rank (tensor parallelism splits the
    attention and MLP widths; the hidden state is whole on every rank)."""
    h, tp = shape.hidden, rank.tp
    q, kv, i = shape.query_width / tp, shape.kv_width / tp, shape.intermediate / tp
    kept = (6 * h + 4 * q + 3 * kv + 4 * i) * rank.activation_bytes
    if rank.lora_dropout > 0:
        widths = {
            "q_proj": h,
            "k_proj": h,
            "v_proj": h,
            "o_proj": q,
            "gate_proj": h,
            "up_proj": h,
            "down_proj": i,
        }
        dropped = sum(widths.get(t, h) for t in shape.lora_targets_per_layer)
        kept += dropped * (rank.activation_bytes + 1)  # the dropped input and its boolean mask
    if mode == "off":
        return kept
    if mode == "selective":
        return kept / 2
    return h * rank.activation_bytes  # full: the layer's input only


def peak_bytes(shape: ModelShape, rank: RankSetup, mode: str) -> int:
    """One rank's estimated peak during a step with recompute ``mode``."""
    split = rank.tp * rank.shard_ranks
    base = shape.base_parameters * rank.base_bytes / split
    gathered_layers = 2 if rank.shard_ranks > 1 else shape.layers  # prefetch, or kept whole (one shard)
    gathered = shape.largest_layer_parameters * rank.base_bytes / rank.tp * gathered_layers
    # Gradient and Adam moments in fp32; LoRA's own fp32 weights too (a full fine-tune's trained weights
    # are the base, counted above).
    per_trained = 4 + 8 + (4 if shape.lora_targets_per_layer else 0)
    trained = shape.trained_parameters * per_trained / split
    tokens = rank.micro_batch * rank.sequence
    activations = tokens * shape.layers * activation_bytes_per_token_layer(shape, rank, mode)
    if mode == "full":  # one layer's activations while it is recomputed
        activations += tokens * activation_bytes_per_token_layer(shape, rank, "off")
    vocab = shape.vocab / (rank.tp if rank.loss_parallel else 1)
    if rank.loss_chunk_tokens:  # one chunk's logits in the compute dtype, in fp32, and their gradient
        logits = min(tokens, rank.loss_chunk_tokens) * vocab * (rank.activation_bytes + 4 * 2)
    else:
        logits = tokens * vocab * 4 * 2
    return int(base + gathered + trained + activations + logits)


def plan(configured: str, shape: ModelShape, rank: RankSetup, device_bytes: int | None) -> RecomputePlan:
    """The recompute mode: ``configured`` when it is not ``auto``; else the first of off, selective, full
    whose estimate fits the budget (``full`` when none does, or when the device's memory is unknown)."""
    peaks = {mode: peak_bytes(shape, rank, mode) for mode in ORDER}
    budget = None
    if device_bytes:
        budget = int(device_bytes * (1 - MARGIN_FRACTION) - MARGIN_BYTES)
    if configured != "auto":
        choice = configured
    elif budget is None:
        choice = "full"
    else:
        choice = next((mode for mode in ORDER if peaks[mode] <= budget), "full")
    return RecomputePlan(choice, configured, device_bytes, budget, peaks)


def shape_of(model: Any, config: Any, layers: list[Any], lora_targets: list[str]) -> ModelShape:
    """The estimate's view of a (meta-device) model: its config's widths and its parameter counts."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max(sum(p.numel() for n, p in layer.named_parameters() if "lora_" not in n) for layer in layers)
    return ModelShape(
        layers=len(layers),
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        query_width=heads * head_dim,
        kv_width=kv_heads * head_dim,
        vocab=text.vocab_size,
        base_parameters=base,
        largest_layer_parameters=largest,
        trained_parameters=trained,
        lora_targets_per_layer=tuple(lora_targets),
    )


def host_memory_bytes() -> int:
    """Physical memory of this machine (what a CPU run has)."""
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
