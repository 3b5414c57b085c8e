"""The GPU trainer on CPU: FSDP2 (and DTensor tensor parallelism) over gloo, one process and two.

Runs go through the public CLI (``trnft train`` with ``fsdp.devices`` / ``parallel.tp``), which starts the ranks
itself. The two-rank runs are the acceptance of the sharded trainer: same losses as one process with the
same global batch, exact resume after SIGKILL, and a consolidated adapter equal to the one-process one.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import SHARDED_TRAIN, first_step_reference, ok, step_batch_loss
from safetensors.torch import load_file

from trnft.common import cli
from trnft.common.fsdp import checkpoint as gpu_checkpoint
from trnft.common.fsdp.trainer import ShardedTrainFigures
from trnft.common.training.data import TokenizeOutput

SHORT = {"max_steps": 12, "save_steps": 4, "logging_steps": 4, "warmup_steps": 2}
# The acceptance setting: weight decay on (large enough to show), validation whose 3 batches do not split
# evenly over 2 ranks, micro-batch 2 of packed rows.
SHARDED = SHARDED_TRAIN


def _gpu_run(make_run, **sections):
    return make_run(platform="gpu", **sections)


def _adapter(run, step):
    """The trained tensors of a checkpoint, read back in one process."""
    return dict(gpu_checkpoint.read_tensors(run.root / "train" / f"checkpoint-{step}"))


def _consolidated(run, step, out):
    code = cli.main(
        ["consolidate", "--checkpoint", str(run.root / "train" / f"checkpoint-{step}"), "--output", str(out)]
    )
    assert code == 0
    files = sorted(out.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


# --------------------------------------------------------------------------------------------------
# One process


def test_lora_training_lowers_the_loss_and_saves_adapter_only_sharded_checkpoints(make_run):
    run = _gpu_run(make_run, train={"max_steps": 40, "save_steps": 20, "logging_steps": 20})
    ok(run.stage("train"))
    fig = run.figures("train", ShardedTrainFigures)
    assert len(fig.losses) == 40 and fig.backend == "fsdp2-cpu" and (fig.dp, fig.tp) == (1, 1)
    # activation_checkpointing: auto keeps everything where the estimate fits (a tiny model, host memory)
    assert fig.recompute["choice"] == "off" and fig.recompute["configured"] == "auto"
    assert np.mean(fig.losses[-5:]) < 0.8 * np.mean(fig.losses[:5]), (fig.losses[:5], fig.losses[-5:])
    assert sorted(p.name for p in (run.root / "train").glob("checkpoint-*")) == [
        "checkpoint-20",
        "checkpoint-40",
    ]
    ckpt = run.root / "train" / "checkpoint-40"
    tensors = _adapter(run, 40)
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)  # no base weight written
    assert all(v.dtype == torch.float32 for v in tensors.values())  # fp32 adapters
    assert fig.trainable_parameters == sum(v.numel() for v in tensors.values())
    meta = gpu_checkpoint.CheckpointMeta.read(ckpt)
    assert meta.peft_config["r"] == 16 and meta.mode == "lora"
    assert (ckpt / "done").is_file() and (ckpt / "optimizer" / ".metadata").is_file()
    assert list((run.root / "train" / "tensorboard").glob("events.out.tfevents.*"))


def test_converted_adapter_is_a_peft_adapter_and_the_merged_model_is_the_trained_one(make_run, tiny_llama):
    """Weights after 8 steps, converted and merged, give the loss the trainer measured at step 9."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    run = _gpu_run(make_run, train={**SHORT, "max_steps": 9, "save_steps": 8})
    ok(run.stage("train"))
    adapter, merged = run.root / "adapter-8", run.root / "merged-8"
    saved = _consolidated(run, 8, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
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
    np.testing.assert_allclose(loss, run.figures("train", ShardedTrainFigures).losses[8], rtol=2e-4)


def test_full_fine_tuning_converts_to_hf_safetensors_in_the_base_dtype(make_run):
    from transformers import AutoModelForCausalLM

    run = _gpu_run(
        make_run,
        lora={"enabled": False},
        train={**SHORT, "max_steps": 5, "save_steps": 4, "learning_rate": 1e-3},
    )
    ok(run.stage("train"))
    assert any(
        k.endswith("embed_tokens.weight")
        for k in gpu_checkpoint.tensor_names(run.root / "train" / "checkpoint-4")
    )
    out = run.root / "full-4"
    _consolidated(run, 4, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32  # the smoke config's model.dtype
    split = TokenizeOutput(run.root / "tokenize").split("train")
    loss = step_batch_loss(model, split, 4, 4, run.raw["train"]["seed"])
    np.testing.assert_allclose(loss, run.figures("train", ShardedTrainFigures).losses[4], rtol=2e-4)


@pytest.mark.slow  # train, consolidate, merge
def test_first_step_loss_is_a_plain_forwards_and_the_merged_model_changed_the_base(make_run, tiny_llama):
    """The first step equals a plain transformers forward of the base (the XLA trainer is held to the same
    reference on the trn1 line, tests/neuron/test_train.py); the merged model is not the base."""
    from transformers import AutoModelForCausalLM

    gpu = _gpu_run(make_run, train={"max_steps": 3, "save_steps": 3, "warmup_steps": 1})
    ok(gpu.stage("train"))
    first = gpu.figures("train", ShardedTrainFigures).losses[0]
    reference = first_step_reference(gpu, tiny_llama)
    assert abs(first - reference) < 1e-5, (first, reference)
    ok(gpu.stage("consolidate"))
    ok(gpu.stage("merge"))
    merged = AutoModelForCausalLM.from_pretrained(gpu.root / "merge")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        ids = torch.arange(5, 37).reshape(1, -1)
        assert (merged(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_validation_early_stopping_and_tensorboard(make_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # A learning rate far below fp32 resolution leaves the adapted model's outputs bitwise unchanged, so
    # the second validation cannot improve on the first and patience 1 must stop the run there, whatever
    # the library versions make of the training curve.
    run = _gpu_run(
        make_run,
        train={"max_steps": 30, "save_steps": 100, "eval_steps": 2, "eval_batches": 4, "early_stopping_patience": 1,
               "learning_rate": 1e-30, "min_lr": 1e-30, "warmup_steps": 0},
    )  # fmt: skip
    ok(run.stage("train"))
    fig = run.figures("train", ShardedTrainFigures)
    assert fig.stopped_early and fig.end_step == 4
    assert [v.step for v in fig.validation] == [2, 4]
    assert fig.validation[1].loss == fig.validation[0].loss
    assert fig.final_checkpoint == f"checkpoint-{fig.end_step}"  # what was trained is kept
    tags = EventAccumulator(str(run.root / "train" / "tensorboard")).Reload().Tags()["scalars"]
    assert {"train/loss", "val/loss", "train/grad_norm", "train/learning_rate"} <= set(tags)
    ok(run.stage("consolidate"))


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
        model=gpt2, platform="gpu", lora={"target_modules": ["c_attn", "c_proj"]},
        train={**SHORT, "max_steps": 3, "save_steps": 3},
    )  # fmt: skip
    assert cli.main(["tokenize", "--config", str(run.config)]) == 0
    ok(run.stage("train"))
    for stage in ("consolidate", "merge"):
        assert cli.main([stage, "--config", str(run.config)]) == 0
    assert (
        json.loads((run.root / "consolidate" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    )
    AutoModelForCausalLM.from_pretrained(run.root / "merge")


# --------------------------------------------------------------------------------------------------
# Two ranks (gloo) against one process with the same global batch


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_llama, tokenized):
    """micro 2 x accumulation 2 on one process: the global batch of 2 ranks x micro 2 x accumulation 1."""
    from helpers import Run, smoke_raw

    def make(name, **sections):
        root = tmp_path_factory.mktemp(name) / "run"
        root.mkdir()
        shutil.copytree(tokenized, root / "tokenize")
        return Run(root, smoke_raw(root, tiny_llama, platform="gpu", **sections))

    single = make("single", train={**SHARDED, "gradient_accumulation_steps": 2})
    ok(single.stage("train"))
    return single, make


@pytest.fixture(scope="module")
def two_ranks(one_process):
    _, make = one_process
    run = make("dp2", train={**SHARDED, "gradient_accumulation_steps": 1}, fsdp={"devices": 2})
    ok(run.stage("train"))
    return run


def test_two_ranks_train_exactly_like_one_process(one_process, two_ranks):
    """Weight decay on, uneven validation, micro-batch 2, packed rows: the same losses within 1e-4."""
    single, make = one_process
    a, b = single.figures("train", ShardedTrainFigures), two_ranks.figures("train", ShardedTrainFigures)
    assert (b.dp, b.tp, a.dp) == (2, 1, 1) and two_ranks.manifest("train")["layout"]["world"] == 2
    assert a.loss_chunk_tokens == b.loss_chunk_tokens == 1024  # fsdp.chunked_loss: auto, on at tp 1
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b.grad_norms, a.grad_norms, rtol=1e-4, atol=1e-4)
    assert [v.step for v in b.validation] == [v.step for v in a.validation] == [3, 6]
    np.testing.assert_allclose([v.loss for v in b.validation], [v.loss for v in a.validation], rtol=1e-4)
    assert b.trainable_parameters == a.trainable_parameters  # counted over shards, not rank 0's
    # and the decay is real: without it the same run trains differently
    no_decay = make("nodecay", train={**SHARDED, "gradient_accumulation_steps": 2, "weight_decay": 0.0})
    ok(no_decay.stage("train"))
    assert abs(no_decay.figures("train", ShardedTrainFigures).losses[-1] - a.losses[-1]) > 1e-3


def test_a_two_rank_checkpoint_consolidates_to_the_one_process_adapter(one_process, two_ranks, tmp_path):
    single, _ = one_process
    mine, theirs = _consolidated(two_ranks, 6, tmp_path / "dp2"), _consolidated(single, 6, tmp_path / "one")
    assert mine.keys() == theirs.keys()
    config = single.manifest("train")["config"]
    # Adam moves a weight by about the learning rate per step at most. The layouts sum gradients in a
    # different order, and Adam's normalisation enlarges that difference where a gradient is near zero,
    # so allow 0.1 % of the largest distance training could have moved any weight.
    atol = 1e-3 * config["train.learning_rate"] * config["train.max_steps"]
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-4, atol=atol)


def test_two_rank_resume_after_sigkill_equals_the_uninterrupted_run(one_process, two_ranks):
    _, make = one_process
    broken = make("dp2-killed", train={**SHARDED, "gradient_accumulation_steps": 1}, fsdp={"devices": 2})
    killed = broken.stage("train", env={"TRNFT_FAULT": "kill-during-save:6"})
    assert killed.returncode == 137  # the SIGKILLed rank, as a retryable exit
    resumed = ok(broken.stage("train"))
    assert "resuming checkpoint-3 at step 3" in resumed.stdout
    a, b = two_ranks.figures("train", ShardedTrainFigures), broken.figures("train", ShardedTrainFigures)
    assert b.start_step == 3 and b.losses == a.losses
    ta, tb = _adapter(two_ranks, 6), _adapter(broken, 6)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_sigterm_to_one_rank_saves_the_step_it_was_in_and_the_rerun_ends_like_the_uninterrupted_run(
    one_process, two_ranks
):
    """An eviction: SIGTERM reaches rank 1 during step 4 (checkpoints are due at 3 and 6). Both ranks agree
    to stop after step 4, save checkpoint-4 and exit 143; the rerun resumes at step 4, not 3."""
    _, make = one_process
    evicted = make("dp2-term", train={**SHARDED, "gradient_accumulation_steps": 1}, fsdp={"devices": 2})
    stopped = evicted.stage("train", env={"TRNFT_FAULT": "term-during-step:4", "TRNFT_FAULT_RANK": "1"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "SIGTERM received; stopping after step 4 with checkpoint-4 saved" in stopped.stdout
    assert "stopped by SIGTERM" in stopped.stderr
    train_dir = evicted.root / "train"
    assert (train_dir / "checkpoint-4" / "done").is_file() and not (train_dir / "manifest.json").exists()
    resumed = ok(evicted.stage("train"))
    assert "resuming checkpoint-4 at step 4" in resumed.stdout
    a, b = two_ranks.figures("train", ShardedTrainFigures), evicted.figures("train", ShardedTrainFigures)
    assert b.start_step == 4 and b.losses == a.losses
    ta, tb = _adapter(two_ranks, 6), _adapter(evicted, 6)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def _adapted_logits(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(torch.arange(5, 69).reshape(2, -1)).logits


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_a_checkpoint_damaged_after_its_save_is_skipped_and_the_run_resumes_from_the_one_before(
    one_process, damage
):
    """A stop at step 4 saves checkpoint-4; then one of its distributed-checkpoint data files loses its
    tail (a full volume, a lost page cache) or has 64 bytes flipped at the same size (bit rot, which only the
    checksums recorded at the save reveal). The rerun names the file, sets checkpoint-4 aside, resumes from
    checkpoint-3 and ends exactly like the uninterrupted run."""
    single, make = one_process
    run = make(f"single-{damage}", train={**SHARDED, "gradient_accumulation_steps": 2})
    stopped = run.stage("train", env={"TRNFT_FAULT": "term-during-step:4"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    train_dir = run.root / "train"
    data = max((train_dir / "checkpoint-4").rglob("*.distcp"), key=lambda p: p.stat().st_size)
    relative = data.relative_to(train_dir / "checkpoint-4")
    if damage == "cut":
        os.truncate(data, data.stat().st_size // 2)
        says = f"skipping checkpoint-4: {relative.parent}/.metadata needs"
    else:
        raw = bytearray(data.read_bytes())
        middle = len(raw) // 2
        raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
        data.write_bytes(bytes(raw))
        says = f"skipping checkpoint-4: {relative} has changed since it was saved"
    resumed = ok(run.stage("train"))
    assert says in resumed.stdout, resumed.stdout
    assert "resuming checkpoint-3 at step 3" in resumed.stdout
    assert "checkpoint-4.unusable" not in {p.name for p in train_dir.iterdir()}  # pruned once 6 was saved
    a, b = single.figures("train", ShardedTrainFigures), run.figures("train", ShardedTrainFigures)
    assert b.start_step == 3 and b.losses == a.losses


def test_tensor_parallel_two_ranks_train_like_one_process(one_process, tmp_path, tiny_llama):
    """parallel.tp=2: the decoder projections split over 2 ranks (dp 1); the same losses and adapter."""
    single, make = one_process
    tp = make(
        "tp2", train={**SHARDED, "gradient_accumulation_steps": 2}, parallel={"tp": 2}, fsdp={"devices": 2}
    )
    ok(tp.stage("train"))
    a, b = single.figures("train", ShardedTrainFigures), tp.figures("train", ShardedTrainFigures)
    assert (b.dp, b.tp) == (1, 2)
    assert tp.manifest("train")["layout"]["loss_parallel"] is True  # logits split along the vocabulary
    assert b.loss_chunk_tokens is None and a.loss_chunk_tokens == 1024  # the logits path against the chunked
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-4, atol=1e-4)
    mine, theirs = _consolidated(tp, 6, tmp_path / "tp2"), _consolidated(single, 6, tmp_path / "one")
    assert mine.keys() == theirs.keys()
    # Row-parallel sums add in another order, and Adam turns a near-zero gradient's rounding into a full
    # step for that element, so compare what the adapters compute: the logits of the adapted model.
    logits = [_adapted_logits(tiny_llama, tmp_path / name) for name in ("tp2", "one")]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-3, atol=1e-3)


@pytest.mark.slow  # two more training runs; tests/common/test_recompute.py checks the policy by default
def test_recomputing_selectively_or_fully_trains_like_keeping_everything(one_process):
    """train.activation_checkpointing: selective and full recompute in the backward pass what the default
    (auto, which keeps everything for a tiny model on this machine) keeps; the numbers are the same."""
    single, make = one_process
    reference = single.figures("train", ShardedTrainFigures)
    assert "activation_checkpointing" not in SHARDED
    assert reference.recompute["configured"] == "auto" and reference.recompute["choice"] == "off"
    assert reference.recompute["estimated_peak_gib"]["off"] <= reference.recompute["budget_gib"]
    for mode in ("selective", "full"):
        run = make(
            mode, train={**SHARDED, "gradient_accumulation_steps": 2, "activation_checkpointing": mode}
        )
        ok(run.stage("train"))
        figures = run.figures("train", ShardedTrainFigures)
        assert figures.recompute["choice"] == figures.recompute["configured"] == mode
        np.testing.assert_allclose(figures.losses, reference.losses, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(figures.grad_norms, reference.grad_norms, rtol=1e-5, atol=1e-6)


def test_hsdp_two_replica_groups_train_like_one_process(one_process, tmp_path, tiny_llama):
    """parallel.replicate=2 on 2 ranks: HSDP with two replica groups of one shard each (gradients all-reduced
    between groups, not reduce-scattered); the same losses, and the checkpoint consolidates to the same
    adapter's logits."""
    single, make = one_process
    run = make(
        "hsdp",
        train={**SHARDED, "gradient_accumulation_steps": 1},
        parallel={"replicate": 2},
        fsdp={"devices": 2},
    )
    ok(run.stage("train"))
    assert run.manifest("train")["layout"]["replicate"] == 2
    a, b = single.figures("train", ShardedTrainFigures), run.figures("train", ShardedTrainFigures)
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b.grad_norms, a.grad_norms, rtol=1e-4, atol=1e-4)
    _consolidated(run, 6, tmp_path / "hsdp")
    _consolidated(single, 6, tmp_path / "one")
    logits = [_adapted_logits(tiny_llama, tmp_path / name) for name in ("hsdp", "one")]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("configured", "lora", "dp", "nodes", "groups"),
    [
        (None, True, 16, 2, 2),  # LoRA across nodes: one replica group per node
        (None, False, 16, 2, 1),  # full fine-tuning: plain FSDP
        (None, True, 8, 1, 1),  # one node
        (None, True, 6, 4, 1),  # nodes that do not split the ranks evenly
        (4, False, 16, 2, 4),
    ],
)
def test_replica_groups(configured, lora, dp, nodes, groups):
    from trnft.common.fsdp.parallel import replica_groups

    assert replica_groups(configured, lora=lora, dp=dp, nodes=nodes) == groups


def test_a_replicate_that_does_not_divide_the_ranks_is_one_line():
    from trnft.common.errors import ConfigError
    from trnft.common.fsdp.parallel import replica_groups

    with pytest.raises(ConfigError) as err:
        replica_groups(3, lora=True, dp=4, nodes=1)
    assert str(err.value) == (
        "parallel.replicate: 3 does not divide the 4 data-parallel ranks (processes / parallel.tp); use a divisor of 4"
    )


def test_cpu_offload_on_two_ranks_trains_like_one_process(one_process):
    """fsdp.cpu_offload: FSDP2 keeps parameters, gradients and Adam state in host memory (on the CPU
    here: what it checks is that the offload path builds, clips across devices and trains the same)."""
    single, make = one_process
    run = make(
        "offload",
        train={**SHARDED, "gradient_accumulation_steps": 1},
        fsdp={"devices": 2, "cpu_offload": True},
    )
    ok(run.stage("train"))
    a, b = single.figures("train", ShardedTrainFigures), run.figures("train", ShardedTrainFigures)
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b.grad_norms, a.grad_norms, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def full_fine_tuning(one_process, tmp_path_factory):
    """Full fine-tuning on one process (micro 2 x accumulation 2): its consolidated model, settings, factory."""
    _, make = one_process
    single_ft = {**SHARDED, "max_steps": 2, "save_steps": 2, "eval_steps": 0, "learning_rate": 1e-3}
    one = make("ft1", lora={"enabled": False}, train={**single_ft, "gradient_accumulation_steps": 2})
    ok(one.stage("train"))
    return _consolidated(one, 2, tmp_path_factory.mktemp("ft1-out")), single_ft, make


@pytest.mark.slow  # three processes twice; the LoRA two-rank tests run by default
@pytest.mark.parametrize(
    "tp, accumulation",
    [(1, 1), (2, 2)],
    ids=["dp2", "tp2-loss-parallel"],
)
def test_full_fine_tuning_on_two_ranks_consolidates_to_the_one_process_model(
    full_fine_tuning, tmp_path, tp, accumulation
):
    """dp 2, and tp 2 where the trained lm_head is split along the vocabulary (loss parallelism)."""
    theirs, single_ft, make = full_fine_tuning
    two = make(
        "ft2",
        lora={"enabled": False},
        train={**single_ft, "gradient_accumulation_steps": accumulation},
        parallel={"tp": tp},
        fsdp={"devices": 2},
    )
    ok(two.stage("train"))
    assert two.manifest("train")["layout"]["loss_parallel"] is (tp == 2)
    mine = _consolidated(two, 2, tmp_path / "ft2")
    assert mine.keys() == theirs.keys() and "model.embed_tokens.weight" in mine and "lm_head.weight" in mine
    # Row-parallel and vocabulary-parallel sums add in another order at tp 2; Adam turns a near-zero
    # gradient's rounding into a full lr-sized step for that element (measured: 4 of 65,536 elements of one
    # tensor by 4.2e-4 at lr 1e-3), so at tp 2 a few elements may differ by up to 2 x lr.
    for k in mine:
        far = (mine[k] - theirs[k]).abs() > 1e-5 + 1e-4 * theirs[k].abs()
        assert int(far.sum()) <= (mine[k].numel() // 1000 if tp > 1 else 0), k
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-4, atol=2e-3 if tp > 1 else 1e-5)


# --------------------------------------------------------------------------------------------------
# Refusals and broken checkpoints


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
        (
            {"fsdp": {"attn_implementation": "flash_attention_2"}},
            "fsdp.attn_implementation: flash_attention_2 needs CUDA",
        ),
        ({"parallel": {"tp": 2}}, "parallel.tp: 2 does not divide the 1 training processes"),
        (
            {"parallel": {"tp": 3}, "fsdp": {"devices": 3}},
            "parallel.tp: 3 does not divide the model's 4 attention heads",
        ),
        (
            {"gpu": {"strategy": "fsdp"}},
            "gpu.strategy: no longer a setting; the GPU trainer always shards with FSDP2",
        ),
    ],
    ids=["lora-target", "accumulation", "indivisible", "flash-on-cpu", "tp-world", "tp-heads", "retired-key"],
)
def test_bad_input_is_one_line_before_any_training(make_run, sections, message, capsys):
    run = _gpu_run(make_run, **sections)
    code = cli.main(["train", "--config", str(run.config)])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and err.strip().count("\n") == 0, err
    assert not (run.root / "train").exists()


def test_missing_tokenize_output_names_the_stage_to_run(tmp_path, tiny_llama):
    from helpers import Run, smoke_raw

    raw = smoke_raw(tmp_path / "run", tiny_llama, platform="gpu", fsdp={"devices": 2})
    proc = Run(tmp_path / "run", raw).stage("train")
    assert proc.returncode != 0 and "run `trnft tokenize --config <run.yaml>` first" in proc.stderr


def test_broken_checkpoints_fail_with_one_line_and_no_output(make_run, tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    run = _gpu_run(make_run, train={**SHORT, "max_steps": 2, "save_steps": 2, "warmup_steps": 1})
    ok(run.stage("train"))
    good = run.root / "train" / "checkpoint-2"

    def rewrite_model(ckpt, change):
        tensors = change(dict(gpu_checkpoint.read_tensors(ckpt)))
        shutil.rmtree(ckpt / "model")
        dcp.save(tensors, checkpoint_id=str(ckpt / "model"), no_dist=True)

    def tampered(kind):
        ckpt = tmp_path / kind / "checkpoint-2"
        shutil.copytree(good, ckpt)
        meta = json.loads((ckpt / "trnft.json").read_text())
        if kind == "no-done":
            (ckpt / "done").unlink()
            return ckpt, "incomplete checkpoint (no 'done' marker"
        if kind == "missing-b":
            rewrite_model(
                ckpt,
                lambda t: {k: v for i, (k, v) in enumerate(t.items()) if not (".lora_B." in k and i < 2)},
            )
            return ckpt, "has no lora_B weight"
        if kind == "foreign-key":
            rewrite_model(ckpt, lambda t: {**t, "something.else.weight": torch.zeros(2)})
            return ckpt, "checkpoint key something.else.weight: not a LoRA tensor"
        if kind == "rank":
            meta["peft_config"]["r"] = 4
            (ckpt / "trnft.json").write_text(json.dumps(meta))
            return ckpt, "but adapter_config says r=4"
        (ckpt / "trnft.json").unlink()
        return ckpt, "has no trnft.json"

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


# --------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
def test_fsdp2_and_tensor_parallel_on_two_cuda_devices(make_run, tmp_path):
    """bf16, activation checkpointing, flash attention when installed; dp 2 and tp 2 agree."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    runs = {}
    for name, tp in (("dp", 1), ("tp", 2)):
        runs[name] = _gpu_run(
            make_run,
            train={**SHORT, "bf16": True, "micro_batch_size": 2},
            parallel={"tp": tp},
            fsdp={"devices": 2},
        )
        ok(runs[name].stage("train"))
    a, b = (runs[n].figures("train", ShardedTrainFigures) for n in ("dp", "tp"))
    assert a.backend == "fsdp2-cuda" and a.losses[-1] < a.losses[0]
    np.testing.assert_allclose(a.losses, b.losses, rtol=2e-2)  # bf16 reductions differ by layout
    ok(runs["tp"].stage("consolidate"))


@pytest.mark.parametrize(
    ("save_steps", "read_at", "saved"),
    [(1, 2, ["checkpoint-1"]), (4, 4, [])],
    ids=["read-every-step", "read-two-steps-later"],
)
def test_a_non_finite_step_stops_the_run_before_it_is_saved(make_run, save_steps, read_at, saved):
    """The fused optimizer skips the non-finite step's update on the device; the step driver reads the
    figures at the next step that logs or saves and refuses there, before that step is saved."""
    run = _gpu_run(make_run, train={"learning_rate": 1e6, "min_lr": 0.0, "max_grad_norm": 0.0, "warmup_steps": 0,
                                    "max_steps": 5, "save_steps": save_steps, "logging_steps": save_steps})  # fmt: skip
    proc = run.stage("train")
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("trnft train: error: train: step 2 has a non-finite"), line
    assert f"its update was skipped on the device; stopped at step {read_at}" in line, line
    assert sorted(p.name for p in (run.root / "train").glob("checkpoint-*")) == saved
    assert not (run.root / "train" / "manifest.json").exists()
