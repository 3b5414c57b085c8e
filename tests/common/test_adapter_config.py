"""One reading of rank_pattern/alpha_pattern, equal to PEFT's own lookup."""

from __future__ import annotations

import json
import math

import pytest
from peft.utils.other import get_pattern_key

from trnft.common.config.adapter_config import LoraSettings, module_of, pattern_key

pytestmark = pytest.mark.both_lines  # shared code whose libraries differ between the lines

PATTERNS = {"q_proj": 4, r"layers\.1\.mlp\.down_proj": 32, "model.layers.0.self_attn.v_proj": 2}
MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.10.self_attn.v_proj",
    "model.layers.0.self_attn.k_proj",
    "model.embed_tokens",
]


@pytest.mark.parametrize("module", MODULES)
def test_pattern_lookup_is_peft_s(module):
    peft_key = get_pattern_key(list(PATTERNS), module)
    ours = pattern_key(PATTERNS, module)
    assert (ours if ours is not None else module) == peft_key


def test_rank_alpha_and_scale_per_module():
    settings = LoraSettings.from_config(
        {
            "r": 16,
            "lora_alpha": 32,
            "rank_pattern": PATTERNS,
            "alpha_pattern": {"q_proj": 8},
            "use_rslora": True,
        }
    )
    assert settings.rank("model.layers.3.self_attn.q_proj") == 4
    assert settings.alpha("model.layers.3.self_attn.q_proj") == 8.0
    assert settings.scale("model.layers.3.self_attn.q_proj") == pytest.approx(8 / math.sqrt(4))
    assert settings.rank("model.layers.0.mlp.up_proj") == 16
    assert settings.scale("model.layers.0.mlp.up_proj") == pytest.approx(32 / math.sqrt(16))
    assert settings.largest_rank() == 32
    plain = LoraSettings.from_config({"r": 8, "lora_alpha": 16})
    assert plain.scale("x.q_proj") == 2.0


@pytest.mark.parametrize(
    ("tensor", "module"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj"),
        ("base_model.model.model.embed_tokens.lora_embedding_B", "model.embed_tokens"),
        ("model.layers.1.mlp.down_proj.lora_B.default.weight", "model.layers.1.mlp.down_proj"),
    ],
)
def test_module_of_a_tensor(tensor, module):
    assert module_of(tensor) == module


# Source: peft 0.21.2, src/peft/tuners/lora/config.py (LoraConfig's fields that 0.17.0 does not have).
PEFT_0_21_ADDED = {
    "alora_invocation_tokens", "arrow_config", "ensure_weight_tying", "kasa_config", "lora_ga_config",
    "monteclora_config", "use_bdlora", "velora_config",
}  # fmt: skip


def test_the_known_keys_are_exactly_the_two_lines_lora_config_fields():
    """The table is PEFT 0.17's fields plus 0.21's additions: this line's LoraConfig has exactly its share."""
    import dataclasses

    import peft
    from peft import LoraConfig

    from trnft.common.config.adapter_config import PEFT_LORA_KEYS

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    if peft.__version__.startswith("0.17."):
        # 0.17's save_pretrained writes peft_version although it is not a field there.
        fields, expected = fields | {"peft_version"}, PEFT_LORA_KEYS - PEFT_0_21_ADDED
    else:
        expected = PEFT_LORA_KEYS
    assert fields == expected, (peft.__version__, fields ^ expected)


def test_the_known_keys_are_peft_lora_configs_fields(tmp_path):
    """Every field PEFT's LoraConfig writes is known; anything else is reported as ignored, by name."""
    import dataclasses

    from peft import LoraConfig

    from trnft.common.config.adapter_config import PEFT_LORA_KEYS, read_adapter_config

    assert {f.name for f in dataclasses.fields(LoraConfig)} <= PEFT_LORA_KEYS
    LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    said: list[str] = []
    assert read_adapter_config(tmp_path, said.append)["r"] == 4 and said == []
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "lora_alhpa": 64}))
    read_adapter_config(tmp_path, said.append)
    assert said == [
        f"warning: {tmp_path}/adapter_config.json: ignoring keys that are not PEFT LoRA settings: lora_alhpa"
    ]


def test_every_lora_config_field_has_a_merge_rule_and_unknown_keys_are_refused(tmp_path):
    """Each field of this line's LoraConfig (PEFT 0.17 or 0.21) is in exactly one of the merge's tables; a key in none (a future
    option, a misspelling) stops the merge naming it, and so does a structural option that is switched on."""
    import dataclasses

    from peft import LoraConfig

    from trnft.common.config.adapter_config import (
        MERGE_HARMLESS,
        MERGE_ONLY_OFF,
        MERGE_USES,
        check_merge_settings,
    )
    from trnft.common.errors import TrnftError

    tables = [MERGE_USES, MERGE_HARMLESS, set(MERGE_ONLY_OFF)]
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert fields <= set().union(*tables)
    assert all(not (a & b) for i, a in enumerate(tables) for b in tables[i + 1 :])
    LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    check_merge_settings(written, tmp_path / "adapter_config.json")  # what PEFT writes merges
    for extra, words in (
        ({"use_ortho_lora": True}, "'use_ortho_lora' is not a LoRA setting this merge knows"),
        ({"lora_alhpa": 64}, "'lora_alhpa' is not a LoRA setting"),
        ({"layer_replication": [[0, 2]]}, "layer_replication is set (layers duplicated by PEFT)"),
        ({"trainable_token_indices": [5]}, "trainable_token_indices is set"),
    ):
        with pytest.raises(TrnftError, match=words.replace("(", r"\(").replace(")", r"\)")):
            check_merge_settings({**written, **extra}, tmp_path / "adapter_config.json")


def test_peft_s_own_lora_dropout_default_is_zero_the_setting_the_readme_calls_fast():
    """README ("LoRA dropout 0 is the fast setting", PEFT's own default) and the GPU example rely on it:
    peft 0.21.2, peft/tuners/lora/config.py ``LoraConfig.lora_dropout = 0.0``. trnft's schema default stays
    0.05 (it is in existing runs' train fingerprints)."""
    from peft import LoraConfig

    from trnft.common.config.run_config import LoraSection

    assert LoraConfig().lora_dropout == 0.0
    assert LoraSection().dropout == 0.05
