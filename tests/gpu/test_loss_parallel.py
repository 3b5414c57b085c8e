"""Loss parallelism under parallel.tp: the lm_head splits along the vocabulary, each tensor-parallel rank holds only
its columns of the logits, and the loss and gradients equal those of the whole logits (2 gloo ranks).

Upstream facts relied on (torch 2.8.0, torch/distributed/tensor/parallel/loss.py): ``loss_parallel()``
computes ``F.cross_entropy`` on logits sharded on the class dimension with a plain-tensor target,
``ignore_index`` and ``reduction="sum"``, and the backward must run inside the same context."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from torch import nn

from trnft.common.fsdp.parallel import loss_parallel_head

VOCAB = 96


def _llama(tied: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def test_only_an_untied_plain_lm_head_is_split():
    from peft import LoraConfig, get_peft_model

    untied = _llama(tied=False)
    assert loss_parallel_head(untied) is untied.lm_head
    assert loss_parallel_head(_llama(tied=True)) is None  # splitting it would split the embedding too
    adapted = get_peft_model(_llama(tied=False), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert loss_parallel_head(adapted) is None  # a LoRA lm_head keeps its own layout
    plain = get_peft_model(_llama(tied=False), LoraConfig(r=2, target_modules=["q_proj"]))
    assert isinstance(loss_parallel_head(plain), nn.Linear)


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trnft.common.fsdp.parallel import split_output_head
    from trnft.common.training.data import summed_token_loss

    dist.init_process_group("gloo")
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    whole = AutoModelForCausalLM.from_config(config)
    split = AutoModelForCausalLM.from_config(config)
    split.load_state_dict(whole.state_dict())
    assert split_output_head(split, init_device_mesh("cpu", (2,)))
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100

    reference = summed_token_loss(whole(input_ids=ids).logits, labels)
    reference.backward()
    logits = split(input_ids=ids).logits
    with loss_parallel():
        loss = summed_token_loss(logits, labels)
        loss.backward()
    embed = split.model.embed_tokens.weight.grad
    head = split.lm_head.weight.grad.full_tensor()
    out = {
        "local_logits_shape": list(logits.to_local().shape),
        "loss": float(loss.to_local()),
        "reference": float(reference),
        "embed_grad_diff": float((embed - whole.model.embed_tokens.weight.grad).abs().max()),
        "head_grad_diff": float((head - whole.lm_head.weight.grad).abs().max()),
    }
    if dist.get_rank() == 0:
        json.dump(out, open(sys.argv[1], "w"))
    # Both ranks leave together, holding no distributed tensors: on torch 2.14 a rank that tore gloo down
    # while its peer still held collective results once aborted ("terminate called without an active
    # exception") after the test's work was done.
    del logits, loss, split
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_two_tensor_parallel_ranks_each_hold_half_the_logits_and_the_loss_is_the_whole_one(tmp_path):
    script, result = tmp_path / "worker.py", tmp_path / "result.json"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out["local_logits_shape"] == [2, 12, VOCAB // 2]
    assert out["loss"] == pytest.approx(out["reference"], rel=1e-6)
    assert out["embed_grad_diff"] < 1e-6 and out["head_grad_diff"] < 1e-6
