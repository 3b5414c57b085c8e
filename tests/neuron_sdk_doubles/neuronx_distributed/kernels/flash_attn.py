"""NxD's NKI flash attention, computed with plain torch ops (the math the kernel implements).

Layouts follow NxD 0.15 ``kernels/flash_attn.py``: with ``transpose_nki_inputs`` q, k and v arrive as
[batch, heads, head_dim, seq]; otherwise [batch, heads, seq, head_dim]. The result is [batch, heads, seq,
head_dim]. Like the kernel, sequence lengths that are not a multiple of 2048 are refused.
"""

from __future__ import annotations

import torch

from .._limits import placeholder_getattr as _placeholder_getattr


def nki_flash_attn_func(
    q,
    k,
    v,
    lnc=1,
    dropout_p=0.0,
    softmax_scale=None,
    causal=True,
    mixed_precision=True,
    seed=None,
    hardware_type=None,
    transpose_nki_inputs=True,
):
    if transpose_nki_inputs:
        q, k, v = (t.transpose(2, 3) for t in (q, k, v))
    seq = q.shape[2]
    if seq % 2048 != 0:
        raise NotImplementedError("Only support sequence as multiples of 2K")
    if dropout_p:
        raise NotImplementedError("nki_flash_attn_func double: dropout")
    dtype = q.dtype
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * scale
    if causal:
        blocked = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(blocked, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())
    return out.to(dtype)


__getattr__ = _placeholder_getattr(__name__)
