"""On a real trn1: tokenize, compile, train (SIGKILLed during a save, then resumed), consolidate, merge.

Needs a Neuron device (``/dev/neuron*``) and the Neuron SDK of the trnft image; skips itself elsewhere.
Run it inside the image built by ``containers/build-and-push.sh neuron`` on a trn1.2xlarge or trn1.32xlarge:

    python -m pytest -m trainium tests/e2e/test_trainium.py

A tiny Llama (hidden 64, 4 heads, 2 KV heads, 2 layers) trains with tensor parallelism 2 over the first two
NeuronCores, rows of 2048 tokens with NxD's flash attention, so the whole file takes minutes (mostly
neuronx-cc compiling the graphs once into the compile cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ok, smoke_raw, write_config

from trnft.neuron.compile import TrainiumCompileFigures
from trnft.neuron.trainium import TrainiumTrainFigures

pytestmark = [pytest.mark.trainium, pytest.mark.trn1]

TRAIN = {
    "max_steps": 8,
    "save_steps": 4,
    "logging_steps": 1,
    "micro_batch_size": 1,
    "gradient_accumulation_steps": 2,
    "warmup_steps": 2,
    "compile_steps": 3,
    "bf16": True,
    "keep_checkpoints": 3,
}


def _trnft(config: Path, stage: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trnft.common.cli", stage, "--config", str(config)]
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=3600
    )


def _train(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The train job's command on one node (trnft.common.launch.torchrun_argv with two processes)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "trnft.common.cli",
        "train",
        "--config",
        str(config),
    ]
    full = {**os.environ, "NEURON_RT_NUM_CORES": "2", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=3600)


def test_the_trainium_pipeline_with_a_kill_and_a_resume(tmp_path):
    from trnft.common.cluster.instances import instance
    from trnft.common.config.run_config import load_config
    from trnft.common.testing.fixtures import build_tiny_model
    from trnft.neuron import launch

    model = build_tiny_model(tmp_path / "base-model", "llama")
    root = tmp_path / "run"
    raw = smoke_raw(
        root,
        model,
        dataset={"packing": False, "max_seq_length": 2048},
        train=TRAIN,
        parallel={"tp": 2},
        neuron={"backend": "trainium", "attention": "flash", "cache_dir": str(tmp_path / "neuron_cache")},
        cluster={"instance_type": "trn1.2xlarge", "num_nodes": 1},
    )
    raw["model"]["dtype"] = "bfloat16"
    config = write_config(tmp_path / "run.yaml", raw)
    # As in the Kubernetes specs: compile and train see the same compiler flags and cache.
    os.environ["NEURON_CC_FLAGS"] = launch.neuron_cc_flags(
        load_config([str(config)], []), instance("trn1.2xlarge")
    )

    ok(_trnft(config, "tokenize"))
    ok(_trnft(config, "compile"))
    compiled = TrainiumCompileFigures.of(json.loads((root / "compile" / "manifest.json").read_text()))
    assert compiled.neff_files > 0

    killed = _train(config, env={"TRNFT_FAULT": "kill-during-save:8"})
    assert killed.returncode != 0
    assert (root / "train" / "checkpoint-4" / "trnft_state" / "state.json").is_file()
    resumed = ok(_train(config))
    assert "resuming from checkpoint-4 at step 4" in resumed.stdout
    figures = TrainiumTrainFigures.of(json.loads((root / "train" / "manifest.json").read_text()))
    assert figures.start_step == 4 and figures.final_checkpoint == "checkpoint-8"
    assert figures.optimum_neuron.tensor_parallel_size == 2

    ok(_trnft(config, "consolidate"))
    ok(_trnft(config, "merge"))
    merged = json.loads((root / "merge" / "manifest.json").read_text())
    assert merged["status"] == "complete"
