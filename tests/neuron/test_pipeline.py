"""Train -> consolidate -> merge on the Neuron CPU-XLA path: the merged model is the model that trained."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ok, step_batch_loss

from trnft.common import cli
from trnft.common.training.data import TokenizeOutput
from trnft.neuron.train import XlaTrainFigures

pytestmark = pytest.mark.trn1  # the trn1 line (tests/trn1_line.sh)


@pytest.mark.parametrize("tp", [2, 4], ids=["tp2-separate-qkv", "tp4-gqa-qkv"])
def test_merged_model_reproduces_the_trainers_loss(make_run, tiny_llama, tp):
    """Weights after 20 steps, consolidated and merged, give the loss the trainer measured at step 21.

    Any slip in un-sharding (a permuted head, a wrong LoRA A/B split, a missed scaling) moves this
    loss far more than the fp32 tolerance used here.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = make_run(
        parallel={"tp": tp},
        neuron={"cpu_devices": tp},
        train={"max_steps": 21, "save_steps": 20, "logging_steps": 20, "keep_checkpoints": 2},
    )
    ok(run.stage("train"))
    losses = run.figures("train", XlaTrainFigures).losses
    ckpt = run.root / "train" / "checkpoint-20"
    adapter, merged = run.root / "adapter-20", run.root / "merged-20"
    assert cli.main(["consolidate", "--checkpoint", str(ckpt), "--output", str(adapter)]) == 0
    assert (
        cli.main(["merge", "--base", str(tiny_llama), "--adapter", str(adapter), "--output", str(merged)])
        == 0
    )

    split = TokenizeOutput(run.root / "tokenize").split("train")
    train = run.raw["train"]
    global_batch = train["micro_batch_size"] * train["gradient_accumulation_steps"]
    seed = train["seed"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base_loss = step_batch_loss(base, split, 20, global_batch, seed)
    peft_loss = step_batch_loss(PeftModel.from_pretrained(base, adapter), split, 20, global_batch, seed)
    merged_loss = step_batch_loss(AutoModelForCausalLM.from_pretrained(merged), split, 20, global_batch, seed)

    assert losses[20] < base_loss - 1.0, (losses[20], base_loss)  # training moved the model
    np.testing.assert_allclose([peft_loss, merged_loss], [losses[20]] * 2, rtol=2e-4)


def test_the_stages_take_the_newest_checkpoint_and_rerun_is_a_no_op(make_run):
    run = make_run(train={"max_steps": 6, "save_steps": 3, "logging_steps": 3, "warmup_steps": 2})
    ok(run.stage("train"))
    consolidated = ok(run.stage("consolidate")).stdout
    assert "using checkpoint-6" in consolidated
    ok(run.stage("merge"))
    assert run.manifest("merge")["upstream"]["consolidate"] == run.manifest("consolidate")["output_digest"]
    again = ok(run.stage("merge")).stdout
    assert "already complete" in again
