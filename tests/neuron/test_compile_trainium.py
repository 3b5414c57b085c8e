"""The Trainium compile stage in the pods of a multi-node PyTorchJob.

``neuron_parallel_compile`` ships only in the Neuron SDK; a stand-in on PATH records the command and
environment it was started with and exits with a chosen code. Everything else (the stage machinery, the
worker/master split, the command and environment) is trnft's real code, run as ``trnft compile``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import ok

from trnft.neuron.compile import TrainiumCompileFigures

pytestmark = pytest.mark.trn1  # the trn1 line (tests/trn1_line.sh)

FAKE_TOOL = """#!/usr/bin/env python3
import json, os, sys
record = {"argv": sys.argv[1:], "NEURON_CC_FLAGS": os.environ.get("NEURON_CC_FLAGS"),
          "config": open(sys.argv[sys.argv.index("--config") + 1]).read()}
with open(os.environ["FAKE_NPC_RECORD"], "w") as fh:
    json.dump(record, fh)
sys.exit(int(os.environ.get("FAKE_NPC_EXIT", "0")))
"""


@pytest.fixture
def parallel_compile_tool(tmp_path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "neuron_parallel_compile"
    tool.write_text(FAKE_TOOL)
    tool.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_NPC_RECORD": str(tmp_path / "record.json"),
        "TRNFT_TRAINIUM_REHEARSAL": "1",  # no Neuron device and no SDK here: skip the device check and preflight
    }


def _pod_env(rank: int) -> dict[str, str]:
    """What the training operator sets in the pods of a 2-node PyTorchJob."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "run-compile-master-0",
        "MASTER_PORT": "23456",
        "TRNFT_JOB_NAME": "smoke-compile",
    }


def _two_node_run(make_run):
    # The shared tokenized fixture is packed, so these runs use the attention that keeps packing.
    # tp 4: the tiny Llama's 4 attention heads split over it (a tp that cannot split the model is refused)
    return make_run(
        parallel={"tp": 4}, neuron={"backend": "trainium", "attention": "eager"}, cluster={"num_nodes": 2}
    )


def test_a_worker_pod_traces_its_graphs_and_writes_no_stage_output(make_run, parallel_compile_tool):
    run = _two_node_run(make_run)
    proc = ok(run.stage("compile", env={**parallel_compile_tool, **_pod_env(1)}))
    assert "worker rank 1 traced its graphs" in proc.stdout
    record = json.loads(Path(parallel_compile_tool["FAKE_NPC_RECORD"]).read_text())
    argv = record["argv"]
    assert argv[:4] == ["trnft", "torchrun", "--nnodes=2", "--nproc_per_node=32"]
    assert "--rdzv_endpoint=run-compile-master-0:23456" in argv and "--rdzv_id=smoke-compile" in argv
    assert argv[-4:-1] == ["--module", "trnft.neuron.precompile", "--config"]
    assert "backend: trainium" in record["config"]
    assert f"--cache_dir={run.root}/neuron_cache" in record["NEURON_CC_FLAGS"]
    assert not (run.root / "compile").exists()
    assert not list(run.root.glob("compile*")), list(run.root.iterdir())  # no staging folder either


def test_the_master_pod_writes_the_stage_output(make_run, parallel_compile_tool):
    run = _two_node_run(make_run)
    ok(run.stage("compile", env={**parallel_compile_tool, **_pod_env(0)}))
    manifest = run.manifest("compile")
    assert TrainiumCompileFigures.of(manifest).command[0] == "neuron_parallel_compile"
    assert manifest["layout"] == {"tp": 4, "pp": 1, "dp": 16, "world": 64}


def test_master_and_workers_run_the_same_command(make_run, parallel_compile_tool):
    run = _two_node_run(make_run)
    record = Path(parallel_compile_tool["FAKE_NPC_RECORD"])
    commands = []
    for rank in (0, 1):
        ok(run.stage("compile", "--force", env={**parallel_compile_tool, **_pod_env(rank)}))
        argv = json.loads(record.read_text())["argv"]
        commands.append(argv[:-1])  # all but the node-local config path
    assert commands[0] == commands[1]


@pytest.mark.parametrize("code", [3, 137], ids=["permanent", "retryable"])
def test_a_worker_fails_in_one_line_when_the_tool_fails(make_run, parallel_compile_tool, code):
    """The tool's exit code reaches the cluster unchanged, so its class (1-127 permanent, 128+ retryable)
    decides whether the compile job is restarted."""
    run = _two_node_run(make_run)
    proc = run.stage("compile", env={**parallel_compile_tool, **_pod_env(1), "FAKE_NPC_EXIT": str(code)})
    assert proc.returncode == code
    assert proc.stderr.strip().splitlines()[-1] == (
        f"trnft compile: error: compile: neuron_parallel_compile exited with {code}; see its log above"
    )


def test_a_setting_training_would_refuse_stops_compile_before_the_tool_runs(make_run, parallel_compile_tool):
    run = _two_node_run(make_run)
    proc = run.stage("compile", "neuron.attention=flash", env={**parallel_compile_tool, **_pod_env(0)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("trnft compile: error: dataset.packing:")
    assert not Path(parallel_compile_tool["FAKE_NPC_RECORD"]).exists()
    assert not (run.root / "compile").exists()


def test_a_worker_refuses_without_tokenize(make_run, parallel_compile_tool):
    run = _two_node_run(make_run)
    shutil.rmtree(run.root / "tokenize")
    proc = run.stage("compile", env={**parallel_compile_tool, **_pod_env(1)})
    assert proc.returncode == 1
    assert "compile needs a complete tokenize stage" in proc.stderr
    assert not Path(parallel_compile_tool["FAKE_NPC_RECORD"]).exists()
