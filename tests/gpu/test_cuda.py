"""The GPU trainer on one CUDA device: what a single-GPU machine can show without flash-attn or vLLM.

Each test compares the CUDA run with something independent of it: the same run on the CPU (the stage
started with ``CUDA_VISIBLE_DEVICES=""``), the uninterrupted run, or each packed sample alone. They are
``gpu``-marked and skip themselves without CUDA; ``benchmarks/gpu_check.sh`` runs them.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
from helpers import SHARDED_TRAIN, ok
from packed_rows import check_every_sample_alone, two_packed_rows

from trnft.common.fsdp import checkpoint as gpu_checkpoint
from trnft.common.fsdp.trainer import ShardedTrainFigures

pytestmark = pytest.mark.gpu

ON_CPU = {"CUDA_VISIBLE_DEVICES": ""}

STEPS = SHARDED_TRAIN


def _run(make_run, fsdp=None, **train):
    return make_run(
        platform="gpu", train={**STEPS, **train}, fsdp={"attn_implementation": "sdpa", **(fsdp or {})}
    )


def test_fp32_training_on_cuda_equals_training_on_the_cpu(make_run):
    """The device is a parameter of the trainer: fp32 on CUDA follows the CPU run step for step."""
    runs = {}
    for name, env in (("cuda", None), ("cpu", ON_CPU)):
        runs[name] = _run(make_run, bf16=False)
        ok(runs[name].stage("train", env=env))
    cuda, cpu = (runs[n].figures("train", ShardedTrainFigures) for n in ("cuda", "cpu"))
    assert (cuda.backend, cpu.backend) == ("fsdp2-cuda", "fsdp2-cpu")
    np.testing.assert_allclose(cuda.losses, cpu.losses, rtol=1e-3)
    np.testing.assert_allclose([v.loss for v in cuda.validation], [v.loss for v in cpu.validation], rtol=1e-3)
    assert cuda.trainable_parameters == cpu.trainable_parameters


def test_bf16_training_on_cuda_resumes_after_sigkill_like_the_uninterrupted_run(make_run):
    """bf16 autocast with activation checkpointing; a rank killed while saving step 6 resumes from 3."""
    whole = _run(make_run, bf16=True)
    ok(whole.stage("train"))
    broken = _run(make_run, bf16=True)
    killed = broken.stage("train", env={"TRNFT_FAULT": "kill-during-save:6"})
    # one device trains in the CLI's own process (killed: -9); under torchrun the launcher exits 137
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
    resumed = ok(broken.stage("train"))
    assert "resuming checkpoint-3 at step 3" in resumed.stdout
    a, b = whole.figures("train", ShardedTrainFigures), broken.figures("train", ShardedTrainFigures)
    assert a.backend == "fsdp2-cuda" and b.start_step == 3
    # CUDA's attention backward may sum in another order from run to run: equal to bf16 rounding.
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-2)
    for stage in ("consolidate", "merge"):
        ok(broken.stage(stage))


def test_every_packed_sample_sees_only_itself_under_cuda_sdpa(tiny_llama, tokenized):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").to("cuda").eval()
    check_every_sample_alone(model, two_packed_rows(tokenized, "cuda"), "sdpa", atol=1e-3)


def test_background_saves_on_cuda_hold_the_same_tensors_as_waiting_saves(make_run):
    """fsdp.async_checkpoint (the default) on the device's own torch: each checkpoint's shards are copied
    off the GPU while the next steps already run, so a copy that raced them would hold a later step's
    values. Every checkpoint of the background run equals the same step's checkpoint of a run that waited
    for each save (fp32: the two runs compute the same numbers)."""
    runs = {}
    for background in (True, False):
        runs[background] = run = _run(make_run, fsdp={"async_checkpoint": background})
        ok(run.stage("train"))
    steps = sorted(int(p.name.split("-")[1]) for p in (runs[True].root / "train").glob("checkpoint-*"))
    assert len(steps) >= 2, steps
    for step in steps:
        a, b = (
            dict(gpu_checkpoint.read_tensors(runs[flag].root / "train" / f"checkpoint-{step}"))
            for flag in (True, False)
        )
        assert a.keys() == b.keys() and a
        for name in a:
            assert np.array_equal(a[name].numpy(), b[name].numpy()), (step, name)
    a, b = (runs[flag].figures("train", ShardedTrainFigures) for flag in (True, False))
    assert a.backend == "fsdp2-cuda" and a.losses == b.losses
