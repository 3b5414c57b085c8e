"""Cross-entropy without the ``[B, S, V]`` logits: the output projection and the loss, chunk by chunk, over
the supervised positions only (``fsdp.chunked_loss``).

The usual path materialises every position's logits, upcasts them to fp32 and keeps them (and their
gradient) for the backward pass: at a 128,256-word vocabulary and 8,192 tokens a micro-batch that is
8 GiB, the largest single allocation of a LoRA step once activations are not recomputed. Here the model's
output projection (``lm_head``) is swapped, for the call, for one that takes the last hidden states of
the positions whose next token is supervised (computed on the host from the labels, so the device is never
asked how many there are), multiplies ``chunk_tokens`` of them at a time by the head's weight and sums
their cross-entropy. Each chunk runs under a non-reentrant checkpoint: only its hidden states are kept and
its logits are computed again in the backward pass, so at most one chunk's logits exist at a time
(``chunk_tokens x V`` in fp32, and its gradient).

The swap happens inside the model's forward, where FSDP2 has gathered the root's parameters: the weight the
chunks use is the gathered one, and FSDP2's pre-backward hook on the model's output gathers it again for
the recomputation when the root reshards after forward. The loss is the same sum the logits path computes
(positions without a supervised next token add nothing to either); only float rounding differs (the
order of the sum). With bf16 parameters and a trained head (full fine-tuning), the head's weight gradient
is the sum of one bf16 matmul per chunk (autograd accumulates it in the weight's dtype): within about one
bf16 step of the gradient's scale of the single matmul's (tests/common/test_chunked_loss.py measures it).

It applies where the head's output *is* the logits: families whose causal-LM forward is
``lm_head(hidden_states)`` and nothing after it (:data:`CHUNKABLE_FAMILIES`; Gemma's soft-capping or
Granite's logit scaling would be skipped), an un-adapted ``nn.Linear`` head (LoRA on ``lm_head`` adds its own
branch), and no tensor parallelism (loss parallelism splits the head along the vocabulary instead).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from .data import IGNORE_INDEX

# Families whose ForCausalLM.forward returns ``lm_head(hidden_states[:, slice])`` unchanged as its logits
# (transformers 5.20: modeling_<family>.py), each checked by tests/common/test_chunked_loss.py on a tiny
# model against the logits path. Gemma (final_logit_softcapping), Granite (logits_scaling) and Cohere
# (logit_scale) change the logits after the head and are not here.
CHUNKABLE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "ministral3", "phi3", "olmo2")


def supervised_positions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, targets)`` of a host batch of labels ``[B, S]``: the flat indices (into the ``B * S``
    hidden states, row-major) of every position whose next token is supervised, and that token.

    Position ``(b, t)`` predicts label ``(b, t + 1)``, as in :func:`~trnft.common.training.data.summed_token_loss`.
    """
    length = labels.shape[1]
    nxt = labels[:, 1:]
    b, t = np.nonzero(nxt != IGNORE_INDEX)
    positions = (b * length + t).astype(np.int64)
    return positions, nxt[b, t].astype(np.int64)


def unchunkable_reason(model: Any, model_type: str | None, tp: int) -> str | None:
    """Why the chunked loss cannot replace this model's logits (one phrase), or None when it can."""
    import torch

    if tp > 1:
        return "tensor parallelism splits or replicates the output head"
    if model_type not in CHUNKABLE_FAMILIES:
        return f"model_type {model_type!r} is not one whose head output is its logits ({', '.join(CHUNKABLE_FAMILIES)})"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the output head is a {type(head).__name__}, not a plain Linear (an adapted lm_head)"
    return None


def chunked_token_loss(
    hidden: Any, weight: Any, bias: Any, positions: Any, targets: Any, chunk_tokens: int
) -> Any:
    """Summed cross-entropy of ``targets`` given the hidden states at ``positions`` (``hidden``: ``[..., H]``,
    flattened to rows), in chunks of ``chunk_tokens``; equal to the logits path up to rounding."""
    import torch
    from torch.utils.checkpoint import checkpoint

    rows = hidden.reshape(-1, hidden.shape[-1])
    count = int(positions.shape[0])  # a host-side shape: no device read
    if count == 0:
        # Nothing supervised: a zero that still reaches every parameter, as the logits path's sum does.
        return rows.sum() * 0.0
    picked = rows.index_select(0, positions)
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    for start in range(0, count, chunk_tokens):
        stop = min(start + chunk_tokens, count)
        total = total + checkpoint(
            _chunk_loss,
            picked[start:stop],
            weight,
            bias,
            targets[start:stop],
            use_reentrant=False,
            preserve_rng_state=False,  # nothing random in a projection and a cross-entropy
        )
    return total


def _chunk_loss(hidden: Any, weight: Any, bias: Any, targets: Any) -> Any:
    import torch.nn.functional as F

    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


@contextlib.contextmanager
def head_returns_loss(head: Any, positions: Any, targets: Any, chunk_tokens: int) -> Iterator[None]:
    """For the duration, ``head``'s forward returns :func:`chunked_token_loss` of its input (a 0-d tensor)
    instead of the logits: the model's ``.logits`` output is then the micro-batch's summed loss."""

    def loss_forward(hidden: Any) -> Any:
        return chunked_token_loss(hidden, head.weight, head.bias, positions, targets, chunk_tokens)

    head.forward = loss_forward  # an instance attribute: nn.Module.__call__ finds it before the class's
    try:
        yield
    finally:
        del head.forward
