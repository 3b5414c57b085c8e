"""Packed rows under flash attention: the sample boundaries (``cu_seq_lens``) and the longest sample are
computed once per micro-batch on the host and reach every attention layer, so transformers never derives
them from ``position_ids`` on the device (a GPU->CPU sync in every layer).

flash-attn cannot run here, so a registered attention function stands in for its varlen kernel: it
attends within each [cu[i], cu[i+1]) span exactly as ``flash_attn_varlen_func`` does and records what it
received. The logits must equal the sdpa path's with its block-diagonal mask."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import torch
import torch.nn.functional as F

from trnft.common.fsdp.trainer import forward_logits
from trnft.common.training.data import packed_varlen

SEEN: list[dict] = []


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """[1, heads, tokens, dim] in, [1, tokens, heads, dim] out; causal attention within each span."""
    SEEN.append(
        {k: kwargs.get(k) for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    )
    cu = kwargs["cu_seq_lens_q"].tolist()
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling
            )
            for a, b in itertools.pairwise(cu)
        ],
        dim=2,
    )
    return out.transpose(1, 2).contiguous(), None


def _models():
    from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig

    AttentionInterface.register("trnft_test_varlen", _varlen_attention)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    # A config each: from_config records the attention implementation on the config object it is given.
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    varlen = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="trnft_test_varlen")
    varlen.eval()
    varlen.load_state_dict(sdpa.state_dict())
    return sdpa, varlen


def _packed_batch() -> dict[str, np.ndarray]:
    """Two rows of 12: samples of 5 + 4 + 3 padding, and 7 + 5, as tokenize packs them (padding has
    position 0 and segment 0)."""
    segments = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 7 + [2] * 5])
    positions = np.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(7)) + list(range(5))])
    ids = np.random.default_rng(0).integers(1, 97, size=(2, 12))
    return {"input_ids": ids, "position_ids": positions, "segment_ids": segments}


def test_the_host_boundaries_are_the_ones_transformers_derives_from_position_ids():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    host = _packed_batch()
    cu, longest = packed_varlen(host["position_ids"])
    (theirs, _), (their_longest, _) = prepare_fa_kwargs_from_position_ids(
        torch.from_numpy(host["position_ids"]).reshape(1, -1)
    )
    assert cu.dtype == np.int32 and cu.tolist() == theirs.tolist() == [0, 5, 9, 10, 11, 12, 19, 24]
    assert longest == their_longest == 7


def test_packed_flash_path_passes_the_boundaries_to_every_layer_and_isolates_samples():
    sdpa, varlen = _models()
    host = _packed_batch()
    batch = {k: torch.from_numpy(v) for k, v in host.items()}
    cu, longest = packed_varlen(host["position_ids"])
    SEEN.clear()
    with torch.no_grad():
        reference = forward_logits(sdpa, batch, "sdpa")
        mine = forward_logits(
            varlen, {**batch, "cu_seq_lens": torch.from_numpy(cu), "max_length": longest}, "flash_attention_2"
        )
    assert len(SEEN) == 2  # one call per decoder layer, each with the host's boundaries
    for seen in SEEN:
        assert seen["cu_seq_lens_q"].tolist() == seen["cu_seq_lens_k"].tolist() == cu.tolist()
        assert seen["max_length_q"] == seen["max_length_k"] == longest
    real = host["segment_ids"] != 0  # padding's logits are never used
    torch.testing.assert_close(mine[real], reference[real], rtol=1e-5, atol=1e-5)
