"""Consolidation round trips: shard a known model with the test-side writer, consolidate, compare bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from nxd_writer import Dims, Layout, random_adapter, random_model, write_full, write_lora
from safetensors.torch import load_file

from trnft.common import cli

pytestmark = pytest.mark.both_lines  # shared code whose libraries differ between the lines

GQA = Dims(heads=8, kv_heads=2)  # tp 4 and 8 need KV replication (x2, x4)
MHA = Dims(heads=8, kv_heads=8)
DEEP = Dims(heads=8, kv_heads=2, layers=4)  # for PP=2
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def consolidate(checkpoint, out) -> None:
    code = cli.main(
        ["consolidate", "--checkpoint", str(checkpoint), "--output", str(out), "--max-shard-size", "100KB"]
    )
    assert code == 0


def load_output(out) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


FULL_CASES = [
    # era, tp, pp, encoding, dims, fuse_qkv, tie
    ("new", 1, 1, "xser", GQA, False, False),
    ("new", 2, 1, "plain", GQA, False, False),
    ("new", 4, 1, "xser", GQA, False, False),
    ("new", 8, 1, "plain", GQA, False, False),
    ("new", 8, 1, "xser", GQA, True, False),
    ("new", 2, 1, "xser", MHA, True, False),
    ("new", 4, 1, "plain", MHA, False, False),
    ("new", 2, 2, "xser", DEEP, False, False),
    ("new", 4, 2, "plain", DEEP, False, False),
    ("new", 2, 1, "plain", GQA, False, True),
    ("old", 1, 1, "plain", GQA, False, False),
    ("old", 2, 1, "xser", GQA, False, False),
    ("old", 4, 1, "xser", GQA, False, False),
    ("old", 8, 1, "plain", GQA, True, False),
    ("old", 2, 2, "xser", DEEP, False, False),
    ("old", 4, 1, "plain", GQA, False, True),
]


@pytest.mark.parametrize(
    ("era", "tp", "pp", "encoding", "dims", "fuse_qkv", "tie"),
    FULL_CASES,
    ids=[
        f"{e}-tp{t}-pp{p}-{enc}-{'mha' if d.kv_heads == d.heads else 'gqa'}{'-fused' if f else ''}{'-tied' if ti else ''}"
        for e, t, p, enc, d, f, ti in FULL_CASES
    ],
)
def test_full_model_round_trip(tmp_path, era, tp, pp, encoding, dims, fuse_qkv, tie):
    sd = random_model(dims, tie=tie)
    ckpt = write_full(
        tmp_path / "checkpoint-7",
        sd,
        dims,
        Layout(era=era, tp=tp, pp=pp, encoding=encoding, fuse_qkv=fuse_qkv),
        tie=tie,
    )
    out = tmp_path / "out"
    consolidate(ckpt, out)
    expected = {k: v for k, v in sd.items() if not (tie and k == "lm_head.weight")}
    assert_same(load_output(out), expected)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected) and len(set(index["weight_map"].values())) > 1  # sharded
    assert (out / "config.json").is_file()


LORA_CASES = [
    # era, tp, encoding, dims, targets
    ("new", 1, "xser", GQA, ALL),
    ("new", 2, "plain", GQA, ALL),
    ("new", 4, "xser", GQA, ALL),
    ("new", 8, "plain", GQA, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("new", 2, "xser", GQA, ["q_proj", "v_proj"]),  # §6b: the MLP spec is there, its tensors are not
    ("new", 4, "plain", GQA, ["o_proj", "down_proj"]),  # GQA spec, no q/k/v LoRA, o_proj A still permuted
    ("new", 8, "xser", MHA, ["q_proj", "v_proj"]),  # the awsome sample's case at TP=8: no GQA layer
    ("old", 2, "plain", GQA, ["q_proj", "v_proj"]),
    ("old", 8, "plain", MHA, ALL),
]


@pytest.mark.parametrize(
    ("era", "tp", "encoding", "dims", "targets"),
    LORA_CASES,
    ids=[
        f"{e}-tp{t}-{enc}-{'mha' if d.kv_heads == d.heads else 'gqa'}-{'+'.join(x[0] for x in tg)}"
        for e, t, enc, d, tg in LORA_CASES
    ],
)
def test_lora_round_trip(tmp_path, era, tp, encoding, dims, targets):
    tie = ("gate_proj", "up_proj") + (
        ("q_proj", "k_proj", "v_proj") if dims.kv_heads < tp and era == "new" else ()
    )
    adapter = random_adapter(dims, targets, tie_fused=tie)
    ckpt = write_lora(
        tmp_path / "checkpoint-3", adapter, dims, Layout(era=era, tp=tp, encoding=encoding), targets
    )
    out = tmp_path / "out"
    consolidate(ckpt, out)
    assert_same(load_file(out / "adapter_model.safetensors"), adapter)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(targets)


def test_the_adapter_config_does_not_depend_on_the_order_peft_listed_the_modules_in(tmp_path):
    """PEFT writes target_modules from a set; equal settings must consolidate to equal bytes."""
    adapter = random_adapter(GQA, ALL)
    texts = []
    for name, targets in (("listed", ALL), ("reversed", ALL[::-1])):
        ckpt = write_lora(tmp_path / name / "checkpoint-1", adapter, GQA, Layout(tp=2), targets)
        consolidate(ckpt, tmp_path / name / "out")
        texts.append((tmp_path / name / "out" / "adapter_config.json").read_bytes())
    assert texts[0] == texts[1]
    assert json.loads(texts[0])["target_modules"] == sorted(ALL)


def test_fused_lora_a_goes_to_each_projection_exactly(tmp_path):
    """One LoRA A on Trainium -> the same A for gate and up (optimum-neuron's loading averages; we never do)."""
    adapter = random_adapter(GQA, ALL, tie_fused=("gate_proj", "up_proj", "q_proj", "k_proj", "v_proj"))
    ckpt = write_lora(tmp_path / "checkpoint-1", adapter, GQA, Layout(tp=4), ALL)
    consolidate(ckpt, tmp_path / "out")
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    p = "base_model.model.model.layers.0"
    assert torch.equal(got[f"{p}.mlp.gate_proj.lora_A.weight"], got[f"{p}.mlp.up_proj.lora_A.weight"])
    assert torch.equal(
        got[f"{p}.self_attn.k_proj.lora_A.weight"], adapter[f"{p}.self_attn.q_proj.lora_A.weight"]
    )


def test_a_run_dir_takes_the_newest_complete_checkpoint(tmp_path, capsys):
    train = tmp_path / "run" / "train"
    sd = random_model(GQA)
    write_full(train / "checkpoint-10", sd, GQA, Layout(tp=2))
    newer = write_full(train / "checkpoint-20", random_model(GQA, seed=5), GQA, Layout(tp=2))
    (newer / "shards" / "done").unlink()  # a save that never finished
    consolidate(tmp_path / "run", tmp_path / "out")
    out = capsys.readouterr().out
    assert "skipping checkpoint-20 (shards has no 'done' marker)" in out and "using checkpoint-10" in out
    assert_same(load_output(tmp_path / "out"), sd)


@pytest.mark.parametrize("start", ["shards", "checkpoint"])
def test_path_can_be_the_shards_folder_or_the_checkpoint(tmp_path, start):
    sd = random_model(GQA)
    ckpt = write_full(tmp_path / "checkpoint-5", sd, GQA, Layout(tp=2, encoding="plain"))
    code = cli.main(
        [
            "consolidate",
            "--checkpoint",
            str(ckpt / "shards" if start == "shards" else ckpt),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    assert_same(load_output(tmp_path / "out"), sd)


def _break(kind, ckpt):
    model = ckpt / "shards" / "model"
    if kind == "missing-rank":
        for p in model.glob("dp_rank_00_tp_rank_01_pp_rank_00.pt*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return "missing rank files dp_rank_00_tp_rank_01_pp_rank_00.pt"
    if kind == "no-done":
        (ckpt / "shards" / "done").unlink()
        return "incomplete checkpoint (shards has no 'done' marker)"
    if kind == "shape":
        f = model / "dp_rank_00_tp_rank_01_pp_rank_00.pt"
        tensors = torch.load(f, weights_only=True)
        name = "model.layers.1.mlp.down_proj.weight"
        tensors[name] = tensors[name][:, :-1].contiguous()
        torch.save(tensors, f)
        return "model.layers.1.mlp.down_proj.weight: shape differs across TP ranks (rank 0: [64, 64], rank 1: [64, 63])"
    if kind == "truncated":
        f = model / "dp_rank_00_tp_rank_00_pp_rank_00.pt"
        f.write_bytes(f.read_bytes()[:200])
        return "dp_rank_00_tp_rank_00_pp_rank_00.pt: not a zip file"
    if kind == "extra-key":
        for r in (0, 1):
            f = model / f"dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt"
            tensors = torch.load(f, weights_only=True)
            tensors["model.layers.0.mlp.mystery.weight"] = torch.zeros(2)
            torch.save(tensors, f)
        return "tensor model.layers.0.mlp.mystery.weight is not described by the checkpoint's metadata"
    if kind == "metadata":
        (ckpt / "shards" / "mp_metadata_pp_rank_0.json").unlink()
        return "missing mp_metadata_pp_rank_0.json"
    if kind == "config-shape":
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["intermediate_size"] = 96
        (ckpt / "config.json").write_text(json.dumps(cfg))
        return "model.layers.0.mlp.down_proj.weight: consolidated shape [64, 128] but the model config implies [64, 96]"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["missing-rank", "no-done", "shape", "truncated", "extra-key", "metadata", "config-shape"]
)
def test_broken_checkpoints_fail_with_one_line_and_no_output(tmp_path, capsys, kind):
    ckpt = write_full(tmp_path / "checkpoint-4", random_model(GQA), GQA, Layout(tp=2, encoding="plain"))
    message = _break(kind, ckpt)
    out = tmp_path / "out"
    code = cli.main(["consolidate", "--checkpoint", str(ckpt), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out.staging-*"))


def test_old_lora_of_a_gqa_layer_is_refused_rather_than_guessed(tmp_path, capsys):
    """optimum-neuron <= 0.2 dropped q/k/v LoRA under GQA; NEURON_FORMAT §6c says refuse."""
    sd = random_model(GQA)
    ckpt = write_full(tmp_path / "checkpoint-1", sd, GQA, Layout(era="old", tp=4, encoding="plain"))
    (ckpt / "shards").rename(ckpt / "adapter_shards")
    (ckpt / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    assert cli.main(["consolidate", "--checkpoint", str(ckpt), "--output", str(tmp_path / "out")]) == 1
    assert "cannot be consolidated correctly; retrain with optimum-neuron >= 0.3" in capsys.readouterr().err


def test_output_folder_must_be_new(tmp_path, capsys):
    ckpt = write_full(tmp_path / "checkpoint-4", random_model(GQA), GQA, Layout(tp=2))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert cli.main(["consolidate", "--checkpoint", str(ckpt), "--output", str(tmp_path / "out")]) == 1
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("encoding", ["plain", "xser"])
def test_memory_stays_at_a_block_not_the_model(tmp_path, encoding):
    """Consolidating a ~270 MB checkpoint peaks far below its size (pages are released per tensor).

    xser puts every tensor in its own file; a reader that keeps those mappings resident grows with the
    model (it once peaked at the model's size).
    """
    import os
    import subprocess
    import sys

    dims = Dims(hidden=1024, heads=8, kv_heads=2, intermediate=4096, vocab=8192, layers=4)
    sd = random_model(dims, dtype=torch.float32)
    model_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    ckpt = write_full(tmp_path / "checkpoint-1", sd, dims, Layout(tp=4, encoding=encoding))
    del sd
    launcher = (
        "import os, subprocess, sys\n"
        "p = subprocess.Popen(sys.argv[1:])\n"
        "_, status, usage = os.wait4(p.pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n"
    )
    cmd = [sys.executable, "-c", launcher, sys.executable, "-m", "trnft.common.cli", "consolidate",
           "--checkpoint", str(ckpt), "--output", str(tmp_path / "out")]  # fmt: skip
    code, peak_kib = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-2:]
    assert code == "0"
    peak = int(peak_kib) * 1024
    assert model_bytes > 250e6
    assert peak < 0.45 * model_bytes, (peak / 1e6, model_bytes / 1e6)
    assert os.path.getsize(tmp_path / "out" / "model-00001-of-00001.safetensors") >= model_bytes


@pytest.mark.parametrize("encoding", ["xser", "plain"])
def test_replicas_that_trained_apart_are_refused_naming_the_tensor(tmp_path, capsys, encoding):
    """Every tensor-parallel rank holds a whole copy of a replicated tensor (here the row-parallel o_proj's
    LoRA B); a checkpoint whose ranks hold different copies (each trained on its own slice of the sequence)
    has no single trained adapter, so consolidation refuses instead of exporting rank 0's."""
    adapter = random_adapter(GQA, ALL)
    name = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
    apart = dict(adapter)
    apart[name] = adapter[name] + 0.01 * adapter[name].abs().max()
    same = write_lora(tmp_path / "same" / "checkpoint-2", adapter, GQA, Layout(tp=2, encoding=encoding), ALL)
    other = write_lora(tmp_path / "apart" / "checkpoint-2", apart, GQA, Layout(tp=2, encoding=encoding), ALL)
    # Rank 1's files from the run whose copy moved: rank 0 and rank 1 now disagree on that tensor only.
    shards = Path("adapter_default") / "adapter_shards" / "model"
    for rank_file in (other / shards).glob("dp_rank_00_tp_rank_01_pp_rank_00*"):
        target = same / shards / rank_file.name
        shutil.rmtree(target) if rank_file.is_dir() else target.unlink()
        (shutil.copytree if rank_file.is_dir() else shutil.copy2)(rank_file, target)
    out = tmp_path / "out"
    assert cli.main(["consolidate", "--checkpoint", str(same), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layers.1.self_attn.o_proj.lora_B" in err[0], err
    assert "rank 1's copy differs from rank 0's by up to" in err[0] and "trained different copies" in err[0]
    assert not out.exists()


def test_replicas_within_bf16_rounding_are_one_tensor():
    from trnft.common.io.tensor_io import from_f32
    from trnft.neuron.consolidate import REPLICA_RTOL, replica_difference

    x = torch.randn(64, 32).numpy()
    assert replica_difference(from_f32(x, "F32"), from_f32(x * (1 + REPLICA_RTOL / 4), "F32")) is None
    assert replica_difference(from_f32(x, "BF16"), from_f32(x * (1 + REPLICA_RTOL / 4), "BF16")) is None
    gap, largest = replica_difference(from_f32(x, "F32"), from_f32(x * 1.05, "F32"))
    assert gap > 0.04 * abs(x).max() / 1.05 and largest == pytest.approx(abs(x).max())
