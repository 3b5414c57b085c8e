"""The trnft command: help lists every stage, errors are one line with a non-zero exit, status works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trnft.common import cli
from trnft.common.pipeline import registry

STAGES = registry.names()


def test_help_lists_every_stage_and_command():
    proc = subprocess.run(
        [sys.executable, "-m", "trnft.common.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for command in (*STAGES, "status", "jobspec", "submit", "wait", "torchrun", "smoke"):
        assert f"    {command}" in proc.stdout


@pytest.mark.parametrize("command", [*STAGES, "status", "jobspec", "submit", "wait", "smoke"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: trnft" in capsys.readouterr().out


@pytest.mark.parametrize("platform", ["neuron", "gpu"])
def test_every_stage_dispatches_through_one_registry(platform):
    from trnft.common.pipeline import backend

    platform_backend = backend.get(platform)
    assert platform_backend.platform == platform
    assert {s for s in STAGES if registry.spec(s).by_platform} == {"compile", "train", "consolidate"}
    from trnft.common import tokenize

    assert registry.runner("tokenize", None) is tokenize.run  # a shared stage never reaches a backend
    with pytest.raises(ModuleNotFoundError):
        platform_backend.run_stage("tokenize", None, force=False, log=print)


def test_an_unknown_platform_is_one_line():
    from trnft.common.errors import TrnftError
    from trnft.common.pipeline import backend

    with pytest.raises(TrnftError, match=r"model.platform: no backend named 'tpu'; use one of neuron, gpu"):
        backend.get("tpu")


def test_checkpoints_are_claimed_by_the_platform_that_wrote_them(tmp_path):
    from trnft.common.pipeline import backend

    gpu = tmp_path / "gpu-run" / "train" / "checkpoint-2"
    (gpu / "model").mkdir(parents=True)
    (gpu / "model" / ".metadata").write_bytes(b"")  # a distributed-checkpoint folder
    (gpu / "done").write_text("1")
    nxd = tmp_path / "neuron-run" / "train" / "checkpoint-2" / "adapter_default" / "adapter_shards" / "model"
    nxd.mkdir(parents=True)
    assert backend.for_checkpoint(tmp_path / "gpu-run").platform == "gpu"
    assert backend.for_checkpoint(gpu).platform == "gpu"
    assert backend.for_checkpoint(tmp_path / "neuron-run").platform == "neuron"
    assert backend.get("neuron").owns_checkpoint(tmp_path / "neuron-run" / "train")
    assert not backend.get("gpu").owns_checkpoint(tmp_path / "neuron-run")


def test_bad_config_value_is_one_line_exit_2(run_config, capsys):
    code = cli.main(["status", "--config", str(run_config()), "train.micro_batch_size=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("trnft status: error: ") and err.count("\n") == 1
    assert err.endswith("error: override train.micro_batch_size=0: must be >= 1, got 0\n")  # not the file


def test_missing_config_file(capsys, tmp_path):
    code = cli.main(["tokenize", "--config", str(tmp_path / "absent.yaml")])
    assert code == 2
    assert "absent.yaml not found" in capsys.readouterr().err


def test_standalone_consolidate_needs_its_paths(capsys):
    code = cli.main(["consolidate", "--checkpoint", "/x"])
    assert code == 1
    assert "pass --config FILE, or --output for a standalone consolidate" in capsys.readouterr().err


def test_status_prints_one_row_per_stage(run_config, capsys):
    from trnft.common.config.run_config import load_config

    config = run_config()
    Path(load_config(config).run.root).mkdir(parents=True)
    assert cli.main(["status", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:]] == list(STAGES)
    assert all(line.split()[1] == "missing" for line in lines[2:])


def test_status_refuses_a_config_every_stage_refuses_with_the_stages_line(run_config, capsys):
    """neuron-native trains with the FSDP2 trainer's settings, so the XLA path's neuron.* keys (the test
    config's neuron.backend) are refused by every stage: status said nothing about it before."""
    config = str(run_config())
    bad = ["model.platform=neuron-native", "cluster.instance_type=trn2.48xlarge"]
    assert cli.main(["tokenize", "--config", config, *bad]) == 2
    stage_line = capsys.readouterr().err
    assert stage_line.startswith("trnft tokenize: error: ") and "neuron-native" in stage_line
    assert cli.main(["status", "--config", config, *bad]) == 2
    status_line = capsys.readouterr().err
    assert (
        status_line == stage_line.replace("trnft tokenize", "trnft status") and status_line.count("\n") == 1
    )


def test_status_of_a_run_root_that_does_not_exist_or_is_a_file_says_so(run_config, tmp_path, capsys):
    assert cli.main(["status", "--config", str(run_config()), f"run.root={tmp_path / 'nowhere'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    (tmp_path / "afile").write_text("x")
    assert cli.main(["status", "--config", str(run_config()), f"run.root={tmp_path / 'afile'}"]) == 1
    assert "is a file, not a run directory" in capsys.readouterr().err


def test_debug_shows_the_traceback_behind_the_one_line(tmp_path, capsys, monkeypatch):
    """Without --debug: the one line only. With it (or TRNFT_DEBUG=1): the library error it came from too."""
    from trnft.common import cli

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{not json")
    base = tmp_path / "base"
    base.mkdir()
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "out")]
    assert cli.main(argv) == 1
    plain = capsys.readouterr().err
    assert plain.count("\n") == 1 and "Traceback" not in plain and "adapter_config.json" in plain
    assert cli.main(["--debug", *argv]) == 1
    debug = capsys.readouterr().err
    assert "Traceback" in debug and "JSONDecodeError" in debug and debug.strip().endswith(plain.strip())
    monkeypatch.setenv("TRNFT_DEBUG", "1")
    assert cli.main(argv) == 1
    assert "Traceback" in capsys.readouterr().err


def test_overrides_may_follow_an_option():
    from trnft.common.cli import build_parser, parse_args

    parser = build_parser()
    args = parse_args(parser, ["train", "--config", "run.yaml", "--force", "train.max_steps=2", "lora.r=4"])
    assert args.force and args.overrides == ["train.max_steps=2", "lora.r=4"]
    args = parse_args(parser, ["train", "--config", "run.yaml", "train.max_steps=2", "--force", "lora.r=4"])
    assert args.overrides == ["train.max_steps=2", "lora.r=4"]
    with pytest.raises(SystemExit):
        parse_args(parser, ["train", "--config", "run.yaml", "--force", "--no-such-flag"])
