"""Which LoRA targets optimum-neuron fuses into one module on the trn1 path, checked before any stage runs.

optimum-neuron 0.4.5's training models (NEW custom modeling, NEURON_FORMAT.md section 2.4) build:

- ``gate_up_proj``: gate_proj and up_proj as one column-parallel layer, always;
- ``qkv_proj``: q_proj, k_proj and v_proj as one module when ``neuron.fuse_qkv`` is on, or when NxD's GQA
  QKV layer is used because the key/value heads do not split over the tensor-parallel ranks
  (``kv_heads < tp`` or ``kv_heads % tp != 0``).

LoRA adapts such a module as a whole, so a target list that names only some members of a fused group fails
inside optimum-neuron at model build (invisible at tp = 1 for q/k/v). :func:`check` refuses it first, in
one line naming the group, why it is fused at this tp and the modules to add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trnft.common.errors import ConfigError


@dataclass(frozen=True)
class FusedGroup:
    module: str  # the fused module optimum-neuron builds
    members: tuple[str, ...]  # the Hugging Face projections it holds


GATE_UP = FusedGroup("gate_up_proj", ("gate_proj", "up_proj"))
QKV = FusedGroup("qkv_proj", ("q_proj", "k_proj", "v_proj"))


def qkv_fusion_reason(kv_heads: int | None, tp: int, fuse_qkv: bool) -> str | None:
    """Why q/k/v are one module at this layout (None: they stay separate)."""
    if fuse_qkv:
        return "neuron.fuse_qkv is on"
    if kv_heads is None:
        return None
    if kv_heads < tp:
        return f"the model's {kv_heads} key/value heads are fewer than neuron.tp={tp} (NxD's GQA QKV layer)"
    if kv_heads % tp:
        return f"neuron.tp={tp} does not divide the model's {kv_heads} key/value heads (NxD's GQA QKV layer)"
    return None


def fused_groups(kv_heads: int | None, tp: int, fuse_qkv: bool) -> list[tuple[FusedGroup, str]]:
    """The fused groups of this layout, each with why it is fused."""
    groups = [(GATE_UP, "optimum-neuron always fuses gate_proj and up_proj")]
    reason = qkv_fusion_reason(kv_heads, tp, fuse_qkv)
    if reason is not None:
        groups.append((QKV, reason))
    return groups


def check(targets: Sequence[str], kv_heads: int | None, tp: int, fuse_qkv: bool) -> None:
    """Refuse a target list that names part of a fused group.

    ``kv_heads`` None (the model config could not be read here): only the always-fused groups are checked.

    Raises:
        ConfigError: naming the group, the reason, and the modules to add.
    """
    wanted = set(targets)
    for group, reason in fused_groups(kv_heads, tp, fuse_qkv):
        named = [m for m in group.members if m in wanted]
        missing = [m for m in group.members if m not in wanted]
        if named and missing:
            raise ConfigError(
                f"lora.target_modules: names {', '.join(named)} but not {', '.join(missing)}; on the Trainium "
                f"path they are one module {group.module} ({reason}), which LoRA adapts as a whole: add "
                f"{', '.join(missing)} or remove {', '.join(named)}"
            )
