"""Which checkpoint a restart resumes from when the newest one's files did not survive.

The checkpoints here are written by the real writers (``torch.save``, distributed checkpoint, safetensors,
json) and then damaged the ways a full volume or a lost page cache damages them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from trnft.common.errors import TrnftError
from trnft.common.pipeline import checkpoints

FINGERPRINT = "abc123"


def _checkpoint(train_dir: Path, step: int, fingerprint: str = FINGERPRINT) -> Path:
    """A complete checkpoint with every file kind trainers write."""
    path = train_dir / f"checkpoint-{step}"
    (path / checkpoints.TRNFT_STATE).mkdir(parents=True)
    (path / checkpoints.TRNFT_STATE / "state.json").write_text(
        json.dumps({"step": step, "fingerprint": fingerprint})
    )
    torch.save({"w": torch.arange(64.0) * step}, path / checkpoints.TRNFT_STATE / "optimizer.pt")
    save_file({"a": torch.ones(32, 8) * step}, str(path / "adapter.safetensors"))
    dcp.save({"model": torch.full((256,), float(step))}, checkpoint_id=str(path / "model"))
    checkpoints.write_done(path)
    return path


@pytest.fixture
def train_dir(tmp_path):
    folder = tmp_path / "train"
    for step in (2, 4):
        _checkpoint(folder, step)
    return folder


def _cut(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


DAMAGES = {
    "state-zero-bytes": (
        lambda c: _cut(c / "trnft_state" / "state.json", 0),
        "trnft_state/state.json is 0 bytes",
    ),
    "torch-file-cut": (
        lambda c: _cut(c / "trnft_state" / "optimizer.pt"),
        "trnft_state/optimizer.pt is damaged",
    ),
    "safetensors-cut": (lambda c: _cut(c / "adapter.safetensors", 0.02), "adapter.safetensors is cut short"),
    "dcp-data-cut": (
        lambda c: _cut(next((c / "model").glob("*.distcp"))),
        "model/.metadata needs",
    ),
    "dcp-index-zero-bytes": (lambda c: _cut(c / "model" / ".metadata", 0), "model/.metadata is 0 bytes"),
    "every-file-zero-bytes": (
        lambda c: [_cut(f, 0) for f in c.rglob("*") if f.is_file()],
        "is 0 bytes",
    ),
}


def test_whole_checkpoints_verify(train_dir):
    assert checkpoints.verify_checkpoint(train_dir / "checkpoint-4") == ""


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_is_named_set_aside_and_the_one_before_resumed(train_dir, damage):
    spoil, says = DAMAGES[damage]
    spoil(train_dir / "checkpoint-4")
    lines: list[str] = []
    found = checkpoints.resume_point(train_dir, FINGERPRINT, lines.append)
    assert found == train_dir / "checkpoint-2"
    assert lines[0].startswith("train: skipping checkpoint-4: ") and says in lines[0], lines
    assert lines[0].endswith("moved it to checkpoint-4.unusable")
    assert lines[1] == "train: resuming from checkpoint-2, the newest checkpoint that verifies"
    # out of every reader's way (downstream stages take the newest complete checkpoint), kept for a look
    assert checkpoints.newest_complete(train_dir).step == 2
    assert (train_dir / "checkpoint-4.unusable" / "done").is_file()
    # and gone once training has saved past it
    _checkpoint(train_dir, 6)
    removed = checkpoints.prune(train_dir, keep=2, log=lambda _: None)
    assert (
        train_dir / "checkpoint-4.unusable" in removed and not (train_dir / "checkpoint-4.unusable").exists()
    )


def test_when_no_checkpoint_verifies_training_starts_over_and_says_so(train_dir):
    for step in (2, 4):
        _cut(train_dir / f"checkpoint-{step}" / "trnft_state" / "state.json", 0)
    lines: list[str] = []
    assert checkpoints.resume_point(train_dir, FINGERPRINT, lines.append) is None
    assert (
        lines[-1]
        == "train: no checkpoint verifies (skipped checkpoint-4, checkpoint-2); training starts at step 0"
    )
    # a set-aside checkpoint newer than every saved one stays until a newer save exists
    assert checkpoints.prune(train_dir, keep=2, log=lambda _: None) == []


def test_an_older_checkpoint_of_other_settings_is_not_resumed_silently(tmp_path):
    train_dir = tmp_path / "train"
    _checkpoint(train_dir, 2, fingerprint="other")
    _cut(_checkpoint(train_dir, 4) / "adapter.safetensors", 0)
    with pytest.raises(TrnftError, match="checkpoint-2: was written with other settings"):
        checkpoints.resume_point(train_dir, FINGERPRINT, lambda _: None)


def test_a_checkpoint_without_trnft_state_is_refused_not_set_aside(train_dir):
    """Not damage: another tool's checkpoint. Refused as before (the user decides), never moved."""
    (train_dir / "checkpoint-4" / "trnft_state" / "state.json").unlink()
    with pytest.raises(TrnftError, match=r"has no trnft_state/state\.json"):
        checkpoints.resume_point(train_dir, FINGERPRINT, lambda _: None)
    assert (train_dir / "checkpoint-4").is_dir()


def _committed(train_dir: Path, step: int) -> Path:
    """A checkpoint saved as the trainers save it: staged, then committed (which records the checksums)."""
    staged = _checkpoint(train_dir, step)
    staging = checkpoints.staging_dir(train_dir, step)
    staged.rename(staging)
    checkpoints.commit(train_dir, staging, step)
    return train_dir / f"checkpoint-{step}"


def _flip(path: Path, count: int = 64) -> None:
    """``count`` bytes in the middle of ``path`` inverted, the size unchanged (a bit rot, not a cut)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(len(data), middle + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_committed_checkpoint_records_every_file_and_verifies(tmp_path):
    path = _committed(tmp_path / "train", 3)
    table = json.loads((path / checkpoints.CHECKSUMS).read_text())["files"]
    files = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {checkpoints.CHECKSUMS}
    assert set(table) == files and "done" in table and "trnft_state/state.json" in table
    assert checkpoints.verify_checkpoint(path) == ""


@pytest.mark.parametrize(
    ("target", "says"),
    [
        (lambda c: next((c / "model").glob("*.distcp")), "has changed since it was saved"),
        (
            lambda c: c / "trnft_state" / "optimizer.pt",
            "trnft_state/optimizer.pt has changed since it was saved",
        ),
        (lambda c: c / "adapter.safetensors", "adapter.safetensors has changed since it was saved"),
    ],
)
def test_flipped_bytes_of_unchanged_size_are_found_and_the_checkpoint_set_aside(tmp_path, target, says):
    train_dir = tmp_path / "train"
    _committed(train_dir, 2)
    newest = _committed(train_dir, 4)
    _flip(target(newest))
    assert all(not checkpoints._file_problem(f) for f in newest.rglob("*") if f.is_file())  # structure intact
    lines: list[str] = []
    assert checkpoints.resume_point(train_dir, FINGERPRINT, lines.append) == train_dir / "checkpoint-2"
    assert says in lines[0] and lines[0].endswith("moved it to checkpoint-4.unusable"), lines


def test_swapped_states_are_set_aside_whichever_checkpoint_they_land_in(tmp_path):
    train_dir = tmp_path / "train"
    for step in (2, 4, 6):
        _committed(train_dir, step)
    a, b = (train_dir / f"checkpoint-{s}" / "trnft_state" / "state.json" for s in (4, 6))
    text_a, text_b = a.read_text(), b.read_text()
    a.write_text(text_b)
    b.write_text(text_a)
    lines: list[str] = []
    assert checkpoints.resume_point(train_dir, FINGERPRINT, lines.append) == train_dir / "checkpoint-2"
    assert "skipping checkpoint-6: trnft_state/state.json says step 4, the folder step 6" in lines[0]
    assert "skipping checkpoint-4: trnft_state/state.json says step 6, the folder step 4" in lines[1]


def test_a_trainer_state_of_another_step_is_caught_too(tmp_path):
    path = _committed(tmp_path / "train", 4)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    assert checkpoints.verify_checkpoint(path) == "trainer_state.json says step 5, the folder step 4"


def test_checkpoints_saved_before_checksums_still_resume(train_dir):
    assert not (train_dir / "checkpoint-4" / checkpoints.CHECKSUMS).exists()
    assert checkpoints.resume_point(train_dir, FINGERPRINT, lambda _: None) == train_dir / "checkpoint-4"
