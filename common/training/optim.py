"""Optimizer pieces both trainers share, so the same config trains the same way on either path.

- :func:`lr_at`: linear warmup then cosine decay to ``train.min_lr``. The first step already uses
  ``lr * 1/warmup`` (not 0), so no step is wasted and no step is a no-op.
- :func:`decay_groups`: AdamW weight decay on matrices only; biases, norms and other 1-D parameters
  get none (LoRA A/B are matrices and get it).
- :func:`global_batch` and its checks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..config.run_config import TrainSection
from ..errors import ConfigError


def lr_at(step: int, train: TrainSection) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    peak, floor = train.learning_rate, train.min_lr
    if train.warmup_steps and step < train.warmup_steps:
        return peak * (step + 1) / train.warmup_steps
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wants_decay(name: str, ndim: int) -> bool:
    """Matrices decay; biases, norm weights and other vectors do not."""
    return ndim >= 2 and not name.endswith(".bias")


def decay_groups(named_params: Iterable[tuple[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW parameter groups (with and without weight decay); empty groups are left out."""
    decay: list[Any] = []
    no_decay: list[Any] = []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        (decay if wants_decay(name, param.ndim) else no_decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def global_batch(train: TrainSection, data_parallel: int) -> int:
    """Sequences per optimizer step: micro batch x accumulation x data-parallel ranks.

    Raises ConfigError when ``train.global_batch_size`` is set and disagrees, naming the accumulation
    that would give it (or saying that none can).
    """
    if data_parallel < 1:
        raise ConfigError(f"data-parallel size must be >= 1, got {data_parallel}")
    per_pass = train.micro_batch_size * data_parallel
    actual = per_pass * train.gradient_accumulation_steps
    wanted = train.global_batch_size
    if wanted is not None and wanted != actual:
        where = (
            f"micro_batch_size {train.micro_batch_size} x {data_parallel} data-parallel rank(s) = {per_pass}"
        )
        if wanted % per_pass:
            raise ConfigError(
                f"train.global_batch_size: {wanted} is not a multiple of {where}, so no gradient accumulation "
                "gives it; change global_batch_size or micro_batch_size"
            )
        raise ConfigError(
            f"train.global_batch_size: {wanted} needs train.gradient_accumulation_steps={wanted // per_pass} "
            f"with {where}, got {train.gradient_accumulation_steps}"
        )
    return actual
