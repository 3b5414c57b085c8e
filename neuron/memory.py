"""Will a training layout fit a NeuronCore? A first-order estimate made before the trn1 path starts.

Per training process (one logical NeuronCore), in bytes:

- **weights**: every decoder projection, the embeddings and the LM head, split over ``parallel.tp`` (NxD
  shards all of them), in ``model.dtype``;
- **gradients and optimizer state** of the trained parameters, split over ``parallel.tp`` and not over data
  parallelism (ZeRO-1 is off): a gradient in the weight dtype and two Adam moments, fp32 (4 bytes each)
  for LoRA and for full fine-tuning in fp32, bf16 under optimum-neuron's full-bf16 mode;
- **activations** of one micro-batch (Korthikanti et al., "Reducing Activation Recomputation in Large
  Transformer Models", 2022, section 4: ``s·b·h·(10 + 24/t + 5·a·s/(h·t))`` bytes per layer in 16-bit
  without sequence parallelism; NxD's flash attention keeps no score matrix, so its last term drops out).
  With ``train.activation_checkpointing: full`` each layer keeps only its input (``2·s·b·h`` bytes) and
  one layer's activations exist at a time; the fp32 logits of the loss add ``4·s·b·V/t``.

The NeuronCore's HBM comes from the instance table (chip HBM / cores per chip x LNC). A layout whose
estimate exceeds :data:`USABLE_FRACTION` of it (the runtime, collectives buffers and compiler scratch use
the rest) is refused in one line with what to change. It is an estimate: a layout it passes can still run
out of memory (exit 3), one it refuses would at best run at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..common.cluster.instances import InstanceType
from ..common.config.run_config import RunConfig
from ..common.errors import ConfigError

GIB = 1024**3
USABLE_FRACTION = 0.9
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    optimizer_gib: float  # gradients + Adam moments of the trained parameters
    activations_gib: float
    hbm_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.optimizer_gib + self.activations_gib

    def fits(self) -> bool:
        return self.total_gib <= USABLE_FRACTION * self.hbm_gib


def projection_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of each decoder projection of a Llama-like config."""
    h, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    return {
        "q_proj": (h, heads * head_dim),
        "k_proj": (h, kv * head_dim),
        "v_proj": (h, kv * head_dim),
        "o_proj": (heads * head_dim, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def estimate(cfg: RunConfig, config: Any, inst: InstanceType) -> MemoryEstimate | None:
    """The per-NeuronCore estimate, or None where the instance table has no HBM figure."""
    hbm = inst.neuron_core_memory_gib(cfg.neuron.logical_nc_config)
    if hbm is None:
        return None
    tp = cfg.parallel.tp
    layers, h, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    shapes = projection_shapes(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    decoder = layers * sum(i * o for i, o in shapes.values())
    embeddings = vocab * h * (1 if tied else 2)
    weight_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    weights = (decoder + embeddings) * weight_bytes / tp
    if cfg.lora.enabled:
        r = cfg.lora.r
        trained = layers * sum(
            r * (shapes[t][0] + shapes[t][1]) for t in cfg.lora.target_modules if t in shapes
        )
        per_trained = 4 + 8  # fp32 gradient and two fp32 moments
    else:
        trained = decoder + embeddings
        state_bytes = 2 if cfg.train.bf16 else 4
        per_trained = weight_bytes + 2 * state_bytes
    optimizer = trained * per_trained / tp
    s, b = cfg.dataset.max_seq_length, cfg.train.micro_batch_size
    heads = config.num_attention_heads
    scores = 0.0 if cfg.neuron.attention == "flash" else 5 * heads * s / (h * tp)
    per_layer = s * b * h * (10 + 24 / tp + scores)
    if cfg.train.activation_checkpointing in ("full", "auto"):  # auto is full on this platform
        activations = layers * 2 * s * b * h + per_layer
    else:
        activations = layers * per_layer
    activations += 4 * s * b * vocab / tp
    return MemoryEstimate(weights / GIB, optimizer / GIB, activations / GIB, hbm)


def check(cfg: RunConfig, config: Any, inst: InstanceType) -> MemoryEstimate | None:
    """Refuse a layout whose estimate does not fit (ConfigError, one line naming what to change)."""
    found = estimate(cfg, config, inst)
    if found is None or found.fits():
        return found
    advice = []
    if cfg.train.activation_checkpointing not in ("full", "auto"):
        advice.append("set train.activation_checkpointing=full")
    advice.append(f"raise parallel.tp (now {cfg.parallel.tp})")
    advice.append("lower dataset.max_seq_length or train.micro_batch_size")
    if not cfg.lora.enabled:
        advice.append("or train LoRA (lora.enabled=true)")
    raise ConfigError(
        f"parallel.tp: the layout needs about {found.total_gib:.1f} GiB per NeuronCore (weights "
        f"{found.weights_gib:.1f}, gradients and optimizer {found.optimizer_gib:.1f}, activations "
        f"{found.activations_gib:.1f}) but a {inst.name} NeuronCore has {found.hbm_gib:.0f} GiB "
        f"({USABLE_FRACTION:.0%} usable); {', '.join(advice)}"
    )
