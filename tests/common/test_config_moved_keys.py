"""Settings grouped by concern: parallelism in ``parallel:``, the FSDP2 trainer's options in ``fsdp:``. A config
written with the old names (``neuron.tp``, ``gpu.*``) still loads for one release, each moved key with one
notice naming its new place, and runs started before the move keep their stage fingerprints: the fixture
holds the fingerprints the previous release computed for such a config on each platform."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trnft.common.config import run_config
from trnft.common.config.run_config import MOVED_KEYS, config_from_dict, load_config
from trnft.common.errors import ConfigError
from trnft.common.pipeline import registry
from trnft.common.pipeline.stages import fingerprint_of

DATA = Path(__file__).parent / "data"
OLD_CONFIG = DATA / "run_config_0_before_concern_sections.yaml"
RECORDED = json.loads((DATA / "fingerprints_0_before_concern_sections.json").read_text())
INSTANCE = {"neuron": "trn1.32xlarge", "gpu": "p5.48xlarge", "neuron-native": "trn2.48xlarge"}


@pytest.fixture(autouse=True)
def _fresh_notices(monkeypatch):
    monkeypatch.setattr(run_config, "_noticed", set())
    monkeypatch.delenv("RANK", raising=False)


def _fingerprints(cfg) -> dict[str, str]:
    return {stage: fingerprint_of(registry.spec(stage), cfg, {}, [])[0] for stage in RECORDED["neuron"]}


def _new_layout(platform: str) -> dict:
    """The old fixture rewritten by hand in the new layout, with the values each platform read."""
    raw = yaml.safe_load(OLD_CONFIG.read_text())
    neuron, gpu = raw.pop("neuron"), raw.pop("gpu")
    tp = neuron.pop("tp") if platform == "neuron" else gpu["tp"]
    pp = neuron.pop("pp", 1)
    del gpu["tp"]
    replicate = gpu.pop("replicate")
    raw["parallel"] = {"tp": tp, "pp": pp, **({} if platform == "neuron" else {"replicate": replicate})}
    raw["neuron"] = neuron if platform == "neuron" else {}
    raw["fsdp"] = gpu
    raw["model"]["platform"] = platform
    raw["cluster"]["instance_type"] = INSTANCE[platform]
    return raw


@pytest.mark.parametrize("platform", ["neuron", "gpu", "neuron-native"])
def test_runs_started_before_the_move_keep_their_fingerprints(platform):
    overrides = [f"model.platform={platform}", f"cluster.instance_type={INSTANCE[platform]}"]
    from_old_names = load_config(OLD_CONFIG, overrides)
    assert _fingerprints(from_old_names) == RECORDED[platform]
    from_new_names = config_from_dict(_new_layout(platform))
    assert _fingerprints(from_new_names) == RECORDED[platform]
    # and the change is not a no-op: a different tp changes train's fingerprint
    bumped = load_config(OLD_CONFIG, [*overrides, "parallel.tp=1"])
    assert _fingerprints(bumped)["train"] != RECORDED[platform]["train"]


def test_each_old_name_is_one_notice_naming_the_new_key(capsys):
    cfg = load_config(OLD_CONFIG, ["model.platform=gpu", "cluster.instance_type=p5.48xlarge"])
    notices = capsys.readouterr().err.strip().splitlines()
    # the gpu platform read the gpu section; neuron.tp and neuron.pp, which it never read, go without a word
    written = yaml.safe_load(OLD_CONFIG.read_text())["gpu"]
    moved = [old for old in MOVED_KEYS if old.startswith("gpu.") and old.removeprefix("gpu.") in written]
    assert len(moved) == len(written) == 8
    assert len(notices) == len(moved), notices
    for old, line in zip(moved, notices):
        assert line == (
            f"trnft: {OLD_CONFIG}: {old} is now {MOVED_KEYS[old]}; the old name is read until the next release, "
            "rename it"
        )
    assert (cfg.parallel.tp, cfg.parallel.replicate, cfg.fsdp.devices, cfg.fsdp.compile) == (4, 2, 8, "off")
    assert (cfg.fsdp.wandb, cfg.fsdp.async_checkpoint, cfg.fsdp.reshard_after_forward) == (True, False, False)


def test_the_old_tp_key_of_the_platform_is_the_one_that_applies():
    for platform, tp in (("neuron", 2), ("gpu", 4), ("neuron-native", 4)):
        cfg = load_config(
            OLD_CONFIG, [f"model.platform={platform}", f"cluster.instance_type={INSTANCE[platform]}"]
        )
        assert cfg.parallel.tp == tp, platform
    # a trn1 run never read gpu.replicate: it is dropped, not turned into an HSDP setting trn1 refuses
    assert load_config(OLD_CONFIG).parallel.replicate is None


def test_an_old_name_in_an_override_is_read_with_its_notice(capsys):
    cfg = load_config(OLD_CONFIG, ["gpu.devices=3", "neuron.tp=8"])
    assert (cfg.fsdp.devices, cfg.parallel.tp) == (3, 8)
    err = capsys.readouterr().err
    assert "trnft: override gpu.devices is now fsdp.devices" in err
    assert "trnft: override neuron.tp is now parallel.tp" in err


def test_a_key_under_both_names_is_one_line(tmp_path):
    raw = yaml.safe_load(OLD_CONFIG.read_text())
    raw["parallel"] = {"tp": 2}
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: neuron.tp and parallel.tp are both set; neuron.tp is the old name of parallel.tp: keep only "
        "parallel.tp"
    )


def test_retired_and_unknown_keys_of_the_old_section_stay_one_line(tmp_path):
    raw = yaml.safe_load(OLD_CONFIG.read_text())
    raw["gpu"]["strategy"] = "fsdp"
    path = tmp_path / "retired.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ConfigError, match=r"gpu\.strategy: no longer a setting; the GPU trainer always shards"
    ):
        load_config(path)
    raw["gpu"] = {"devcies": 2}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"fsdp\.devcies: unknown key; did you mean 'devices'\?"):
        load_config(path)


def test_other_ranks_do_not_repeat_the_notices(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    load_config(OLD_CONFIG)
    assert capsys.readouterr().err == ""


def test_a_new_section_that_is_not_a_mapping_is_reported_not_a_traceback(tmp_path):
    raw = yaml.safe_load(OLD_CONFIG.read_text())
    raw["parallel"] = 2
    path = tmp_path / "scalar.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"parallel: must be a mapping, got int"):
        load_config(path)
