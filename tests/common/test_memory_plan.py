"""train.activation_checkpointing: auto (the FSDP2 trainer): the activation estimate against the figures
measured for Llama-3.1-8B shapes, and the choice per memory budget."""

from __future__ import annotations

import pytest

from trnft.common.training import memory_plan as mp

KIB, GIB = 1024, 2**30
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_8B = mp.ModelShape(
    layers=32,
    hidden=4096,
    intermediate=14336,
    query_width=4096,
    kv_width=1024,
    vocab=128256,
    base_parameters=8_030_261_248,
    largest_layer_parameters=218_112_000,
    trained_parameters=41_943_040,  # r 16 on every linear layer
    lora_targets_per_layer=TARGETS,
)


def _rank(**changes) -> mp.RankSetup:
    setup = {"tp": 1, "shard_ranks": 1, "micro_batch": 2, "sequence": 4096, "base_bytes": 2,
             "activation_bytes": 2, "lora_dropout": 0.0, "loss_parallel": False}  # fmt: skip
    return mp.RankSetup(**{**setup, **changes})


@pytest.mark.parametrize(("dropout", "measured_kib", "within"), [(0.0, 193, 0.03), (0.05, 301, 0.04)])
def test_activations_per_token_and_layer_match_the_measured_llama_8b_figures(dropout, measured_kib, within):
    """Measured on the CPU per decoder layer in bf16 (saved tensors of one layer's forward, issue 36): 193
    KiB per token without LoRA dropout, 301 KiB with dropout 0.05 on the seven projections. The estimate
    gives 198 and 312 (2.6 % and 3.6 % over, on the safe side: each target's dropped input and mask are
    counted separately)."""
    got = mp.activation_bytes_per_token_layer(LLAMA_8B, _rank(lora_dropout=dropout), "off") / KIB
    assert got == pytest.approx(measured_kib, rel=within)


def test_recomputing_keeps_less():
    rank = _rank()
    off, selective, full = (mp.activation_bytes_per_token_layer(LLAMA_8B, rank, m) for m in mp.ORDER)
    assert off > selective > full == 4096 * 2
    peaks = [mp.peak_bytes(LLAMA_8B, rank, m) for m in mp.ORDER]
    assert peaks == sorted(peaks, reverse=True)


@pytest.mark.parametrize(
    ("device_gib", "choice"),
    [(141, "off"), (80, "selective"), (40, "full"), (24, "full")],  # H200, H100, A100-40G, a 24 GB card
)
def test_auto_picks_the_least_recompute_that_fits(device_gib, choice):
    plan = mp.plan("auto", LLAMA_8B, _rank(), device_gib * GIB)
    assert plan.choice == choice, plan.summary()
    assert plan.budget_bytes == int(device_gib * GIB * 0.9 - 2 * GIB)
    if choice != "full":
        assert plan.peak_bytes[choice] <= plan.budget_bytes


def test_a_configured_mode_is_kept_and_an_unknown_device_recomputes_fully():
    assert mp.plan("selective", LLAMA_8B, _rank(), 141 * GIB).choice == "selective"
    unknown = mp.plan("auto", LLAMA_8B, _rank(), None)
    assert unknown.choice == "full" and "auto" in unknown.summary()
    assert mp.plan("off", LLAMA_8B, _rank(), 24 * GIB).to_json()["configured"] == "off"


def test_sharding_and_tensor_parallelism_lower_the_estimate():
    alone = mp.peak_bytes(LLAMA_8B, _rank(), "off")
    assert mp.peak_bytes(LLAMA_8B, _rank(shard_ranks=8), "off") < alone
    assert mp.peak_bytes(LLAMA_8B, _rank(tp=2, loss_parallel=True), "off") < alone


def test_full_fine_tuning_counts_each_weight_once_with_its_gradient_and_moments():
    full = mp.ModelShape(**{**LLAMA_8B.__dict__, "trained_parameters": LLAMA_8B.base_parameters,
                            "lora_targets_per_layer": ()})  # fmt: skip
    rank = _rank(base_bytes=4, shard_ranks=8)
    lora = mp.peak_bytes(LLAMA_8B, _rank(base_bytes=4, shard_ranks=8), "full")
    # 4 bytes of fp32 weight + 12 of gradient and moments per parameter, over 8 shards, beyond LoRA's run
    extra = mp.peak_bytes(full, rank, "full") - lora
    expected = LLAMA_8B.base_parameters * 12 / 8 - LLAMA_8B.trained_parameters * 16 / 8
    assert extra == pytest.approx(expected, rel=1e-6)


def test_the_chunked_loss_counts_one_chunk_of_logits_instead_of_the_micro_batch():
    """fsdp.chunked_loss: 1,024 tokens' logits in bf16 and fp32 and their fp32 gradient (1.2 GiB at Llama-3's
    128,256 words) instead of 8,192 tokens' fp32 logits and gradient (7.8 GiB): LoRA on 8B at micro-batch
    2 x 4,096 keeps every activation from a 91 GiB device up instead of from 98 GiB."""
    whole = mp.peak_bytes(LLAMA_8B, _rank(), "off")
    chunked = mp.peak_bytes(LLAMA_8B, _rank(loss_chunk_tokens=1024), "off")
    assert whole - chunked == 8192 * 128256 * 8 - 1024 * 128256 * 10
    assert mp.plan("auto", LLAMA_8B, _rank(), 91 * GIB).choice == "selective"
    assert mp.plan("auto", LLAMA_8B, _rank(loss_chunk_tokens=1024), 91 * GIB).choice == "off"
    assert mp.plan("auto", LLAMA_8B, _rank(), 98 * GIB).choice == "off"
    # a chunk larger than the micro-batch holds the micro-batch's logits only
    larger = mp.peak_bytes(LLAMA_8B, _rank(loss_chunk_tokens=10**6), "off")
    assert larger == mp.peak_bytes(LLAMA_8B, _rank(loss_chunk_tokens=8192), "off")
