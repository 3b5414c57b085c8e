"""The one reading of PEFT's ``adapter_config.json`` LoRA settings: rank and alpha per module.

PEFT keys ``rank_pattern``/``alpha_pattern`` by regular expressions matched against the end of a module's
path (``peft.utils.other.get_pattern_key``: ``(.*\\.)?(<key>)$``, first matching key wins); everything
else takes ``r``/``lora_alpha``. Merge, both consolidators and evaluate's vLLM rank all ask this module.
Torch-free on purpose (merge and consolidate are).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ADAPTER_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


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
