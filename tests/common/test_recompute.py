"""train.activation_checkpointing: full, selective and off compute the same gradients; selective reruns
half of what full reruns of a layer's matmuls in the backward pass (counted at the ATen level)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trnft.common.training.recompute import checkpointing_kwargs, matmul_ops

LAYERS = 2


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in matmul_ops():
            self.count += 1
        return func(*args, **(kwargs or {}))


def _model(mode: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    kwargs = checkpointing_kwargs(mode)
    if kwargs is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return model


def _backward(mode: str) -> tuple[int, int, dict[str, torch.Tensor]]:
    """Matmuls in the forward and in the backward pass, and the gradients."""
    model = _model(mode)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with _CountMatmuls() as forward:
        loss = model(input_ids=ids, labels=ids).loss
    with _CountMatmuls() as backward:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return forward.count, backward.count, grads


def test_selective_reruns_half_the_matmuls_full_reruns_all_and_the_gradients_agree():
    f_off, b_off, g_off = _backward("off")
    f_full, b_full, g_full = _backward("full")
    f_sel, b_sel, g_sel = _backward("selective")
    assert f_off == f_full == f_sel
    per_layer = (f_off - 1) // LAYERS  # every matmul but the LM head's is inside a decoder layer
    assert per_layer == 7  # q, k, v, o, gate, up, down
    # full: the layer again, up to the last tensor the backward needs (torch's non-reentrant checkpoint
    # stops there: the down projection's output is never needed, so it is not recomputed)
    assert b_full - b_off == LAYERS * (per_layer - 1)
    # selective: only the 2nd, 4th and 6th matmul of each layer (k, o, up); the others' outputs were kept
    assert b_sel - b_off == LAYERS * 3
    # The same numbers: only the order in which the residual stream's gradients are added differs (a few
    # float32 ulps; measured 3e-8 against gradients up to 0.16).
    for name, grad in g_off.items():
        torch.testing.assert_close(g_full[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(g_sel[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_off_gives_no_checkpointing_and_full_no_selective_policy():
    assert checkpointing_kwargs("off") is None
    assert checkpointing_kwargs("full") == {"use_reentrant": False}
    assert set(checkpointing_kwargs("selective")) == {"use_reentrant", "context_fn"}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_reaches_every_decoder_layer(mode):
    model = _model(mode)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
