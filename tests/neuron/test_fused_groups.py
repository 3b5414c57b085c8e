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
            "module qkv_proj (the model's 8 key/value heads are fewer than parallel.tp=32: NxD's GQA QKV "
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
            ["parallel.pp=2", "parallel.tp=1"],
            "parallel.pp: 2 (pipeline parallelism) has never run end to end on this path",
        ),
        (["lora.target_modules=[gate_proj,q_proj,k_proj,v_proj]"], "add up_proj or remove gate_proj"),
        # the tiny Llama has 2 key/value heads: at parallel.tp=4 (8 CPU devices) q/k/v are one module
        (
            ["parallel.tp=4", "neuron.cpu_devices=8", "lora.target_modules=[q_proj,v_proj]"],
            "fewer than parallel.tp=4",
        ),
        # fused q/k/v on NxD's GQA layer with a frozen base: NxD 0.15's backward fails (qkv_linear_utils.py)
        (
            ["parallel.tp=4", "neuron.cpu_devices=8", "neuron.fuse_qkv=true"],
            "neuron.fuse_qkv: LoRA keeps the base frozen",
        ),
        # 2 KV heads copied twice on trn2, where NxD's copy groups do not match optimum-neuron's loading
        (
            ["parallel.tp=4", "neuron.cpu_devices=8", "cluster.instance_type=trn2.48xlarge"],
            "parallel.tp: 4 on trn2 copies each of the model's 2 key/value heads 2 times",
        ),
    ],
)
def test_every_stage_refuses_before_it_runs(make_run, overrides, message, capsys):
    """Through the CLI's entry function, in this process (the refusal comes before any stage starts a
    process or imports a trainer; tests/test_exits.py covers what a separate process exits with)."""
    from trnft.common import cli

    run = make_run()
    before = sorted(p.name for p in run.root.iterdir())
    for stage in ("tokenize", "compile", "train"):
        code = cli.main([stage, "--config", str(run.config), *overrides])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert sorted(p.name for p in run.root.iterdir()) == before  # nothing written


def test_fused_qkv_is_refused_only_where_nxd_fails():
    from trnft.neuron.fused_groups import check_frozen_fused_gqa

    with pytest.raises(ConfigError, match=r"saved_tensors\[:1\]"):
        check_frozen_fused_gqa(_layout(LLAMA_8B, 16, fuse_qkv=True), lora=True)
    check_frozen_fused_gqa(_layout(LLAMA_8B, 16, fuse_qkv=True), lora=False)  # full fine-tuning trains it
    check_frozen_fused_gqa(_layout(LLAMA_8B, 16, fuse_qkv=False), lora=True)  # unfused GQA weights train
    check_frozen_fused_gqa(_layout(MHA, 8, fuse_qkv=True), lora=True)  # fused MHA is a plain column layer


# -- KV-head copies: trn1's repeat rule and trn2's repeat_interleave rule, at 2 KV heads and tp 4 ----------


def test_kv_copies_of_several_heads_are_refused_on_trn2_only():
    from trnft.neuron.fused_groups import check_kv_copies_on_target

    two_kv = ModelDims(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=96, layers=2)
    one_kv = ModelDims(hidden=64, heads=4, kv_heads=1, head_dim=16, intermediate=128, vocab=96, layers=2)
    with pytest.raises(ConfigError, match=r"parallel\.tp: 4 on trn2 copies each of the model's 2 key/value"):
        check_kv_copies_on_target(_layout(two_kv, 4), "trn2")
    check_kv_copies_on_target(_layout(two_kv, 4), "trn1")  # the rule optimum-neuron loads with
    check_kv_copies_on_target(_layout(one_kv, 4), "trn2")  # one head: both rules give the same copies
    check_kv_copies_on_target(_layout(two_kv, 2), "trn2")  # no copies


KV_RULES = """
import json, torch
from neuronx_distributed.modules.qkv_linear import _replicate_heads
from neuronx_distributed.parallel_layers.parallel_state import arrange_kv_groups
from torch_neuronx.utils import get_platform_target

heads = torch.tensor([[0.0], [1.0]])  # two KV heads, one row each
local = [int(h) for h in _replicate_heads(heads, 2).flatten()]  # rank r holds local[r] at tp 4
loaded = [int(h) for h in heads.repeat(2, 1).flatten()]  # optimum-neuron's loading, every platform
groups = arrange_kv_groups(1, 4, 2, platform=get_platform_target())
print(json.dumps({"init": [[local[r] for r in g] for g in groups], "loaded": [[loaded[r] for r in g] for g in groups]}))
"""


@pytest.mark.parametrize(
    ("target", "loaded_groups"), [("trn1", [[0, 0], [1, 1]]), ("trn2", [[0, 1], [0, 1]])]
)
def test_the_doubles_kv_rules_at_two_kv_heads_and_tp4(target, loaded_groups):
    """NxD's own copies always sit in their kv-shared group (trn1 repeat + strided groups, trn2
    repeat_interleave + adjacent groups); the copies optimum-neuron loads (repeat) do so on trn1 only: on
    trn2 each group would sum K0's and K1's gradients, which is why trn2 is refused above. A double with the
    two rules swapped fails this test."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    doubles = Path(__file__).resolve().parents[1] / "neuron_sdk_doubles"
    env = {"PYTHONPATH": str(doubles), "NEURON_PLATFORM_TARGET_OVERRIDE": target, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", KV_RULES], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["init"] == [[0, 0], [1, 1]]  # NxD is consistent with itself on both targets
    assert found["loaded"] == loaded_groups
