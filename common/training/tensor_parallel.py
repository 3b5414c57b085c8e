"""Megatron-style tensor parallelism of a Llama-style decoder layer: which projection splits on which dim.

Both platforms shard the same way: NxD's column/row-parallel layers on Trainium (and the CPU-XLA
rehearsal of them), DTensor's ``ColwiseParallel``/``RowwiseParallel`` on GPU. A column-parallel
projection splits its output features (weight dim 0, bias too), so every rank computes a slice of the
output from the whole input; a row-parallel one splits its input features (weight dim 1) and its partial
outputs are summed. LoRA follows its base layer: on a column-parallel layer lora_B (out x r) splits like
the weight and lora_A (r x in) is whole on every rank; on a row-parallel layer lora_A splits on dim 1 and
lora_B is whole.

Torch-free: the Neuron consolidator reads this table too.
"""

from __future__ import annotations

from typing import Literal

SplitKind = Literal["column", "row"]

COLUMN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PROJECTIONS = ("o_proj", "down_proj")

# For each kind of layer, the dimension each of its tensors is split on over tensor-parallel ranks, None
# where every rank holds the whole tensor. A tensor is named by its LoRA part, or weight/bias of the base.
DECODER_SPLITS: dict[SplitKind, dict[str, int | None]] = {
    "column": {"weight": 0, "bias": 0, "lora_A": None, "lora_B": 0},
    "row": {"weight": 1, "bias": None, "lora_A": 1, "lora_B": None},
}


def projection_kind(leaf: str) -> SplitKind | None:
    """How a decoder-layer projection (by its leaf name) is split; None when it is not."""
    if leaf in COLUMN_PROJECTIONS:
        return "column"
    if leaf in ROW_PROJECTIONS:
        return "row"
    return None
