"""Fused LoRA groups of the trn1 path, refused at config time in one line from the one layout rule
(NeuronLayout, NEURON_FORMAT.md 2.4), and pipeline parallelism refused until a pipeline run has executed."""

from __future__ import annotations

import pytest

from trnft.common.errors import ConfigError
from trnft.neuron.fused_groups import check, fused_modules
from trnft.neuron.parallel_layout import ModelDims, NeuronLayout

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Llama-3.1-8B: 32 query heads, 8 key/value heads; an MHA model of the same width.
LLAMA_8B = ModelDims(
    hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256, layers=32
)
MHA = ModelDims(hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=14336, vocab=128256, layers=32)


def _layout(dims, tp, fuse_qkv=False):
    return NeuronLayout.for_model(dims, tp, fuse_qkv=fuse_qkv)


@pytest.mark.parametrize(
    ("dims", "tp", "fuse_qkv", "qkv_fused"),
    [
        (LLAMA_8B, 8, False, False),  # k/v split evenly: separate q/k/v
        (LLAMA_8B, 32, False, True),  # fewer kv heads than ranks: NxD's GQA QKV layer
        (LLAMA_8B, 16, False, True),
        (LLAMA_8B, 8, True, False),  # fuse_qkv fuses MHA models only
        (MHA, 8, True, True),
        (
            LLAMA_8B,
            1,
            False,
            False,
        ),  # tp 1: never fused without fuse_qkv (why the failure was invisible there)
    ],
)
def test_which_layouts_fuse_q_k_v(dims, tp, fuse_qkv, qkv_fused):
    modules = fused_modules(_layout(dims, tp, fuse_qkv))
    assert modules["gate_up_proj"] == ("gate_proj", "up_proj")
    assert ("qkv_proj" in modules) is qkv_fused


def test_full_lists_and_unfused_subsets_pass():
    check(ALL, _layout(LLAMA_8B, 32))
    check(["q_proj", "v_proj", "gate_proj", "up_proj"], _layout(LLAMA_8B, 8))
    check(["o_proj", "down_proj"], _layout(LLAMA_8B, 32))
    check(["q_proj"], None)  # no model config here: only the always-fused group is known


@pytest.mark.parametrize(
    ("targets", "layout", "message"),
    [
        (
            ["q_proj", "v_proj"],
            _layout(LLAMA_8B, 32),
            "lora.target_modules: names q_proj, v_proj but not k_proj; on the Trainium path they are one "
            "module qkv_proj (the model's 8 key/value heads are fewer than neuron.tp=32: NxD's GQA QKV "
            "layer), which LoRA adapts as a whole: add k_proj or remove q_proj, v_proj",
        ),
        (
            ["q_proj"],
            _layout(MHA, 8, True),
            "(neuron.fuse_qkv is on and the model has as many key/value heads",
        ),
        (["gate_proj"], _layout(LLAMA_8B, 1), "add up_proj or remove gate_proj"),
        (["up_proj", "q_proj"], None, "optimum-neuron always fuses gate_proj and up_proj"),
    ],
)
def test_part_of_a_fused_group_is_one_line_naming_it(targets, layout, message):
    with pytest.raises(ConfigError) as err:
        check(targets, layout)
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
        # fused q/k/v on NxD's GQA layer with a frozen base: NxD 0.15's backward fails (qkv_linear_utils.py)
        (
            ["neuron.tp=4", "neuron.cpu_devices=8", "neuron.fuse_qkv=true"],
            "neuron.fuse_qkv: LoRA keeps the base frozen",
        ),
    ],
)
def test_every_stage_refuses_before_it_runs(make_run, overrides, message):
    run = make_run()
    for stage in ("tokenize", "compile", "train"):
        proc = run.stage(stage, *overrides)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_fused_qkv_is_refused_only_where_nxd_fails():
    from trnft.neuron.fused_groups import check_frozen_fused_gqa

    with pytest.raises(ConfigError, match=r"saved_tensors\[:1\]"):
        check_frozen_fused_gqa(_layout(LLAMA_8B, 16, fuse_qkv=True), lora=True)
    check_frozen_fused_gqa(_layout(LLAMA_8B, 16, fuse_qkv=True), lora=False)  # full fine-tuning trains it
    check_frozen_fused_gqa(_layout(LLAMA_8B, 16, fuse_qkv=False), lora=True)  # unfused GQA weights train
    check_frozen_fused_gqa(_layout(MHA, 8, fuse_qkv=True), lora=True)  # fused MHA is a plain column layer
