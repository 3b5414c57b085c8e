"""Staleness propagates: a stage is stale when anything upstream is stale or newer, status shows it, and
running a stage on a stale or broken upstream refuses (even with --force), naming the stage to redo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import complete_by_hand

from trnft.common import cli
from trnft.common.config.run_config import load_config
from trnft.common.pipeline.stages import stage_states


def _downstream_by_hand(run) -> None:
    cfg = load_config(run.config)
    for stage in ("train", "consolidate", "merge"):
        complete_by_hand(cfg, stage)


def _states(run, *overrides) -> dict[str, str]:
    return {row.name: row.state for row in stage_states(load_config(run.config, list(overrides)))}


def test_retokenizing_makes_every_later_stage_stale_and_they_refuse_to_run(make_run, capsys):
    run = make_run()
    _downstream_by_hand(run)
    assert _states(run) == {
        "tokenize": "complete", "compile": "missing", "train": "complete", "consolidate": "complete",
        "merge": "complete", "evaluate": "missing",
    }  # fmt: skip
    changed = "dataset.max_seq_length=128"
    assert cli.main(["tokenize", "--config", str(run.config), changed]) == 0
    states = _states(run, changed)
    assert (states["tokenize"], states["train"], states["consolidate"], states["merge"]) == (
        "complete", "stale", "stale", "stale",
    )  # fmt: skip
    rows = {row.name: row for row in stage_states(load_config(run.config, [changed]))}
    assert rows["train"].reason == "newer output of tokenize"
    assert (
        rows["consolidate"].reason == "upstream train is stale"
        and "stale: upstream train" in rows["consolidate"].summary
    )
    capsys.readouterr()
    for argv in (["evaluate"], ["merge"], ["merge", "--force"], ["consolidate", "--force"]):
        code = cli.main([argv[0], "--config", str(run.config), changed, *argv[1:]])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1, (argv, err)
        assert (
            f"{argv[0]} needs a complete train stage" in err and "is stale: newer output of tokenize" in err
        )
        assert "run `trnft train --config <run.yaml> --force` first" in err  # train never redoes by itself
    assert not (run.root / "evaluate").exists()
    assert cli.main(["status", "--config", str(run.config), changed]) == 0
    out = capsys.readouterr().out
    assert "consolidate  stale" in out and "upstream train is stale" in out


def test_a_corrupt_manifest_is_shown_as_corrupt_and_the_others_normally(make_run, capsys):
    run = make_run()
    _downstream_by_hand(run)
    (run.root / "train" / "manifest.json").write_text('{"stage": "train", "status": "comp')
    assert cli.main(["status", "--config", str(run.config)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert lines["tokenize"].split()[1] == "complete"
    assert lines["train"].split()[1] == "corrupt" and "unreadable manifest" in lines["train"]
    assert lines["consolidate"].split()[1] == "stale" and "upstream train is corrupt" in lines["consolidate"]
    assert lines["evaluate"].split()[1] == "missing"


def test_status_into_a_closed_pipe_is_quiet(make_run):
    """`trnft status | head -1`: the reader went away; no BrokenPipeError traceback, exit 0."""
    run = make_run()
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run(
        [sys.executable, "-m", "trnft.common.cli", "status", "--config", str(run.config)],
        stdout=write, stderr=subprocess.PIPE, text=True, timeout=300,
    )  # fmt: skip
    os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_an_upstream_file_changed_after_it_was_written_is_refused_by_name(make_run, capsys):
    """The sha256 of every output file is in the manifest; the next stage checks the files it reads."""
    from trnft.common.training.data import SPLIT_DIRS

    run = make_run(platform="gpu")  # any train stage checks its inputs; this one runs on either line
    manifest = json.loads((run.root / "tokenize" / "manifest.json").read_text())
    assert all(f["digest"].startswith("sha256:") for f in manifest["files"])
    arrays = run.root / "tokenize" / SPLIT_DIRS["train"] / "labels.npy"
    data = bytearray(arrays.read_bytes())
    data[-5] ^= 0x01
    arrays.write_bytes(bytes(data))
    code = cli.main(["train", "--config", str(run.config)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert f"{arrays}: its sha256 differs from the one the tokenize manifest recorded" in err
    assert not list((run.root / "train").glob("checkpoint-*"))


# One key of each section changed, and what each stage's state must become: a stage is stale when its own
# fingerprint covers the key or when anything upstream is stale. "-" marks a stage that stays complete.
ALL_STALE = ("stale",) * 6
SECTION_CHANGES = {
    "run": ("run.name=renamed", ("-",) * 6),  # names the run, not its outputs
    "model": ("model.dtype=bfloat16", ("-", "stale", "stale", "stale", "stale", "stale")),
    "dataset": ("dataset.max_seq_length=128", ALL_STALE),
    "lora": ("lora.r=4", ("-", "stale", "stale", "stale", "stale", "stale")),
    "train": ("train.learning_rate=0.001", ("-", "stale", "stale", "stale", "stale", "stale")),
    "train-runtime": ("train.logging_steps=7", ("-",) * 6),  # how often to log: no output changes
    "neuron": ("neuron.checkpoint_format=plain", ("-", "stale", "stale", "stale", "stale", "stale")),
    "parallel": ("parallel.tp=1", ("-", "stale", "stale", "stale", "stale", "stale")),
    "fsdp": ("fsdp.reshard_after_forward=false", ("-",) * 6),  # the other trainer's section
    "train-recompute": ("train.activation_checkpointing=off", ("-",) * 6),  # memory and time, not numbers
    "eval": ("eval.max_new_tokens=5", ("-",) * 5 + ("stale",)),
    "cluster": ("cluster.num_nodes=2", ("-",) * 6),  # where pods run, not what they compute
}


def test_one_key_of_each_section_makes_exactly_the_stages_it_decides_stale(make_run):
    import pytest

    from trnft.common.pipeline.registry import names

    STAGES = names()

    run = make_run()
    cfg = load_config(run.config)
    assert cfg.model.platform == "neuron"
    for stage in STAGES[1:]:
        complete_by_hand(cfg, stage)
    assert set(_states(run).values()) == {"complete"}
    for section, (override, expected) in SECTION_CHANGES.items():
        states = _states(run, override)
        want = {stage: "complete" if e == "-" else e for stage, e in zip(STAGES, expected, strict=True)}
        if states != want:
            pytest.fail(f"{section} ({override}): {states} != {want}")


def test_runtime_only_keys_keep_every_stage_complete_and_an_output_key_does_not(make_run):
    """Each key declares in the schema whether it changes the output (opt(runtime_only=True)); toggling
    W&B, background saves, logging or recompute on a rerun keeps train complete (so an interrupted train
    resumes from its checkpoint), while a key that changes the numbers makes it stale."""
    import dataclasses

    from trnft.common.config.run_config import (
        FsdpSection,
        NeuronSection,
        ParallelSection,
        TrainSection,
        changes_output,
    )
    from trnft.common.pipeline.registry import names

    STAGES = names()

    declared = {
        f"{name}.{f.name}"
        for name, section in (
            ("train", TrainSection),
            ("parallel", ParallelSection),
            ("fsdp", FsdpSection),
            ("neuron", NeuronSection),
        )
        for f in dataclasses.fields(section)
        if not changes_output(section, f.name)
    }
    assert declared == {
        "train.logging_steps", "train.on_recompile", "train.keep_checkpoints", "train.activation_checkpointing",
        "fsdp.wandb", "fsdp.async_checkpoint", "fsdp.chunked_loss", "fsdp.loss_chunk_tokens",
        "neuron.parallel_compile_workers",
    }  # fmt: skip
    for platform in ("gpu", "neuron-native"):
        run = make_run(platform=platform)
        cfg = load_config(run.config)
        for stage in STAGES[1:]:
            complete_by_hand(cfg, stage)
        for override in ("fsdp.wandb=true", "fsdp.async_checkpoint=false", "train.logging_steps=3",
                         "train.activation_checkpointing=off"):  # fmt: skip
            assert _states(run, override)["train"] == "complete", (platform, override)
        assert _states(run, "parallel.tp=2")["train"] == "stale"
        assert _states(run, "train.learning_rate=0.5")["train"] == "stale"
