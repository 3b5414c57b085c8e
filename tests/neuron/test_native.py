"""The neuron-native platform on a machine without a Neuron device: the Lightning FSDP2 trainer on the CPU
over gloo, through the CLI as the pods run it.

What a Trainium 2/3 node adds (the Neuron accelerator, the ``neuron`` backend, the NEFF cache) is pinned in
``test_torchneuron_contract.py`` and exercised by the ``trainium``-marked test at the end, which skips here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHARDED_TRAIN, Run, first_step_reference, ok, smoke_raw

from trnft.common.env import has_neuron_device
from trnft.common.fsdp import checkpoint as fsdp_checkpoint
from trnft.common.fsdp.trainer import ShardedTrainFigures
from trnft.neuron.native.compile import NativeCompileFigures

NATIVE = "neuron-native"


def _native(make_run, **sections) -> Run:
    return make_run(platform=NATIVE, **sections)


def test_first_step_loss_equals_the_gpu_platform_and_a_plain_transformers_forward(make_run, tiny_llama):
    """The same data, model and seed: one first-step loss on both FSDP2 platforms, equal to the base model's
    loss on that batch by a plain transformers forward within 1e-5 (the XLA trainer's own comparison is in
    tests/neuron/test_train.py, on the trn1 line)."""
    common = {"max_steps": 2, "save_steps": 2, "warmup_steps": 1}
    native = _native(make_run, train=common)
    gpu = make_run(platform="gpu", train=common)
    for run in (native, gpu):
        ok(run.stage("train"))
    first_native = native.figures("train", ShardedTrainFigures)
    first_gpu = gpu.figures("train", ShardedTrainFigures).losses[0]
    reference = first_step_reference(native, tiny_llama)
    assert first_native.backend == "fsdp2-cpu" and first_native.graphs_compiled_after_first_step is None
    assert abs(first_native.losses[0] - reference) < 1e-5, (first_native.losses[0], reference)
    assert abs(first_gpu - reference) < 1e-5, (first_gpu, reference)
    assert native.manifest("train")["platform"] == NATIVE


def test_compile_is_a_trial_run_that_says_there_is_no_cache_on_cpu(make_run):
    run = _native(make_run, train={"compile_steps": 2, "eval_steps": 5})
    proc = ok(run.stage("compile"))
    fig = run.figures("compile", NativeCompileFigures)
    assert (fig.device, fig.trial_steps, fig.validated, fig.saved) == ("cpu", 2, True, True)
    assert fig.graphs_cached is None and "no compile cache to fill" in fig.summary()
    assert "trial run of 2 steps on cpu" in proc.stdout and "train: step 2/2" in proc.stdout
    assert "validation loss" in proc.stdout and "saved checkpoint-2" in proc.stdout
    assert not (run.root / "compile.trial").exists()  # the trial leaves nothing behind
    assert sorted(p.name for p in (run.root / "compile").iterdir()) == ["manifest.json"]


@pytest.mark.slow  # a 2-process torchrun trial run
def test_compile_as_the_pod_runs_it_under_torchrun_on_two_ranks(make_run):
    """The rendered TrainJob/PyTorchJob runs `trnft torchrun ... --module trnft.common.cli compile`: every rank
    runs the stage (rank 1 used to fail "staged stages run in one process"); rank 0 alone writes the output."""
    run = _native(make_run, train={"compile_steps": 2}, fsdp={"devices": 2})
    argv = ["torchrun", "--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
            "--rdzv_id=compile-test", "--module", "trnft.common.cli", "compile", "--config", str(run.config)]  # fmt: skip
    env = {**os.environ, "PJRT_DEVICE": "CPU", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "trnft.common.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = run.figures("compile", NativeCompileFigures)
    assert (fig.device, fig.trial_steps) == ("cpu", 2)
    assert not (run.root / "compile.trial").exists()
    assert sorted(p.name for p in (run.root / "compile").iterdir()) == ["manifest.json"]


# --------------------------------------------------------------------------------------------------
# Two ranks, resume


@pytest.fixture(scope="module")
def native_runs(tmp_path_factory, tiny_llama, tokenized):
    def make(name, **sections):
        root = tmp_path_factory.mktemp(name) / "run"
        root.mkdir()
        shutil.copytree(tokenized, root / "tokenize")
        return Run(root, smoke_raw(root, tiny_llama, **sections, platform=NATIVE))

    return make


def test_two_ranks_equal_one_rank_with_accumulation_and_resume_after_sigkill(native_runs):
    single = native_runs("native-1", train={**SHARDED_TRAIN, "gradient_accumulation_steps": 2})
    ok(single.stage("train"))
    two = native_runs(
        "native-2", train={**SHARDED_TRAIN, "gradient_accumulation_steps": 1}, fsdp={"devices": 2}
    )
    killed = two.stage("train", env={"TRNFT_FAULT": "kill-during-save:6"})
    assert killed.returncode == 137
    resumed = ok(two.stage("train"))
    assert "resuming checkpoint-3 at step 3" in resumed.stdout
    a, b = single.figures("train", ShardedTrainFigures), two.figures("train", ShardedTrainFigures)
    assert (a.dp, b.dp, b.start_step) == (1, 2, 3)
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-4, atol=1e-4)
    # and the resumed two-rank run equals the same two-rank run uninterrupted, bit for bit
    clean = native_runs(
        "native-2-clean", train={**SHARDED_TRAIN, "gradient_accumulation_steps": 1}, fsdp={"devices": 2}
    )
    ok(clean.stage("train"))
    assert clean.figures("train", ShardedTrainFigures).losses == b.losses
    ta = dict(fsdp_checkpoint.read_tensors(clean.root / "train" / "checkpoint-6"))
    tb = dict(fsdp_checkpoint.read_tensors(two.root / "train" / "checkpoint-6"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# --------------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, before anything is written


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["cluster.instance_type=trn1.32xlarge"],
            "cluster.instance_type: trn1.32xlarge cannot run model.platform neuron-native (native PyTorch on "
            "Neuron supports trn2 and trn3 only); use model.platform: neuron (the PyTorch/XLA path)",
        ),
        (["cluster.instance_type=p5.48xlarge"], "use model.platform: gpu for it"),
        (
            ["neuron.cpu_devices=2"],
            "neuron.cpu_devices: 2 is a setting of model.platform neuron (PyTorch/XLA)",
        ),
        (["parallel.pp=2"], "the FSDP2 trainer has no pipeline parallelism"),
        (["neuron.fuse_qkv=true"], "neuron.fuse_qkv: True is a setting of model.platform neuron"),
        (
            ["fsdp.attn_implementation=flash_attention_2"],
            "fsdp.attn_implementation: flash_attention_2 is CUDA's",
        ),
        (["fsdp.cpu_offload=true"], "fsdp.cpu_offload: FSDP2 CPU offload is not supported on neuron-native"),
    ],
)
def test_settings_it_cannot_honour_are_one_line_and_exit_2(make_run, overrides, message):
    run = _native(make_run)
    for stage in ("train", "compile"):
        proc = run.stage(stage, *overrides)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert message in lines[0], lines[0]
        assert not (run.root / stage).exists()


def test_the_jobspec_refuses_a_trn1_instance_in_one_line(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "llama31_8b_lora_trn2_native.yaml"
    cmd = [sys.executable, "-m", "trnft.common.cli", "jobspec", "--config", str(example)]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "out"), "cluster.instance_type=trn1n.32xlarge"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "use model.platform: neuron (the PyTorch/XLA path)" in proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# On a real Trainium 2/3 node


@pytest.mark.trainium
@pytest.mark.skipif(not has_neuron_device(), reason="needs a Neuron device (/dev/neuron*) and torch-neuronx")
def test_trains_on_neuron_cores_fills_the_cache_and_resumes(make_run, tmp_path):
    """On a trn2: compile fills the NEFF cache, training compiles nothing after step 1, resume is exact."""
    cache = tmp_path / "neff-cache"
    sections = {"train": {**SHARDED_TRAIN, "compile_steps": 3}, "fsdp": {"devices": 2}}
    run = _native(make_run, neuron={"cache_dir": str(cache)}, **sections)
    ok(run.stage("compile"))
    compiled = run.figures("compile", NativeCompileFigures)
    assert compiled.device == "neuron" and compiled.graphs_cached and compiled.graphs_cached > 0
    killed = run.stage("train", env={**os.environ, "TRNFT_FAULT": "kill-during-save:6"})
    assert killed.returncode == 137
    ok(run.stage("train", "train.on_recompile=fail"))
    fig = run.figures("train", ShardedTrainFigures)
    assert fig.backend == "fsdp2-neuron" and fig.graphs_compiled_after_first_step == 0
    assert json.loads((run.root / "train" / "manifest.json").read_text())["status"] == "complete"
