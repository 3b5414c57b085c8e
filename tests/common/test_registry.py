"""Stages come from one registry: a stage written outside trnft (tests/toy_stage.py) and registered with
one line runs through the CLI, shows in `trnft status`, is checked against its upstream and gets a rendered
job spec, with no other change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trnft.common import cli
from trnft.common.config.run_config import load_config
from trnft.common.pipeline import registry
from trnft.jobspecs.render import apply_lines, render, stage_files

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def with_toy(monkeypatch):
    monkeypatch.setitem(registry.STAGE_MODULES, "toy", "toy_stage:SPEC")


def test_a_registered_stage_runs_and_shows(with_toy, run_config, capsys):
    config = str(run_config())
    assert cli.main(["toy", "--config", config]) == 1  # its upstream first, as for any stage
    assert "toy needs a complete tokenize stage" in capsys.readouterr().err
    assert cli.main(["tokenize", "--config", config]) == 0
    assert cli.main(["toy", "--config", config]) == 0
    cfg = load_config(config)
    assert json.loads((Path(cfg.run.root) / "toy" / "count.json").read_text())["train_rows"] > 0
    capsys.readouterr()
    assert cli.main(["status", "--config", config]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(rows) == list(registry.names()) and rows["toy"] == "complete"


def test_a_registered_stage_gets_its_job_spec(with_toy):
    """On a real example config: a seventh file, a Job that runs `trnft toy` offline, and its line in the
    apply script with the stage's own wait timeout."""
    cfg = load_config(REPO / "examples" / "llama31_8b_lora_p5.yaml")
    files = render(cfg)
    assert stage_files()["toy"] == "07-toy.yaml" and "07-toy.yaml" in files
    (job,) = [d for d in yaml.safe_load_all(files["07-toy.yaml"]) if d]
    assert job["kind"] == "Job"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["trnft", "toy", "--config", "/config/run.yaml"]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
    assert apply_lines(Path("/specs"), cfg)[-1] == "trnft submit /specs/07-toy.yaml --wait --timeout 10m"


def test_the_registry_refuses_an_entry_under_another_stages_name(monkeypatch):
    monkeypatch.setitem(registry.STAGE_MODULES, "count", "toy_stage:SPEC")
    with pytest.raises(AssertionError, match="is stage 'toy', registered as 'count'"):
        registry.spec("count")
