"""Every writer trnft uses, on a volume that is really full: one line, exit 1, nothing half-written.

The volume is a 64 KiB tmpfs mounted for the test (root with CAP_SYS_ADMIN, as in CI); where mounting is
not allowed the tests skip, saying so. Each library reports a full volume differently: an OSError with
ENOSPC (Python's own files), numpy's short write without errno, safetensors' Rust error carrying
``(os error 28)``, torch.save's zip writer failing a position check, and the distributed checkpoint's
``CheckpointException`` (a BaseException) holding each rank's error.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from trnft.common.exits import run_command


@pytest.fixture
def full_volume(tmp_path):
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()[:120]})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _dcp_save(path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(100_000)}, checkpoint_id=str(path))


def _safetensors_save(path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(100_000)}, str(path))


WRITERS = {
    "python-json": (lambda p: p.write_text(json.dumps(list(range(100_000)))), "No space left on the device"),
    "numpy-save": (lambda p: np.save(p, np.ones(100_000)), "A write stopped short"),
    "safetensors": (_safetensors_save, "SafetensorError: No space left on the device"),
    "torch-save": (lambda p: torch.save({"w": torch.ones(100_000)}, p), "A torch file write stopped short"),
    "distributed-checkpoint": (_dcp_save, "the volume is most likely full"),  # its torch.save fails
}


@pytest.mark.parametrize("writer", WRITERS)
def test_each_writer_on_a_full_volume_is_one_line_and_permanent(full_volume, writer, capsys):
    write, says = WRITERS[writer]
    assert run_command("merge", lambda: write(full_volume / "out")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trnft merge: error: ") and says in err[0], err
    assert "volume is most likely full" in err[0] or "free space or write elsewhere" in err[0]


def test_a_standalone_merge_to_a_full_volume_is_one_line_and_leaves_nothing(
    full_volume, tiny_llama, tmp_path
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora).save_pretrained(adapter)
    out = full_volume / "merged"
    argv = ["merge", "--base", str(tiny_llama), "--adapter", str(adapter), "--output", str(out)]
    proc = subprocess.run([sys.executable, "-m", "trnft.common.cli", *argv], capture_output=True, text=True)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and err[0].startswith("trnft merge: error: "), proc.stderr
    assert "space" in err[0] or "full" in err[0], err
    assert list(full_volume.iterdir()) == [], list(full_volume.iterdir())
