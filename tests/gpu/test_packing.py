"""Packed samples never see each other in the GPU trainer's forward pass, with any micro-batch size.

transformers keeps packed samples apart under flash-attention 2 only in a batch of one row; the trainer
flattens each micro-batch into one row (``forward_logits``). sdpa and eager get the segment mask.
"""

from __future__ import annotations

import pytest
import torch
from packed_rows import check_every_sample_alone, segments, two_packed_rows

from trnft.common.fsdp.trainer import forward_logits


# sdpa picks another CPU kernel with a mask than without one: rounding, not leakage (a leak moves logits by > 1).
@pytest.mark.parametrize(("attn", "atol"), [("sdpa", 5e-4), ("eager", 5e-5)])
def test_every_sample_of_a_micro_batch_of_packed_rows_sees_only_itself(tiny_llama, tokenized, attn, atol):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn).eval()
    check_every_sample_alone(model, two_packed_rows(tokenized, "cpu"), attn, atol=atol)


def test_without_the_mask_the_second_sample_would_see_the_first(tiny_llama, tokenized):
    """The check above can fail: plain causal attention over a packed row moves the later samples."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    batch = two_packed_rows(tokenized, "cpu")
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"]).logits
        isolated = forward_logits(model, batch, "sdpa")
    start, end = segments(batch["segment_ids"][0].numpy())[1]
    assert not torch.allclose(leaky[0, start:end], isolated[0, start:end], atol=1e-3)


@pytest.mark.gpu
def test_flash_attention_2_keeps_packed_samples_apart_at_micro_batch_two(tiny_llama, tokenized):
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama, attn_implementation="flash_attention_2", dtype=torch.bfloat16
    ).to("cuda")
    model.eval()
    check_every_sample_alone(model, two_packed_rows(tokenized, "cuda"), "flash_attention_2", atol=1e-1)
