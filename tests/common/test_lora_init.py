"""Every trainer starts from one adapter: LoRA A drawn by tensor name from train.seed, a fused layer's A
by its first projection's name (the name the rehearsal's tied A carries)."""

from __future__ import annotations

import torch

from trnft.common.config.run_config import config_from_dict
from trnft.common.training.lora import apply_lora, lora_init, lora_seed_name, seed_lora_a

FUSED = {"gate_up_proj": ("gate_proj", "up_proj"), "qkv_proj": ("q_proj", "k_proj", "v_proj")}


def test_a_fused_layers_tensor_is_drawn_by_its_first_projections_name():
    fused = "base_model.model.model.layers.3.mlp.gate_up_proj.lora_A.default.weight"
    assert (
        lora_seed_name(fused, FUSED) == "base_model.model.model.layers.3.mlp.gate_proj.lora_A.default.weight"
    )
    qkv = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.default.weight"
    assert (
        lora_seed_name(qkv, FUSED) == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    )
    plain = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.default.weight"
    assert lora_seed_name(plain, FUSED) == plain
    assert lora_seed_name(fused, {}) == fused  # a layout with nothing fused


def test_the_rehearsals_tied_a_is_the_matrix_the_fused_layer_draws(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    cfg = config_from_dict(
        {
            "run": {"name": "t", "root": str(tmp_path / "r")},
            "model": {"name_or_path": str(tmp_path / "m")},
            "dataset": {"name": "a/b"},
            "lora": {"r": 4, "target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"]},
        }
    )
    model = apply_lora(
        AutoModelForCausalLM.from_config(config), cfg, cfg.lora.target_modules, [("gate_proj", "up_proj")]
    )
    assert seed_lora_a(model, 7) == 3  # q, the tied gate/up A (once), down
    mlp = model.base_model.model.model.layers[0].mlp
    fused_name = "base_model.model.model.layers.0.mlp.gate_up_proj.lora_A.default.weight"
    drawn = lora_init(lora_seed_name(fused_name, FUSED), (4, 32), 7)
    assert mlp.up_proj.lora_A["default"].weight is mlp.gate_proj.lora_A["default"].weight
    assert torch.equal(mlp.gate_proj.lora_A["default"].weight, drawn)
    assert not torch.equal(
        lora_init(lora_seed_name(fused_name, FUSED), (4, 32), 8), drawn
    )  # the seed matters
