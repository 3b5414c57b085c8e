"""Which model families each trainer takes, in one table: what the FSDP2 trainer (``gpu``, ``neuron-native``)
and the trn1 XLA path (``neuron``) do with a ``model_type``, and what they refuse, in one line naming it.

Read from the model folder's ``config.json`` (``model_type``), never through transformers, so the same
answer comes on both dependency lines (transformers 4.57.1 does not know this year's families).

- The FSDP2 trainer is generic: it shards any decoder that declares its layer class
  (``_no_split_modules``) and splits the projections it knows by name for tensor parallelism
  (:mod:`trnft.common.training.tensor_parallel`); :data:`TESTED` lists the families CI runs through every
  stage. It refuses mixture-of-experts models (experts would be replicated on every rank and LoRA would
  not reach them) and hybrid recurrent/linear-attention families (packed rows would carry recurrent state
  from one document into the next).
- The trn1 line trains through optimum-neuron 0.4.5's own model classes, which exist for
  :data:`TRN1_FAMILIES` only (optimum/neuron/models/training/auto_models.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# Families every stage runs on in CI, on the FSDP2 platforms (tests/gpu/test_families.py), with the LoRA
# targets its projections have (q/k/v/o attention, gate/up/down MLP) and the first transformers release
# that has it.
TESTED: Mapping[str, str] = {
    "llama": "transformers 4",
    "qwen3": "transformers 4",
    "mistral": "transformers 4",
    "ministral3": "transformers 5",
    "gemma4_text": "transformers 5",
}
DENSE_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# optimum-neuron 0.4.5 registers training models for these model types only.
TRN1_FAMILIES = ("llama", "granite", "qwen3")

# Families the FSDP2 trainer refuses by name, with why.
_MOE = (
    "a mixture-of-experts model (its experts would be replicated on every rank and LoRA would not reach them)"
)
_RECURRENT = (
    "a hybrid recurrent / linear-attention model (packed training rows would carry its recurrent state from "
    "one document into the next)"
)
_MOE_FAMILIES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_5_moe", "qwen3_vl_moe", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "deepseek_v4", "dbrx", "granitemoe", "granitemoeshared", "jamba", "olmoe", "phimoe",
    "minimax", "minimax_m2", "glm4_moe", "glm4_moe_lite", "llama4", "gpt_oss", "mistral4", "ernie4_5_moe",
    "hunyuan_v1_moe", "lfm2_moe", "cohere2_moe", "exaone_moe", "afmoe", "bailing_moe", "kimi_k25",
)  # fmt: skip
_RECURRENT_FAMILIES = (
    "qwen3_5", "qwen3_5_text", "qwen3_next", "kimi_linear", "nemotron_h", "olmo_hybrid", "granitemoehybrid",
    "falcon_h1", "mamba", "mamba2", "recurrent_gemma", "bailing_hybrid", "lfm2", "zamba", "zamba2",
)  # fmt: skip
REFUSED: Mapping[str, str] = {
    **dict.fromkeys(_MOE_FAMILIES, _MOE),
    **dict.fromkeys(_RECURRENT_FAMILIES, _RECURRENT),
}
# Config keys that make any family, listed or not, a mixture of experts when they are set.
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def model_type_of(model_dir: str | Path) -> tuple[str | None, dict[str, Any]]:
    """``(model_type, config)`` of a local model folder; ``(None, {})`` where there is no readable
    ``config.json`` (a hub id: the train stage, which loads the model, checks again)."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    return config.get("model_type"), {**config, **(text or {})}


def _experts(config: Mapping[str, Any]) -> str | None:
    if config.get("enable_moe_block"):
        return "enable_moe_block=true"
    for key in _EXPERT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 1:
            return f"{key}={value}"
    return None


def check_fsdp_family(model_dir: str | Path) -> None:
    """Refuse a family the FSDP2 trainer cannot train (one line naming it); others pass."""
    model_type, config = model_type_of(model_dir)
    if model_type is None:
        return
    reason = REFUSED.get(model_type)
    experts = _experts(config)
    if reason is None and experts is not None:
        reason = f"a mixture-of-experts model ({experts} in its config.json)"
    if reason is not None:
        raise ConfigError(
            f"model.name_or_path: {model_dir} is {model_type!r}, {reason}; trnft does not train it yet. "
            f"Pick a dense model (tested: {', '.join(TESTED)})"
        )


def check_trn1_family(model_dir: str | Path) -> None:
    """Refuse on ``model.platform: neuron`` a family optimum-neuron 0.4.5 has no training model for."""
    model_type, _ = model_type_of(model_dir)
    if model_type is None or model_type in TRN1_FAMILIES:
        return
    raise ConfigError(
        f"model.name_or_path: {model_dir} is {model_type!r}, which the trn1 line (optimum-neuron 0.4.5) cannot "
        f"train (it has {', '.join(TRN1_FAMILIES)}); use model.platform: neuron-native on trn2/trn3 or "
        "model.platform: gpu"
    )
