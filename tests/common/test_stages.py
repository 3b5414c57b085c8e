"""The stage machinery: atomic output, skip when complete, --force, upstream refusal, status."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from trnft.common.config.run_config import load_config, with_overrides
from trnft.common.errors import TrnftError, UpstreamError
from trnft.common.pipeline.figures import Figures
from trnft.common.pipeline.registry import spec
from trnft.common.pipeline.rundir import RunDir
from trnft.common.pipeline.stages import StageOutcome, format_status, run_stage, stage_states

MINIMAL = {
    "run": {"name": "t", "root": "RUN"},
    "model": {"name_or_path": "org/model"},
    "dataset": {"name": "org/data"},
}


@pytest.fixture
def cfg(tmp_path):
    raw = json.loads(json.dumps(MINIMAL).replace("RUN", str(tmp_path / "run")))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@dataclass(frozen=True)
class CharFigures(Figures):
    KIND: ClassVar[str] = "test/chars"

    chars: int


def writing_body(text: str = "hello", calls: list | None = None):
    def body(ctx):
        if calls is not None:
            calls.append(ctx.out_dir)
        (ctx.out_dir / "data.txt").write_text(text)
        return StageOutcome(summary=f"wrote {len(text)} chars", figures=CharFigures(len(text)))

    return body


def test_stage_output_appears_complete_with_manifest(cfg):
    result = run_stage(spec("tokenize"), cfg, writing_body(), log=lambda m: None)
    out = Path(cfg.run.root) / "tokenize"
    assert result.path == out and not result.skipped
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    digest = "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert manifest["files"] == [{"path": "data.txt", "bytes": 5, "digest": digest}]
    assert manifest["figures"] == {"kind": "test/chars", "chars": 5}
    assert CharFigures.of(manifest).chars == 5
    assert {"torch", "transformers", "peft"} <= set(manifest["versions"])
    assert manifest["config"]["dataset"]["name"] == "org/data"
    # nothing but the final folder and the bookkeeping folder is left in the run root
    assert sorted(p.name for p in Path(cfg.run.root).iterdir()) == [".trnft", "tokenize"]


def test_crash_inside_the_body_leaves_no_visible_output(cfg):
    def body(ctx):
        (ctx.out_dir / "half.txt").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        run_stage(spec("tokenize"), cfg, body, log=lambda m: None)
    root = Path(cfg.run.root)
    assert not (root / "tokenize").exists()
    assert not list(root.glob("tokenize.staging-*"))
    assert next(r.state for r in stage_states(cfg)) == "failed"
    assert "disk full" in format_status(cfg)


def test_sigkill_before_rename_leaves_no_visible_output(cfg, tmp_path):
    """A process killed mid-stage (no cleanup runs) leaves only a staging folder; the next run removes it."""
    script = tmp_path / "die.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal
            from trnft.common.config.run_config import load_config
            from trnft.common.pipeline.registry import spec
            from trnft.common.pipeline.stages import StageOutcome, run_stage
            cfg = load_config({str(tmp_path / "run.yaml")!r})
            def body(ctx):
                (ctx.out_dir / "data.txt").write_text("half")
                os.kill(os.getpid(), signal.SIGKILL)
            run_stage(spec("tokenize"), cfg, body)
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True)
    assert proc.returncode == -9
    root = Path(cfg.run.root)
    assert not (root / "tokenize").exists()
    assert len(list(root.glob("tokenize.staging-*"))) == 1
    assert stage_states(cfg)[0].state == "incomplete"
    run_stage(spec("tokenize"), cfg, writing_body(), log=lambda m: None)
    assert not list(root.glob("tokenize.staging-*"))
    assert (root / "tokenize" / "data.txt").read_text() == "hello"


def test_complete_stage_is_skipped_and_force_redoes_it(cfg):
    calls: list = []
    logs: list[str] = []
    run_stage(spec("tokenize"), cfg, writing_body("one", calls), log=logs.append)
    second = run_stage(spec("tokenize"), cfg, writing_body("two", calls), log=logs.append)
    assert second.skipped and len(calls) == 1
    assert any("already complete" in m and "--force" in m for m in logs)
    assert (Path(cfg.run.root) / "tokenize" / "data.txt").read_text() == "one"
    forced = run_stage(spec("tokenize"), cfg, writing_body("two", calls), force=True, log=logs.append)
    assert not forced.skipped and len(calls) == 2
    assert (Path(cfg.run.root) / "tokenize" / "data.txt").read_text() == "two"


def test_config_change_redoes_a_stage_and_says_why(cfg):
    logs: list[str] = []
    run_stage(spec("tokenize"), cfg, writing_body("one"), log=logs.append)
    changed = with_overrides(cfg, ["dataset.max_seq_length=512"])
    result = run_stage(spec("tokenize"), changed, writing_body("two"), log=logs.append)
    assert not result.skipped
    assert any("redoing, config changed: dataset.max_seq_length" in m for m in logs)
    # a key outside the stage's fingerprint does not redo it
    other = with_overrides(changed, ["train.max_steps=50"])
    assert run_stage(spec("tokenize"), other, writing_body("three"), log=logs.append).skipped


def test_missing_upstream_refuses_before_any_work(cfg):
    calls: list = []
    with pytest.raises(UpstreamError) as err:
        run_stage(spec("compile"), cfg, writing_body(calls=calls), log=lambda m: None)
    assert "compile needs a complete tokenize stage" in str(err.value)
    assert "run `trnft tokenize --config" in str(err.value)
    assert calls == []
    assert not (Path(cfg.run.root) / "compile").exists()


def test_newer_upstream_output_marks_downstream_stale_and_redoes_it(cfg):
    quiet = lambda m: None  # noqa: E731
    run_stage(spec("tokenize"), cfg, writing_body("one"), log=quiet)
    run_stage(spec("compile"), cfg, writing_body("c"), log=quiet)
    assert [r.state for r in stage_states(cfg)][:2] == ["complete", "complete"]
    run_stage(spec("tokenize"), cfg, writing_body("new data"), force=True, log=quiet)
    assert [r.state for r in stage_states(cfg)][:2] == ["complete", "stale"]
    logs: list[str] = []
    assert not run_stage(spec("compile"), cfg, writing_body("c"), log=logs.append).skipped
    assert any("newer output of tokenize" in m for m in logs)


def test_in_place_stage_refuses_a_changed_config_without_force(cfg):
    quiet = lambda m: None  # noqa: E731
    run_stage(spec("tokenize"), cfg, writing_body(), log=quiet)
    run_stage(spec("train"), cfg, writing_body("weights"), log=quiet)
    changed = with_overrides(cfg, ["train.learning_rate=0.5"])
    with pytest.raises(
        TrnftError, match=r"train: .* was made with other settings \(config changed: train.learning_rate\)"
    ):
        run_stage(spec("train"), changed, writing_body("other"), log=quiet)
    # keys that do not decide the output (logging) do not count as a change
    assert run_stage(
        spec("train"), with_overrides(cfg, ["train.logging_steps=1"]), writing_body(), log=quiet
    ).skipped
    assert not run_stage(spec("train"), changed, writing_body("other"), force=True, log=quiet).skipped


def test_status_on_a_partial_run(cfg):
    quiet = lambda m: None  # noqa: E731
    run_stage(spec("tokenize"), cfg, writing_body(), log=quiet)
    rundir = RunDir(cfg.run.root)
    (rundir.stage_dir("train")).mkdir()
    rundir.write_progress("train", {"summary": "checkpoint-20 of 100 steps"})
    rows = {r.name: r for r in stage_states(cfg)}
    assert rows["tokenize"].state == "complete" and rows["tokenize"].summary == "wrote 5 chars"
    assert rows["compile"].state == "missing"
    assert rows["train"].state == "incomplete" and rows["train"].summary == "checkpoint-20 of 100 steps"
    text = format_status(cfg)
    assert text.splitlines()[2].split()[:2] == ["tokenize", "complete"]
    assert "checkpoint-20 of 100 steps" in text


def test_second_runner_of_a_stage_is_refused(cfg):
    rundir = RunDir(cfg.run.root)
    with rundir.lock("tokenize"), pytest.raises(TrnftError, match="already running"):
        run_stage(spec("tokenize"), cfg, writing_body(), log=lambda m: None)


def test_non_main_ranks_write_no_manifest(cfg, monkeypatch):
    run_stage(spec("tokenize"), cfg, writing_body(), log=lambda m: None)
    monkeypatch.setenv("RANK", "1")
    result = run_stage(spec("train"), cfg, writing_body("w"), log=lambda m: None)
    assert result.manifest == {}
    assert not (Path(cfg.run.root) / "train" / "manifest.json").exists()


def test_retries_in_a_cluster_job_are_bounded_and_progress_restarts_the_count(cfg, monkeypatch):
    """training-operator never bounds ExitCode retries (kubeflow/trainer#2045): the run directory does. With
    cluster.backoff_limit 2, the third start after two failures without progress refuses, permanently."""
    monkeypatch.setenv("TRNFT_JOB_NAME", "t-tokenize")
    cfg = with_overrides(cfg, ["cluster.backoff_limit=2"])

    def lost_peer(ctx):
        raise RuntimeError("NCCL watchdog: collective timed out")

    for _ in range(2):
        with pytest.raises(RuntimeError):
            run_stage(spec("tokenize"), cfg, lost_peer, log=lambda m: None)
    calls: list = []
    with pytest.raises(
        TrnftError, match=r"2 attempts since the start made no progress .*NCCL watchdog"
    ) as info:
        run_stage(spec("tokenize"), cfg, writing_body(calls=calls), log=lambda m: None)
    assert info.value.exit_code == 1 and calls == []  # permanent, and the body never ran
    assert "--force" in str(info.value)
    # --force clears the budget; success removes the record.
    run_stage(spec("tokenize"), cfg, writing_body(), force=True, log=lambda m: None)
    assert not (Path(cfg.run.root) / ".trnft" / "tokenize.attempts.json").exists()


def test_train_attempts_that_saved_a_new_checkpoint_do_not_use_the_budget(cfg, monkeypatch):
    monkeypatch.setenv("TRNFT_JOB_NAME", "t-train")
    cfg = with_overrides(cfg, ["cluster.backoff_limit=1"])
    rundir = RunDir(cfg.run.root)
    from trnft.common.pipeline import attempts

    attempts.begin(rundir.meta, "train", progress=None, limit=1, last_failure=None)
    with pytest.raises(TrnftError, match="1 attempts since the start"):
        attempts.begin(rundir.meta, "train", progress=None, limit=1, last_failure=None)
    attempts.begin(rundir.meta, "train", progress=40, limit=1, last_failure=None)  # checkpoint-40 since
    with pytest.raises(TrnftError, match="since checkpoint-40 made no progress"):
        attempts.begin(rundir.meta, "train", progress=40, limit=1, last_failure="evicted")


def test_local_runs_have_no_retry_budget(cfg, monkeypatch):
    monkeypatch.delenv("TRNFT_JOB_NAME", raising=False)
    cfg = with_overrides(cfg, ["cluster.backoff_limit=0"])
    run_stage(spec("tokenize"), cfg, writing_body(), log=lambda m: None)


@pytest.mark.parametrize(
    ("manifest", "failure", "state", "words"),
    [
        (b"null", None, "corrupt", "holds a JSON NoneType, not a manifest"),
        (b"[1, 2]", None, "corrupt", "holds a JSON list, not a manifest"),
        (b"\x89PNG\x00\xff\xfe", None, "corrupt", "unreadable manifest (UnicodeDecodeError"),
        (b'{"stage": "train", "status": "compl', None, "corrupt", "unreadable manifest (JSONDecodeError"),
        (None, b'{"stage": "train", "err', "failed", "its failure record"),
        (None, b'{"stage": "train", "at": "2026-12-05T00:00:00Z"}', "failed", "failed (no reason recorded)"),
        (None, b'["x"]', "failed", "is not a JSON object"),
        (None, b"\xff\xfe\x00", "failed", "cannot be read"),
    ],
)
def test_status_reads_every_manifest_and_failure_record_shape(
    run_config, capsys, manifest, failure, state, words
):
    """`trnft status` never dies on what a crash, a full disk or a hand edit left: it shows the stage as
    corrupt or failed with the file to look at, and exits 0."""
    from trnft.common import cli
    from trnft.common.config.run_config import load_config

    config = run_config()
    root = load_config(config).root
    if manifest is not None:
        (root / "train").mkdir(parents=True)
        (root / "train" / "manifest.json").write_bytes(manifest)
    if failure is not None:
        (root / ".trnft").mkdir(parents=True)
        (root / ".trnft" / "train.failed.json").write_bytes(failure)
    capsys.readouterr()
    assert cli.main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr()
    row = next(line for line in out.out.splitlines() if line.startswith("train "))
    assert row.split()[1] == state and words in row, row
    assert "Traceback" not in out.err


def test_a_stale_standalone_staging_folder_goes_only_when_its_writer_is_provably_gone(tmp_path):
    """Beside --output: a staging folder whose writer (pid + host) has exited on this host is removed; one
    written from another host may still be live and is kept, with a line saying so."""
    import socket
    import subprocess
    import sys

    from trnft.common.pipeline.rundir import OWNER_FILE, into_new_folder

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone = tmp_path / ".out.staging-aaaa1111"
    gone.mkdir()
    (gone / OWNER_FILE).write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")
    elsewhere = tmp_path / ".out.staging-bbbb2222"
    elsewhere.mkdir()
    (elsewhere / OWNER_FILE).write_text("12345 some-other-node\n")
    said: list[str] = []
    into_new_folder(tmp_path / "out", lambda staging: (staging / "f.txt").write_text("x"), log=said.append)
    assert (tmp_path / "out" / "f.txt").read_text() == "x" and not (tmp_path / "out" / OWNER_FILE).exists()
    assert not gone.exists() and elsewhere.exists()
    assert any("has exited" in line and str(gone) in line for line in said)
    assert any(line.startswith(f"keeping {elsewhere}: its writer (12345 some-other-node)") for line in said)
