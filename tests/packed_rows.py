"""Packed rows of the tokenize fixture, and the check that each packed sample sees only itself."""

from __future__ import annotations

import numpy as np
import torch

from trnft.common.fsdp.trainer import forward_logits
from trnft.common.training.data import TokenizeOutput


def segments(segment_ids: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of every non-pad sample in one row."""
    out = []
    for seg in sorted(set(segment_ids.tolist()) - {0}):
        where = np.flatnonzero(segment_ids == seg)
        out.append((int(where[0]), int(where[-1]) + 1))
    return out


def two_packed_rows(tokenized, device: str) -> dict[str, torch.Tensor]:
    split = TokenizeOutput(tokenized).split("train")
    rows = [r for r in range(len(split)) if len(segments(np.asarray(split.segment_ids[r]))) >= 3][:2]
    assert len(rows) == 2
    return {k: torch.from_numpy(v).to(device) for k, v in split.rows(rows).items()}


def check_every_sample_alone(model, batch, attn: str, atol: float) -> None:
    with torch.no_grad():
        packed = forward_logits(model, batch, attn).float()
        assert packed.shape[:2] == batch["input_ids"].shape
        checked = 0
        for row in range(batch["input_ids"].shape[0]):
            for start, end in segments(batch["segment_ids"][row].cpu().numpy()):
                ids = batch["input_ids"][row : row + 1, start:end]
                alone = model(input_ids=ids).logits[0].float()
                torch.testing.assert_close(packed[row, start:end], alone, atol=atol, rtol=atol)
                checked += 1
    assert checked >= 6  # every sample of both rows, including those after the first of a row
