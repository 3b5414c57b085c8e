"""Neuron train and compile stages on torch-xla's CPU device, run as processes like the Kubernetes jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import first_step_reference, ok

from trnft.common.io.tensor_io import to_f32
from trnft.common.pipeline import checkpoints
from trnft.neuron.compile import XlaCompileFigures
from trnft.neuron.consolidate import load_checkpoint_tensors
from trnft.neuron.nxd_format import SHARD_FILE
from trnft.neuron.train import XlaTrainFigures

pytestmark = [pytest.mark.integration, pytest.mark.trn1]  # the trn1 line (tests/trn1_line.sh)

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(checkpoint: Path) -> dict[str, np.ndarray]:
    return {k: to_f32(v) for k, v in load_checkpoint_tensors(checkpoint).items()}


def test_lora_tp2_dp2_lowers_the_loss_and_writes_the_optimum_neuron_layout(make_run):
    run = make_run(
        parallel={"tp": 2},
        neuron={"cpu_devices": 4},
        train={
            "max_steps": 150,
            "save_steps": 75,
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 2,
            "logging_steps": 25,
        },
    )
    ok(run.stage("train"))
    manifest = run.manifest("train")
    losses = XlaTrainFigures.of(manifest).losses
    assert len(losses) == 150
    assert np.mean(losses[-10:]) < 0.35 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    assert manifest["layout"] == {"tp": 2, "dp": 2, "devices": 4, "attention": "separate", "global_batch": 4}
    # the checkpoint is optimum-neuron 0.4.x's LoRA layout
    ckpt = run.root / "train" / "checkpoint-150"
    tag = ckpt / "adapter_default" / "adapter_shards"
    assert (tag / "checkpoint").read_text() == "1" and (tag / "done").read_text() == "1"
    shards = sorted(p.name for p in (tag / "model").iterdir() if SHARD_FILE.match(p.name))
    assert shards == ["dp_rank_00_tp_rank_00_pp_rank_00.pt", "dp_rank_00_tp_rank_01_pp_rank_00.pt"]
    assert (tag / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors").is_dir()  # xser
    meta = json.loads((tag / "mp_metadata_pp_rank_0.json").read_text())
    assert set(meta) == {"parameters", "model_weight_transformation_specs"}
    config = json.loads((ckpt / "adapter_default" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(ALL_TARGETS) and config["r"] == 16
    assert sorted(p.name for p in (run.root / "train").glob("checkpoint-*")) == [
        "checkpoint-150",
        "checkpoint-75",
    ]


@pytest.mark.slow  # three XLA runs; tp2 is covered in the default run
def test_first_step_loss_is_the_same_at_tp1_tp2_and_tp4(make_run):
    """tp=4 puts the 2 KV heads into a GQA qkv layer (replicated KV, tied LoRA A): same first loss."""
    first = {}
    for tp in (1, 2, 4):
        run = make_run(
            parallel={"tp": tp},
            neuron={"cpu_devices": tp},
            train={"max_steps": 1, "save_steps": 1, "warmup_steps": 0},
        )
        ok(run.stage("train"))
        first[tp] = run.figures("train", XlaTrainFigures).losses[0]
        assert run.manifest("train")["layout"]["attention"] == ("gqa" if tp == 4 else "separate")
    assert abs(first[2] - first[1]) < 1e-4 and abs(first[4] - first[1]) < 1e-4, first


def test_first_step_loss_equals_a_plain_transformers_forward(make_run, tiny_llama):
    """The CPU-XLA trainer's first LoRA step logs the base model's loss on that batch, as a plain
    transformers forward computes it (the FSDP2 platforms check the same in tests/neuron/test_native.py)."""
    run = make_run(
        parallel={"tp": 1},
        neuron={"cpu_devices": 1},
        train={"max_steps": 1, "save_steps": 1, "warmup_steps": 0},
    )
    ok(run.stage("train"))
    first = run.figures("train", XlaTrainFigures).losses[0]
    reference = first_step_reference(run, tiny_llama)
    assert abs(first - reference) < 1e-5, (first, reference)


def _wait_for(path_glob, root: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(root.glob(path_glob)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before {path_glob} appeared")
        time.sleep(0.05)
    raise AssertionError(f"{path_glob} did not appear")


def test_restart_resumes_exactly_after_sigkill_between_steps_and_during_a_save(make_run):
    common = {
        "lora": {"dropout": 0.1},  # dropout makes the per-step RNG matter
        "train": {
            "max_steps": 8,
            "save_steps": 2,
            "keep_checkpoints": 2,
            "logging_steps": 1,
            "warmup_steps": 2,
        },
        "parallel": {"tp": 2},
        "neuron": {"cpu_devices": 2, "checkpoint_format": "plain"},
    }
    straight = make_run(**common)
    ok(straight.stage("train"))
    expected = straight.figures("train", XlaTrainFigures).losses
    expected_adapter = _adapter(straight.root / "train" / "checkpoint-8")

    # 1) killed while checkpoint-6 is being written: shards and `done` exist, but only in a staging folder
    run = make_run(**common)
    died = run.stage("train", env={"TRNFT_FAULT": "kill-during-save:6"})
    assert died.returncode == -signal.SIGKILL
    train_dir = run.root / "train"
    assert [p.name.split(".staging-")[0] for p in checkpoints.staging_leftovers(train_dir)] == [
        "checkpoint-6"
    ]
    staging = checkpoints.staging_leftovers(train_dir)[0]
    assert (
        staging / "adapter_default" / "adapter_shards" / "done"
    ).is_file()  # a marker-only reader would take it
    assert checkpoints.newest_complete(train_dir).step == 4
    assert run.root.joinpath("train", "manifest.json").exists() is False

    # 2) restarted: resumes from checkpoint-4 (never the half-written 6), then SIGKILL between steps
    proc = subprocess.Popen(
        [sys.executable, "-m", "trnft.common.cli", "train", "--config", str(run.config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PJRT_DEVICE": "CPU"},
    )  # fmt: skip
    _wait_for("train/checkpoint-6", run.root, proc)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0]
    assert "removing checkpoint-6.staging-" in output and "resumed from checkpoint-4 at step 4" in output

    # 3) restarted again: finishes from the newest complete checkpoint
    finished = ok(run.stage("train"))
    assert "resumed from checkpoint-" in finished.stdout
    got = run.figures("train", XlaTrainFigures).losses
    assert len(got) == len(expected) == 8
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    adapter = _adapter(train_dir / "checkpoint-8")
    assert adapter.keys() == expected_adapter.keys()
    for name in adapter:
        np.testing.assert_allclose(adapter[name], expected_adapter[name], rtol=0, atol=1e-5, err_msg=name)


def test_compile_then_train_compiles_nothing_after_the_first_step(make_run):
    run = make_run(
        train={"max_steps": 6, "save_steps": 3, "compile_steps": 3, "on_recompile": "fail", "warmup_steps": 2}
    )
    compiled = ok(run.stage("compile"))
    assert "none after step 1" in compiled.stdout
    cfig = run.figures("compile", XlaCompileFigures)
    assert cfig.graphs_compiled >= 2 and cfig.compiles_per_step[1:] == [0, 0]
    assert Path(cfig.cache_path).is_dir()
    ok(run.stage("train"))
    fig = run.figures("train", XlaTrainFigures)
    assert fig.compile_stage_ran is True
    assert fig.xla_compiles_first_step >= 2
    assert fig.xla_compiles_after_first_step == 0  # saves at steps 3 and 6 included
    # a rerun of train is skipped, a rerun of compile too
    assert "already complete" in ok(run.stage("train")).stdout
    assert "already complete" in ok(run.stage("compile")).stdout


def test_full_fine_tuning_writes_model_shards(make_run):
    run = make_run(
        lora={"enabled": False},
        parallel={"tp": 2},
        neuron={"cpu_devices": 2},
        train={"max_steps": 2, "save_steps": 2, "learning_rate": 1.0e-4, "min_lr": 1.0e-5, "warmup_steps": 0},
    )
    ok(run.stage("train"))
    ckpt = run.root / "train" / "checkpoint-2"
    assert (
        (ckpt / "shards" / "done").is_file()
        and (ckpt / "config.json").is_file()
        and (ckpt / "trn_config.json").is_file()
    )
    tensors = load_checkpoint_tensors(ckpt)
    assert (
        "model.layers.0.mlp.gate_proj.weight" in tensors
        and "model.layers.0.mlp.gate_up_proj.weight" not in tensors
    )
    assert tensors["model.embed_tokens.weight"].shape == (512, 128)


# -- bad input: one line, before any compilation ---------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"parallel": {"tp": 3}, "neuron": {"cpu_devices": 3}},
            "parallel.tp: 3 does not divide the 4 attention heads of the model",
        ),
        (
            {"parallel": {"tp": 2}, "neuron": {"cpu_devices": 3}},
            "neuron.cpu_devices: must be a multiple of parallel.tp (2), got 3",
        ),
        ({"neuron": {"cache_dir": "/tmp/cache.v2"}}, "neuron.cache_dir: must not contain '.'"),
        ({"lora": {"target_modules": ["q_proj", "dense"]}}, "lora.target_modules: 'dense' is not supported"),
        (
            {"lora": {"target_modules": ["gate_proj", "down_proj"]}},
            "names gate_proj but not up_proj; on the Trainium path they are one module gate_up_proj",
        ),
        (
            {
                "parallel": {"tp": 4},
                "neuron": {"cpu_devices": 4},
                "lora": {"target_modules": ["q_proj", "v_proj"]},
            },
            "names q_proj, v_proj but not k_proj; on the Trainium path they are one module qkv_proj (the "
            "model's 2 key/value heads are fewer than parallel.tp=4",
        ),
    ],
)
def test_bad_input_is_refused_before_compiling(make_run, sections, message, capsys, monkeypatch):
    """Every check runs before torch-xla starts, so this runs in the test process."""
    from trnft.common import cli

    monkeypatch.delenv("CPU_NUM_DEVICES", raising=False)
    run = make_run(**sections)
    code = cli.main(["train", "--config", str(run.config)])
    captured = capsys.readouterr()
    assert code != 0
    assert message in captured.err and captured.err.strip().count("\n") == 0, captured.err
    assert "compiles" not in captured.out
    assert not list(run.root.glob("train/checkpoint-*"))
    assert "CPU_NUM_DEVICES" not in os.environ  # set by init_runtime: the XLA runtime never started


def test_train_without_tokenize_output_names_the_stage_to_run(tmp_path, tiny_llama):
    from helpers import Run, smoke_raw

    run = Run(tmp_path / "fresh", smoke_raw(tmp_path / "fresh", tiny_llama))
    proc = run.stage("train")
    assert proc.returncode == 1
    assert (
        "train needs a complete tokenize stage" in proc.stderr
        and "run `trnft tokenize --config" in proc.stderr
    )


def test_a_non_finite_step_stops_the_run_before_it_is_saved(make_run):
    # full fine-tuning at an absurd learning rate: the weights overflow within a step or two
    run = make_run(
        parallel={"tp": 1}, neuron={"cpu_devices": 1},
        lora={"enabled": False},
        train={"learning_rate": 1e30, "min_lr": 0.0, "max_grad_norm": 0.0, "warmup_steps": 0, "max_steps": 5,
               "save_steps": 1},
    )  # fmt: skip
    proc = run.stage("train")
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("trnft train: error: train: step ") and "non-finite" in line, line
    bad = int(line.split("step ")[1].split()[0])
    saved = sorted(int(p.name.split("-")[1]) for p in (run.root / "train").glob("checkpoint-*"))
    assert saved == list(range(1, bad))  # every finite step saved, the non-finite one not


def test_sigterm_saves_the_step_in_flight_exits_143_and_the_rerun_ends_like_the_uninterrupted_run(make_run):
    """The CPU-XLA trainer is one process: SIGTERM during step 3 (checkpoints due at 4 and 6) saves
    checkpoint-3 after that step and exits 143; the rerun resumes there."""
    common = {"train": {"max_steps": 6, "save_steps": 4, "logging_steps": 1, "warmup_steps": 1}}
    straight = make_run(**common)
    ok(straight.stage("train"))
    run = make_run(**common)
    stopped = run.stage("train", env={"TRNFT_FAULT": "term-during-step:3"})
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "SIGTERM received; stopping after step 3 with checkpoint-3 saved" in stopped.stdout
    assert checkpoints.newest_complete(run.root / "train").step == 3
    resumed = ok(run.stage("train"))
    assert "resumed from checkpoint-3 at step 3" in resumed.stdout
    assert run.figures("train", XlaTrainFigures).losses == straight.figures("train", XlaTrainFigures).losses
    mine, theirs = (_adapter(r.root / "train" / "checkpoint-6") for r in (run, straight))
    assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in theirs)
