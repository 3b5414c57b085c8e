"""Selective activation checkpointing (``train.activation_checkpointing: selective``) for the FSDP2 trainer.

``full`` keeps only each decoder layer's input and reruns the whole layer in the backward pass: about a
third more compute. ``selective`` reruns a layer too, but keeps the outputs of its most expensive
operations, so most of the rerun is cheap element-wise work (norms, activations, RoPE):

- every attention kernel's output (flash, memory-efficient, cuDNN, the CPU one, flash-attn's own op):
  attention is the costliest operation per byte kept;
- the output of every other matrix multiply (the 1st, 3rd, 5th, ... of a layer's forward), about half of
  the layer's matmul FLOPs recomputed for half of their activation memory;
- the results of tensor-parallel collectives, so a rerun never communicates again.

Everything else is recomputed. This is the operator-level policy torchtitan calls selective ("op"),
applied through ``torch.utils.checkpoint``'s ``context_fn`` on the model's own per-layer checkpointing;
the numbers computed are the same as with ``full`` or ``off`` (recomputation is deterministic), only
memory and speed differ.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# Operator names (namespace, op, overload) whose outputs are kept. Looked up when first needed: an op
# this torch build or machine lacks (cuDNN attention, flash-attn's op without flash-attn) is skipped.
_MATMULS = (("aten", "mm", "default"), ("aten", "addmm", "default"))
_KEPT = (
    ("aten", "_scaled_dot_product_flash_attention", "default"),
    ("aten", "_scaled_dot_product_efficient_attention", "default"),
    ("aten", "_scaled_dot_product_cudnn_attention", "default"),
    ("aten", "_scaled_dot_product_flash_attention_for_cpu", "default"),
    ("flash_attn", "_flash_attn_forward", "default"),
    ("flash_attn", "_flash_attn_varlen_forward", "default"),
    ("_c10d_functional", "all_reduce", "default"),
    ("_c10d_functional", "reduce_scatter_tensor", "default"),
)


def _resolve(names: tuple[tuple[str, str, str], ...]) -> frozenset[Any]:
    found = set()
    for namespace, op, overload in names:
        try:
            found.add(getattr(getattr(getattr(torch.ops, namespace), op), overload))
        except (AttributeError, RuntimeError):  # not in this build, or its library is not loaded
            continue
    return frozenset(found)


@functools.cache
def matmul_ops() -> frozenset[Any]:
    return _resolve(_MATMULS)


def kept_ops() -> frozenset[Any]:
    # Not cached: flash-attn registers its ops when it is imported, which may happen after the first call.
    return _resolve(_KEPT)


def selective_context() -> Any:
    """A fresh pair of checkpoint contexts for one checkpointed layer call (``context_fn``).

    Matmuls are counted separately in the forward pass and in the recomputation, so both agree on which
    of them were kept.
    """
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    matmuls, kept = matmul_ops(), kept_ops()
    counted = {False: 0, True: 0}  # matmuls seen so far: in the forward pass, in the recomputation

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        if op in matmuls:
            counted[ctx.is_recompute] += 1
            keep = counted[ctx.is_recompute] % 2 == 1
        else:
            keep = op in kept
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def checkpointing_kwargs(mode: str) -> dict[str, Any] | None:
    """The keyword arguments of ``torch.utils.checkpoint.checkpoint`` for one decoder-layer call
    (non-reentrant; with the selective policy for ``selective``), or None for ``off``."""
    if mode == "off":
        return None
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = selective_context
    return kwargs


def checkpoint_layers(layers: Sequence[nn.Module], mode: str) -> int:
    """Make each decoder layer's ``forward`` a checkpointed call of itself; the number of layers changed.

    The checkpoint goes *inside* the layer's ``forward`` (an instance attribute, so parameter names and the
    module tree are untouched), not around the layer's call as Hugging Face's
    ``gradient_checkpointing_enable`` puts it. Compiling the layer afterwards (``nn.Module.compile``
    compiles the call, which runs this ``forward``) then traces the checkpoint as part of the graph:
    torchtitan's order, checkpoint, then compile, then shard. With Hugging Face's placement the compiled
    call runs inside the checkpoint, and with transformers 4.57 / torch 2.8 Dynamo compiles no frame of it
    under the selective policy's dispatch mode (tests/common/test_recompute.py counts both).
    """
    kwargs = checkpointing_kwargs(mode)
    if kwargs is None:
        return 0
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        inner = layer.forward  # bound before any wrapper; FSDP2 and TP add hooks, not a new forward

        def checkpointed(*args: Any, _inner: Any = inner, **call_kwargs: Any) -> Any:
            return checkpoint(_inner, *args, **kwargs, **call_kwargs)

        layer.forward = checkpointed  # type: ignore[method-assign]
    return len(layers)
