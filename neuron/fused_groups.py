"""LoRA targets that name part of a layer optimum-neuron fuses, refused before any stage runs (trn1 path).

Which projections are one module comes from the one layout rule, :class:`trnft.neuron.parallel_layout.
NeuronLayout` (optimum-neuron 0.4.5's NEW custom modeling, NEURON_FORMAT.md section 2.4):

- ``gate_up_proj``: gate_proj and up_proj, always;
- ``qkv_proj``: q_proj, k_proj and v_proj under NxD's GQA QKV layer (the key/value heads do not split over
  the tensor-parallel ranks: ``kv_heads < tp`` or ``kv_heads % tp != 0``), or with ``neuron.fuse_qkv`` on a
  model with as many key/value heads as query heads.

LoRA adapts such a module as a whole, so a target list that names only some members fails inside
optimum-neuron at model build (for q/k/v, invisible at tp = 1). :func:`check` says so first, in one line
naming the group, why it is fused at this layout and the modules to add.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..common.errors import ConfigError
from .parallel_layout import GATE_UP, NeuronLayout


def why_fused(module: str, layout: NeuronLayout | None) -> str:
    if module == "gate_up_proj":
        return "optimum-neuron always fuses gate_proj and up_proj"
    assert layout is not None
    kv, tp = layout.dims.kv_heads, layout.tp
    if layout.attention == "gqa":
        if kv < tp:
            return f"the model's {kv} key/value heads are fewer than parallel.tp={tp}: NxD's GQA QKV layer"
        return f"parallel.tp={tp} does not divide the model's {kv} key/value heads: NxD's GQA QKV layer"
    return "neuron.fuse_qkv is on and the model has as many key/value heads as query heads"


def fused_modules(layout: NeuronLayout | None) -> dict[str, tuple[str, ...]]:
    """Fused module -> its projections; without a layout (no model config here) the always-fused ones."""
    return layout.fused_modules() if layout is not None else {"gate_up_proj": GATE_UP}


def check(targets: Sequence[str], layout: NeuronLayout | None) -> None:
    """Refuse a target list that names part of a fused module.

    Raises:
        ConfigError: naming the module, why it is fused, and the projections to add.
    """
    wanted = set(targets)
    for module, members in fused_modules(layout).items():
        named = [m for m in members if m in wanted]
        missing = [m for m in members if m not in wanted]
        if named and missing:
            raise ConfigError(
                f"lora.target_modules: names {', '.join(named)} but not {', '.join(missing)}; on the Trainium "
                f"path they are one module {module} ({why_fused(module, layout)}), which LoRA adapts as a "
                f"whole: add {', '.join(missing)} or remove {', '.join(named)}"
            )


def check_frozen_fused_gqa(layout: NeuronLayout | None, lora: bool) -> None:
    """Refuse ``neuron.fuse_qkv`` on NxD's GQA QKV layer when its weight is frozen (LoRA).

    NxD 0.15's GQA QKV backward, when the weight takes no gradient, reads the fused weight as
    ``weight_qkv = ctx.saved_tensors[:1]`` (a tuple) and multiplies with it, which fails
    (neuronx-distributed v2.26.0 ``modules/qkv_linear_utils.py`` ``_qkvlinear_autograd_base_setup_bwd``,
    unchanged at v2.27.0 and v2.28.0). Unfused q/k/v weights take the other branch and train.

    Raises:
        ConfigError: naming neuron.fuse_qkv, the layout and what to set.
    """
    if not lora or layout is None or not layout.fuse_qkv or layout.attention != "gqa":
        return
    raise ConfigError(
        f"neuron.fuse_qkv: LoRA keeps the base frozen, and with {why_fused('qkv_proj', layout)} NxD 0.15's "
        "fused QKV backward fails on a frozen weight (qkv_linear_utils.py reads ctx.saved_tensors[:1], a "
        "tuple); set neuron.fuse_qkv=false (separate q/k/v weights train the same adapter)"
    )


def check_kv_copies_on_target(layout: NeuronLayout | None, target: str | None) -> None:
    """Refuse NxD's GQA layer with copies of more than one KV head on a trn2/trn3 target.

    NxD keeps the copies of a KV head in sync by summing their gradients over a kv-shared group, arranged
    per platform: on trn1 every ``tp / multiplier``-th rank (copies made with ``repeat``: K0 K1 K0 K1), on
    trn2 adjacent ranks (``repeat_interleave``: K0 K0 K1 K1) (neuronx-distributed v2.26.0
    ``parallel_layers/parallel_state.py`` ``arrange_kv_groups``, ``modules/qkv_linear.py``
    ``_initialize_affine_weight``). optimum-neuron 0.4.5 loads the copies with ``repeat`` on every platform
    (``transformations_utils.py`` ``create_kv_proj_local_weight_from_regular_weight``) and trnft consolidates
    that layout, so on trn2 a group would sum the gradients of different heads. With one KV head, or one
    copy, the two rules agree.

    Raises:
        ConfigError: naming the layout, why, and what to use instead.
    """
    if layout is None or target in (None, "trn1") or layout.attention != "gqa":
        return
    if layout.kv_multiplier <= 1 or layout.dims.kv_heads <= 1:
        return
    raise ConfigError(
        f"parallel.tp: {layout.tp} on {target} copies each of the model's {layout.dims.kv_heads} key/value heads "
        f"{layout.kv_multiplier} times in NxD's GQA layer, whose {target} copy groups (adjacent ranks) do not "
        "match the layout optimum-neuron 0.4.5 loads on every platform (repeat: K0 K1 K0 K1), so different "
        f"heads' gradients would be summed; use model.platform: neuron-native on {target}, or "
        f"parallel.tp <= {layout.dims.kv_heads}"
    )
