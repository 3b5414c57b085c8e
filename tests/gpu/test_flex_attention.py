"""FlexAttention for packed rows (``fsdp.attn_implementation: flex_attention``, auto on CUDA without flash):
the document-causal BlockMask gives what the dense segment mask gives, and skips the tiles no query may see.
Runs on the CPU (FlexAttention compiles through inductor's C++ backend there)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trnft.common.errors import ConfigError
from trnft.common.fsdp.trainer import attention_implementation, forward_logits
from trnft.common.training.data import document_causal_block_mask, segment_allowed

BLOCK = 128


@pytest.fixture(autouse=True)
def _compile_in_this_process():
    """Inductor compiles these kernels without its worker pool (which would stay for the whole session)."""
    import torch._inductor.config as inductor

    with inductor.patch(compile_threads=1):
        yield


def _packed_batch(lengths_per_row: list[list[int]], length: int, vocab: int) -> dict[str, torch.Tensor]:
    """Rows of samples of the given lengths, then padding (segment 0); positions restart per sample."""
    rng = np.random.default_rng(0)
    segments = np.zeros((len(lengths_per_row), length), dtype=np.int64)
    positions = np.zeros_like(segments)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for number, n in enumerate(lengths, start=1):
            segments[row, start : start + n] = number
            positions[row, start : start + n] = np.arange(n)
            start += n
    ids = rng.integers(3, vocab, size=segments.shape)
    return {
        "input_ids": torch.from_numpy(ids),
        "position_ids": torch.from_numpy(positions),
        "segment_ids": torch.from_numpy(segments),
    }


def test_the_block_mask_allows_exactly_what_the_dense_mask_allows():
    batch = _packed_batch([[100, 200, 156], [300, 50]], 512, 100)  # row 2 ends in 162 padding tokens
    block_mask = document_causal_block_mask(batch["segment_ids"], block_size=BLOCK)
    dense = segment_allowed(batch["segment_ids"])
    # the mask function itself, evaluated at every position, is the dense rule
    rows, length = batch["segment_ids"].shape
    q = torch.arange(length)[:, None]
    kv = torch.arange(length)[None, :]
    for row in range(rows):
        got = block_mask.mask_mod(torch.tensor(row), torch.tensor(0), q, kv)
        assert torch.equal(got, dense[row, 0])


def test_tiles_of_other_samples_and_of_the_future_are_skipped():
    """Four samples of one tile each in a row of 512: only the 4 diagonal tiles are computed (a causal
    mask alone would compute 10 of the 16)."""
    batch = _packed_batch([[BLOCK] * 4], 4 * BLOCK, 100)
    block_mask = document_causal_block_mask(batch["segment_ids"], block_size=BLOCK)
    computed = int(block_mask.kv_num_blocks.sum()) + int(
        block_mask.full_kv_num_blocks.sum() if block_mask.full_kv_num_blocks is not None else 0
    )
    assert computed == 4
    assert block_mask.sparsity() == pytest.approx(75.0)


def _logits_and_grads(model_dir, attn: str, batch: dict, device: str, backward: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    model.to(device)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.set_grad_enabled(backward):
        logits = forward_logits(model, batch, attn)
    if not backward:
        return logits, {}
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if "layers.0.self_attn" in n}


def test_flex_attention_equals_sdpa_with_the_dense_mask_and_needs_the_documents():
    """The compiled FlexAttention kernel with the BlockMask (GQA: 4 query heads on 2 K/V heads, K/V not
    repeated) against SDPA with the dense mask and repeated K/V: within 1e-5. A causal mask alone (samples
    not kept apart) is far off, so the comparison sees the documents."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch = _packed_batch([[100, 200, 156], [300, 50]], 512, 100)
    seg = batch["segment_ids"]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 512, 16, generator=gen) for heads in (4, 2, 2))
    dense = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=segment_allowed(seg)
    )
    compiled = torch.compile(flex_attention)
    flex = compiled(q, k, v, block_mask=document_causal_block_mask(seg), enable_gqa=True)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    causal = create_block_mask(lambda b, h, i, j: j <= i, 2, None, 512, 512, device="cpu")
    leaky = compiled(q, k, v, block_mask=causal, enable_gqa=True)
    assert (leaky[0, :, 100:300] - dense[0, :, 100:300]).abs().max() > 1e-2


def test_flex_attention_logits_equal_the_dense_masks(tiny_llama):
    """The tiny GQA Llama through transformers' flex_attention path and through sdpa with the dense mask,
    the same packed batch with padding: logits within 1e-5 of their scale at every position (forward only:
    torch has no FlexAttention backward on the CPU). Measured: 1.5e-4 on logits up to 15.5 in magnitude
    (1e-5 relative), the kernels' summation order compounded over the layers (the attention outputs agree
    to 3e-7)."""
    batch = _packed_batch([[100, 200, 156], [300, 50]], 512, 200)
    dense, _ = _logits_and_grads(tiny_llama, "sdpa", batch, "cpu", backward=False)
    flex, _ = _logits_and_grads(tiny_llama, "flex_attention", batch, "cpu", backward=False)
    scale = float(dense.abs().max())
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5 * scale)


@pytest.mark.gpu  # FlexAttention's backward: CUDA only
def test_flex_attention_gradients_equal_the_dense_masks_on_cuda(tiny_llama):
    batch = _packed_batch([[100, 200, 156], [300, 50]], 512, 200)
    dense, dense_grads = _logits_and_grads(tiny_llama, "sdpa", batch, "cuda", backward=True)
    flex, flex_grads = _logits_and_grads(tiny_llama, "flex_attention", batch, "cuda", backward=True)
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, rtol=1e-3, atol=1e-5)


def test_flex_attention_is_refused_where_it_cannot_train():
    for device in ("cpu", "neuron"):
        cfg = SimpleNamespace(
            fsdp=SimpleNamespace(attn_implementation="flex_attention"), train=SimpleNamespace(bf16=True)
        )
        with pytest.raises(
            ConfigError, match=r"fsdp\.attn_implementation: flex_attention trains on CUDA only"
        ):
            attention_implementation(cfg, device)


def test_auto_picks_flex_on_cuda_without_flash_and_sdpa_elsewhere(monkeypatch):
    cfg = SimpleNamespace(fsdp=SimpleNamespace(attn_implementation="auto"), train=SimpleNamespace(bf16=True))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "flash_attn" else real(name)
    )
    assert attention_implementation(cfg, "cuda") == "flex_attention"
    assert attention_implementation(cfg, "cpu") == "sdpa"
    assert attention_implementation(cfg, "neuron") == "sdpa"
