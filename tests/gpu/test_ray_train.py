"""The train stage under Ray Train (``cluster.operator: rayjob``) on a real local Ray cluster the tests start:
two CPU workers over gloo, the ``gpu`` platform's FSDP2 trainer, against the same run under torchrun."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import SHARDED_TRAIN, Run, ok, smoke_raw

from trnft.common.fsdp import checkpoint as gpu_checkpoint
from trnft.common.fsdp.trainer import ShardedTrainFigures

pytestmark = pytest.mark.slow  # a Ray cluster and four two-rank runs

TRAIN = {**SHARDED_TRAIN, "gradient_accumulation_steps": 1}
# One thread per rank on both sides (torchrun's launcher and Ray both default to it on a 2-core machine,
# not on a bigger one), so the two runs sum in the same order.
THREADS = {"OMP_NUM_THREADS": "1"}
# The test's own throwaway cluster: no token auth, whatever ~/.ray/auth_token holds (Ray 2.60 turns token
# auth on for `ray start` when that file exists, e.g. left by any earlier local ray.init()).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster on this machine (4 logical CPUs: two workers and room for a restart), stopped
    after the module."""
    pytest.importorskip("ray", reason="Ray Train is the [ray] extra; the README's install has it")
    temp = tempfile.mkdtemp(prefix="/tmp/ray-")  # Ray's socket paths must stay short
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **THREADS, **RAY_ENV}
    start = [
        _ray_cli(), "start", "--head", f"--port={port}", "--num-cpus=4", "--num-gpus=0",
        "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([_ray_cli(), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _run(
    tmp_path: Path, tiny_llama: Path, tokenized: Path, name: str, platform: str = "gpu", **sections
) -> Run:
    root = tmp_path / name
    root.mkdir()
    shutil.copytree(tokenized, root / "tokenize")
    fsdp = {"devices": 2, **sections.pop("fsdp", {})}
    raw = smoke_raw(root, tiny_llama, train=TRAIN, **sections, platform=platform)
    raw.setdefault("fsdp", {}).update(fsdp)
    return Run(root, raw)


def _under_ray(run: Run, address: str, *args: str, env: dict[str, str] | None = None, stage: str = "train"):
    cmd = [sys.executable, "-m", "trnft.common.cli", "ray", stage, "--config", str(run.config), *args]
    full_env = {**os.environ, **THREADS, **RAY_ENV, "RAY_ADDRESS": address, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=900)


def _checkpoint_files(run: Run) -> list[str]:
    """Every file of the train stage's checkpoints, relative to the stage folder."""
    train = run.root / "train"
    return sorted(str(p.relative_to(train)) for p in train.glob("checkpoint-*/**/*") if p.is_file())


def _trained(run: Run, step: int) -> dict[str, torch.Tensor]:
    """The trained tensors of a checkpoint, read back in one process."""
    return dict(gpu_checkpoint.read_tensors(run.root / "train" / f"checkpoint-{step}"))


def _same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def under_torchrun(tmp_path_factory, tiny_llama, tokenized):
    run = _run(tmp_path_factory.mktemp("torchrun"), tiny_llama, tokenized, "run")
    ok(run.stage("train", env=THREADS))
    return run


def test_ray_train_equals_torchrun_step_for_step(
    ray_cluster, under_torchrun, tmp_path, tiny_llama, tokenized
):
    run = _run(tmp_path, tiny_llama, tokenized, "ray")
    done = _under_ray(run, ray_cluster, "--workers", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 Ray Train worker(s)" in done.stdout
    ours, theirs = (
        run.figures("train", ShardedTrainFigures),
        under_torchrun.figures("train", ShardedTrainFigures),
    )
    assert (ours.dp, ours.tp, run.manifest("train")["layout"]["world"]) == (2, 1, 2)
    assert len(ours.losses) == len(theirs.losses) == TRAIN["max_steps"]
    assert max(abs(a - b) for a, b in zip(ours.losses, theirs.losses)) <= 1e-6, (ours.losses, theirs.losses)
    assert _checkpoint_files(run) == _checkpoint_files(under_torchrun)
    for step in (3, 6):
        _same_tensors(_trained(run, step), _trained(under_torchrun, step))


def test_a_killed_worker_is_restarted_by_ray_and_the_run_ends_as_the_uninterrupted_one(
    ray_cluster, under_torchrun, tmp_path, tiny_llama, tokenized
):
    """Rank 0's Ray worker (it commits checkpoints) is SIGKILLed while checkpoint-6 is saved (checkpoint-3 is
    complete); Ray restarts the group, the stage resumes at step 3 and ends with the uninterrupted run's
    losses and files."""
    run = _run(tmp_path, tiny_llama, tokenized, "killed")
    marker = tmp_path / "killed-once"
    fault = {"TRNFT_FAULT": "kill-during-save:6", "TRNFT_FAULT_ONCE": str(marker)}
    done = _under_ray(run, ray_cluster, "--workers", "2", "--max-failures", "2", env=fault)
    assert done.returncode == 0, done.stderr[-4000:]
    assert marker.exists()  # the fault fired
    output = done.stdout + done.stderr
    assert "resuming checkpoint-3 at step 3" in output
    ours, theirs = (
        run.figures("train", ShardedTrainFigures),
        under_torchrun.figures("train", ShardedTrainFigures),
    )
    assert ours.start_step == 3 and ours.resumed_from == "checkpoint-3"
    assert len(ours.losses) == len(theirs.losses)  # the history travels with the checkpoint
    assert max(abs(a - b) for a, b in zip(ours.losses, theirs.losses)) <= 1e-6
    assert _checkpoint_files(run) == _checkpoint_files(under_torchrun)
    _same_tensors(_trained(run, 6), _trained(under_torchrun, 6))


def test_a_permanent_error_in_the_workers_is_not_retried(ray_cluster, tmp_path, tiny_llama, tokenized):
    """A LoRA target the model does not have is refused by each worker's pre-flight (exit 2); with a budget
    of 3 restarts the stage runs once, and the command exits 2 with the worker's line above its own."""
    run = _run(tmp_path, tiny_llama, tokenized, "bad", lora={"target_modules": ["no_such_proj"]})
    done = _under_ray(run, ray_cluster, "--workers", "2", "--max-failures", "3")
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-4000:])
    output = done.stdout + done.stderr
    assert "not retried" in done.stderr.splitlines()[-1], done.stderr[-2000:]
    # Ray restarts the group (its failure policy cannot tell a permanent error), but the restarted workers
    # find the recorded error and end at once: the stage itself ran only in the first group. (How many of
    # the first group's ranks print their refusal is a race: Ray stops the group when rank 0 fails.)
    first_group, _, restarted = output.partition("Started training worker group")[2].partition(
        "Started training worker group"
    )
    assert "error: lora.target_modules" in first_group, first_group[-3000:]
    assert "error: lora.target_modules" not in restarted and "train: step" not in output
    assert "(permanent) earlier in this run; the stage is not run again" in restarted, restarted[-3000:]
    assert not (run.root / "train").exists() or not list((run.root / "train").glob("checkpoint-*"))


def test_the_trn1_platform_is_refused_under_ray_in_one_line(tmp_path, tiny_llama):
    from trnft.common.cluster import ray_train
    from trnft.common.config.run_config import config_from_dict
    from trnft.common.errors import ConfigError

    cfg = config_from_dict(smoke_raw(tmp_path / "run", tiny_llama))
    assert cfg.model.platform == "neuron"
    with pytest.raises(ConfigError, match=r"model\.platform neuron"):
        ray_train.run("train", cfg, workers=2, per_worker={"CPU": 1})


@pytest.mark.extended  # the same comparison on the other platform and layout (beyond CI's budget)
def test_neuron_native_compile_and_tensor_parallel_train_under_ray_equal_torchrun(
    ray_cluster, tmp_path, tiny_llama, tokenized
):
    """neuron-native on the CPU at tp 2: the compile trial run and training as Ray Train workers, against the
    same stages started by trnft itself."""
    runs = {}
    for name in ("torchrun", "ray"):
        run = _run(tmp_path, tiny_llama, tokenized, name, platform="neuron-native", parallel={"tp": 2})
        if name == "torchrun":
            ok(run.stage("compile", env=THREADS))
            ok(run.stage("train", env=THREADS))
        else:
            for stage in ("compile", "train"):
                done = _under_ray(run, ray_cluster, "--workers", "2", stage=stage)
                assert done.returncode == 0, done.stderr[-4000:]
        runs[name] = run
    ours, theirs = (runs[n].figures("train", ShardedTrainFigures) for n in ("ray", "torchrun"))
    assert ours.tp == theirs.tp == 2
    assert max(abs(a - b) for a, b in zip(ours.losses, theirs.losses)) <= 1e-6, (ours.losses, theirs.losses)
    assert runs["ray"].manifest("compile")["status"] == "complete"
    assert _checkpoint_files(runs["ray"]) == _checkpoint_files(runs["torchrun"])
    _same_tensors(_trained(runs["ray"], 6), _trained(runs["torchrun"], 6))
