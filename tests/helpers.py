"""Helpers shared by the test packages (importable because pytest's pythonpath includes tests/)."""

from __future__ import annotations

import json
import os
import subprocess as _subprocess
import sys
from pathlib import Path
from typing import TypeVar

import yaml

F = TypeVar("F")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# The GPU trainer's short run with everything the sharding tests must cover: packed rows of two, weight
# decay, validation batches that do not split evenly over 2 ranks, a save to resume from.
SHARDED_TRAIN = {
    "max_steps": 6,
    "save_steps": 3,
    "logging_steps": 1,
    "warmup_steps": 1,
    "micro_batch_size": 2,
    "weight_decay": 5.0,
    "eval_steps": 3,
    "eval_batches": 3,
}


def smoke_raw(root: Path, model_dir: Path, *, platform: str | None = None, **sections) -> dict:
    """The smoke config as a dict, pointed at ``root`` and ``model_dir`` (and ``platform``: see
    :func:`set_platform`), with section overrides merged last."""
    from trnft.common.testing.fixtures import bundled_dataset_path

    raw = yaml.safe_load((EXAMPLES / "smoke.yaml").read_text())
    raw["run"]["root"] = str(root)
    raw["model"]["name_or_path"] = str(model_dir)
    raw["dataset"]["files"] = [str(bundled_dataset_path())]
    if platform:
        set_platform(raw, platform)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


# What each platform needs on top of the smoke config (as `trnft smoke --platform` does it): neuron-native
# takes a trn2/trn3 instance type and none of the XLA path's neuron.* settings.
PLATFORM_SECTIONS = {"neuron-native": {"cluster": {"instance_type": "trn2.48xlarge"}}}


def set_platform(raw: dict, platform: str) -> dict:
    """Point a raw smoke config at ``platform``: its parallel and neuron sections set up the XLA path's CPU
    rehearsal, so the other platforms start from their defaults (as ``trnft smoke --platform`` does)."""
    raw["model"]["platform"] = platform
    if platform != "neuron":
        raw.pop("neuron", None)
        raw.pop("parallel", None)
    for section, values in PLATFORM_SECTIONS.get(platform, {}).items():
        raw.setdefault(section, {}).update(values)
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# TRNFT_TEST_SUBPROCESS=1 runs every Run.stage as its own process (as before stages ran in-process).
SUBPROCESS_ENV = "TRNFT_TEST_SUBPROCESS"


class Run:
    """A run directory with its config file. ``stage()`` runs a stage through the CLI's entry function in
    this process (its exit code, stdout and stderr as a CompletedProcess), or as a ``python -m
    trnft.common.cli`` process where a test needs one: an ``env`` (fault injection, which may SIGKILL the
    process), ``subprocess=True``, or the trn1 platform's compile and train (torch-xla's CPU device is set up
    per process)."""

    def __init__(self, root: Path, raw: dict) -> None:
        self.root = root
        self.raw = raw
        self.config = write_config(root.parent / f"{root.name}.yaml", raw)

    def stage(
        self,
        stage: str,
        *overrides: str,
        env: dict[str, str] | None = None,
        timeout: int = 900,
        subprocess: bool = False,
    ) -> _subprocess.CompletedProcess:
        argv = [stage, "--config", str(self.config), *overrides]
        platform = self.raw.get("model", {}).get("platform", "neuron")
        xla = platform == "neuron" and stage in ("compile", "train")
        if env is None and not subprocess and not xla and os.environ.get(SUBPROCESS_ENV) != "1":
            return run_cli_in_process(argv)
        cmd = [sys.executable, "-m", "trnft.common.cli", *argv]
        full_env = {**os.environ, "PJRT_DEVICE": "CPU", **(env or {})}
        return _subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)

    def manifest(self, stage: str) -> dict:
        return json.loads((self.root / stage / "manifest.json").read_text())

    def figures(self, stage: str, kind: type[F]) -> F:
        """The stage's figures as their type (refused when the manifest holds another kind)."""
        return kind.of(self.manifest(stage))


def run_cli_in_process(argv: list[str]) -> _subprocess.CompletedProcess:
    """``trnft <argv>`` through ``cli.main`` in this process, as a CompletedProcess. What it writes is captured
    at the file descriptors, so processes it starts (torchrun's workers) are captured too; the environment
    and torch's thread count are put back afterwards (a stage sets process defaults and its platform's
    variables), so the next test starts from the same state."""
    import contextlib
    import tempfile

    import torch

    from trnft.common import cli

    saved_env, threads = dict(os.environ), torch.get_num_threads()
    os.environ["PJRT_DEVICE"] = "CPU"
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            with (
                open(1, "w", buffering=1, closefd=False) as py_out,
                open(2, "w", buffering=1, closefd=False) as py_err,
                contextlib.redirect_stdout(py_out),
                contextlib.redirect_stderr(py_err),
            ):
                try:
                    code = cli.main(argv)
                except SystemExit as exc:  # argparse's exit
                    code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            os.close(saved_fds[0])
            os.close(saved_fds[1])
            os.environ.clear()
            os.environ.update(saved_env)
            if torch.get_num_threads() != threads:  # setting it unasked pins MKL's threads (other sums)
                torch.set_num_threads(threads)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
    return _subprocess.CompletedProcess(["trnft", *argv], code, *texts)


def ok(proc: _subprocess.CompletedProcess) -> _subprocess.CompletedProcess:
    """Assert a stage process succeeded, showing its output when it did not."""
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


def step_batch_loss(model, split, step: int, global_batch: int, seed: int) -> float:
    """The trainer's loss definition (sum over the global batch / its supervised tokens), in plain torch."""
    import torch

    from trnft.common.training.data import IGNORE_INDEX, batch_indices, segment_attention_mask

    idx = batch_indices(step, global_batch, len(split), seed)
    rows = {k: torch.from_numpy(v) for k, v in split.rows(idx).items()}
    with torch.no_grad():
        logits = model(
            input_ids=rows["input_ids"],
            attention_mask=segment_attention_mask(rows["segment_ids"]),
            position_ids=rows["position_ids"],
        ).logits[:, :-1]
    labels = rows["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total.item() / max(1, int((labels != IGNORE_INDEX).sum()))


def first_step_reference(run, model_dir) -> float:
    """The first step's loss of ``run`` computed by a plain transformers forward of the base model in
    ``model_dir`` (what every trainer's first LoRA step must log: B starts at zero)."""
    from transformers import AutoModelForCausalLM

    from trnft.common.training.data import TokenizeOutput

    split = TokenizeOutput(run.root / "tokenize").split("train")
    train = run.raw["train"]
    global_batch = train["micro_batch_size"] * train["gradient_accumulation_steps"]
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return step_batch_loss(base, split, 0, global_batch, train["seed"])


def complete_by_hand(cfg, stage: str, files: list[dict] | None = None) -> dict:
    """Write ``stage``'s manifest as if it had run with ``cfg`` (its fingerprint over the current upstream
    manifests), so tests can put a stage in place without running it. Returns the manifest."""
    from trnft.common.pipeline import registry
    from trnft.common.pipeline.rundir import RunDir, output_digest
    from trnft.common.pipeline.stages import fingerprint_of

    spec = registry.spec(stage)
    rundir = RunDir(cfg.run.root)
    upstream = {name: rundir.manifest(name) for name in spec.needs(cfg)}
    external = spec.inputs(cfg)
    fingerprint, subset = fingerprint_of(spec, cfg, upstream, external)
    folder = rundir.stage_dir(stage)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "stage": stage, "status": "complete", "fingerprint": fingerprint, "config": subset,
        "external_inputs": external, "upstream": {n: m.get("output_digest") for n, m in upstream.items()},
        "files": files or [], "output_digest": output_digest(files or []), "summary": "made by hand",
    }  # fmt: skip
    rundir.write_manifest(folder, manifest)
    return manifest
