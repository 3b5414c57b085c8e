"""The GPU path on CPU: Lightning single-process and DDP over gloo, checkpoints, resume, conversion, parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ok, step_batch_loss
from safetensors.torch import load_file

from trnft.common import cli
from trnft.common.training.data import TokenizeOutput

SHORT = {"max_steps": 12, "save_steps": 4, "logging_steps": 4, "warmup_steps": 2}


def _ckpt(run, step):
    return torch.load(
        run.root / "train" / f"checkpoint-{step}" / "lightning.ckpt", map_location="cpu", weights_only=False
    )


def test_lora_training_lowers_the_loss_and_saves_adapter_only_checkpoints(make_run):
    run = _gpu_run(make_run, train={"max_steps": 60, "save_steps": 20, "logging_steps": 20})
    ok(run.stage("train"))
    fig = run.manifest("train")["figures"]
    losses = fig["losses"]
    assert len(losses) == 60 and fig["backend"] == "lightning-single-cpu"
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), (losses[:5], losses[-5:])
    assert sorted(p.name for p in (run.root / "train").glob("checkpoint-*")) == [
        "checkpoint-40",
        "checkpoint-60",
    ]
    ckpt = _ckpt(run, 60)
    assert ckpt["state_dict"] and all(".lora_A." in k or ".lora_B." in k for k in ckpt["state_dict"])
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())  # fp32 adapters
    assert ckpt["trnft"]["peft_config"]["r"] == 16 and ckpt["trnft"]["mode"] == "lora"
    assert (run.root / "train" / "checkpoint-60" / "done").is_file()
    assert list((run.root / "train" / "tensorboard").glob("events.out.tfevents.*"))


def _gpu_run(make_run, **sections):
    return make_run(platform="gpu", **sections)


def test_resume_after_sigkill_during_a_save_equals_an_uninterrupted_run(make_run):
    whole = _gpu_run(make_run, train=SHORT)
    ok(whole.stage("train"))
    broken = _gpu_run(make_run, train=SHORT)
    killed = broken.stage("train", env={"TRNFT_FAULT": "kill-during-save:8"})
    assert killed.returncode == -9
    assert list((broken.root / "train").glob("checkpoint-8.staging-*"))  # the interrupted save
    resumed = ok(broken.stage("train"))
    assert (
        "removing checkpoint-8.staging-" in resumed.stdout
        and "resuming checkpoint-4 at step 4" in resumed.stdout
    )
    a, b = whole.manifest("train")["figures"], broken.manifest("train")["figures"]
    assert b["resumed_from"] == "checkpoint-4" and b["start_step"] == 4
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5)
    sa, sb = _ckpt(whole, 12)["state_dict"], _ckpt(broken, 12)["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-7)


def test_converted_adapter_is_a_peft_adapter_and_the_merged_model_is_the_trained_one(make_run, tiny_llama):
    """Weights after 8 steps, converted and merged, give the loss the trainer measured at step 9."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    run = _gpu_run(make_run, train={**SHORT, "max_steps": 9, "save_steps": 8})
    ok(run.stage("train"))
    adapter, merged = run.root / "adapter-8", run.root / "merged-8"
    assert (
        cli.main(
            [
                "consolidate",
                "--checkpoint",
                str(run.root / "train" / "checkpoint-8"),
                "--output",
                str(adapter),
            ]
        )
        == 0
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    saved = load_file(adapter / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(
        get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_llama),
            LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}),
        )
    )
    assert saved.keys() == expected.keys()  # key for key what PEFT itself saves
    assert all(saved[k].shape == expected[k].shape for k in saved)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter)
    loaded = get_peft_model_state_dict(peft_model)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)  # nothing missing, nothing unexpected

    assert (
        cli.main(["merge", "--base", str(tiny_llama), "--adapter", str(adapter), "--output", str(merged)])
        == 0
    )
    split = TokenizeOutput(run.root / "tokenize").split("train")
    loss = step_batch_loss(
        AutoModelForCausalLM.from_pretrained(merged), split, 8, 4, run.raw["train"]["seed"]
    )
    trained = run.manifest("train")["figures"]["losses"][8]
    np.testing.assert_allclose(loss, trained, rtol=2e-4)


def test_full_fine_tuning_converts_to_hf_safetensors_in_the_base_dtype(make_run, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    run = _gpu_run(
        make_run,
        lora={"enabled": False},
        train={**SHORT, "max_steps": 5, "save_steps": 4, "learning_rate": 1e-3},
    )
    ok(run.stage("train"))
    ckpt = _ckpt(run, 4)
    assert any(k.endswith("embed_tokens.weight") for k in ckpt["state_dict"])  # the whole model
    out = run.root / "full-4"
    assert (
        cli.main(
            ["consolidate", "--checkpoint", str(run.root / "train" / "checkpoint-4"), "--output", str(out)]
        )
        == 0
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32  # the smoke config's model.dtype
    split = TokenizeOutput(run.root / "tokenize").split("train")
    loss = step_batch_loss(model, split, 4, 4, run.raw["train"]["seed"])
    np.testing.assert_allclose(loss, run.manifest("train")["figures"]["losses"][4], rtol=2e-4)

    # The same checkpoint as FSDP's sharded state dict writes it (a torch.distributed.checkpoint folder
    # plus Lightning's meta.pt) converts to the same files.
    import torch.distributed.checkpoint as dcp

    from trnft.common.pipeline.checkpoints import write_done

    sharded = tmp_path / "sharded" / "checkpoint-4"
    folder = sharded / "lightning.ckpt"
    folder.mkdir(parents=True)
    dcp.save({"model": ckpt.pop("state_dict")}, checkpoint_id=str(folder), no_dist=True)
    torch.save(ckpt, folder / "meta.pt")
    write_done(sharded)
    out2 = tmp_path / "from-sharded"
    assert cli.main(["consolidate", "--checkpoint", str(sharded), "--output", str(out2)]) == 0
    a, b = (
        load_file(out / "model-00001-of-00001.safetensors"),
        load_file(out2 / "model-00001-of-00001.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_first_step_loss_matches_the_neuron_cpu_xla_trainer_and_both_adapters_merge(make_run, tiny_llama):
    from transformers import AutoModelForCausalLM

    common = {"max_steps": 3, "save_steps": 3, "warmup_steps": 1}
    neuron = make_run(train=common, neuron={"tp": 1, "cpu_devices": 1})
    gpu = _gpu_run(make_run, train=common)
    ok(neuron.stage("train"))
    ok(gpu.stage("train"))
    first_n = neuron.manifest("train")["figures"]["losses"][0]
    first_g = gpu.manifest("train")["figures"]["losses"][0]
    assert abs(first_n - first_g) < 1e-4, (first_n, first_g)
    logits = []
    for run in (neuron, gpu):
        ok(run.stage("consolidate"))
        ok(run.stage("merge"))
        model = AutoModelForCausalLM.from_pretrained(run.root / "merge")
        ids = torch.arange(5, 37).reshape(1, -1)
        with torch.no_grad():
            logits.append(model(ids).logits)
    # different LoRA A init streams and kernels: both changed the base, neither is broken
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        base_logits = base(torch.arange(5, 37).reshape(1, -1)).logits
    assert all((x - base_logits).abs().max() > 1e-3 for x in logits)
    assert set(os.listdir(neuron.root / "consolidate")) == set(os.listdir(gpu.root / "consolidate"))


def test_ddp_over_gloo_trains_on_the_same_batches_as_one_process(make_run):
    """2 ranks x micro 1 x accumulation 2 and 1 rank x micro 1 x accumulation 4: same global batch, same losses."""
    single = _gpu_run(
        make_run, train={**SHORT, "max_steps": 4, "gradient_accumulation_steps": 4, "micro_batch_size": 1}
    )
    ok(single.stage("train"))
    ddp = _gpu_run(
        make_run,
        train={**SHORT, "max_steps": 4, "gradient_accumulation_steps": 2, "micro_batch_size": 1},
        gpu={"strategy": "ddp"},
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "trnft.common.cli", "train", "--config", str(ddp.config)]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    ok(proc)
    a, b = single.manifest("train")["figures"], ddp.manifest("train")["figures"]
    assert b["backend"] == "lightning-ddp-cpu" and ddp.manifest("train")["layout"]["world"] == 2
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-4)


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"lora": {"target_modules": ["q_proj", "qkv"]}},
            "lora.target_modules: 'qkv' is not a linear layer of LlamaForCausalLM",
        ),
        (
            {"train": {"global_batch_size": 6}},
            "train.global_batch_size: 6 needs train.gradient_accumulation_steps=3",
        ),
        (
            {"train": {"global_batch_size": 5}},
            "train.global_batch_size: 5 is not a multiple of micro_batch_size 2",
        ),
        ({"gpu": {"strategy": "fsdp"}}, "gpu.strategy: fsdp needs CUDA devices"),
        (
            {"gpu": {"attn_implementation": "flash_attention_2"}},
            "gpu.attn_implementation: flash_attention_2 needs CUDA",
        ),
    ],
    ids=["lora-target", "accumulation", "indivisible", "fsdp-on-cpu", "flash-on-cpu"],
)
def test_bad_input_is_one_line_before_any_training(make_run, sections, message, capsys):
    run = _gpu_run(make_run, **sections)
    code = cli.main(["train", "--config", str(run.config)])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and err.strip().count("\n") == 0, err
    assert not list((run.root / "train").glob("checkpoint-*"))


def test_missing_tokenize_output_names_the_stage_to_run(tmp_path, tiny_llama):
    from helpers import Run, smoke_raw

    raw = smoke_raw(tmp_path / "run", tiny_llama, model={"platform": "gpu"})
    proc = Run(tmp_path / "run", raw).stage("train")
    assert proc.returncode != 0 and "run `trnft tokenize --config <run.yaml>` first" in proc.stderr


def test_validation_early_stopping_and_the_lr_in_tensorboard(make_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _gpu_run(
        make_run,
        train={"max_steps": 40, "save_steps": 100, "eval_steps": 2, "eval_batches": 4, "early_stopping_patience": 1,
               "learning_rate": 0.5, "min_lr": 0.5, "warmup_steps": 0, "max_grad_norm": 0.0},
    )  # fmt: skip
    ok(run.stage("train"))
    fig = run.manifest("train")["figures"]
    assert fig["stopped_early"] and fig["end_step"] < 40
    assert len(fig["validation"]) >= 2 and fig["validation"][0]["step"] == 2
    assert fig["final_checkpoint"] == f"checkpoint-{fig['end_step']}"  # what was trained is kept
    events = EventAccumulator(str(run.root / "train" / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "val_loss", "train/grad_norm"} <= set(tags) and any(
        t.startswith("lr-") for t in tags
    )
    ok(run.stage("consolidate"))


def test_fsdp_wraps_decoder_layers_and_lora_leaves_apart_for_any_family():
    """The wrap policy comes from the model (no imports by name); LoRA A/B get units of their own."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    from trnft.gpu.train import decoder_layer_classes

    for config, targets, layer in (
        (GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64), ["c_attn"], "GPT2Block"),
        (Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=64, vocab_size=64), ["q_proj"], "Qwen2DecoderLayer"),
    ):  # fmt: skip
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        classes = decoder_layer_classes(model)
        assert {c.__name__ for c in classes} == {layer}
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
        from trnft.gpu.train import wrap_policy

        policy = wrap_policy(classes, lora=True)
        wrapped = {
            n
            for n, m in peft_model.named_modules()
            if n and policy(module=m, recurse=False, nonwrapped_numel=1)
        }
        assert any(n.endswith("lora_A.default") for n in wrapped) and any(
            n.endswith("lora_B.default") for n in wrapped
        )
        assert all(not n.endswith("base_layer") for n in wrapped)
        assert any(type(m).__name__ == layer for n, m in peft_model.named_modules() if n in wrapped)


def test_an_unknown_family_trains_too(make_run, tmp_path):
    """GPT-2 (Conv1D layers, its own block class) through the same stage."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    from trnft.common.testing.fixtures import build_tiny_model

    llama = build_tiny_model(tmp_path / "ref", "llama")
    gpt2 = tmp_path / "gpt2"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(
        GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=512)
    ).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(llama).save_pretrained(gpt2)
    run = make_run(
        model=gpt2,
        platform="gpu",
        lora={"target_modules": ["c_attn", "c_proj"]},
        train={**SHORT, "max_steps": 3, "save_steps": 3},
    )
    assert cli.main(["tokenize", "--config", str(run.config)]) == 0
    ok(run.stage("train"))
    for stage in ("consolidate", "merge"):
        assert cli.main([stage, "--config", str(run.config)]) == 0
    assert (
        json.loads((run.root / "consolidate" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    )
    AutoModelForCausalLM.from_pretrained(run.root / "merge")


@pytest.mark.gpu
def test_fsdp_lora_on_two_cuda_devices(make_run):
    """FSDP FULL_SHARD, bf16, activation checkpointing on CUDA; the adapter converts like the CPU one."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    run = _gpu_run(make_run, train={**SHORT, "bf16": True}, gpu={"strategy": "fsdp"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "trnft.common.cli", "train", "--config", str(run.config)]  # fmt: skip
    ok(subprocess.run(cmd, capture_output=True, text=True, timeout=900))
    fig = run.manifest("train")["figures"]
    assert fig["backend"] == "lightning-fsdp-cuda" and fig["losses"][-1] < fig["losses"][0]
    ok(run.stage("consolidate"))


def test_broken_lightning_checkpoints_fail_with_one_line_and_no_output(make_run, tmp_path, capsys):
    import shutil

    run = _gpu_run(make_run, train={**SHORT, "max_steps": 2, "save_steps": 2, "warmup_steps": 1})
    ok(run.stage("train"))
    good = run.root / "train" / "checkpoint-2"

    def tampered(kind):
        ckpt = tmp_path / kind / "checkpoint-2"
        shutil.copytree(good, ckpt)
        if kind == "no-done":
            (ckpt / "done").unlink()
            return ckpt, "incomplete checkpoint (no 'done' marker beside lightning.ckpt)"
        data = torch.load(ckpt / "lightning.ckpt", weights_only=False)
        first_b = next(k for k in data["state_dict"] if ".lora_B." in k)
        if kind == "missing-b":
            del data["state_dict"][first_b]
            message = "has no lora_B weight"
        elif kind == "foreign-key":
            data["state_dict"]["model.something.else.weight"] = torch.zeros(2)
            message = "checkpoint key model.something.else.weight: not a LoRA tensor"
        elif kind == "rank":
            data["trnft"]["peft_config"]["r"] = 4
            message = "but adapter_config says r=4"
        elif kind == "no-meta":
            del data["trnft"]
            message = "has no 'trnft' entry"
        torch.save(data, ckpt / "lightning.ckpt")
        return ckpt, message

    for kind in ("no-done", "missing-b", "foreign-key", "rank", "no-meta"):
        ckpt, message = tampered(kind)
        out = tmp_path / f"out-{kind}"
        code = cli.main(["consolidate", "--checkpoint", str(ckpt), "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 1 and message in err and err.count("\n") == 1, (kind, err)
        assert not out.exists() and not list(tmp_path.glob(f".out-{kind}.staging-*")), kind
    code = cli.main(
        ["consolidate", "--checkpoint", str(tmp_path / "absent"), "--output", str(tmp_path / "o")]
    )
    assert code == 1 and "does not exist" in capsys.readouterr().err
