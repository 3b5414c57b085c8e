"""Tiny models from real configs, a locally trained tokenizer, and the bundled dataset."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from trnft.common.testing.fixtures import TinyShape, build_tiny_model, bundled_dataset_path

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_tiny_models_load_and_run(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_model(tmp_path / family, family, shape=TinyShape(num_hidden_layers=1))
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == family
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert tok.pad_token_id != tok.eos_token_id and tok.bos_token_id not in (
        tok.pad_token_id,
        tok.eos_token_id,
    )
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    ids = tok("Reverse the order of the words. red owl apple fig", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    assert tok.decode(ids[0], skip_special_tokens=True) == "Reverse the order of the words. red owl apple fig"
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    a = load_file(build_tiny_model(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(build_tiny_model(tmp_path / "b", seed=3) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bundled_dataset_matches_its_generator():
    script = REPO / "examples" / "data" / "generate_tiny_instructions.py"
    module = runpy.run_path(str(script), run_name="not_main")
    expected = module["render"](module["generate"]())
    assert bundled_dataset_path().read_text() == expected
    rows = [json.loads(line) for line in expected.splitlines()]
    assert len(rows) >= 300
    assert set(rows[0]) == {"instruction", "context", "response", "category"}
    assert len({r["category"] for r in rows}) == 8
