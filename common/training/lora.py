"""LoRA set-up shared by both trainers: target checks, the PEFT config, tied LoRA A of fused layers."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from ..config.run_config import RunConfig
from ..errors import ConfigError

ADAPTER = "default"


def _linear_types() -> tuple[type, ...]:
    """Layer types LoRA can target: torch Linear and transformers' Conv1D (GPT-2 style, [in, out] weights)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def linear_names(model: Any) -> list[str]:
    """Leaf names of the model's linear layers (``q_proj``, ``c_attn``, ``lm_head``, ...), sorted."""
    types = _linear_types()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, types)})


def stores_weights_transposed(model: Any, targets: Sequence[str]) -> bool:
    """Whether the targets are Conv1D layers (PEFT's ``fan_in_fan_out``)."""
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, m in model.named_modules()
    )


def check_targets(model: Any, targets: Sequence[str], rank: int | None = None) -> None:
    """Every target must name a Linear layer of the model (by its leaf name); with ``rank``, the rank must not
    exceed the smaller side of any targeted layer (B·A of rank r over a d-wide side has rank at most d: the
    extra rank only costs memory, and a typo like 512 for 16 trained, consolidated and merged silently)."""
    available = linear_names(model)
    for target in targets:
        if target not in available:
            raise ConfigError(
                f"lora.target_modules: {target!r} is not a linear layer of {type(model).__name__}; "
                f"its linear layers are: {', '.join(available)}"
            )
    if rank is None:
        return
    types = _linear_types()
    for name, module in model.named_modules():
        if isinstance(module, types) and name.rsplit(".", 1)[-1] in targets:
            side = min(module.weight.shape[-2:])  # type: ignore[attr-defined]  # Linear or Conv1D
            if rank > side:
                raise ConfigError(
                    f"lora.r: {rank} is larger than {name.rsplit('.', 1)[-1]}'s smaller side ({side}); a rank above "
                    f"min(in, out) adds nothing; use lora.r <= {side}"
                )


def peft_config(cfg: RunConfig, targets: Sequence[str], *, fan_in_fan_out: bool = False) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        fan_in_fan_out=fan_in_fan_out,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=sorted(targets),
        use_rslora=cfg.lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def tie_lora_a(model: Any, groups: Sequence[Sequence[str]], adapter: str = ADAPTER) -> int:
    """Make the projections of each group share one LoRA A parameter; returns how many were tied.

    On Trainium a fused layer (``gate_up_proj``, a GQA ``qkv_proj``) has one LoRA A for all its parts, so
    the CPU rehearsal trains the same model: A is shared, each part keeps its own LoRA B.
    """
    from peft.tuners.lora import LoraLayer

    tied = 0
    for _, parent in model.named_modules():
        for group in groups:
            members = [getattr(parent, name, None) for name in group]
            if not all(isinstance(m, LoraLayer) and adapter in m.lora_A for m in members):
                continue
            shared = members[0].lora_A[adapter].weight
            for member in members[1:]:
                member.lora_A[adapter].weight = shared
                tied += 1
    return tied


def apply_lora(
    model: Any, cfg: RunConfig, targets: Sequence[str], tie_groups: Sequence[Sequence[str]] = ()
) -> Any:
    """Wrap ``model`` with a PEFT LoRA adapter (fp32 adapter weights) and tie fused groups' LoRA A."""
    from peft import get_peft_model

    check_targets(model, targets, cfg.lora.r)
    config = peft_config(cfg, targets, fan_in_fan_out=stores_weights_transposed(model, targets))
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    if tie_groups:
        tie_lora_a(peft_model, tie_groups)
    return peft_model


def seed_lora_a(model: Any, seed: int) -> int:
    """Draw every LoRA A of a whole (unsharded) PEFT model from :func:`lora_init` by its own name, as the
    sharded trainers draw theirs. A tied A (:func:`tie_lora_a`) is one parameter, listed once under its
    group's first member, so it is drawn by that name. Returns how many were drawn."""
    import torch

    drawn = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.copy_(lora_init(name, tuple(param.shape), seed).to(param.dtype))
                drawn += 1
    return drawn


def lora_seed_name(fqn: str, fused: Mapping[str, Sequence[str]]) -> str:
    """The name a LoRA tensor's initial value is drawn by (:func:`lora_init`): its own name, except that
    a fused layer's module (``fused``: fused module -> its Hugging Face projections, e.g. ``gate_up_proj``
    -> gate_proj, up_proj) is replaced by its first projection. That is the name the unfused model gives
    the same shared LoRA A (the CPU-XLA rehearsal ties a group's A to its first member), so optimum-neuron's
    fused model and the rehearsal start from one adapter."""
    return ".".join(fused[part][0] if part in fused else part for part in fqn.split("."))


def lora_init(fqn: str, shape: tuple[int, ...], seed: int) -> Any:
    """PEFT's default LoRA init, drawn from a generator seeded by the run seed and the tensor's name.

    lora_A: kaiming-uniform (a = sqrt(5)), lora_B: zeros, so training starts at the base model. The same
    name gives the same tensor in any layout (one process, data or tensor parallel).
    """
    import torch

    if ".lora_B." in fqn or ".lora_embedding_B." in fqn:
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(fqn.encode()))
    fan_in = shape[1]
    bound = 1.0 / (fan_in**0.5)  # kaiming_uniform with a = sqrt(5): gain^2 = 2 / 6
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)
