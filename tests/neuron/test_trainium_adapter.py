"""The Trainium backend through optimum-neuron 0.4.5's real trainer, model and PEFT code, on torch-xla's CPU.

``trnft train`` runs under torchrun exactly as in the Kubernetes train job, with ``neuron.backend=trainium``.
Only the packages that are not on PyPI (neuronx-distributed, torch-neuronx, libneuronxla) are replaced, by the
tensor-parallel-size-1 doubles in ``tests/neuron_sdk_doubles`` (``TRNFT_TRAINIUM_REHEARSAL=1`` skips the device
check and the preflight). Everything else, optimum-neuron's ``NeuronTrainer``, ``NeuronModelForCausalLM``,
``get_peft_model``, its accelerator, optimizer wrapper and checkpoint writer, is the real code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Run, ok, smoke_raw, step_batch_loss, write_config

from trnft.common.config.run_config import config_from_dict
from trnft.common.errors import ConfigError
from trnft.common.training.data import TokenizeOutput, batch_indices
from trnft.neuron.trainium import TrainiumTrainFigures

pytestmark = [pytest.mark.integration, pytest.mark.trn1]  # the trn1 line (tests/trn1_line.sh)

DOUBLES = Path(__file__).resolve().parents[1] / "neuron_sdk_doubles"
# Padded rows of 2048 tokens: NxD's flash-attention kernel takes multiples of 2048 and no packing.
FLASH_DATASET = {"packing": False, "max_seq_length": 2048}
TRAIN = {
    "max_steps": 6,
    "save_steps": 3,
    "logging_steps": 1,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "warmup_steps": 2,
    "keep_checkpoints": 3,
}


def torchrun(run: Run, stage: str, *overrides: str, env: dict[str, str] | None = None, nproc: int = 1):
    """``torchrun --standalone --nproc_per_node <nproc> -m trnft.common.cli <stage>``, as the train job runs it.

    With ``nproc`` > 1 the NxD double carries torch-xla's collectives over gloo (``xla_multiprocess_cpu``).

    ``stage`` "precompile" runs the compile stage's trial run (``-m trnft.neuron.precompile``) instead.
    """
    entry = ["trnft.neuron.precompile"] if stage == "precompile" else ["trnft.common.cli", stage]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        *entry,
        "--config",
        str(run.config),
        *overrides,
    ]
    full = {
        **os.environ,
        "PJRT_DEVICE": "CPU",
        "TRNFT_TRAINIUM_REHEARSAL": "1",
        "PYTHONPATH": os.pathsep.join([str(DOUBLES), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=900)


@pytest.fixture(scope="module")
def flash_tokenized(tmp_path_factory, tiny_llama) -> Path:
    from trnft.common import tokenize

    root = tmp_path_factory.mktemp("trn-tokenized")
    tokenize.run(config_from_dict(smoke_raw(root, tiny_llama, dataset=FLASH_DATASET)), log=lambda m: None)
    return root / "tokenize"


def _trainium_run(root: Path, model: Path, tokenized: Path, **sections) -> Run:
    root.mkdir()
    shutil.copytree(tokenized, root / "tokenize")
    sections = {"dataset": FLASH_DATASET, "train": TRAIN, **sections}
    sections["neuron"] = {"backend": "trainium", "cpu_devices": 1, **sections.get("neuron", {})}
    sections["parallel"] = {"tp": 1, **sections.get("parallel", {})}
    return Run(root, smoke_raw(root, model, **sections))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama, flash_tokenized) -> Run:
    """Six steps, checkpoints at 3 and 6, never interrupted."""
    run = _trainium_run(tmp_path_factory.mktemp("trn") / "run", tiny_llama, flash_tokenized)
    ok(torchrun(run, "train"))
    return run


def _adapter_tensors(checkpoint: Path, tp_rank: int = 0) -> dict[str, torch.Tensor]:
    from trnft.neuron.nxd_format import open_shard_set
    from trnft.neuron.xla_trainer import to_torch

    shard = open_shard_set(checkpoint / "adapter_default" / "adapter_shards").file(tp_rank, 0)
    return {n: to_torch(shard.lazy(n).read()) for n in shard.names()}


def _global_batch() -> int:
    return TRAIN["micro_batch_size"] * TRAIN["gradient_accumulation_steps"]


def _seed(run: Run) -> int:
    return run.raw["train"]["seed"]


def test_a_full_run_writes_a_manifest_with_what_optimum_neuron_ran(uninterrupted):
    manifest = uninterrupted.manifest("train")
    figures = TrainiumTrainFigures.of(manifest)
    assert manifest["status"] == "complete"
    assert figures.end_step == 6 and figures.loss_steps == [1, 2, 3, 4, 5, 6]  # logging_steps 1
    assert figures.first_loss == figures.losses[0] and figures.steps_this_run == 6
    assert figures.checkpoints_saved == ["checkpoint-3", "checkpoint-6"]
    assert figures.final_checkpoint == "checkpoint-6"
    # Every setting reached optimum-neuron (read back from its own objects, not from trnft's config).
    settings = figures.optimum_neuron
    assert settings.attn_implementation == "flash_attention_2"
    assert settings.use_xser is True and settings.fuse_qkv is False
    assert settings.recompute_causal_mask is True and settings.zero_1 is False
    assert (settings.tensor_parallel_size, settings.data_parallel_size) == (1, 1)
    assert (settings.save_steps, settings.logging_steps) == (3, 1)
    assert settings.gradient_checkpointing is True  # train.activation_checkpointing: full (the default)
    assert settings.save_only_model is True  # the optimizer moments are saved once, by trnft, per rank
    for step in (3, 6):
        state = json.loads(
            (uninterrupted.root / "train" / f"checkpoint-{step}" / "trnft_state" / "state.json").read_text()
        )
        assert state["step"] == step and state["not_restored_on_resume"] == ["xla_rng_state"]
    assert not list((uninterrupted.root / "train").glob("*staging*"))


def test_the_trainer_reads_trnft_batches_and_computes_trnft_loss(uninterrupted, tiny_llama):
    """Step 1's loss (LoRA B is zero, so the base model's) equals trnft's loss of batch_indices(0)."""
    from transformers import AutoModelForCausalLM

    split = TokenizeOutput(uninterrupted.root / "tokenize").split("train")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    expected = step_batch_loss(base, split, 0, _global_batch(), _seed(uninterrupted))
    other = step_batch_loss(base, split, 1, _global_batch(), _seed(uninterrupted))
    logged = uninterrupted.figures("train", TrainiumTrainFigures).losses
    assert abs(expected - other) > 1e-2  # batches differ enough that a wrong order would show
    np.testing.assert_allclose(logged[0], expected, rtol=1e-4)


def test_consolidating_its_checkpoint_gives_the_model_that_trained(uninterrupted, tiny_llama, tmp_path):
    """The adapter of checkpoint-3, consolidated by trnft, reproduces the loss the trainer logged at step 4."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trnft.common import cli

    adapter = tmp_path / "adapter-3"
    checkpoint = uninterrupted.root / "train" / "checkpoint-3"
    assert cli.main(["consolidate", "--checkpoint", str(checkpoint), "--output", str(adapter)]) == 0
    split = TokenizeOutput(uninterrupted.root / "tokenize").split("train")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base_loss = step_batch_loss(base, split, 3, _global_batch(), _seed(uninterrupted))
    tuned = PeftModel.from_pretrained(base, adapter)
    loss = step_batch_loss(tuned, split, 3, _global_batch(), _seed(uninterrupted))
    logged = uninterrupted.figures("train", TrainiumTrainFigures).losses
    assert abs(base_loss - logged[3]) > 1e-2  # training moved the model
    np.testing.assert_allclose(loss, logged[3], rtol=2e-4)
    # The stage form consumes the newest checkpoint.
    consolidated = ok(uninterrupted.stage("consolidate")).stdout
    assert "using checkpoint-6" in consolidated


def test_sigkill_during_a_save_then_rerun_continues_exactly(
    tmp_path, tiny_llama, flash_tokenized, uninterrupted
):
    run = _trainium_run(tmp_path / "run", tiny_llama, flash_tokenized)
    killed = torchrun(run, "train", env={"TRNFT_FAULT": "kill-during-save:6"})
    assert killed.returncode != 0
    train_dir = run.root / "train"
    assert (train_dir / "checkpoint-3" / "trnft_state" / "state.json").is_file()
    assert not (train_dir / "checkpoint-6").exists()
    assert (train_dir / "checkpoint-6.staging-trn").is_dir()  # the half-done save
    # Another process, the same train.seed: LoRA started from the same A, so step 3 is the same adapter.
    first, straight = (_adapter_tensors(r / "train" / "checkpoint-3") for r in (run.root, uninterrupted.root))
    assert all(torch.equal(first[name], straight[name]) for name in straight)

    resumed = ok(torchrun(run, "train"))
    assert "removing checkpoint-6.staging-trn, an interrupted save" in resumed.stdout
    assert "resuming from checkpoint-3 at step 3" in resumed.stdout
    assert "not restored on resume: xla_rng_state" in resumed.stdout
    figures = run.figures("train", TrainiumTrainFigures)
    assert figures.start_step == 3 and figures.end_step == 6
    assert figures.checkpoints_saved == ["checkpoint-6"]  # names keep increasing
    assert {"optimizer_moments", "lr_schedule", "data_position", "step", "weights"} <= set(
        figures.restored_on_resume
    )
    assert figures.not_restored_on_resume == ["xla_rng_state"]
    expected = uninterrupted.figures("train", TrainiumTrainFigures).losses[3:]
    assert figures.losses == expected  # same data, LR and optimizer state from step 4 on
    mine = _adapter_tensors(train_dir / "checkpoint-6")
    theirs = _adapter_tensors(uninterrupted.root / "train" / "checkpoint-6")
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_the_production_default_bf16_keeps_trained_weights_and_adam_moments_fp32(
    tmp_path, tiny_llama, flash_tokenized, lora
):
    """train.bf16 with a bf16 model (the shipped examples) through the real NeuronTrainer: matmuls in bf16
    (autocast), trained weights and Adam moments fp32 (optimum-neuron's FULL_BF16 would make both bf16)."""
    run = _trainium_run(
        tmp_path / "run", tiny_llama, flash_tokenized, lora={"enabled": lora},
        train={**TRAIN, "bf16": True, "max_steps": 2, "save_steps": 2, "warmup_steps": 1},
    )  # fmt: skip
    run.raw["model"]["dtype"] = "bfloat16"  # the shipped examples' base dtype
    write_config(run.config, run.raw)
    ok(torchrun(run, "train"))
    settings = run.figures("train", TrainiumTrainFigures).optimum_neuron
    assert settings.mixed_precision == "AUTOCAST_BF16"
    assert settings.trained_dtypes == ["float32"] and settings.optimizer_state_dtypes == ["float32"]
    if lora:
        saved = _adapter_tensors(run.root / "train" / "checkpoint-2")
        assert saved and all(t.dtype == torch.float32 for t in saved.values())


def test_lora_starts_from_train_seed(tmp_path, tiny_llama, flash_tokenized):
    """train.seed draws LoRA's initial A. At a learning rate of 1e-30 the adapter saved after one step is its
    initial value (the data order, which the seed also picks, cannot move it), so two seeds must differ
    there; unseeded, both runs would start from torch's fixed default generator and agree."""
    one_frozen_step = {**TRAIN, "learning_rate": 1e-30, "min_lr": 0.0, "max_steps": 1, "save_steps": 1,
                       "warmup_steps": 0}  # fmt: skip
    adapters = []
    for seed in (7, 8):
        run = _trainium_run(
            tmp_path / f"seed{seed}", tiny_llama, flash_tokenized, train={**one_frozen_step, "seed": seed}
        )
        ok(torchrun(run, "train"))
        adapters.append(_adapter_tensors(run.root / "train" / "checkpoint-1"))
    a_names = [n for n in adapters[0] if "lora_A" in n]
    assert a_names and all(not torch.equal(adapters[0][n], adapters[1][n]) for n in a_names)
    b_names = [n for n in adapters[0] if "lora_B" in n]  # B starts at zero whatever the seed
    assert all(float(adapters[0][n].abs().max()) < 1e-20 for n in b_names)


@pytest.mark.extended  # the LoRA resume above covers the same code path in the default run
def test_full_fine_tuning_resumes_exactly_and_consolidates(tmp_path, tiny_llama, flash_tokenized):
    """lora.enabled=false: optimum-neuron's model shards (shards/) are resumed and consolidated the same way."""
    full = {"lora": {"enabled": False}, "train": {**TRAIN, "learning_rate": 1e-4, "min_lr": 1e-5}}
    straight = _trainium_run(tmp_path / "straight", tiny_llama, flash_tokenized, **full)
    ok(torchrun(straight, "train"))
    run = _trainium_run(tmp_path / "run", tiny_llama, flash_tokenized, **full)
    assert torchrun(run, "train", env={"TRNFT_FAULT": "kill-during-save:6"}).returncode != 0
    resumed = ok(torchrun(run, "train"))
    assert "resuming from checkpoint-3 at step 3" in resumed.stdout
    losses = run.figures("train", TrainiumTrainFigures).losses
    assert losses == straight.figures("train", TrainiumTrainFigures).losses[3:]
    consolidated = ok(run.stage("consolidate")).stdout
    assert "full from checkpoint-6" in consolidated
    from safetensors.torch import load_file

    weights = {}
    for f in sorted((run.root / "consolidate").glob("*.safetensors")):
        weights.update(load_file(f))
    assert "model.layers.0.mlp.gate_proj.weight" in weights and "model.layers.0.mlp.up_proj.weight" in weights


def test_eager_attention_keeps_packed_samples_apart(make_run, tiny_llama):
    """neuron.attention=eager with packed rows: step 1's loss is trnft's segment-masked loss, not causal-only."""
    from transformers import AutoModelForCausalLM

    from trnft.common.training.data import IGNORE_INDEX

    run = make_run(
        parallel={"tp": 1},
        neuron={"backend": "trainium", "cpu_devices": 1, "attention": "eager"},
        train={**TRAIN, "max_steps": 1, "save_steps": 1, "warmup_steps": 0},
    )
    ok(torchrun(run, "train"))
    figures = run.figures("train", TrainiumTrainFigures)
    logged = figures.losses
    assert figures.optimum_neuron.attn_implementation == "eager"
    split = TokenizeOutput(run.root / "tokenize").split("train")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    seed = run.raw["train"]["seed"]
    isolated = step_batch_loss(base, split, 0, _global_batch(), seed)
    rows = {
        k: torch.from_numpy(v)
        for k, v in split.rows(batch_indices(0, _global_batch(), len(split), seed)).items()
    }
    with torch.no_grad():
        logits = base(input_ids=rows["input_ids"].long(), position_ids=rows["position_ids"].long()).logits[
            :, :-1
        ]
    labels = rows["labels"][:, 1:].long()
    leaky = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    ).item() / int((labels != IGNORE_INDEX).sum())
    assert abs(isolated - leaky) > 1e-3  # packing without the mask would be visible
    np.testing.assert_allclose(logged[0], isolated, rtol=1e-4)


def test_precompilation_traces_the_steps_and_saves_nothing(tmp_path, tiny_llama, flash_tokenized):
    run = _trainium_run(
        tmp_path / "run",
        tiny_llama,
        flash_tokenized,
        train={**TRAIN, "compile_steps": 2, "logging_steps": 50},
    )
    proc = ok(torchrun(run, "precompile", env={"NEURON_EXTRACT_GRAPHS_ONLY": "1"}))
    # logging_steps (50) > compile_steps (2): the trial run still logs once, so that graph is compiled too.
    assert "precompile: traced 2 steps, loss logged at step(s) [2]" in proc.stdout
    train_dir = run.root / "train"
    assert not train_dir.exists() or not any(train_dir.glob("checkpoint-*"))
    assert not (train_dir / "manifest.json").exists()


def test_the_train_stage_refuses_to_run_under_neuron_parallel_compile(tmp_path, tiny_llama, flash_tokenized):
    """Outputs are not real while graphs are extracted: a wrapped `trnft train` must not write checkpoints."""
    run = _trainium_run(tmp_path / "run", tiny_llama, flash_tokenized, train=TRAIN)
    proc = run.stage("train", env={"NEURON_EXTRACT_GRAPHS_ONLY": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "trnft train: error: train: started under neuron_parallel_compile (NEURON_EXTRACT_GRAPHS_ONLY=1), where "
        "model outputs are not real; run `trnft compile` to fill the compile cache and `trnft train` without "
        "the wrapper"
    ]
    assert not (run.root / "train").exists()


# --------------------------------------------------------------------------------------------------
# Pieces that need no trainer


def test_each_data_parallel_rank_reads_its_slice_of_trnfts_global_batch():
    from trnft.neuron.trainium import rank_sequence_order

    micro, accumulation, dp, n, seed = 2, 3, 4, 37, 5
    per_rank = [
        rank_sequence_order(
            n,
            seed=seed,
            micro_batch=micro,
            accumulation=accumulation,
            dp_size=dp,
            dp_rank=r,
            start_step=2,
            steps=3,
        )
        for r in range(dp)
    ]
    for k, step in enumerate(range(2, 5)):
        expected = batch_indices(step, micro * accumulation * dp, n, seed)
        for m in range(accumulation):
            # The CPU-XLA trainer's micro-batch m is expected[m*micro*dp:(m+1)*micro*dp], sharded over dp.
            together = np.concatenate(
                [
                    per_rank[r][(k * accumulation + m) * micro : (k * accumulation + m + 1) * micro]
                    for r in range(dp)
                ]
            )
            np.testing.assert_array_equal(together, expected[m * micro * dp : (m + 1) * micro * dp])


@pytest.mark.parametrize(
    ("sections", "words"),
    [
        # train.eval_steps and early_stopping_patience: refused for both trainers of the platform
        # (trnft.neuron.backend.check_settings; tests/test_bad_inputs.py and the test below)
        ({"train": {"on_recompile": "fail"}}, "train.on_recompile"),
        ({"train": {"activation_checkpointing": "selective"}}, "selective is the FSDP2 trainer's"),
        ({"dataset": {"packing": True, "max_seq_length": 2048}}, "dataset.packing"),
        ({"dataset": {"packing": False, "max_seq_length": 1024}}, "multiple of 2048"),
    ],
)
def test_settings_the_trainium_path_cannot_honour_are_refused(tiny_llama, tmp_path, sections, words):
    from trnft.neuron.trainium import check_settings

    cfg = config_from_dict(smoke_raw(tmp_path / "r", tiny_llama, **sections))
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        check_settings(cfg)


def test_a_refused_setting_is_one_line_and_writes_nothing(tmp_path, tiny_llama, flash_tokenized):
    run = _trainium_run(tmp_path / "run", tiny_llama, flash_tokenized)
    proc = run.stage(
        "train", "train.eval_steps=2", env={"TRNFT_TRAINIUM_REHEARSAL": "1", "PYTHONPATH": str(DOUBLES)}
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("trnft train: error: train.eval_steps:")
    assert "Traceback" not in proc.stderr
    assert not any((run.root / "train").glob("checkpoint-*"))


def test_a_non_finite_step_is_refused_at_that_step_even_between_logging_steps(
    tmp_path, tiny_llama, flash_tokenized
):
    """optimum-neuron logs only every logging_steps; the policy's check still runs at every optimizer step,
    so a step whose weights overflowed is never checkpointed (save_steps 1, logging_steps 100)."""
    # One step at 1e30 overflows the weights, so step 2 is non-finite: three steps are enough to see it.
    train = {**TRAIN, "learning_rate": 1e30, "min_lr": 0.0, "max_grad_norm": 0.0, "warmup_steps": 0,
             "max_steps": 3, "save_steps": 1, "logging_steps": 100}  # fmt: skip
    run = _trainium_run(tmp_path / "run", tiny_llama, flash_tokenized, lora={"enabled": False}, train=train)
    proc = torchrun(run, "train")
    assert proc.returncode != 0
    line = next(x for x in proc.stderr.splitlines() if "non-finite" in x)
    bad = int(line.split("train: step ")[1].split()[0])
    assert bad < 3, line  # caught before the first logging step (100) and the last step
    saved = sorted(int(p.name.split("-")[1]) for p in (run.root / "train").glob("checkpoint-*"))
    assert all(step < bad for step in saved), (saved, line)


# --------------------------------------------------------------------------------------------------
# Two processes through the real NeuronTrainer: tensor parallel (tp = 2) and data parallel (tp = 1, dp = 2).
# Both read the same global batch of 4 rows per step as the one-process `uninterrupted` run (dp 2 takes 2
# micro-batches of 2 rows, one per rank, without accumulation), so both must train the same adapter.


# tp = 2 sums each matmul's halves and all-reduces them: measured 2.9e-5 relative on the losses and 7.1e-5
# absolute on the adapter, which training moved by 1.2e-2. dp = 2 measured bit-identical to one process.
LOSS_RTOL = 1e-4
ADAPTER_ATOL = 2e-4


def _two_rank_run(root: Path, model: Path, tokenized: Path, tp: int) -> Run:
    train = TRAIN if tp == 2 else {**TRAIN, "gradient_accumulation_steps": 1}
    return _trainium_run(root, model, tokenized, train=train, parallel={"tp": tp}, neuron={"cpu_devices": 2})


@pytest.fixture(scope="module")
def tp2(tmp_path_factory, tiny_llama, flash_tokenized) -> Run:
    run = _two_rank_run(tmp_path_factory.mktemp("tp2") / "run", tiny_llama, flash_tokenized, tp=2)
    ok(torchrun(run, "train", nproc=2))
    return run


@pytest.fixture(scope="module")
def dp2(tmp_path_factory, tiny_llama, flash_tokenized) -> Run:
    run = _two_rank_run(tmp_path_factory.mktemp("dp2") / "run", tiny_llama, flash_tokenized, tp=1)
    ok(torchrun(run, "train", nproc=2))
    return run


def _consolidated(run: Run, step: int, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from trnft.common import cli

    checkpoint = run.root / "train" / f"checkpoint-{step}"
    assert cli.main(["consolidate", "--checkpoint", str(checkpoint), "--output", str(out)]) == 0
    return load_file(out / "adapter_model.safetensors")


@pytest.mark.slow  # two torchrun runs (about 2.5 min): keeps the default suite under 20 min
@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_two_processes_write_nxds_files_and_report_the_layout(layout, request):
    run = request.getfixturevalue(layout)
    tp, dp = (2, 1) if layout == "tp2" else (1, 2)
    settings = run.figures("train", TrainiumTrainFigures).optimum_neuron
    assert (settings.tensor_parallel_size, settings.data_parallel_size) == (tp, dp)
    assert settings.sequence_parallel_enabled is (tp > 1)  # optimum-neuron's default at tp > 1
    assert run.manifest("train")["layout"] == {"tp": tp, "pp": 1, "dp": dp, "global_batch": 4}
    shards = run.root / "train" / "checkpoint-6" / "adapter_default" / "adapter_shards" / "model"
    refs = sorted(p.name for p in shards.glob("*_pp_rank_00.pt"))
    assert refs == [f"dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt" for r in range(tp)]
    for ref in refs:  # every tensor of every tp rank written once, whichever dp rank wrote it
        info = torch.load(shards / f"{ref}.info.pt", weights_only=False)
        files = sorted(p.name for p in (shards / f"{ref}.tensors").iterdir())
        assert files == sorted(f"tensor_{tid}.pt" for tid in info)
    # One optimizer file per tensor rank, written by data-parallel rank 0 (ZeRO-1 is off).
    optimizer = sorted(
        p.name for p in (run.root / "train" / "checkpoint-6" / "trnft_state").glob("optimizer_*")
    )
    assert optimizer == [f"optimizer_tp_rank_{r:02d}_pp_rank_00.pt" for r in range(tp)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_two_processes_train_the_adapter_one_process_trains(layout, request, uninterrupted, tmp_path):
    """Same data, same seed: the losses and the consolidated adapter of checkpoint-6 match the one-process
    run: exactly at dp = 2 (gradients averaged over two ranks = accumulated over two micro-batches), within
    what matmuls summed in another order allow at tp = 2."""
    run = request.getfixturevalue(layout)
    one = uninterrupted.figures("train", TrainiumTrainFigures).losses
    two = run.figures("train", TrainiumTrainFigures).losses
    np.testing.assert_allclose(two, one, rtol=LOSS_RTOL)
    mine = _consolidated(run, 6, tmp_path / "two")
    theirs = _consolidated(uninterrupted, 6, tmp_path / "one")
    assert mine.keys() == theirs.keys()
    moved = max(theirs[n].abs().max().item() for n in theirs if ".lora_B." in n)  # B starts at zero
    assert moved > 50 * ADAPTER_ATOL  # the tolerance is far below how far training moved the adapter
    if layout == "dp2":
        assert two == one
        assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    for name in mine:
        np.testing.assert_allclose(mine[name].numpy(), theirs[name].numpy(), atol=ADAPTER_ATOL, err_msg=name)


@pytest.mark.extended
def test_the_tp2_neuron_trainer_and_the_cpu_xla_trainer_train_the_same_adapter(
    tp2, tiny_llama, flash_tokenized, tmp_path
):
    """The same data, seed and layout (tp = 2) through optimum-neuron's NeuronTrainer (torchrun, the NxD
    doubles) and through the CPU-XLA rehearsal (torch-xla SPMD): both draw LoRA A by name (a fused layer's
    by its first projection's), so the losses of every step agree and `trnft consolidate` of the two
    checkpoints gives the same adapter, within the tolerance the two-process checks use (fp32 here)."""
    from trnft.neuron.train import XlaTrainFigures

    xla = _trainium_run(
        tmp_path / "xla",
        tiny_llama,
        flash_tokenized,
        parallel={"tp": 2},
        neuron={"backend": "cpu", "cpu_devices": 2},
    )
    ok(xla.stage("train"))
    theirs = xla.figures("train", XlaTrainFigures).losses
    mine = tp2.figures("train", TrainiumTrainFigures).losses
    assert len(mine) == len(theirs) == TRAIN["max_steps"]
    np.testing.assert_allclose(mine, theirs, rtol=LOSS_RTOL)
    a, b = _consolidated(tp2, 6, tmp_path / "neuron"), _consolidated(xla, 6, tmp_path / "cpu-xla")
    assert a.keys() == b.keys()
    assert max(b[n].abs().max().item() for n in b if ".lora_B." in n) > 50 * ADAPTER_ATOL  # it trained
    for name in a:
        np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), atol=ADAPTER_ATOL, err_msg=name)
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    print(f"NeuronTrainer tp=2 vs CPU-XLA tp=2: losses {mine} vs {theirs}; adapters differ by <= {worst:.2e}")


@pytest.mark.extended
def test_tp2_sigkill_during_a_save_resumes_exactly_and_force_restarts_on_every_rank(
    tmp_path, tiny_llama, flash_tokenized, tp2
):
    run = _two_rank_run(tmp_path / "run", tiny_llama, flash_tokenized, tp=2)
    killed = torchrun(run, "train", nproc=2, env={"TRNFT_FAULT": "kill-during-save:6"})
    assert killed.returncode != 0
    assert not (run.root / "train" / "checkpoint-6").exists()
    resumed = ok(torchrun(run, "train", nproc=2))
    assert "resuming from checkpoint-3 at step 3" in resumed.stdout
    figures = run.figures("train", TrainiumTrainFigures)
    assert (figures.start_step, figures.end_step) == (3, 6)
    assert figures.losses == tp2.figures("train", TrainiumTrainFigures).losses[3:]
    for tp_rank in (0, 1):
        mine = _adapter_tensors(run.root / "train" / "checkpoint-6", tp_rank)
        theirs = _adapter_tensors(tp2.root / "train" / "checkpoint-6", tp_rank)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[n], theirs[n]) for n in mine), tp_rank
    # --force: rank 0 clears the folder before any rank picks a start; both start at step 0.
    forced = ok(torchrun(run, "train", "--force", nproc=2))
    assert "resuming" not in forced.stdout
    again = run.figures("train", TrainiumTrainFigures)
    assert again.start_step == 0 and again.losses == tp2.figures("train", TrainiumTrainFigures).losses


@pytest.mark.extended
def test_sigterm_saves_the_step_in_flight_and_the_rerun_ends_like_the_uninterrupted_run(
    tmp_path, tiny_llama, flash_tokenized, uninterrupted
):
    run = _trainium_run(tmp_path / "run", tiny_llama, flash_tokenized)
    stopped = torchrun(run, "train", env={"TRNFT_FAULT": "term-during-step:4"})
    assert stopped.returncode != 0
    assert "SIGTERM received; stopping after step 4 with checkpoint-4 saved" in stopped.stdout
    assert (run.root / "train" / "checkpoint-4" / "trnft_state" / "state.json").is_file()
    resumed = ok(torchrun(run, "train"))
    assert "resuming from checkpoint-4 at step 4" in resumed.stdout
    expected = uninterrupted.figures("train", TrainiumTrainFigures).losses[4:]
    assert run.figures("train", TrainiumTrainFigures).losses == expected
    mine = _adapter_tensors(run.root / "train" / "checkpoint-6")
    theirs = _adapter_tensors(uninterrupted.root / "train" / "checkpoint-6")
    assert all(torch.equal(mine[n], theirs[n]) for n in theirs)


# --------------------------------------------------------------------------------------------------
# NxD's GQA QKV layer: a model with one key/value head at tp = 2 makes optimum-neuron build
# GQAQKVColumnParallelLinear with kv_size_multiplier 2 (each rank a copy of the head) and LoRA on it.


@pytest.fixture(scope="module")
def one_kv_llama(tmp_path_factory) -> Path:
    from trnft.common.testing.fixtures import TinyShape, build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "one-kv-llama", "llama", shape=TinyShape(num_key_value_heads=1)
    )


@pytest.fixture(scope="module")
def one_kv_tokenized(tmp_path_factory, one_kv_llama) -> Path:
    from trnft.common import tokenize

    root = tmp_path_factory.mktemp("one-kv-tokenized")
    tokenize.run(config_from_dict(smoke_raw(root, one_kv_llama, dataset=FLASH_DATASET)), log=lambda m: None)
    return root / "tokenize"


@pytest.mark.slow  # two runs, one of two processes (about 2 min)
def test_the_gqa_qkv_layer_at_tp2_trains_and_consolidates_to_a_peft_adapter(
    tmp_path, one_kv_llama, one_kv_tokenized
):
    """kv heads (1) < tp (2): optimum-neuron replaces q/k/v with NxD's GQA QKV layer, the single KV head copied
    on both ranks, and its LoRA is one LoRA A shared by q, k and v with a GQA layer as LoRA B. The run through
    the real NeuronTrainer completes; both copies of the KV head's LoRA B get the gradient of both and stay
    equal; the first loss (LoRA B is zero, so the base model alone) equals the one-process run's; and
    `trnft consolidate` undoes the copies and the head layout into the PEFT adapter the one-process run
    writes, with the shared A written to each of q_proj, k_proj and v_proj.

    After the first step the two runs cannot agree: one process trains three A matrices (PEFT on separate
    q/k/v), the GQA layer one shared A, which is the adapter optimum-neuron trains whenever tp exceeds the
    KV heads. The layer's gradients themselves are checked against the dense computation in
    test_nxd_doubles_contract.py."""
    one = _trainium_run(tmp_path / "one", one_kv_llama, one_kv_tokenized)
    ok(torchrun(one, "train"))
    two = _two_rank_run(tmp_path / "two", one_kv_llama, one_kv_tokenized, tp=2)
    ok(torchrun(two, "train", nproc=2))
    checkpoint = two.root / "train" / "checkpoint-6"
    ranks = [_adapter_tensors(checkpoint, r) for r in (0, 1)]
    gqa = sorted(n for n in ranks[0] if "qkv_proj" in n)
    assert any(n.endswith("lora_B.weight_k") for n in gqa), gqa
    for name in (n for n in gqa if n.endswith(("lora_B.weight_k", "lora_B.weight_v"))):
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert ranks[0][name].abs().max() > 0, name  # trained, not the zero init
    first = two.figures("train", TrainiumTrainFigures).losses[0]
    np.testing.assert_allclose(first, one.figures("train", TrainiumTrainFigures).losses[0], rtol=LOSS_RTOL)
    mine, theirs = _consolidated(two, 6, tmp_path / "c2"), _consolidated(one, 6, tmp_path / "c1")
    assert mine.keys() == theirs.keys()
    assert all(mine[n].shape == theirs[n].shape for n in mine)
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.self_attn"
        a = [mine[f"{prefix}.{p}.lora_A.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        assert torch.equal(a[0], a[1]) and torch.equal(a[0], a[2])
        # The KV head's LoRA B once, as the one-process adapter has it (hidden 128 / 4 heads = 32 rows).
        assert mine[f"{prefix}.k_proj.lora_B.weight"].shape[0] == 32


# -- sequence parallelism at tp > 1: the exported adapter is the trained one ------------------------------
# optimum-neuron turns sequence parallelism on at tp > 1. The LoRA factor every rank holds whole (A of a
# column-parallel target, B of a row-parallel one) then sees only its rank's slice of the sequence; trnft
# flags it as NxD flags its RMSNorm weights, so optimum sums its gradient over the tensor-parallel group.
# Packed rows put supervised tokens in every slice (padded 2,048-token rows put them all in the first).
PACKED_DATASET = {"packing": True, "max_seq_length": 256}
# Replicated under sequence parallelism: column-parallel targets' A, row-parallel targets' B.
REPLICATED_FACTOR = ("qkv_proj.lora_A", "q_proj.lora_A", "k_proj.lora_A", "v_proj.lora_A",
                     "gate_up_proj.lora_A", "o_proj.lora_B", "down_proj.lora_B")  # fmt: skip


@pytest.fixture(scope="module")
def packed_tokenized(tmp_path_factory, tiny_llama) -> Path:
    from trnft.common import tokenize

    root = tmp_path_factory.mktemp("trn-packed")
    tokenize.run(config_from_dict(smoke_raw(root, tiny_llama, dataset=PACKED_DATASET)), log=lambda m: None)
    return root / "tokenize"


def _packed_run(root: Path, model: Path, tokenized: Path, tp: int, backend: str = "trainium") -> Run:
    neuron = {"backend": backend, "cpu_devices": tp, "attention": "eager"}
    return _trainium_run(root, model, tokenized, dataset=PACKED_DATASET, parallel={"tp": tp}, neuron=neuron)


def _supervised_share_per_shard(tokenized: Path, seed: int, tp: int) -> list[float]:
    split = TokenizeOutput(tokenized).split("train")
    counts = np.zeros(tp)
    for step in range(TRAIN["max_steps"]):
        labels = split.rows(batch_indices(step, _global_batch(), len(split), seed))["labels"]
        supervised = labels != -100
        for shard, part in enumerate(np.array_split(supervised, tp, axis=1)):
            counts[shard] += part.sum()
    return list(counts / counts.sum())


def _sequence_parallel_run(tmp_path: Path, model: Path, tokenized: Path, tp: int) -> Run:
    """A ``tp``-process NeuronTrainer run on packed rows whose supervised tokens reach every sequence shard,
    checked: every rank's copy of every replicated LoRA factor is the same trained matrix, and checkpoint-3
    consolidated into PEFT gives step 4's logged loss (the exported adapter is the trained model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = _packed_run(tmp_path / f"tp{tp}", model, tokenized, tp=tp)
    shares = _supervised_share_per_shard(tokenized, _seed(run), tp)
    assert min(shares) >= 1 / (2 * tp), shares  # each shard holds at least half an even share
    ok(torchrun(run, "train", nproc=tp))
    figures = run.figures("train", TrainiumTrainFigures)
    assert figures.optimum_neuron.sequence_parallel_enabled

    ranks = [_adapter_tensors(run.root / "train" / "checkpoint-6", r) for r in range(tp)]
    replicated = sorted(n for n in ranks[0] if any(f in n for f in REPLICATED_FACTOR))
    assert any("o_proj.lora_B" in n for n in replicated) and any("lora_A" in n for n in replicated)
    for name in replicated:
        for rank in range(1, tp):
            assert torch.equal(ranks[0][name], ranks[rank][name]), (name, rank)
            if ".lora_B" in name:
                assert ranks[rank][name].abs().max() > 0, name  # it learned from the other slices too

    adapter = tmp_path / f"adapter-tp{tp}-3"
    _consolidated(run, 3, adapter)
    base = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, adapter).eval()
    split = TokenizeOutput(tokenized).split("train")
    next_loss = step_batch_loss(peft, split, 3, _global_batch(), _seed(run))
    np.testing.assert_allclose(figures.losses[3], next_loss, rtol=1e-3)
    return run


@pytest.mark.slow  # a 2-process NeuronTrainer run and a CPU-XLA run (about 3 min)
def test_at_tp2_with_sequence_parallelism_every_rank_trains_the_adapter_that_is_exported(
    tmp_path, tiny_llama, packed_tokenized
):
    from trnft.neuron.train import XlaTrainFigures

    run = _sequence_parallel_run(tmp_path, tiny_llama, packed_tokenized, tp=2)
    figures = run.figures("train", TrainiumTrainFigures)
    assert min(_supervised_share_per_shard(packed_tokenized, _seed(run), 2)) >= 1 / 3

    # And it is the adapter the CPU-XLA rehearsal (torch-xla SPMD, no sequence slices) trains.
    xla = _packed_run(tmp_path / "xla", tiny_llama, packed_tokenized, tp=2, backend="cpu")
    ok(xla.stage("train"))
    np.testing.assert_allclose(figures.losses, xla.figures("train", XlaTrainFigures).losses, rtol=LOSS_RTOL)
    a, b = _consolidated(run, 6, tmp_path / "neuron"), _consolidated(xla, 6, tmp_path / "cpu-xla")
    assert a.keys() == b.keys()
    # Adam moves an element by about lr a step whatever its gradient's size, so an element whose gradient
    # is near zero can take the other sign under another summation order: at most 0.1 % of elements may
    # leave ADAPTER_ATOL, none by more than 2 lr (the dropped sum made whole copies differ instead).
    lr = run.raw["train"]["learning_rate"]
    total = sum(a[n].numel() for n in a)
    outside = sum(int(((a[n] - b[n]).abs() > ADAPTER_ATOL).sum()) for n in a)
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    print(
        f"tp=2 sequence-parallel NeuronTrainer vs CPU-XLA on packed rows: {outside} of {total} elements beyond "
        f"{ADAPTER_ATOL}, largest difference {worst:.2e} (lr {lr})"
    )
    assert outside <= total // 1000 and worst <= 2 * lr


@pytest.mark.extended  # a 4-process NeuronTrainer run (about 4 min on 2 cores)
def test_at_tp4_with_sequence_parallelism_every_rank_trains_the_adapter_that_is_exported(
    tmp_path, tiny_llama, packed_tokenized
):
    """tp 4 on the tiny Llama's 2 KV heads: q/k/v become NxD's GQA layer (each KV head on two ranks), its
    LoRA one A shared by q, k and v, replicated on all four ranks."""
    run = _sequence_parallel_run(tmp_path, tiny_llama, packed_tokenized, tp=4)
    assert run.figures("train", TrainiumTrainFigures).optimum_neuron.kv_size_multiplier in (None, 2)


@pytest.mark.slow  # a one-process and a two-process full fine-tuning run (about 3 min)
def test_full_fine_tuning_at_tp2_sums_the_norm_gradients_and_trains_what_one_process_trains(
    tmp_path, tiny_llama, packed_tokenized
):
    """Full fine-tuning at tp 2 under sequence parallelism: every rank's RMSNorm weights see their slice of
    the sequence and optimum-neuron sums their gradients with NxD's in-place reduce (the doubles did not
    reduce in place before, so the sum was dropped and tp 2 parted from tp 1 after the first step). All six
    losses equal the one-process run's, and every rank holds the same norm weights."""
    full = {"lora": {"enabled": False}, "train": {**TRAIN, "learning_rate": 1e-4, "min_lr": 1e-5}}
    neuron = {"attention": "eager"}
    one = _trainium_run(tmp_path / "one", tiny_llama, packed_tokenized, dataset=PACKED_DATASET, **full,
                        parallel={"tp": 1}, neuron={**neuron, "cpu_devices": 1})  # fmt: skip
    ok(torchrun(one, "train"))
    two = _trainium_run(tmp_path / "two", tiny_llama, packed_tokenized, dataset=PACKED_DATASET, **full,
                        parallel={"tp": 2}, neuron={**neuron, "cpu_devices": 2})  # fmt: skip
    ok(torchrun(two, "train", nproc=2))
    assert two.figures("train", TrainiumTrainFigures).optimum_neuron.sequence_parallel_enabled
    losses = [r.figures("train", TrainiumTrainFigures).losses for r in (one, two)]
    assert len(losses[1]) == TRAIN["max_steps"]
    np.testing.assert_allclose(losses[1], losses[0], rtol=LOSS_RTOL)

    from trnft.neuron.nxd_format import open_shard_set
    from trnft.neuron.xla_trainer import to_torch

    shards = open_shard_set(two.root / "train" / "checkpoint-6" / "shards")
    norms = [n for n in shards.file(0, 0).names() if n.endswith("norm.weight")]
    assert norms
    for name in norms:
        a, b = (to_torch(shards.file(r, 0).lazy(name).read()) for r in (0, 1))
        assert torch.equal(a, b) and not torch.all(a == 1), name  # one trained copy
