"""The per-NeuronCore memory estimate of the trn1 path, and the one-line refusal of a layout that cannot fit."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from trnft.common.cluster.instances import instance
from trnft.common.config.run_config import config_from_dict
from trnft.common.errors import ConfigError
from trnft.neuron.memory import check, estimate

# Llama-3.1-8B's shapes (its config.json): 32 layers, hidden 4096, MLP 14336, 32 heads, 8 KV heads.
LLAMA_8B = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
)  # fmt: skip


def _cfg(**sections):
    raw = {
        "run": {"name": "m", "root": "/fsx/runs/m"},
        "model": {"name_or_path": "meta-llama/Llama-3.1-8B", "dtype": "bfloat16"},
        "dataset": {"name": "x/y", "max_seq_length": 2048, "packing": False},
        "train": {"bf16": True, "micro_batch_size": 1},
        "parallel": {"tp": 8},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def test_the_shipped_8b_lora_layout_fits_a_trn1_neuron_core():
    found = estimate(_cfg(), LLAMA_8B, instance("trn1.32xlarge"))
    assert found.hbm_gib == 16  # 32 GiB per chip, 2 NeuronCores
    # 8.03 B parameters in bf16 over 8 ranks: about 1.9 GiB of weights per core
    assert 1.8 < found.weights_gib < 2.0
    assert found.fits() and found.total_gib < 4


def test_trn2_cores_at_lnc_2_hold_24_gib():
    assert instance("trn2.48xlarge").neuron_core_memory_gib(2) == 24
    assert instance("trn2.48xlarge").neuron_core_memory_gib(1) == 12
    assert instance("trn1.32xlarge").neuron_core_memory_gib(2) == 16  # LNC is trn2/trn3 only


def test_recomputation_is_what_lets_long_sequences_fit():
    long = {"dataset": {"max_seq_length": 16384}, "parallel": {"tp": 8}, "neuron": {"attention": "eager"}}
    on = estimate(_cfg(**long), LLAMA_8B, instance("trn1.32xlarge"))
    off = estimate(
        _cfg(**long, train={"activation_checkpointing": "off"}), LLAMA_8B, instance("trn1.32xlarge")
    )
    assert on.fits() and not off.fits() and off.activations_gib > 10 * on.activations_gib
    with pytest.raises(ConfigError) as err:
        check(_cfg(**long, train={"activation_checkpointing": "off"}), LLAMA_8B, instance("trn1.32xlarge"))
    line = str(err.value)
    assert (
        line.startswith("parallel.tp: the layout needs about")
        and "a trn1.32xlarge NeuronCore has 16 GiB" in line
    )
    assert "set train.activation_checkpointing=full" in line and "\n" not in line


def test_full_fine_tuning_of_8b_on_one_core_is_refused_with_what_to_change():
    cfg = _cfg(lora={"enabled": False}, parallel={"tp": 1})
    with pytest.raises(ConfigError) as err:
        check(cfg, LLAMA_8B, instance("trn1.32xlarge"))
    assert "raise parallel.tp (now 1)" in str(err.value) and "or train LoRA" in str(err.value)


def test_every_stage_refuses_it_before_running(make_run, tmp_path):
    """neuron.backend=trainium reads the model config at config time (a local folder suffices)."""
    model = tmp_path / "llama-8b-config-only"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**LLAMA_8B.to_dict(), "model_type": "llama"}))
    run = make_run(model=model, parallel={"tp": 1}, neuron={"backend": "trainium"}, lora={"enabled": False})
    proc = run.stage("tokenize", env={"TRNFT_TRAINIUM_REHEARSAL": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "GiB per NeuronCore" in lines[0], proc.stderr
    assert not (run.root / "tokenize").exists()
