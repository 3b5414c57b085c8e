"""train.activation_checkpointing: full, selective and off compute the same gradients; selective reruns
half of what full reruns of a layer's matmuls in the backward pass (counted at the ATen level); a compiled
layer traces its checkpoint (selective policy included) inside its graph."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trnft.common.training.recompute import checkpoint_layers, checkpointing_kwargs, matmul_ops

LAYERS = 2


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in matmul_ops():
            self.count += 1
        return func(*args, **(kwargs or {}))


def _model(mode: str, *, compile_backend=None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.config.use_cache = False
    checkpoint_layers(model.model.layers, mode)
    if compile_backend is not None:  # the trainer's order: checkpoint, then compile (then shard)
        for layer in model.model.layers:
            layer.compile(backend=compile_backend)
    model.train()
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))


def _backward(mode: str) -> tuple[int, int, dict[str, torch.Tensor]]:
    """Matmuls in the forward and in the backward pass, and the gradients."""
    model = _model(mode)
    ids = _ids()
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


class _GraphsSeen:
    """A torch.compile backend that records the operators of each graph Dynamo captures and runs the graph
    as captured (eagerly, so the checkpoint's own dispatch modes still see every ATen call)."""

    def __init__(self) -> None:
        self.graphs: list[list[str]] = []
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_a_compiled_layer_traces_its_checkpoint_inside_the_graph_and_computes_the_same_gradients(mode):
    """Issue 36: with Hugging Face's placement (the checkpoint around the compiled call), transformers
    4.57 / torch 2.8 compiled no frame under the selective policy, while the manifest said inductor. Here
    every graph Dynamo captures is the checkpoint itself (its higher-order op ``tag_activation_checkpoint``,
    the selective policy travelling with it), and the compiled layers run: once per layer in the forward
    pass (the recomputation happens inside the graph's backward)."""
    seen = _GraphsSeen()
    model = _model(mode, compile_backend=seen)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()  # no dispatch mode around it: Dynamo skips under one
    compiled = {n: p.grad for n, p in model.named_parameters()}
    assert seen.graphs, "Dynamo compiled no frame of a checkpointed layer"
    for ops in seen.graphs:
        assert "tag_activation_checkpoint" in ops, ops
    assert seen.calls == LAYERS
    _, _, eager = _backward("off")
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_reaches_every_decoder_layer(mode):
    model = _model(mode)
    # The module tree and parameter names are untouched (checkpoints and adapters keep their keys).
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in _model("off").named_parameters()]
    assert checkpoint_layers(model.model.layers, "off") == 0
    assert all("forward" in vars(layer) for layer in model.model.layers)
