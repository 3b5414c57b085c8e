"""Corrupt or missing bytes are never used: a flipped bit in a torch.save shard, an xser tensor file or a
safetensors file read downstream is one line naming the file; a full disk during consolidate or merge is
one line and leaves the earlier output as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import complete_by_hand
from nxd_writer import Dims, Layout, random_adapter, write_lora
from test_bad_inputs import SHARD_ENCODING, flip_a_stored_bit

from trnft.common import cli
from trnft.common.config.run_config import load_config
from trnft.common.pipeline.rundir import describe_files

DIMS = Dims()


def _checkpoint(tmp_path, encoding: str):
    adapter = random_adapter(DIMS, ["q_proj", "v_proj"])
    return write_lora(
        tmp_path / "train" / "checkpoint-3",
        adapter,
        DIMS,
        Layout(tp=2, encoding=encoding),
        ["q_proj", "v_proj"],
    )


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("encoding", ["plain", "xser"])
def test_a_flipped_bit_in_a_shard_is_refused_naming_the_file(tmp_path, capsys, encoding):
    ckpt = _checkpoint(tmp_path, encoding)
    good = tmp_path / "good"
    assert cli.main(["consolidate", "--checkpoint", str(ckpt), "--output", str(good)]) == 0
    # rank 0's files: every tensor in them is read (other ranks' copies of a replicated LoRA A are not)
    rank0 = ckpt / "adapter_default" / "adapter_shards" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt"
    tensors = sorted(Path(f"{rank0}.tensors").glob("tensor_*.pt"))
    corrupt = flip_a_stored_bit(tensors[-1] if encoding == "xser" else rank0)
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli.main(["consolidate", "--checkpoint", str(ckpt), "--output", str(out)]) == 1
    err = _one_line(capsys)
    assert str(corrupt) in err and "fails its CRC32 check" in err and "corrupt" in err
    assert not out.exists() and not list(tmp_path.glob(".out.staging-*"))


def test_a_flipped_bit_in_an_upstream_safetensors_file_stops_the_next_stage(make_run, tiny_llama, capsys):
    """safetensors has no checksum of its own; the consolidate manifest's sha256 catches it at merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = make_run()
    cfg = load_config(run.config)
    complete_by_hand(cfg, "train")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    adapter = run.root / "consolidate"
    model.save_pretrained(adapter)
    complete_by_hand(cfg, "consolidate", files=describe_files(adapter))
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside the tensor data: the header still parses
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(["merge", "--config", str(run.config)]) == 1
    err = _one_line(capsys)
    assert f"{weights}: its sha256 differs from the one the consolidate manifest recorded" in err
    assert not (run.root / "merge").exists()


def _merged_run(make_run, tiny_llama):
    """A run with a complete merge stage (a real merge of a real adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = make_run()
    cfg = load_config(run.config)
    complete_by_hand(cfg, "train")
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    model.save_pretrained(run.root / "consolidate")
    complete_by_hand(cfg, "consolidate", files=describe_files(run.root / "consolidate"))
    assert cli.main(["merge", "--config", str(run.config)]) == 0
    return run


def test_a_full_disk_during_merge_is_one_line_and_the_earlier_output_stays(
    make_run, tiny_llama, capsys, monkeypatch
):
    run = _merged_run(make_run, tiny_llama)
    before = {p.name: p.read_bytes() for p in (run.root / "merge").iterdir()}
    capsys.readouterr()
    monkeypatch.setenv("TRNFT_FAULT", "oserror-writing:ENOSPC:*")
    assert cli.main(["merge", "--config", str(run.config), "--force"]) == 1
    err = _one_line(capsys)
    assert "model-00001-of-00001.safetensors" in err and "no space left on the device" in err
    assert {p.name: p.read_bytes() for p in (run.root / "merge").iterdir()} == before  # untouched
    assert not [p for p in run.root.iterdir() if ".staging-" in p.name]


def test_a_full_disk_during_consolidate_is_one_line_and_the_earlier_output_stays(
    tmp_path, capsys, monkeypatch
):
    ckpt = _checkpoint(tmp_path, SHARD_ENCODING)
    out = tmp_path / "out"
    assert cli.main(["consolidate", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    shutil.copytree(out, tmp_path / "kept")
    capsys.readouterr()
    monkeypatch.setenv("TRNFT_FAULT", "oserror-writing:ENOSPC:adapter_model.safetensors")
    again = tmp_path / "again"
    assert cli.main(["consolidate", "--checkpoint", str(ckpt), "--output", str(again)]) == 1
    err = _one_line(capsys)
    assert "adapter_model.safetensors: no space left on the device" in err
    assert not again.exists() and not list(tmp_path.glob(".again.*"))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "kept").iterdir())
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "kept" / "adapter_config.json").read_text()
    )


def test_a_killed_standalone_run_leaves_staging_that_the_next_run_removes(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, "plain")
    leftover = tmp_path / ".out.staging-deadbeef"
    (leftover / "half").mkdir(parents=True)
    assert cli.main(["consolidate", "--checkpoint", str(ckpt), "--output", str(tmp_path / "out")]) == 0
    assert f"removing {leftover}, left by an interrupted run" in capsys.readouterr().out
    assert not leftover.exists() and (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("ENOSPC", "no space left on the device"),
        ("EDQUOT", "disk quota is used up"),
        ("EROFS", "read-only"),
        ("EACCES", "permission denied"),
        ("ENOTDIR", "a file is in the way"),
    ],
)
def test_storage_errors_are_one_line_naming_the_path(tmp_path, capsys, monkeypatch, name, words):
    """The mapping every command goes through, here with an injected failure of the merge's output write."""
    import errno as errnos

    from trnft.common.exits import STORAGE_ERRORS

    assert getattr(errnos, name) in STORAGE_ERRORS
    ckpt = _checkpoint(tmp_path, "plain")
    monkeypatch.setenv("TRNFT_FAULT", f"oserror-writing:{name}:adapter_model.safetensors")
    out = tmp_path / "out"
    assert cli.main(["consolidate", "--checkpoint", str(ckpt), "--output", str(out)]) == 1
    err = _one_line(capsys)
    assert (
        err.startswith("trnft consolidate: error: ") and "adapter_model.safetensors: " in err and words in err
    )
    assert not out.exists() and not list(tmp_path.glob(".out.staging-*"))


def test_an_unexpected_os_error_keeps_its_traceback(capsys):
    """Only storage errors a user can fix become one line; anything else is a bug and stays visible."""
    import errno as errnos

    from trnft.common.exits import run_command

    def work() -> int:
        raise OSError(errnos.EBADF, "Bad file descriptor")

    with pytest.raises(OSError, match="Bad file descriptor"):
        run_command("merge", work)
