"""Tokenized training data on disk, and how both trainers read it.

The tokenize stage writes one folder per split (``train/``, ``validation/``) holding four ``.npy`` arrays
of shape ``[num_sequences, max_seq_length]``:

- ``input_ids`` (int32): token ids; padding uses the tokenizer's pad token (distinct from EOS).
- ``labels`` (int32): the token itself where the loss applies, -100 on prompt tokens, on the first token
  of every sample and on padding. A label at position t is predicted from position t-1.
- ``position_ids`` (int32): restart at 0 for every packed sample (RoPE sees each sample alone).
- ``segment_ids`` (int32): 1, 2, ... for the samples packed in a sequence, 0 on padding. Attention is
  allowed only inside one segment and causally (:func:`segment_attention_mask`), so no token attends
  across a sample boundary.

Batches are always full and their order is a pure function of (seed, step): :func:`batch_indices` walks
through per-epoch permutations of all sequences, continuing into the next epoch instead of emitting a
partial batch. Resuming at step ``s`` therefore needs nothing but ``s``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ARRAYS = ("input_ids", "labels", "position_ids", "segment_ids")
IGNORE_INDEX = -100
SPLIT_DIRS = {"train": "train", "validation": "validation"}
TEXT_FILES = {"train": "training.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class TokenizedSplit:
    """Memory-mapped arrays of one split; nothing is read until indexed."""

    path: Path
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    segment_ids: np.ndarray

    @classmethod
    def open(cls, path: str | Path) -> TokenizedSplit:
        p = Path(path)
        arrays = {name: np.load(p / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        shapes = {a.shape for a in arrays.values()}
        assert len(shapes) == 1, f"{p}: arrays disagree in shape {shapes}"
        return cls(path=p, **arrays)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def rows(self, indices: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """The arrays of the given sequences, as fresh int64 arrays (ready for torch)."""
        idx = np.asarray(indices, dtype=np.int64)
        return {name: np.asarray(getattr(self, name)[idx], dtype=np.int64) for name in ARRAYS}

    def tokens(self, indices: np.ndarray | list[int]) -> int:
        """Real (non-padding) tokens of the given sequences: positions with a segment id."""
        segments = np.asarray(self.segment_ids[np.asarray(indices, dtype=np.int64)])
        return int((segments != 0).sum())

    def supervised_tokens(self, indices: np.ndarray | list[int]) -> int:
        """Labelled positions that count in the loss (the first position is never predicted)."""
        labels = np.asarray(self.labels[np.asarray(indices, dtype=np.int64)])
        return int((labels[:, 1:] != IGNORE_INDEX).sum())


def batch_indices(step: int, global_batch: int, num_sequences: int, seed: int) -> np.ndarray:
    """Sequence indices of optimizer step ``step`` (0-based): always ``global_batch`` of them.

    Position p of the endless stream is element ``p % n`` of epoch ``p // n``'s permutation, and each
    epoch's permutation comes from its own seed, so any step can be computed without replaying others.
    """
    assert num_sequences > 0 and global_batch > 0
    start = step * global_batch
    out = np.empty(global_batch, dtype=np.int64)
    filled = 0
    while filled < global_batch:
        position = start + filled
        epoch, offset = divmod(position, num_sequences)
        perm = np.random.default_rng([seed, epoch]).permutation(num_sequences)
        take = min(global_batch - filled, num_sequences - offset)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
    return out


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of optimizer step ``step`` (dropout): a fixed function of the run seed and the step, so a
    resumed run draws what an uninterrupted one would (every trainer reseeds with it before each step)."""
    return seed * 1_000_003 + step


def packed_varlen(position_ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Sample boundaries of packed rows flattened into one row, for flash attention's varlen kernel.

    Returns the cumulative starts (int32, ``[0, ..., tokens]``) and the longest sample's length. A sample
    starts wherever its position id is 0 (padding, at position 0, is a sample of one token): what
    transformers derives from ``position_ids``, here once per micro-batch on the host.
    """
    flat = np.asarray(position_ids).reshape(-1)
    cu = np.append(np.flatnonzero(flat == 0), flat.size).astype(np.int32)
    return cu, int(np.diff(cu).max())


def segment_allowed(segment_ids: Any) -> Any:
    """Boolean ``[B, 1, S, S]``: query i may attend key j (torch tensors; True = attend).

    Query i may attend key j iff j <= i and both are in the same non-pad segment. Padding positions
    attend only to themselves so their softmax row stays finite (their labels are -100 anyway).
    """
    import torch

    seg = segment_ids
    s = seg.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril()
    same = seg[:, :, None] == seg[:, None, :]
    eye = torch.eye(s, dtype=torch.bool, device=seg.device)
    allowed = (same & causal & (seg[:, :, None] != 0)) | eye
    return allowed[:, None, :, :]


def document_causal_block_mask(segment_ids: Any, block_size: int = 128) -> Any:
    """:func:`segment_allowed` as FlexAttention's ``BlockMask`` (``[B, 1, S, S]``, never materialised on
    the device's attention path): the same rule per position, and tiles of ``block_size`` x ``block_size``
    that no query of one sample may see (another sample, the future, padding) are skipped by the kernel.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids

    def allowed(batch: Any, head: Any, q: Any, kv: Any) -> Any:
        same = seg[batch, q] == seg[batch, kv]
        return (same & (kv <= q) & (seg[batch, q] != 0)) | (q == kv)

    rows, length = seg.shape
    return create_block_mask(allowed, rows, None, length, length, device=seg.device, BLOCK_SIZE=block_size)


def segment_attention_mask(segment_ids: Any, dtype: Any = None) -> Any:
    """Additive 4-D attention mask ``[B, 1, S, S]`` from segment ids ``[B, S]``: 0 where
    :func:`segment_allowed`, the dtype's minimum elsewhere (for eager attention)."""
    import torch

    dtype = dtype or torch.float32
    allowed = segment_allowed(segment_ids)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def summed_token_loss(logits: Any, labels: Any) -> Any:
    """Cross-entropy summed over supervised positions (torch): position t's logits predict label t+1.

    Both trainers divide this by the supervised tokens of the whole global batch, so the loss does not
    depend on how the batch is split into micro-batches and ranks.
    """
    import torch.nn.functional as F

    shifted = logits[:, :-1].float()
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@dataclass(frozen=True)
class TokenizeOutput:
    """Paths inside a complete tokenize stage folder."""

    root: Path

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR

    def split(self, name: str) -> TokenizedSplit:
        return TokenizedSplit.open(self.root / SPLIT_DIRS[name])

    def has_split(self, name: str) -> bool:
        return (self.root / SPLIT_DIRS[name] / "input_ids.npy").is_file()

    def text(self, name: str) -> Path:
        return self.root / TEXT_FILES[name]

    @property
    def info(self) -> dict[str, Any]:
        return json.loads((self.root / "tokenize_info.json").read_text())
