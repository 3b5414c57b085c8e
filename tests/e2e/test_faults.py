"""Every stage SIGKILLed at three points, then rerun, gives what an uninterrupted run gives.

The whole matrix (18 cases, about 25 minutes on 2 cores) runs with ``python -m pytest -m faults``; the
cheap stages' cases are also marked ``slow``, so CI's slow run covers kill-and-rerun of a staged stage.

One uninterrupted pipeline (the gpu platform's FSDP2 trainer on the CPU, tiny: the current line's default
path; the XLA path's kill-and-resume has its own tests on the trn1 line) is the reference. For each stage and kill point, a fresh run
directory gets the reference's finished upstream stages, ``trnft <stage>`` is killed there with
``TRNFT_FAULT=kill-during-<where>`` (SIGKILL: no cleanup runs), and the rerun must complete with the
reference's output: the same output digest where the stage is deterministic, the same checkpoint files for
train, the same predictions for evaluate.
"""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import Run, ok, smoke_raw

from trnft.common.pipeline.registry import names

STAGES = names()

pytestmark = pytest.mark.faults
CI_STAGES = ("tokenize", "consolidate", "merge")  # also in the slow run

SETTINGS = {
    "train": {"max_steps": 4, "save_steps": 2, "logging_steps": 1, "warmup_steps": 1, "compile_steps": 2},
    "eval": {"max_samples": 4, "batch_size": 4, "max_new_tokens": 4, "compare_base": False},
}
# The three points of each stage: run_stage's own (before the body, after it, after the manifest but before
# the folder is renamed into place); train's are inside its loop and its save instead.
POINTS = {stage: ("started", "written", "manifest") for stage in STAGES}
POINTS["train"] = ("step:1", "save:2", "train:manifest")


def _fault(stage: str, point: str) -> str:
    return f"kill-during-{point}" if ":" in point else f"kill-during-{stage}:{point}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("reference") / "run"
    run = Run(root, smoke_raw(root, tiny_llama, **SETTINGS, platform="gpu"))
    for stage in STAGES:
        ok(run.stage(stage, timeout=1200))
    return run


def _result(run: Run, stage: str) -> object:
    manifest = run.manifest(stage)
    if stage == "train":  # tensorboard event files carry wall-clock times; the checkpoints must match
        return sorted(
            (
                f["path"],
                _adapter_config(run, f["path"]) if f["path"].endswith("adapter_config.json") else f["digest"],
            )
            for f in manifest["files"]
            if f["path"].startswith("checkpoint-")
        )
    if stage == "evaluate":  # metrics.json has throughput; the answers must match
        return [f["digest"] for f in manifest["files"] if f["path"] == "predictions.jsonl"]
    if stage == "compile":
        return json.loads((run.root / "compile" / "manifest.json").read_text())["figures"]["graphs_compiled"]
    return manifest["output_digest"]


def _adapter_config(run: Run, path: str) -> dict:
    """PEFT writes target_modules from a set, in an order that differs between processes (string hash
    seeds); the config is the same when the modules are."""
    config = json.loads((run.root / "train" / path).read_text())
    config["target_modules"] = sorted(config["target_modules"])
    return config


CASES = [
    pytest.param(stage, point, id=f"{stage}-{point.replace(':', '-')}",
                 marks=[pytest.mark.slow] if stage in CI_STAGES else [])
    for stage in STAGES
    for point in POINTS[stage]
]  # fmt: skip


@pytest.mark.parametrize(("stage", "point"), CASES)
def test_a_killed_stage_reruns_to_the_uninterrupted_result(reference, tmp_path, tiny_llama, stage, point):
    root = tmp_path / "run"
    run = Run(root, smoke_raw(root, tiny_llama, **SETTINGS, platform="gpu"))
    root.mkdir()
    for upstream in STAGES[: STAGES.index(stage)]:
        shutil.copytree(reference.root / upstream, root / upstream)
    killed = run.stage(stage, env={"TRNFT_FAULT": _fault(stage, point)}, timeout=1200)
    assert killed.returncode == -9, (killed.returncode, killed.stdout[-2000:], killed.stderr[-2000:])
    # killed before its manifest was in place the stage is not complete; the in-place train stage's
    # manifest, once written, is (its checkpoints are in place before it)
    assert (root / stage / "manifest.json").is_file() == (point == "train:manifest")
    ok(run.stage(stage, timeout=1200))
    assert _result(run, stage) == _result(reference, stage)
    assert not [p for p in root.iterdir() if ".staging-" in p.name]
