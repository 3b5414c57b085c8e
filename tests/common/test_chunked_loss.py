"""fsdp.chunked_loss: the output head and the cross-entropy chunk by chunk over the supervised positions give
the logits path's loss and gradients for every family it is allowed on; no tensor of the full logits'
size is ever made; what it is not allowed on is said in one line."""

from __future__ import annotations

import dataclasses
import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trnft.common.fsdp.trainer import forward_logits, model_output
from trnft.common.training.chunked_loss import (
    CHUNKABLE_FAMILIES,
    head_returns_loss,
    supervised_positions,
    unchunkable_reason,
)
from trnft.common.training.data import IGNORE_INDEX, summed_token_loss

VOCAB, ROWS, LENGTH, CHUNK = 96, 2, 20, 7


def _model(family: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = AutoConfig.for_model(family, **{**shape, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


def _batch(supervised: bool = True) -> dict[str, torch.Tensor]:
    """Two packed rows of two samples each, prompts masked out of the labels."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, VOCAB, (ROWS, LENGTH))
    segments = np.repeat([[1] * 12 + [2] * 8], ROWS, axis=0)
    positions = np.concatenate([np.arange(12), np.arange(8)])[None].repeat(ROWS, 0)
    labels = ids.copy()
    labels[:, :5] = IGNORE_INDEX  # sample 1's prompt
    labels[:, 12:15] = IGNORE_INDEX  # sample 2's prompt
    if not supervised:
        labels[:] = IGNORE_INDEX
    host = {"input_ids": ids, "position_ids": positions, "segment_ids": segments, "labels": labels}
    host["loss_positions"], host["loss_targets"] = supervised_positions(labels)
    return {k: torch.from_numpy(np.ascontiguousarray(v)).long() for k, v in host.items()}


def _loss_and_grads(model, batch, chunked: bool):
    model.zero_grad(set_to_none=True)
    if chunked:
        head = model.get_output_embeddings()
        with head_returns_loss(head, batch["loss_positions"], batch["loss_targets"], CHUNK):
            loss = model_output(model, batch, "sdpa").logits
    else:
        loss = summed_token_loss(forward_logits(model, batch, "sdpa"), batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_supervised_positions_are_the_flat_indices_whose_next_label_counts():
    labels = np.array([[5, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 3, IGNORE_INDEX]])
    positions, targets = supervised_positions(labels)
    # row 0: t=1 predicts 7, t=2 predicts 8; row 1: t=1 predicts 3 (flat index 4 + 1)
    assert positions.tolist() == [1, 2, 5] and targets.tolist() == [7, 8, 3]


@pytest.mark.parametrize("family", CHUNKABLE_FAMILIES)
def test_the_chunked_loss_equals_the_logits_path_for_every_family_it_is_allowed_on(family):
    """Loss and every parameter's gradient (head included: full fine-tuning) within 1e-5, over 3 chunks
    of 7 and a last of 2; the head's forward is the class's again afterwards."""
    model = _model(family)
    batch = _batch()
    assert unchunkable_reason(model, family, tp=1) is None
    assert len(batch["loss_positions"]) == 2 * (19 - 4 - 3)  # 12 supervised next tokens per row
    reference, reference_grads = _loss_and_grads(model, batch, chunked=False)
    loss, grads = _loss_and_grads(model, batch, chunked=True)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    assert grads.keys() == reference_grads.keys() and "lm_head.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert "forward" not in vars(model.get_output_embeddings())


def test_a_family_that_changes_the_logits_after_the_head_would_get_another_loss_and_is_not_allowed():
    """Granite divides the head's output by ``logits_scaling``: chunking its head would train on other
    logits, which is why only families whose head output is the logits are allowed."""
    model = _model("granite", logits_scaling=4.0)
    batch = _batch()
    assert "granite" not in CHUNKABLE_FAMILIES
    assert "is not one whose head output is its logits" in unchunkable_reason(model, "granite", tp=1)
    reference, _ = _loss_and_grads(model, batch, chunked=False)
    loss, _ = _loss_and_grads(model, batch, chunked=True)
    assert abs(float(loss) - float(reference)) > 1e-2


def test_an_adapted_head_and_tensor_parallelism_are_not_chunked():
    from peft import LoraConfig, get_peft_model

    model = _model("llama")
    assert (
        unchunkable_reason(model, "llama", tp=2) == "tensor parallelism splits or replicates the output head"
    )
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    assert "not a plain Linear" in unchunkable_reason(adapted, "llama", tp=1)
    peft_layers = get_peft_model(_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert unchunkable_reason(peft_layers, "llama", tp=1) is None  # LoRA on the layers only


def test_a_micro_batch_with_nothing_supervised_gives_zero_and_a_gradient_of_zeros():
    model = _model("llama")
    loss, grads = _loss_and_grads(model, _batch(supervised=False), chunked=True)
    assert float(loss) == 0.0 and grads and all(float(g.abs().max()) == 0.0 for g in grads.values())


class _LiveLogitRows(TorchDispatchMode):
    """The most token rows of vocabulary-wide tensors alive at once (tensors an op returns whose last
    dimension is ``vocab``; the head's weight, its gradient and their transposes, ``hidden x vocab``
    elements, are not token rows). A tensor stops counting when it is freed."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab, self.hidden, self.live, self.peak = vocab, hidden, 0, 0
        self.counted: set[int] = set()

    def _free(self, key: int, rows: int) -> None:
        self.live -= rows
        self.counted.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab):
                continue
            key = t.untyped_storage().data_ptr()
            if t.numel() == self.vocab * self.hidden or key in self.counted:
                continue  # a weight-shaped tensor, or a view of one already counted
            rows = t.untyped_storage().nbytes() // (self.vocab * t.element_size())
            self.counted.add(key)
            self.live += rows
            self.peak = max(self.peak, self.live)
            weakref.finalize(t.untyped_storage(), self._free, key, rows)
        return out


def test_at_most_a_few_chunks_of_logits_are_alive_at_once_in_forward_and_backward():
    """The logits path keeps [B, S, V] tensors (logits, their log-softmax, their gradient); the chunked one
    a few chunks' worth at any time: each chunk's logits are dropped after its forward and recomputed in
    the backward pass (without the checkpoint every chunk's would stay alive until backward)."""
    model = _model("llama", vocab_size=4096)
    batch = _batch()
    peaks = {}
    for chunked in (False, True):
        with _LiveLogitRows(4096, 32) as seen:
            _loss_and_grads(model, batch, chunked)
        peaks[chunked] = seen.peak
    supervised = len(batch["loss_positions"])
    assert peaks[False] >= 2 * ROWS * (LENGTH - 1)
    assert peaks[True] <= 3 * CHUNK < supervised, peaks


@pytest.mark.parametrize(
    ("setting", "tp", "platform", "chunk"),
    [("auto", 1, "cpu", 1024), ("auto", 1, "neuron", None), ("auto", 2, "cpu", None), ("off", 1, "cpu", None),
     ("on", 1, "neuron", 1024)],
)  # fmt: skip
def test_the_setting_turns_it_on_where_it_applies(run_config, setting, tp, platform, chunk):
    from trnft.common.config.run_config import load_config
    from trnft.common.fsdp.platform import CPU
    from trnft.common.fsdp.trainer import loss_chunk_tokens

    cfg = load_config(run_config(platform="gpu", parallel={"tp": tp}, fsdp={"chunked_loss": setting}))
    device = CPU if platform == "cpu" else dataclasses.replace(CPU, name="neuron")
    assert loss_chunk_tokens(cfg, device, _model("llama"), "llama") == chunk


def test_on_where_it_does_not_apply_is_one_line(run_config):
    from trnft.common.config.run_config import load_config
    from trnft.common.errors import ConfigError
    from trnft.common.fsdp.platform import CPU
    from trnft.common.fsdp.trainer import loss_chunk_tokens

    cfg = load_config(run_config(platform="gpu", fsdp={"chunked_loss": "on"}))
    with pytest.raises(ConfigError) as err:
        loss_chunk_tokens(cfg, CPU, _model("granite"), "granite")
    assert str(err.value).startswith("fsdp.chunked_loss: on, but model_type 'granite' is not one whose head")
    assert str(err.value).endswith("; set fsdp.chunked_loss to auto or off")


def test_under_fsdp2_in_bf16_with_the_root_resharded_the_chunked_loss_equals_the_logits_path(one_rank_group):
    """The trainer's setting (train.bf16: FSDP2 gathers bf16 parameters; full fine-tuning, so the head's
    weight gets a gradient): the root reshards after forward, so the chunks' recomputation in the backward
    pass runs on the weight FSDP2 gathers again. Loss and every gradient equal the logits path's in the same
    setting: exactly, but for the head's weight gradient (bf16 sums over chunks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (1,))
    results = []
    for chunked in (False, True):
        model = _model("llama")
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        loss, grads = _loss_and_grads(model, _batch(), chunked)
        assert isinstance(model.lm_head.weight, DTensor)  # resharded: the gathered weight is gone again
        results.append((loss, {n: g.full_tensor() for n, g in grads.items()}))
    (reference, reference_grads), (loss, grads) = results
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    assert grads.keys() == reference_grads.keys() and "lm_head.weight" in grads
    for name in grads:
        # The head's weight gradient is summed over the chunks in its own dtype (bf16 here, as autograd
        # accumulates it): up to about one bf16 step of the gradient's scale from one matmul's sum
        # (measured: 0.0156 at a largest gradient of 5.4). Every other gradient is equal.
        scale = float(reference_grads[name].abs().max())
        atol = 2**-7 * scale if name == "lm_head.weight" else 0.0
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=0.0, atol=atol, msg=name)
