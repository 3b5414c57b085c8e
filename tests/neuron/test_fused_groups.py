"""Fused LoRA groups of the trn1 path (optimum-neuron 0.4.5 NEW modeling, NEURON_FORMAT.md 2.4), refused at
config time in one line, and pipeline parallelism refused until a pipeline run has executed."""

from __future__ import annotations

import pytest

from trnft.common.errors import ConfigError
from trnft.neuron.fused_groups import check, qkv_fusion_reason

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    ("kv_heads", "tp", "fuse_qkv", "fused"),
    [
        (8, 8, False, False),  # Llama-3.1-8B at tp 8: k/v split evenly, separate q/k/v
        (8, 32, False, True),  # fewer kv heads than ranks: NxD's GQA QKV layer
        (8, 16, False, True),
        (4, 3, False, True),  # 3 does not divide 4
        (32, 8, True, True),  # fuse_qkv on
        (2, 1, False, False),  # tp 1: never fused without fuse_qkv (why the refusal was invisible there)
    ],
)
def test_when_q_k_v_are_one_module(kv_heads, tp, fuse_qkv, fused):
    assert (qkv_fusion_reason(kv_heads, tp, fuse_qkv) is not None) is fused


def test_every_full_list_and_every_unfused_subset_passes():
    check(ALL, 8, 32, False)
    check(["q_proj", "v_proj", "gate_proj", "up_proj"], 8, 8, False)  # q/k/v separate at tp 8
    check(["o_proj", "down_proj"], 8, 32, False)  # no member of a fused group named


@pytest.mark.parametrize(
    ("targets", "kv_heads", "tp", "fuse_qkv", "message"),
    [
        (
            ["q_proj", "v_proj"],
            8,
            32,
            False,
            "lora.target_modules: names q_proj, v_proj but not k_proj; on the Trainium path they are one "
            "module qkv_proj (the model's 8 key/value heads are fewer than neuron.tp=32 (NxD's GQA QKV "
            "layer)), which LoRA adapts as a whole: add k_proj or remove q_proj, v_proj",
        ),
        (["q_proj"], 32, 8, True, "one module qkv_proj (neuron.fuse_qkv is on)"),
        (["k_proj"], 4, 3, False, "neuron.tp=3 does not divide the model's 4 key/value heads"),
        (["gate_proj"], 8, 1, False, "add up_proj or remove gate_proj"),
        (["up_proj", "q_proj"], None, 8, False, "optimum-neuron always fuses gate_proj and up_proj"),
    ],
)
def test_part_of_a_fused_group_is_one_line_naming_it(targets, kv_heads, tp, fuse_qkv, message):
    with pytest.raises(ConfigError) as err:
        check(targets, kv_heads, tp, fuse_qkv)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["neuron.pp=2", "neuron.tp=1"],
            "neuron.pp: 2 (pipeline parallelism) has never run end to end on this path",
        ),
        (["lora.target_modules=[gate_proj,q_proj,k_proj,v_proj]"], "add up_proj or remove gate_proj"),
        # the tiny Llama has 2 key/value heads: at neuron.tp=4 (8 CPU devices) q/k/v are one module
        (
            ["neuron.tp=4", "neuron.cpu_devices=8", "lora.target_modules=[q_proj,v_proj]"],
            "fewer than neuron.tp=4",
        ),
    ],
)
def test_every_stage_refuses_before_it_runs(make_run, overrides, message):
    run = make_run()
    for stage in ("tokenize", "compile", "train"):
        proc = run.stage(stage, *overrides)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
