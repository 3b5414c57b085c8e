"""The run config: every shipped example parses; bad keys and values name their path; overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trnft.common.config.run_config import (
    RunConfig,
    decode_template,
    dump_config,
    load_config,
    stable_hash,
    with_overrides,
)
from trnft.common.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
PRESETS = sorted((REPO / "examples" / "datasets").glob("*.yaml"))

MINIMAL = {
    "run": {"name": "t", "root": "/tmp/trnft-test-run"},
    "model": {"name_or_path": "org/model"},
    "dataset": {"name": "org/data"},
}


def write(tmp_path: Path, raw: dict, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def with_change(section: str, key: str, value) -> dict:
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    raw.setdefault(section, {})[key] = value
    return raw


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.run.name


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_dataset_presets_layer_over_a_run(preset):
    cfg = load_config([REPO / "examples" / "llama31_8b_lora_trn1.yaml", preset])
    assert cfg.dataset.name == yaml.safe_load(preset.read_text())["dataset"]["name"]
    assert "\n" in cfg.dataset.input_template


def test_minimal_config_gets_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.train.micro_batch_size == 1
    assert cfg.lora.enabled and "q_proj" in cfg.lora.target_modules
    assert cfg.parallel.tp == 1


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "micro_batch_size", 0, "train.micro_batch_size: must be >= 1, got 0"),
        ("train", "learning_rate", "fast", "train.learning_rate: must be a number, got 'fast'"),
        ("train", "bf16", "yes", "train.bf16: must be true or false, got 'yes'"),
        (
            "model",
            "platform",
            "tpu",
            "model.platform: must be one of 'neuron', 'gpu', 'neuron-native', got 'tpu'",
        ),
        ("lora", "dropout", 1.5, "lora.dropout: must be < 1.0, got 1.5"),
        ("run", "name", "My_Run", "run.name: must match"),
        ("neuron", "cache_dir", "/fsx/cache.v2", "neuron.cache_dir: must not contain '.'"),
        ("dataset", "train_ratio", 0.5, "train_ratio + validation_ratio + test_ratio must be 1, got 0.6"),
        ("train", "warmup_steps", 5000, "train.warmup_steps: must be < train.max_steps (1000), got 5000"),
        ("cluster", "storage", {"claim_name": "x", "mount": "/fsx"}, "cluster.storage.mount: unknown key"),
    ],
)
def test_bad_values_name_their_key_path(tmp_path, section, key, value, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, with_change(section, key, value)))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(
        ConfigError, match=r"dataset\.input_templat: unknown key; did you mean 'input_template'\?"
    ):
        load_config(write(tmp_path, with_change("dataset", "input_templat", "x")))


def test_unknown_section(tmp_path):
    raw = dict(MINIMAL, trainer={"max_steps": 3})
    with pytest.raises(ConfigError, match=r"trainer: unknown key; did you mean 'train'\?"):
        load_config(write(tmp_path, raw))


def test_missing_required_key(tmp_path):
    raw = {k: v for k, v in MINIMAL.items() if k != "model"}
    with pytest.raises(ConfigError, match=r"model: required key missing"):
        load_config(write(tmp_path, raw))


def test_several_problems_reported_in_one_line(tmp_path):
    raw = with_change("train", "micro_batch_size", 0)
    raw["train"]["max_steps"] = -1
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, raw))
    text = str(err.value)
    assert "train.max_steps: must be >= 1, got -1" in text and "1 more: train.micro_batch_size" in text


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_are_typed_and_checked(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config(
        path,
        [
            "train.max_steps=7",
            "train.learning_rate=1e-3",
            "lora.target_modules=q_proj,v_proj",
            "train.bf16=false",
            "dataset.input_template=### Question:\\n{instruction}\\n",
            "model.tokenizer=null",
        ],
    )
    assert cfg.train.max_steps == 7
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.bf16 is False
    # '#' and '{x}' survive (YAML would read a comment and a mapping) and \n becomes a real newline.
    assert cfg.dataset.input_template == "### Question:\n{instruction}\n"
    assert cfg.model.tokenizer is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_stepz=3", "unknown key train.max_stepz; did you mean 'train.max_steps'?"),
        ("train.micro_batch_size=0", "override train.micro_batch_size=0: must be >= 1, got 0"),
        ("train", "expected key.sub=value"),
        ("train.max_steps.x=1", "train.max_steps has no sub-keys"),
    ],
)
def test_bad_overrides(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), [override])
    assert message in str(err.value)


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    raw = {
        "run": {"name": "t", "root": "runs/here"},
        "model": {"name_or_path": "./models/tiny"},
        "dataset": {"files": ["data/a.jsonl"]},
    }
    sub = tmp_path / "conf"
    sub.mkdir()
    cfg = load_config(write(sub, raw))
    assert cfg.run.root == str(sub / "runs" / "here")
    assert cfg.model.name_or_path == str(sub / "models" / "tiny")
    assert cfg.dataset.files == [str(sub / "data" / "a.jsonl")]
    # Hub ids are left alone.
    hub = load_config(write(sub, dict(raw, model={"name_or_path": "meta-llama/Llama-3.1-8B"}), "hub.yaml"))
    assert hub.model.name_or_path == "meta-llama/Llama-3.1-8B"


def test_dump_round_trips_exactly(tmp_path):
    cfg = load_config(
        REPO / "examples" / "llama31_8b_lora_trn1.yaml", ["dataset.output_template=a\\\\nb {response}"]
    )
    assert cfg.dataset.output_template == "a\\nb {response}"
    again = load_config(write(tmp_path, yaml.safe_load(dump_config(cfg))))
    assert again == cfg
    assert stable_hash(again) == stable_hash(cfg)


def test_with_overrides_keeps_the_rest(tmp_path):
    cfg = load_config(REPO / "examples" / "smoke.yaml")
    changed = with_overrides(cfg, ["train.max_steps=30"])
    assert changed.train.max_steps == 30
    assert changed.dataset.input_template == cfg.dataset.input_template
    assert stable_hash(changed) != stable_hash(cfg)


def test_decode_template():
    assert decode_template(r"a\nb\tc\\n") == "a\nb\tc\\n"


def test_a_bare_on_or_off_in_yaml_is_the_word_not_a_boolean(tmp_path):
    """YAML 1.1 reads `off` as false: settings whose words are on/off get their word back."""
    path = tmp_path / "run.yaml"
    head = "run: {name: t, root: /tmp/t}\nmodel: {name_or_path: /tmp/m}\ndataset: {name: a/b}\n"
    path.write_text(head + "train: {activation_checkpointing: off}\ngpu: {compile: on}\n")
    cfg = load_config(path)
    assert (cfg.train.activation_checkpointing, cfg.fsdp.compile) == ("off", "on")
    path.write_text(head + "train: {activation_checkpointing: on}\n")
    with pytest.raises(ConfigError) as err:  # no word "on" for this key: the boolean is still refused
        load_config(path)
    assert (
        "train.activation_checkpointing: must be one of 'auto', 'full', 'selective', 'off', got True"
        in str(err.value)
    )
