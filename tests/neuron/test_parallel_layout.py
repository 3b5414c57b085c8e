"""The optimum-neuron 0.4.x layout (NEURON_FORMAT.md §1.6, §2.3-2.5, §3.2): names, local shapes, metadata."""

from __future__ import annotations

import json

import pytest
import torch

from trnft.common.errors import ConfigError
from trnft.neuron.parallel_layout import (
    ModelDims,
    NeuronLayout,
    gqa_query_heads,
    parameter_metadata,
    parse_key,
    shard_state_dict,
)

P = "base_model.model.model.layers.0"
DIMS = ModelDims(hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256, vocab=512, layers=1)
R = 8


@pytest.mark.parametrize(
    ("tp", "heads", "kv", "mult", "rank", "expected"),
    [
        # NEURON_FORMAT §2.4: nH=32, nKV=8, T=32, mult=4: rank r holds query head 4*(r mod 8) + r//8
        *[(32, 32, 8, 4, r, [4 * (r % 8) + r // 8]) for r in (0, 1, 7, 8, 9, 31)],
        # T=16, mult=2: rank r holds heads {4*(r mod 8) + 2*(r//8), +1}
        *[
            (16, 32, 8, 2, r, [4 * (r % 8) + 2 * (r // 8), 4 * (r % 8) + 2 * (r // 8) + 1])
            for r in (0, 3, 8, 15)
        ],
    ],
)
def test_gqa_query_heads_match_the_documented_permutation(tp, heads, kv, mult, rank, expected):
    assert gqa_query_heads(tp, rank, heads, kv, mult).tolist() == expected


@pytest.mark.parametrize(
    ("tp", "heads", "kv", "mult"), [(8, 8, 2, 4), (32, 32, 8, 4), (16, 32, 8, 2), (8, 32, 4, 2), (4, 4, 2, 2)]
)
def test_gqa_permutation_covers_every_head_once(tp, heads, kv, mult):
    heads_seen = sorted(h for r in range(tp) for h in gqa_query_heads(tp, r, heads, kv, mult).tolist())
    assert heads_seen == list(range(heads))


@pytest.mark.parametrize(
    ("tp", "mode", "mult"),
    [(1, "separate", 1), (2, "separate", 1), (4, "gqa", 2)],
)
def test_layout_choice(tp, mode, mult):
    layout = NeuronLayout.for_model(DIMS, tp)
    assert (layout.attention, layout.kv_multiplier) == (mode, mult)
    assert ("qkv_proj" in layout.fused_modules()) == (mode == "gqa")
    assert layout.fused_modules()["gate_up_proj"] == ("gate_proj", "up_proj")  # always fused in NEW


@pytest.mark.parametrize(
    ("dims", "tp", "message"),
    [
        (DIMS, 3, "parallel.tp: 3 does not divide the 4 attention heads of the model"),
        (
            ModelDims(hidden=96, heads=6, kv_heads=3, head_dim=16, intermediate=256, vocab=512, layers=1),
            2,
            "needs KV replication",
        ),
        (
            ModelDims(hidden=128, heads=4, kv_heads=4, head_dim=32, intermediate=250, vocab=512, layers=1),
            4,
            "does not divide the 250 intermediate size",
        ),
        (
            ModelDims(hidden=128, heads=4, kv_heads=4, head_dim=32, intermediate=256, vocab=510, layers=1),
            4,
            "does not divide the 510 vocabulary size",
        ),
    ],
)
def test_impossible_layouts_are_refused(dims, tp, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        NeuronLayout.for_model(dims, tp)


def _adapter(
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
) -> dict[str, torch.Tensor]:
    """A PEFT adapter state dict of one layer with the LoRA A of fused groups tied."""
    torch.manual_seed(0)
    d = DIMS
    io = {
        "self_attn.q_proj": (d.hidden, d.heads * d.head_dim),
        "self_attn.k_proj": (d.hidden, d.kv_heads * d.head_dim),
        "self_attn.v_proj": (d.hidden, d.kv_heads * d.head_dim),
        "self_attn.o_proj": (d.heads * d.head_dim, d.hidden),
        "mlp.gate_proj": (d.hidden, d.intermediate),
        "mlp.up_proj": (d.hidden, d.intermediate),
        "mlp.down_proj": (d.intermediate, d.hidden),
    }
    out = {}
    shared = {}
    for module, (fan_in, fan_out) in io.items():
        if module.rsplit(".", 1)[1] not in targets:
            continue
        group = (
            "qkv"
            if module.endswith(("q_proj", "k_proj", "v_proj"))
            else "gu"
            if module.endswith(("gate_proj", "up_proj"))
            else module
        )
        a = shared.setdefault(group, torch.randn(R, fan_in))
        out[f"{P}.{module}.lora_A.weight"] = a
        out[f"{P}.{module}.lora_B.weight"] = torch.randn(fan_out, R)
    return out


def test_tp2_shard_names_and_local_shapes():
    layout = NeuronLayout.for_model(DIMS, 2)
    adapter = _adapter()
    ranks = [shard_state_dict(adapter, layout, r) for r in range(2)]
    d = DIMS
    expected = {
        f"{P}.self_attn.q_proj.lora_A.weight": (R, d.hidden),  # column: A replicated
        f"{P}.self_attn.q_proj.lora_B.weight": (d.heads * d.head_dim // 2, R),  # column: B split dim 0
        f"{P}.self_attn.k_proj.lora_B.weight": (d.kv_heads * d.head_dim // 2, R),
        f"{P}.self_attn.o_proj.lora_A.weight": (R, d.heads * d.head_dim // 2),  # row: A split dim 1
        f"{P}.self_attn.o_proj.lora_B.weight": (d.hidden, R),  # row: B replicated
        f"{P}.mlp.gate_up_proj.lora_A.weight": (R, d.hidden),  # fused: one A
        f"{P}.mlp.gate_up_proj.lora_B.weight": (2 * d.intermediate // 2, R),  # [gate_r; up_r]
        f"{P}.mlp.down_proj.lora_A.weight": (R, d.intermediate // 2),
        f"{P}.mlp.down_proj.lora_B.weight": (d.hidden, R),
    }
    for rank in ranks:
        assert {k: tuple(v.shape) for k, v in rank.items() if k in expected} == expected
        # each rank's tensors own exactly their bytes (torch.save writes whole storages)
        assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in rank.values())
        assert not any(".gate_proj." in k or ".up_proj." in k for k in rank)
    gate_b, up_b = adapter[f"{P}.mlp.gate_proj.lora_B.weight"], adapter[f"{P}.mlp.up_proj.lora_B.weight"]
    assert torch.equal(ranks[1][f"{P}.mlp.gate_up_proj.lora_B.weight"], torch.cat([gate_b[128:], up_b[128:]]))
    assert torch.equal(
        ranks[0][f"{P}.self_attn.o_proj.lora_A.weight"],
        adapter[f"{P}.self_attn.o_proj.lora_A.weight"][:, :64],
    )


def test_tp4_gqa_names_replication_and_permutation():
    layout = NeuronLayout.for_model(DIMS, 4)  # 2 KV heads < tp 4: GQA qkv_proj, KV replicated twice
    adapter = _adapter()
    ranks = [shard_state_dict(adapter, layout, r) for r in range(4)]
    d = DIMS
    keys = set(ranks[0])
    assert all(
        v.untyped_storage().nbytes() == v.numel() * v.element_size() for r in ranks for v in r.values()
    )
    assert f"{P}.self_attn.qkv_proj.lora_A.weight" in keys
    assert {f"{P}.self_attn.qkv_proj.lora_B.weight_{s}" for s in "qkv"} <= keys
    assert not any(".q_proj." in k or ".k_proj." in k or ".v_proj." in k for k in keys)
    assert tuple(ranks[0][f"{P}.self_attn.qkv_proj.lora_B.weight_q"].shape) == (d.heads * d.head_dim // 4, R)
    assert tuple(ranks[0][f"{P}.self_attn.qkv_proj.lora_B.weight_k"].shape) == (
        d.kv_heads * d.head_dim * 2 // 4,
        R,
    )
    k_b = adapter[f"{P}.self_attn.k_proj.lora_B.weight"]
    gathered_k = torch.cat([r[f"{P}.self_attn.qkv_proj.lora_B.weight_k"] for r in ranks])
    assert torch.equal(gathered_k, torch.cat([k_b, k_b]))  # interleaved replication
    q_b = adapter[f"{P}.self_attn.q_proj.lora_B.weight"].reshape(d.heads, d.head_dim, R)
    for r, rank in enumerate(ranks):
        (head,) = gqa_query_heads(4, r, d.heads, d.kv_heads, 2).tolist()
        assert torch.equal(rank[f"{P}.self_attn.qkv_proj.lora_B.weight_q"], q_b[head])
        o_a = adapter[f"{P}.self_attn.o_proj.lora_A.weight"]
        assert torch.equal(
            rank[f"{P}.self_attn.o_proj.lora_A.weight"], o_a[:, head * d.head_dim : (head + 1) * d.head_dim]
        )


def test_untied_fused_lora_a_is_refused():
    adapter = _adapter()
    adapter[f"{P}.mlp.up_proj.lora_A.weight"] = adapter[f"{P}.mlp.up_proj.lora_A.weight"] + 1
    with pytest.raises(ValueError, match="LoRA A of a fused layer must be one matrix"):
        shard_state_dict(adapter, NeuronLayout.for_model(DIMS, 2), 0)


def test_metadata_matches_optimum_neuron_serialisation():
    layout = NeuronLayout.for_model(DIMS, 4)
    names = [
        "base_model.model.model.embed_tokens.weight",
        f"{P}.self_attn.q_proj.base_layer.weight",
        f"{P}.self_attn.q_proj.lora_A.default.weight",
        f"{P}.self_attn.q_proj.lora_B.default.weight",
        f"{P}.self_attn.k_proj.base_layer.weight",
        f"{P}.self_attn.o_proj.lora_A.default.weight",
        f"{P}.mlp.gate_proj.base_layer.weight",
        f"{P}.mlp.gate_proj.lora_B.default.weight",
        f"{P}.mlp.up_proj.base_layer.weight",
        f"{P}.input_layernorm.weight",
        "base_model.model.lm_head.weight",
    ]
    meta = parameter_metadata(
        names, layout, peft=True, lora_targets={"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    )
    params = meta["parameters"]

    def tp4(dim, stride=1):
        return {
            "tensor_model_parallel": True,
            "partition_dim": dim,
            "partition_stride": stride,
            "num_partitions": 4,
        }

    assert params["base_model.model.model.embed_tokens.weight"] == tp4(0)
    assert params[f"{P}.self_attn.qkv_proj.base_layer.weight_q"] == tp4(0)
    assert params[f"{P}.self_attn.qkv_proj.base_layer.weight_k"] == tp4(0)
    assert params[f"{P}.self_attn.qkv_proj.lora_A.default.weight"] == {"tensor_model_parallel": False}
    assert params[f"{P}.self_attn.qkv_proj.lora_B.default.weight_q"] == tp4(0)
    assert params[f"{P}.self_attn.o_proj.lora_A.default.weight"] == tp4(1)
    assert params[f"{P}.mlp.gate_up_proj.base_layer.weight"] == tp4(0, 2)  # fused base: stride 2
    assert params[f"{P}.mlp.gate_up_proj.lora_B.default.weight"] == tp4(0, 1)  # LoRA B: declared stride 1
    assert params[f"{P}.input_layernorm.weight"] == {"tensor_model_parallel": False}
    assert params["base_model.model.lm_head.weight"] == tp4(0)
    specs = {m["module_fully_qualified_name"]: m["specs"] for m in meta["model_weight_transformation_specs"]}
    (gqa,) = specs[f"{P}.self_attn"]
    assert gqa[0] == "GQAQKVColumnParallelLinearSpec"
    assert gqa[1] | {} == {
        "gqa_qkv_projection_name": "qkv_proj",
        "query_projection_name": "q_proj",
        "key_projection_name": "k_proj",
        "value_projection_name": "v_proj",
        "output_projection_name": "o_proj",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "kv_size_multiplier": 2,
        "q_output_size_per_partition": 32,
        "kv_output_size_per_partition": 32,
        "fuse_qkv": False,
        "bias": False,
        "tp_size": 4,
        "peft_type": "lora",
    }
    (mlp,) = specs[f"{P}.mlp"]
    assert mlp == [
        "FusedLinearsSpec",
        {
            "fused_linear_name": "gate_up_proj",
            "linear_names": ["gate_proj", "up_proj"],
            "bias": False,
            "fuse_axis": 0,
            "original_dims": [256, 256],
            "tp_size": 4,
            "peft_type": "lora",
        },
    ]
    json.dumps(meta)  # serialisable as the .json metadata file


def test_key_parsing_round_trips():
    for name in (
        f"{P}.self_attn.q_proj.lora_A.default.weight",
        "model.layers.3.mlp.gate_up_proj.weight",
        "base_model.model.lm_head.weight",
        "lm_head.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A.default",
    ):
        key = parse_key(name)
        assert key is not None and key.render() == name
    assert parse_key("model.layers.0.input_layernorm.weight") is None
