"""Models of this year on the current line: tiny Ministral 3 and Gemma 4 (families only transformers 5 has)
through all six stages on the FSDP2 platforms (gpu and neuron-native, on the CPU), at tp 1 and tp 2; and the
family table's refusals (:mod:`trnft.common.training.families`)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import first_step_reference, ok

from trnft.common.errors import ConfigError
from trnft.common.fsdp.trainer import ShardedTrainFigures
from trnft.common.testing.fixtures import build_tiny_model
from trnft.common.training import families

SHORT = {"max_steps": 4, "save_steps": 4, "logging_steps": 1, "warmup_steps": 1, "micro_batch_size": 2}
# Each family on each platform, at tp 1 and tp 2 (the tp 1 runs take seconds in the test process).
CASES = [
    pytest.param("ministral3", "gpu", 2, id="ministral3-gpu-tp2"),
    pytest.param("ministral3", "neuron-native", 1, id="ministral3-neuron-native-tp1"),
    pytest.param("gemma4", "gpu", 1, id="gemma4-gpu-tp1"),
    pytest.param("gemma4", "neuron-native", 2, id="gemma4-neuron-native-tp2"),
]


@pytest.mark.slow  # four runs of six stages
@pytest.mark.parametrize(("family", "platform", "tp"), CASES)
def test_a_family_of_this_year_runs_every_stage(make_run, tmp_path, family, platform, tp):
    """First step = a plain transformers forward of the base (1e-5); the merged model's logits = PEFT's
    merge of the consolidated adapter (1e-5); evaluate completes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(tmp_path / family, family)
    run = make_run(model=model, platform=platform, train=SHORT, parallel={"tp": tp}, fsdp={"devices": tp})
    for stage in ("tokenize", "compile", "train", "consolidate", "merge", "evaluate"):
        ok(run.stage(stage))
    figures = run.figures("train", ShardedTrainFigures)
    assert figures.tp == tp
    first = figures.losses[0]
    reference = first_step_reference(run, model)
    assert abs(first - reference) < 1e-5, (first, reference)

    base = AutoModelForCausalLM.from_pretrained(model)
    peft_merged = PeftModel.from_pretrained(base, run.root / "consolidate").merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(run.root / "merge")
    ids = torch.arange(5, 45).reshape(2, -1)
    with torch.no_grad():
        theirs, ours = peft_merged(ids).logits, merged(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert json.loads((run.root / "merge" / "config.json").read_text())["model_type"] == (
        "gemma4_text" if family == "gemma4" else family
    )
    assert run.manifest("evaluate")["status"] == "complete"


def _write_config(folder, **config):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"model_type": "qwen3_moe", "num_experts": 128}, "'qwen3_moe', a mixture-of-experts model"),
        ({"model_type": "qwen3_5", "text_config": {"layer_types": ["linear_attention"]}}, "hybrid recurrent"),
        ({"model_type": "my_new_moe", "n_routed_experts": 64}, "(n_routed_experts=64 in its config.json)"),
        (
            {"model_type": "gemma4_text", "enable_moe_block": True},
            "(enable_moe_block=true in its config.json)",
        ),
    ],
)
def test_the_fsdp2_trainer_refuses_what_it_cannot_train_in_one_line(tmp_path, config, words):
    folder = _write_config(tmp_path / "m", **config)
    with pytest.raises(ConfigError) as err:
        families.check_fsdp_family(folder)
    assert words in str(err.value) and str(err.value).startswith("model.name_or_path:")
    assert "\n" not in str(err.value)


def test_dense_families_pass_and_an_unreadable_config_is_left_to_the_train_stage(tmp_path):
    for model_type in ("llama", "ministral3", "gemma4_text", "gpt2"):
        families.check_fsdp_family(_write_config(tmp_path / model_type, model_type=model_type))
    families.check_fsdp_family("meta-llama/Llama-3.1-8B")  # a hub id: checked where it is loaded


def test_the_trn1_line_refuses_a_family_optimum_neuron_cannot_train(tmp_path):
    for model_type in families.TRN1_FAMILIES:
        families.check_trn1_family(_write_config(tmp_path / model_type, model_type=model_type))
    with pytest.raises(
        ConfigError, match=r"'gemma4_text', which the trn1 line \(optimum-neuron 0.4.5\) cannot"
    ):
        families.check_trn1_family(_write_config(tmp_path / "g", model_type="gemma4_text"))


def test_every_stage_refuses_a_this_year_family_on_the_trn1_platform_before_it_runs(
    make_run, tmp_path, capsys
):
    from trnft.common import cli

    model = build_tiny_model(tmp_path / "ministral3", "ministral3")
    run = make_run(model=model)  # the smoke config's platform: neuron (trn1)
    for stage in ("tokenize", "train"):
        assert cli.main([stage, "--config", str(run.config)]) == 2
        err = capsys.readouterr().err
        assert "'ministral3', which the trn1 line" in err and "model.platform: neuron-native" in err
        assert err.count("\n") == 1
    assert not (run.root / "tokenize").exists()
