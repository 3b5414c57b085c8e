"""The one reading of PEFT's ``adapter_config.json`` LoRA settings: rank and alpha per module.

PEFT keys ``rank_pattern``/``alpha_pattern`` by regular expressions matched against the end of a module's
path (``peft.utils.other.get_pattern_key``: ``(.*\\.)?(<key>)$``, first matching key wins); everything
else takes ``r``/``lora_alpha``. Merge, both consolidators and evaluate's vLLM rank all ask this module.
Torch-free on purpose (merge and consolidate are).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TrnftError

ADAPTER_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# The fields of LoraConfig in PEFT 0.17 (the trn1 line) and 0.21 (the current line), what PEFT itself writes;
# any other key is reported as ignored. The last row is 0.21's additions.
PEFT_LORA_KEYS = frozenset(
    {
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "eva_config",
        "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layer_replication",
        "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout",
        "megatron_config", "megatron_core", "modules_to_save", "peft_type", "qalora_group_size", "r",
        "rank_pattern", "revision", "runtime_config", "target_modules", "target_parameters", "task_type",
        "trainable_token_indices", "use_dora", "use_qalora", "use_rslora", "peft_version",
        "alora_invocation_tokens", "arrow_config", "ensure_weight_tying", "kasa_config", "lora_ga_config",
        "monteclora_config", "use_bdlora", "velora_config",
    }
)  # fmt: skip


# What the merge (W + scale * B @ A per module, from the tensors present) makes of each PEFT 0.17/0.21 LoraConfig
# field. Every field is in exactly one table (tests/common/test_adapter_config.py checks that against
# LoraConfig itself); a key in none of them is refused, so a future option that changes the math (as
# use_dora did) never merges silently.
MERGE_USES = frozenset(
    {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "modules_to_save",
     "bias", "lora_bias", "peft_type", "use_dora"}
)  # fmt: skip
# No effect on the merged weights: metadata, training-time or initialisation settings, and module selection
# (the tensors present say which modules were adapted).
MERGE_HARMLESS = frozenset(
    {"base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping", "peft_version",
     "init_lora_weights", "lora_dropout", "loftq_config", "eva_config", "corda_config", "target_modules",
     "exclude_modules", "layers_pattern", "layers_to_transform", "megatron_config", "megatron_core",
     "runtime_config", "qalora_group_size",
     # 0.21: LoRA-GA initialisation, VeLoRA's training-time activation compression, which tied weights
     # get the adapter (the tensors present say).
     "lora_ga_config", "velora_config", "ensure_weight_tying"}
)  # fmt: skip
# Change the model's structure or the update itself; merged only at their default ("off").
MERGE_ONLY_OFF = {
    "use_qalora": "quantization-aware LoRA",
    "layer_replication": "layers duplicated by PEFT",
    "target_parameters": "LoRA on bare parameters",
    "trainable_token_indices": "trained token embeddings",
    # PEFT 0.21: each changes when or how the update applies, beyond W + scale * B @ A.
    "alora_invocation_tokens": "activated LoRA (the update applies after invocation tokens only)",
    "arrow_config": "Arrow routing between several adapters",
    "kasa_config": "KaSA singular-value adaptation",
    "monteclora_config": "MonteCLoRA's sampled update",
    "use_bdlora": "block-diagonal LoRA",
}


def check_merge_settings(config: Mapping[str, Any], path: Path) -> None:
    """Refuse keys the merge does not know, and settings it cannot apply, naming the key."""
    unknown = sorted(set(config) - MERGE_USES - MERGE_HARMLESS - set(MERGE_ONLY_OFF))
    if unknown:
        raise TrnftError(
            f"{path}: {', '.join(repr(k) for k in unknown)} {'is' if len(unknown) == 1 else 'are'} not a LoRA "
            "setting this merge knows (PEFT 0.17/0.21's LoraConfig); it may change the math, so nothing is merged. "
            "Remove the key if you know it does not"
        )
    for key, what in MERGE_ONLY_OFF.items():
        if config.get(key) not in (None, False, [], {}):
            raise TrnftError(
                f"{path}: {key} is set ({what}); this merge cannot apply it, so nothing is merged"
            )


# Fields PEFT treats as sets (it builds target_modules from one, so its order in the file follows the
# writing process's string hashing); written sorted so that equal settings give equal bytes.
SET_VALUED_KEYS = ("target_modules", "modules_to_save", "exclude_modules", "target_parameters")


def adapter_config_text(config: Mapping[str, Any]) -> str:
    """``config`` as the text of an ``adapter_config.json``: keys and set-valued lists sorted.

    Consolidation output is compared by digest (staleness, reruns), so two runs with the same LoRA
    settings must write the same file whatever order the trainer's PEFT listed the modules in.
    """
    canonical = dict(config)
    for key in SET_VALUED_KEYS:
        value = canonical.get(key)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            canonical[key] = sorted(set(value))
    return json.dumps(canonical, indent=2, sort_keys=True) + "\n"


def read_adapter_config(folder: Path, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``<folder>/adapter_config.json`` as a dict; one line for a missing or unreadable file.

    Keys that are not PEFT LoRA settings are reported through ``log`` (they are ignored), so a misspelt
    ``lora_alpha`` does not silently fall back to PEFT's default.
    """
    path = Path(folder) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise TrnftError(
            f"{path}: missing; the adapter's LoRA settings (r, lora_alpha, targets) come from it"
        )
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrnftError(f"{path}: not valid JSON ({exc}); write it with PEFT's save_pretrained") from exc
    if not isinstance(config, dict):
        raise TrnftError(f"{path}: must hold a JSON object of LoRA settings, found {type(config).__name__}")
    unknown = sorted(set(config) - PEFT_LORA_KEYS)
    if unknown and log is not None:
        log(f"warning: {path}: ignoring keys that are not PEFT LoRA settings: {', '.join(unknown)}")
    return config


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` that matches the end of ``module`` (PEFT's rule), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_of(tensor_name: str) -> str:
    """The module path of a PEFT adapter tensor (``base_model.model.X.lora_A.weight`` -> ``X``)."""
    name = tensor_name.removeprefix(PEFT_PREFIX)
    m = re.search(r"\.lora_(?:embedding_)?[AB](?:\.|$)", name)
    return name[: m.start()] if m else name


@dataclass(frozen=True)
class LoraSettings:
    """Rank and scaling of every module of one LoRA adapter."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LoraSettings:
        """From an ``adapter_config.json`` dict (PEFT's defaults where a key is absent)."""
        return cls(
            r=int(config.get("r", 8)),
            lora_alpha=float(config.get("lora_alpha", 8)),
            use_rslora=bool(config.get("use_rslora", False)),
            rank_pattern={k: int(v) for k, v in (config.get("rank_pattern") or {}).items()},
            alpha_pattern={k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
        )

    def rank(self, module: str) -> int:
        key = pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scale(self, module: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r = self.rank(module)
        return self.alpha(module) / (math.sqrt(r) if self.use_rslora else r)

    def largest_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])
