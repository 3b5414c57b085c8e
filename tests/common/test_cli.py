"""The trnft command: help lists every stage, errors are one line with a non-zero exit, status works."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trnft.common import cli, stages
from trnft.common.stages import STAGES


def test_help_lists_every_stage_and_command():
    proc = subprocess.run(
        [sys.executable, "-m", "trnft.common.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for command in (*STAGES, "status", "jobspec", "smoke"):
        assert f"    {command}" in proc.stdout


@pytest.mark.parametrize("command", [*STAGES, "status", "jobspec", "smoke"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: trnft" in capsys.readouterr().out


def test_unbuilt_stage_exits_2_and_runs_nothing(run_config, monkeypatch, capsys):
    spec = stages.SPECS["train"]
    monkeypatch.setitem(
        stages.SPECS,
        "train",
        stages.StageSpec(
            name="train",
            needs=spec.needs,
            config_keys=spec.config_keys,
            modules={"neuron": "trnft.neuron.not_there", "gpu": "trnft.gpu.not_there"},
        ),
    )
    config = run_config()
    code = cli.main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "trnft train: error: stage train is not built yet for platform neuron" in err


def test_bad_config_value_is_one_line_exit_2(run_config, capsys):
    code = cli.main(["status", "--config", str(run_config()), "train.micro_batch_size=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("trnft status: error: ") and err.count("\n") == 1
    assert err.endswith("run.yaml: train.micro_batch_size: must be >= 1, got 0\n")


def test_missing_config_file(capsys, tmp_path):
    code = cli.main(["tokenize", "--config", str(tmp_path / "absent.yaml")])
    assert code == 2
    assert "absent.yaml not found" in capsys.readouterr().err


def test_standalone_consolidate_needs_its_paths(capsys):
    code = cli.main(["consolidate", "--checkpoint", "/x"])
    assert code == 1
    assert "pass --config FILE, or --output for a standalone consolidate" in capsys.readouterr().err


def test_status_prints_one_row_per_stage(run_config, capsys):
    assert cli.main(["status", "--config", str(run_config())]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:]] == list(STAGES)
    assert all(line.split()[1] == "missing" for line in lines[2:])
