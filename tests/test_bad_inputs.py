"""The bad-input catalog: every wrong file, key, value or path gets one line, a non-zero exit, no output.

One table, across the config, the data, every stage, both standalone tools and jobspec. Each case builds
its input in a fresh folder, runs ``trnft`` (in this process), and checks:

- the exit code (2 for config errors, 1 for bad inputs);
- stderr is exactly one line, ``trnft <command>: error: ...``, with the words the case names, and no
  traceback (one appears only with ``--debug``);
- nothing half-written: no staging folder anywhere, and the output the command would have made absent.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import smoke_raw
from nxd_writer import DEFAULT_ENCODING

from trnft.common import cli


@dataclass
class Env:
    """A fresh folder with a good config, the tiny model and (when asked for) a finished tokenize stage."""

    tmp: Path
    model: Path
    tokenized: Path
    raw: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(self.raw["run"]["root"])

    def config(self, name: str = "run.yaml", **sections) -> Path:
        raw = json.loads(json.dumps(self.raw))
        for section, values in sections.items():
            if values is None:
                raw.pop(section, None)
            else:
                raw.setdefault(section, {}).update(values)
        if (raw.get("model") or {}).get("platform", "neuron") != "neuron" and "parallel" not in sections:
            raw.pop("parallel", None)  # the smoke's tp 2 is its XLA rehearsal's (helpers.set_platform)
        path = self.tmp / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def with_tokenize(self) -> Env:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.tokenized, self.root / "tokenize")
        return self

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    def adapter(self, **config) -> Path:
        """A small valid PEFT adapter of the tiny model (B non-zero), then ``config`` merged into its JSON."""
        folder = self.tmp / "adapter"
        if not folder.exists():
            import torch
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            model = get_peft_model(
                AutoModelForCausalLM.from_pretrained(self.model),
                LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
            )
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.fill_(0.01)
            model.save_pretrained(folder)
        if config:
            path = folder / "adapter_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        return folder


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    words: tuple[str, ...]
    code: int = 1
    # paths (relative to the case folder) that must not exist afterwards
    absent: tuple[str, ...] = ()
    # reaches the XLA trainer, which only the trn1 line has (tests/trn1_line.sh runs it there)
    trn1: bool = False


def _stage(stage: str, **sections):
    return lambda e: [stage, "--config", str(e.config(**sections))]


def _override(stage: str, *overrides: str):
    return lambda e: [stage, "--config", str(e.config()), *overrides]


def _data(name: str, content: bytes | str, **dataset):
    def argv(e: Env) -> list[str]:
        path = e.file(name, content)
        return ["tokenize", "--config", str(e.config(dataset={"files": [str(path)], **dataset}))]

    return argv


def _tokenized(stage: str, **sections):
    return lambda e: [stage, "--config", str(e.with_tokenize().config(**sections))]


def _evaluate(**eval_settings):
    """A run whose train, consolidate and merge stages are complete by hand (the base model as the merged
    one), then ``trnft evaluate`` with ``eval_settings``."""

    def argv(e: Env) -> list[str]:
        from helpers import complete_by_hand

        from trnft.common.config.run_config import load_config

        e.with_tokenize()
        config = e.config(eval=eval_settings)
        cfg = load_config(config)
        for stage in ("train", "consolidate"):
            complete_by_hand(cfg, stage)
        shutil.copytree(e.model, e.root / "merge")
        complete_by_hand(cfg, "merge")
        return ["evaluate", "--config", str(config)]

    return argv


def _corrupt_train(e: Env, stage: str) -> list[str]:
    e.with_tokenize()
    (e.root / "train").mkdir()
    (e.root / "train" / "manifest.json").write_text('{"stage": "train", "status": "compl')
    return [stage, "--config", str(e.config())]


def _jobspec(**sections):
    """``trnft jobspec`` of a cluster config (run directory on the shared volume) with ``sections``."""

    def argv(e: Env) -> list[str]:
        merged = {
            "run": {"name": "r", "root": "/fsx/runs/r"},
            "model": {"name_or_path": "org/model"},
            "dataset": {"name": "org/data", "files": None},
            "cluster": {"image": "x/y:1"},
        }
        for key, values in sections.items():
            merged[key] = {**merged.get(key, {}), **values}
        return ["jobspec", "--config", str(e.config(**merged)), "--out", str(e.tmp / "specs")]

    return argv


def _consolidate(make: Callable[[Env], Path], out: str = "out", *extra: str):
    return lambda e: ["consolidate", "--checkpoint", str(make(e)), "--output", str(e.tmp / out), *extra]


def _merge(base: Callable[[Env], Path], adapter: Callable[[Env], Path], out: str = "out", *extra: str):
    return lambda e: [
        "merge",
        "--base",
        str(base(e)),
        "--adapter",
        str(adapter(e)),
        "--output",
        str(e.tmp / out),
        *extra,
    ]


SHARD_ENCODING = DEFAULT_ENCODING  # xser where torch-xla can write it (the trn1 line), else plain


def _nxd_checkpoint(e: Env, *, done: bool = True) -> Path:
    from nxd_writer import Dims, Layout, random_adapter, write_lora

    dims = Dims()
    layout = Layout(tp=2, encoding=SHARD_ENCODING)
    ckpt = write_lora(
        e.tmp / "train" / "checkpoint-3", random_adapter(dims, ["q_proj"]), dims, layout, ["q_proj"]
    )
    if not done:
        for marker in ckpt.rglob("done"):
            marker.unlink()
    return ckpt


def _with_a_flipped_bit(ckpt: Path) -> Path:
    """``ckpt`` with one bit flipped inside a stored tensor of its first shard (either encoding)."""
    flip_a_stored_bit(next(ckpt.rglob("tensor_*.pt" if SHARD_ENCODING == "xser" else "dp_rank_*.pt")))
    return ckpt


def flip_a_stored_bit(path: Path) -> Path:
    """Flip one exponent bit inside the largest tensor storage of a torch.save (zip) file."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2 + 1] ^= 0x40
    path.write_bytes(bytes(raw))
    return path


def _base_with_bin_only(e: Env) -> Path:
    base = e.tmp / "bin-base"
    shutil.copytree(e.model, base)
    for f in base.glob("*.safetensors"):
        f.unlink()
    (base / "pytorch_model.bin").write_bytes(b"\0")
    return base


def _adapter_with_extra_key(e: Env) -> Path:
    from safetensors.torch import load_file, save_file

    folder = e.adapter()
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.something"] = next(iter(tensors.values())).clone()
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def _truncated_adapter(e: Env) -> Path:
    folder = e.adapter()
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    return folder


def _adapter_without_config(e: Env) -> Path:
    folder = e.adapter()
    (folder / "adapter_config.json").unlink()
    return folder


def _adapter_config_text(text: str):
    def make(e: Env) -> Path:
        folder = e.adapter()
        (folder / "adapter_config.json").write_text(text)
        return folder

    return make


def _safetensors_header(header: dict, payload: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + payload


JSONL_ROW = json.dumps({"instruction": "a", "context": "b", "response": "c"}) + "\n"

CASES = [
    # ---- the config file and overrides (exit 2)
    Case(
        "config-missing",
        lambda e: ["status", "--config", str(e.tmp / "nope.yaml")],
        ("nope.yaml", "not found"),
        2,
    ),
    Case(
        "config-duplicate-section",
        lambda e: [
            "status",
            "--config",
            str(e.file("dup.yaml", "train:\n  learning_rate: 0.003\ntrain:\n  save_steps: 2\n")),
        ],
        ("dup.yaml", "'train' is written twice", "lines 1 and 3"),
        2,
    ),
    Case(
        "config-duplicate-key",
        lambda e: [
            "status",
            "--config",
            str(e.file("dupkey.yaml", "train:\n  save_steps: 2\n  save_steps: 100\n")),
        ],
        ("dupkey.yaml", "'save_steps' is written twice", "lines 2 and 3"),
        2,
    ),
    Case("config-is-a-folder", lambda e: ["status", "--config", str(e.tmp)], ("is a directory",), 2),
    Case(
        "config-not-yaml",
        lambda e: ["status", "--config", str(e.file("bad.yaml", "run: [unclosed\n"))],
        ("bad.yaml", "not valid YAML"),
        2,
    ),
    Case(
        "config-a-list",
        lambda e: ["status", "--config", str(e.file("list.yaml", "- a\n- b\n"))],
        ("top level must be a mapping",),
        2,
    ),
    Case(
        "config-not-utf8",
        lambda e: ["status", "--config", str(e.file("latin.yaml", b"run:\n  name: caf\xe9\n"))],
        ("not UTF-8",),
        2,
    ),
    Case("unknown-section", _stage("status", trainer={"x": 1}), ("trainer: unknown key",), 2),
    Case(
        "unknown-key-suggests",
        _stage("status", train={"max_step": 3}),
        ("train.max_step", "did you mean 'max_steps'"),
        2,
    ),
    Case(
        "wrong-type",
        _stage("status", train={"max_steps": "ten"}),
        ("train.max_steps", "must be an integer"),
        2,
    ),
    Case(
        "huge-step-count",
        _stage("status", train={"max_steps": 10**30}),
        ("train.max_steps", "100000000"),
        2,
    ),
    Case(
        "below-minimum",
        _stage("status", train={"micro_batch_size": 0}),
        ("train.micro_batch_size", "must be >= 1"),
        2,
    ),
    Case(
        "infinite-lr",
        _stage("status", train={"learning_rate": float("inf")}),
        ("train.learning_rate", "finite"),
        2,
    ),
    Case(
        "nan-lr-override",
        _override("status", "train.learning_rate=.nan"),
        ("override train.learning_rate=.nan", "finite"),
        2,
    ),
    Case("override-without-equals", _override("status", "train.max_steps"), ("expected key.sub=value",), 2),
    Case(
        "override-unknown-key",
        _override("status", "train.max_stepz=3"),
        ("unknown key train.max_stepz", "max_steps"),
        2,
    ),
    Case(
        "override-bad-value-blamed-on-override",
        _override("status", "train.max_steps=0"),
        ("override train.max_steps=0", "must be >= 1"),
        2,
    ),
    Case(
        "override-unclosed-list",
        _override("status", "dataset.files=[a.jsonl"),
        ("override dataset.files=[a.jsonl", "not valid YAML"),
        2,
    ),
    Case("override-not-a-key-path", _override("status", "train..x=1"), ("not a dotted key path",), 2),
    Case("override-into-a-number", _override("status", "train.max_steps.x=1"), ("has no sub-keys",), 2),
    Case("empty-run-root", _override("status", "run.root="), ("run.root", "must name the run directory"), 2),
    Case(
        "run-root-with-dot",
        lambda e: ["status", "--config", str(e.config(run={"name": "r", "root": str(e.tmp / "runs.v2")}))],
        ("run.root", "'.'", "neuron.cache_dir"),
        2,
    ),
    Case(
        "retired-gpu-strategy",
        _stage("status", gpu={"strategy": "fsdp"}),
        ("gpu.strategy", "no longer a setting"),
        2,
    ),
    Case(
        "retired-gpu-activation-checkpointing",
        _stage("status", gpu={"activation_checkpointing": True}),
        ("gpu.activation_checkpointing", "no longer a setting", "use train.activation_checkpointing"),
        2,
    ),
    Case(
        "native-on-trn1",
        _stage("tokenize", model={"platform": "neuron-native"}, neuron={"backend": "auto"}),
        (
            "cluster.instance_type",
            "trn1.32xlarge cannot run model.platform neuron-native",
            "model.platform: neuron",
        ),
        2,
    ),
    Case("bad-run-name", _stage("status", run={"name": "My_Run"}), ("run.name", "must match"), 2),
    Case(
        "unknown-platform",
        _stage("status", model={"platform": "tpu"}),
        ("model.platform", "must be one of"),
        2,
    ),
    Case("min-lr-above-lr", _stage("status", train={"min_lr": 1.0}), ("train.min_lr", "must be <="), 2),
    Case(
        "warmup-too-long",
        _stage("status", train={"warmup_steps": 400}),
        ("train.warmup_steps", "must be <"),
        2,
    ),
    Case(
        "adapter-eval-without-lora",
        _stage("status", lora={"enabled": False}, eval={"use_adapter": True}),
        ("eval.use_adapter",),
        2,
    ),
    Case(
        "cpu-devices-vs-tp",
        _stage("status", parallel={"tp": 2}, neuron={"cpu_devices": 3}),
        ("neuron.cpu_devices", "multiple of parallel.tp"),
        2,
    ),
    Case("missing-model-section", _stage("status", model=None), ("model", "required key missing"), 2),
    Case("no-lora-targets", _stage("status", lora={"target_modules": []}), ("lora.target_modules",), 2),
    Case(
        "bad-literal",
        _stage("status", train={"on_recompile": "explode"}),
        ("train.on_recompile", "must be one of"),
        2,
    ),
    Case("bool-override", _override("status", "lora.enabled=maybe"), ("lora.enabled", "true or false"), 2),
    Case(
        "dataset-name-and-files",
        _stage("status", dataset={"name": "org/data"}),
        ("dataset.name", "exactly one of"),
        2,
    ),
    Case(
        "ratios-do-not-add-up",
        _stage("status", dataset={"test_ratio": 0.5}),
        ("dataset.train_ratio", "must be 1"),
        2,
    ),
    Case(
        "cache-dir-with-dot",
        _tokenized("compile", neuron={"cache_dir": "/tmp/a.b"}),
        ("neuron.cache_dir",),
        2,
        ("run/compile",),
    ),
    # ---- data (tokenize)
    Case(
        "data-file-missing",
        lambda e: ["tokenize", "--config", str(e.config(dataset={"files": [str(e.tmp / "nope.jsonl")]}))],
        ("dataset.files", "nope.jsonl", "not found"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-file-symlink-loop",
        lambda e: ["tokenize", "--config", str(e.config(dataset={"files": [str(_symlink_loop(e.tmp))]}))],
        ("dataset.files", "loop.jsonl", "is a loop of symbolic links"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-file-dangling-symlink",
        lambda e: ["tokenize", "--config", str(e.config(dataset={"files": [str(_dangling(e.tmp))]}))],
        ("dataset.files", "gone.jsonl", "is a symbolic link to", "which does not exist"),
        1,
        ("run/tokenize",),
    ),
    Case("data-file-empty", _data("empty.jsonl", ""), ("empty.jsonl", "is empty"), 1, ("run/tokenize",)),
    Case(
        "data-blank-lines-only",
        _data("blank.jsonl", "\n\n  \n"),
        ("blank.jsonl", "is empty"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-not-utf8",
        _data("latin.jsonl", JSONL_ROW.encode() + b'{"instruction": "caf\xe9"}\n'),
        ("latin.jsonl line 2", "not UTF-8"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-bad-jsonl-row",
        _data("rows.jsonl", JSONL_ROW * 3 + '{"instruction": "a",\n'),
        ("rows.jsonl line 4", "not valid JSON"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-jsonl-row-not-object",
        _data("rows.jsonl", JSONL_ROW + "[1, 2]\n"),
        ("rows.jsonl line 2", "not a JSON object"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-json-document-broken",
        _data("rows.json", '[{"instruction": "a"},\n {"x": }]\n'),
        ("rows.json line 2", "not valid JSON"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-csv-not-utf8",
        _data("rows.csv", b"instruction,context,response\nx,y,caf\xe9\n"),
        ("rows.csv line 2", "not UTF-8"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-mixed-formats",
        lambda e: [
            "tokenize",
            "--config",
            str(
                e.config(
                    dataset={"files": [str(e.file("a.jsonl", JSONL_ROW)), str(e.file("b.csv", "x\n1\n"))]}
                )
            ),
        ],
        ("cannot tell one format",),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-missing-column",
        _data("rows.jsonl", json.dumps({"question": "a", "answer": "b"}) + "\n"),
        ("dataset.input_template", "needs column"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-every-output-empty",
        _data("rows.jsonl", json.dumps({"instruction": "a", "context": "b", "response": ""}) + "\n"),
        ("empty output",),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-seq-too-short",
        _stage("tokenize", dataset={"max_seq_length": 16}),
        ("dataset.max_seq_length", "cannot hold any"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-converter-module",
        _stage("tokenize", dataset={"converter": "no_such_module_xyz:convert"}),
        ("dataset.converter", "cannot import"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-converter-function",
        _stage("tokenize", dataset={"converter": "json:no_such_function"}),
        ("dataset.converter", "has no function"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-pad-token-unknown",
        _stage("tokenize", dataset={"pad_token": "<never-seen>"}),
        ("dataset.pad_token", "not in the tokenizer"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-tokenizer-path",
        _stage("tokenize", model={"tokenizer": "/nonexistent/tokenizer"}),
        ("model.tokenizer", "cannot load a tokenizer"),
        1,
        ("run/tokenize",),
    ),
    Case(
        "data-split-would-be-empty",
        _data("few.jsonl", JSONL_ROW * 3),
        ("would be empty",),
        1,
        ("run/tokenize",),
    ),
    # ---- stages: order, inputs, settings
    Case(
        "train-before-tokenize",
        _stage("train"),
        ("train needs a complete tokenize stage", "run `trnft tokenize"),
        1,
        ("run/train",),
        trn1=True,
    ),
    Case(
        "compile-before-tokenize",
        _stage("compile"),
        ("compile needs a complete tokenize stage",),
        1,
        ("run/compile",),
        trn1=True,
    ),
    Case(
        "consolidate-before-train",
        _tokenized("consolidate"),
        ("consolidate needs a complete train stage",),
        1,
        ("run/consolidate",),
    ),
    Case(
        "merge-before-train",
        _tokenized("merge"),
        ("merge needs a complete train stage", "run `trnft train"),
        1,
        ("run/merge",),
    ),
    Case(
        "evaluate-before-train",
        _tokenized("evaluate"),
        ("evaluate needs a complete train stage",),
        1,
        ("run/evaluate",),
    ),
    Case(
        "merge-on-a-corrupt-train",
        lambda e: _corrupt_train(e, "merge"),
        ("merge needs a complete train stage", "unreadable manifest", "--force"),
        1,
        ("run/merge",),
    ),
    Case(
        "lora-rank-above-the-layer",
        _tokenized("train", model={"platform": "gpu"}, lora={"r": 512}),
        ("lora.r: 512 is larger than", "use lora.r <="),
        2,
        ("run/train",),
    ),
    Case(
        "cpu-xla-eval-steps",  # the trn1 platform's trainers do not validate: refused, never ignored
        _stage("train", train={"eval_steps": 2}),
        ("train.eval_steps: 2 needs validation", "model.platform neuron does not run"),
        2,
        ("run/train",),
    ),
    Case(
        "cpu-xla-early-stopping",
        _stage("compile", train={"early_stopping_patience": 3}),
        ("train.early_stopping_patience: 3 needs validation",),
        2,
        ("run/compile",),
    ),
    Case(
        "lora-rank-above-the-layer-trn1-cpu",
        _tokenized("train", lora={"r": 512}),
        ("lora.r: 512 is larger than", "use lora.r <="),
        2,
        ("run/train/checkpoint-1",),
        trn1=True,
    ),
    Case(
        "gpu-train-before-tokenize",
        _stage("train", model={"platform": "gpu"}, fsdp={"devices": 2}),
        ("train needs a complete tokenize stage",),
        1,
        ("run/train",),
    ),
    Case(
        "run-root-is-a-file",
        lambda e: [
            "tokenize",
            "--config",
            str(e.config(run={"name": "r", "root": str(e.file("afile", "x"))})),
        ],
        ("run.root", "is a file"),
        1,
    ),
    Case(
        "status-run-root-missing",
        lambda e: ["status", "--config", str(e.config(run={"name": "r", "root": str(e.tmp / "nowhere")}))],
        ("run.root", "does not exist", "check run.root"),
    ),
    Case(
        "gpu-flash-on-cpu",
        _tokenized("train", model={"platform": "gpu"}, fsdp={"attn_implementation": "flash_attention_2"}),
        ("fsdp.attn_implementation", "needs CUDA"),
        2,
        ("run/train",),
    ),
    Case(
        "gpu-flex-on-cpu",
        _tokenized("train", model={"platform": "gpu"}, fsdp={"attn_implementation": "flex_attention"}),
        ("fsdp.attn_implementation", "trains on CUDA only"),
        2,
        ("run/train",),
    ),
    Case(
        "gpu-tp-vs-processes",
        _tokenized("train", model={"platform": "gpu"}, parallel={"tp": 2}),
        ("parallel.tp: 2 does not divide the 1 training processes",),
        2,
        ("run/train",),
    ),
    Case(
        "gpu-pipeline-parallel",
        _tokenized("train", model={"platform": "gpu"}, parallel={"pp": 2}),
        ("parallel.pp: 2, but the FSDP2 trainer has no pipeline parallelism (model.platform gpu)",),
        2,
        ("run/train",),
    ),
    Case(
        "neuron-hsdp-replicate",
        _tokenized("train", parallel={"replicate": 2}),
        ("parallel.replicate: 2 sets HSDP replica groups of the FSDP2 trainer", "model.platform neuron"),
        2,
        ("run/train",),
    ),
    Case(
        "old-and-new-name-of-one-key",
        _stage("status", parallel={"tp": 2}, neuron={"tp": 2}),
        ("neuron.tp and parallel.tp are both set", "keep only parallel.tp"),
        2,
        (),
    ),
    Case(
        "gpu-lora-target",
        _tokenized("train", model={"platform": "gpu"}, lora={"target_modules": ["qkv"]}),
        ("lora.target_modules", "'qkv'"),
        2,
        ("run/train",),
    ),
    Case(
        "gpu-global-batch",
        _tokenized("train", model={"platform": "gpu"}, train={"global_batch_size": 5}),
        ("train.global_batch_size: 5",),
        2,
        ("run/train",),
    ),
    Case(
        "train-on-changed-data",
        _tokenized("train", dataset={"max_seq_length": 128}),
        ("train needs a complete tokenize stage", "is stale", "dataset.max_seq_length"),
        1,
        ("run/train",),
        trn1=True,
    ),
    Case(
        "neuron-trainium-without-device",
        _tokenized("train", neuron={"backend": "trainium"}),
        ("neuron.backend", "needs a Neuron device"),
        1,
        ("run/train/checkpoint-1",),
        trn1=True,
    ),
    Case(
        "neuron-target-unsupported",
        _tokenized(
            "train", parallel={"tp": 1}, neuron={"cpu_devices": 1}, lora={"target_modules": ["lm_head"]}
        ),
        ("lora.target_modules", "'lm_head'"),
        1,
        ("run/train/checkpoint-1",),
        trn1=True,
    ),
    Case(
        "evaluate-vllm-on-cpu",
        _evaluate(backend="vllm"),
        ("eval.backend", "vllm needs CUDA"),
        2,
        ("run/evaluate",),
    ),
    Case(
        "evaluate-scorer-not-a-model",
        lambda e: _evaluate(scorer_model=str(e.tmp))(e),
        ("eval.scorer_model", "no config.json"),
        2,
        ("run/evaluate",),
    ),
    Case(
        "evaluate-scorer-without-weights",
        lambda e: _evaluate(scorer_model=str(e.file("scorer/config.json", "{}").parent))(e),
        ("eval.scorer_model", "no weights"),
        2,
        ("run/evaluate",),
    ),
    Case(
        "evaluate-scorer-layers",
        _evaluate(scorer_num_layers=99),
        ("eval.scorer_num_layers",),
        2,
        ("run/evaluate",),
    ),
    # ---- standalone consolidate
    Case(
        "consolidate-checkpoint-missing",
        _consolidate(lambda e: e.tmp / "nowhere"),
        ("--checkpoint", "does not exist"),
        1,
        ("out",),
    ),
    Case(
        "consolidate-output-not-empty",
        lambda e: _consolidate(_nxd_checkpoint, "busy")(e) if e.file("busy/x", "x") else [],
        ("--output", "not empty"),
        1,
    ),
    Case(
        "consolidate-output-is-a-file",
        lambda e: _consolidate(_nxd_checkpoint, "afile")(e) if e.file("afile", "x") else [],
        ("--output", "is a file"),
        1,
    ),
    Case(
        "consolidate-output-parent-is-a-file",
        lambda e: _consolidate(_nxd_checkpoint, "afile/out")(e) if e.file("afile", "x") else [],
        ("afile", "is a file"),
        1,
    ),
    Case(
        "consolidate-without-output",
        lambda e: ["consolidate", "--checkpoint", str(e.tmp)],
        ("pass --config FILE, or --output",),
        1,
    ),
    Case(
        "consolidate-shard-size",
        _consolidate(_nxd_checkpoint, "out", "--max-shard-size", "lots"),
        ("--max-shard-size", "cannot read"),
        1,
        ("out",),
    ),
    Case(
        "consolidate-incomplete",
        _consolidate(lambda e: _nxd_checkpoint(e, done=False)),
        ("incomplete checkpoint", "no 'done' marker"),
        1,
        ("out",),
    ),
    Case(
        "consolidate-empty-folder",
        _consolidate(lambda e: e.file("empty/.keep", "").parent),
        ("no checkpoint-<step> folders",),
        1,
        ("out",),
    ),
    Case(
        "consolidate-corrupt-shard",
        _consolidate(lambda e: _with_a_flipped_bit(_nxd_checkpoint(e))),
        ("fails its CRC32 check",),
        1,
        ("out",),
    ),
    Case(
        "consolidate-metadata-zero-bytes",
        _consolidate(lambda e: _emptied(_nxd_checkpoint(e), "mp_metadata_pp_rank_0.json")),
        ("mp_metadata_pp_rank_0.json: empty (0 bytes)", "consolidate an earlier one"),
        1,
        ("out",),
    ),
    Case(
        "consolidate-metadata-not-an-object",
        _consolidate(lambda e: _emptied(_nxd_checkpoint(e), "mp_metadata_pp_rank_0.json", "[1, 2]")),
        ("mp_metadata_pp_rank_0.json: holds a JSON list",),
        1,
        ("out",),
    ),
    Case(
        "consolidate-adapter-config-not-json",
        _consolidate(lambda e: _broken_json(_nxd_checkpoint(e))),
        ("adapter_config.json", "not valid JSON"),
        1,
        ("out",),
    ),
    # ---- standalone merge
    Case(
        "merge-base-missing",
        _merge(lambda e: e.tmp / "nobase", lambda e: e.adapter()),
        ("--base", "is not a folder"),
        1,
        ("out",),
    ),
    Case(
        "merge-adapter-missing",
        _merge(lambda e: e.model, lambda e: e.tmp / "noadapter"),
        ("--adapter", "is not a folder"),
        1,
        ("out",),
    ),
    Case(
        "merge-adapter-config-not-json",
        _merge(lambda e: e.model, _adapter_config_text("{not json")),
        ("adapter_config.json", "not valid JSON"),
        1,
        ("out",),
    ),
    Case(
        "merge-adapter-config-a-list",
        _merge(lambda e: e.model, _adapter_config_text("[1, 2]")),
        ("adapter_config.json", "JSON object"),
        1,
        ("out",),
    ),
    Case(
        "merge-adapter-config-missing",
        _merge(lambda e: e.model, _adapter_without_config),
        ("adapter_config.json", "missing"),
        1,
        ("out",),
    ),
    Case(
        "merge-dora",
        _merge(lambda e: e.model, lambda e: e.adapter(use_dora=True)),
        ("use_dora",),
        1,
        ("out",),
    ),
    Case(
        "merge-unknown-adapter-config-key",
        _merge(lambda e: e.model, lambda e: e.adapter(use_ortho_lora=True)),
        ("'use_ortho_lora' is not a LoRA setting this merge knows", "nothing is merged"),
        1,
        ("out",),
    ),
    Case(
        "merge-layer-replication",
        _merge(lambda e: e.model, lambda e: e.adapter(layer_replication=[[0, 2]])),
        ("layer_replication is set",),
        1,
        ("out",),
    ),
    Case(
        "merge-not-lora",
        _merge(lambda e: e.model, lambda e: e.adapter(peft_type="IA3")),
        ("peft_type IA3", "not supported"),
        1,
        ("out",),
    ),
    Case(
        "merge-foreign-key",
        _merge(lambda e: e.model, _adapter_with_extra_key),
        ("not a LoRA tensor name",),
        1,
        ("out",),
    ),
    Case(
        "merge-truncated-adapter",
        _merge(lambda e: e.model, _truncated_adapter),
        ("adapter_model.safetensors", "truncated or corrupt"),
        1,
        ("out",),
    ),
    Case(
        "merge-base-bin-only",
        _merge(_base_with_bin_only, lambda e: e.adapter()),
        ("only .bin weights",),
        1,
        ("out",),
    ),
    Case(
        "merge-output-not-empty",
        lambda e: (
            _merge(lambda e: e.model, lambda e: e.adapter(), "busy")(e) if e.file("busy/x", "x") else []
        ),
        ("--output", "not empty"),
        1,
    ),
    Case(
        "merge-output-is-a-file",
        lambda e: (
            _merge(lambda e: e.model, lambda e: e.adapter(), "afile")(e) if e.file("afile", "x") else []
        ),
        ("--output", "is a file"),
        1,
    ),
    Case(
        "merge-shard-size-zero",
        _merge(lambda e: e.model, lambda e: e.adapter(), "out", "--max-shard-size", "0"),
        ("--max-shard-size", "must be positive"),
        1,
        ("out",),
    ),
    Case(
        "merge-base-not-safetensors",
        _merge(lambda e: e.file("junk/model.safetensors", b"\x01\x00").parent, lambda e: e.adapter()),
        ("model.safetensors", "not a safetensors file"),
        1,
        ("out",),
    ),
    Case(
        "merge-adapter-header-lies",
        _merge(lambda e: e.model, lambda e: _header_lies(e.adapter())),
        ("takes", "bytes but"),
        1,
        ("out",),
    ),
    # ---- jobspec
    Case(
        "jobspec-tp-vs-cores",
        _jobspec(parallel={"tp": 6}, neuron={"backend": "auto"}),
        ("parallel.tp: 6 does not divide the 32 NeuronCores",),
        2,
        ("specs",),
    ),
    Case(
        "jobspec-platform-vs-instance",
        _jobspec(cluster={"instance_type": "p5.48xlarge"}),
        ("cluster.instance_type", "gpu instance"),
        2,
        ("specs",),
    ),
    Case(
        "jobspec-unknown-instance",
        _jobspec(cluster={"instance_type": "trn9.huge"}),
        ("cluster.instance_type", "trn9.huge"),
        2,
        ("specs",),
    ),
    Case(
        "jobspec-run-root-off-the-volume",
        lambda e: [
            "jobspec",
            "--config",
            str(e.config(cluster={"image": "x/y:1"})),
            "--out",
            str(e.tmp / "specs"),
        ],
        ("run.root", "not on the shared volume"),
        2,
        ("specs",),
    ),
    Case(
        "jobspec-bad-namespace",
        _stage("jobspec", cluster={"namespace": "Not_DNS"}),
        ("cluster.namespace", "must match"),
        2,
    ),
]


def _symlink_loop(tmp: Path) -> Path:
    (tmp / "loop.jsonl").symlink_to(tmp / "loop2.jsonl")
    (tmp / "loop2.jsonl").symlink_to(tmp / "loop.jsonl")
    return tmp / "loop.jsonl"


def _dangling(tmp: Path) -> Path:
    (tmp / "gone.jsonl").symlink_to(tmp / "moved-away.jsonl")
    return tmp / "gone.jsonl"


def _emptied(ckpt: Path, name: str, text: str = "") -> Path:
    """``ckpt`` with every file called ``name`` rewritten to ``text`` (a save cut off mid-write)."""
    files = list(ckpt.rglob(name))
    assert files, name
    for path in files:
        path.write_text(text)
    return ckpt


def _broken_json(ckpt: Path) -> Path:
    (next(ckpt.rglob("adapter_config.json"))).write_text("{oops")
    return ckpt


def _header_lies(folder: Path) -> Path:
    """Rewrite an adapter's safetensors header so one tensor claims fewer bytes than its shape needs."""
    path = folder / "adapter_model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["shape"] = [header[name]["shape"][0] * 2, *header[name]["shape"][1:]]
    path.write_bytes(_safetensors_header(header, raw[8 + n :]))
    del begin, end
    return folder


def test_the_catalog_is_large_enough():
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


@pytest.fixture
def env(tmp_path, tiny_llama, tokenized, monkeypatch) -> Env:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRNFT_DEBUG", raising=False)
    raw = smoke_raw(tmp_path / "run", tiny_llama)
    return Env(tmp_path, tiny_llama, tokenized, raw)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.trn1) if c.trn1 else c for c in CASES],
    ids=[c.id for c in CASES],
)
def test_bad_input_is_one_line_and_leaves_nothing(case: Case, env: Env, capsys):
    argv = case.argv(env)
    capsys.readouterr()  # what building the input printed
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == case.code, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"trnft {argv[0]}: error: "), lines[0]
    for word in case.words:
        assert word in lines[0], (word, lines[0])
    leftovers = [p for p in env.tmp.rglob("*") if ".staging-" in p.name]
    assert not leftovers, leftovers
    for rel in case.absent:
        assert not (env.tmp / rel).exists(), rel
