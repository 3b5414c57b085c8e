"""How optimum-neuron 0.4.x lays a Llama-style model out over tensor-parallel ranks.

This module is the single description of that layout, used in both directions:

- :func:`shard_state_dict` turns full tensors under Hugging Face / PEFT names into the per-rank tensors
  and key names of an optimum-neuron checkpoint (the CPU trainer writes these, tests build fixtures);
- :func:`parameter_metadata` writes ``mp_metadata_pp_rank_0.json`` (``parameters`` and
  ``model_weight_transformation_specs``) exactly as optimum-neuron serialises it;
- :mod:`trnft.neuron.consolidate` reads the layout back.

Facts (NEURON_FORMAT.md): q/k/v/gate/up/lm_head are column-parallel (split on dim 0), o/down row-parallel
(dim 1, bias replicated), the embedding is split on the vocabulary; gate and up are one fused
``gate_up_proj`` whose rank-r rows are ``[gate_r; up_r]``; when the KV heads cannot be split evenly
(``kv < tp`` or ``kv % tp``) q/k/v become a GQA ``qkv_proj`` with ``weight_q/k/v`` (or ``weight_qkv``),
KV heads replicated ``kv_size_multiplier`` times and query heads (and the columns of o_proj) permuted so
each rank holds the queries of its KV heads. A fused layer has ONE LoRA A: gate/up (and q/k/v under
GQA) share it, which is why the CPU trainer ties those LoRA A matrices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..common.config.run_config import RunConfig
from ..common.errors import ConfigError
from ..common.training.tensor_parallel import COLUMN_PROJECTIONS, DECODER_SPLITS, ROW_PROJECTIONS

# This module is imported by the consolidator, which must stay free of torch (its import alone costs
# about half a gigabyte of RSS); the writer functions below import torch where they use it.

PEFT_PREFIX = "base_model.model."
# NxD parallelizes the decoder projections as every Megatron-style layout does, and lm_head column-wise.
COLUMN_PARALLEL = (*COLUMN_PROJECTIONS, "lm_head")
ROW_PARALLEL = ROW_PROJECTIONS
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
# Fused projection -> the Hugging Face projections it replaces, in row order.
EMBEDDING = "embed_tokens"

AttentionMode = Literal["separate", "gqa", "fused_mha"]


# --------------------------------------------------------------------------------------------------
# Model dimensions and the layout at a given TP


@dataclass(frozen=True)
class ModelDims:
    """The dimensions that decide the layout, from a transformers config."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            layers=config.num_hidden_layers,
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class NeuronLayout:
    """The parallel layout optimum-neuron builds for a model at tensor-parallel degree ``tp``."""

    dims: ModelDims
    tp: int
    attention: AttentionMode
    kv_multiplier: int
    fuse_qkv: bool

    @classmethod
    def for_model(
        cls, dims: ModelDims, tp: int, *, fuse_qkv: bool = False, kv_size_multiplier: int | None = None
    ) -> NeuronLayout:
        """The layout, or a ConfigError naming ``parallel.tp`` when the model cannot be split that way."""
        for what, size in (
            ("attention heads", dims.heads),
            ("intermediate size", dims.intermediate),
            ("vocabulary size", dims.vocab),
        ):
            if size % tp:
                raise ConfigError(f"parallel.tp: {tp} does not divide the {size} {what} of the model")
        gqa = dims.kv_heads < tp or dims.kv_heads % tp != 0
        if not gqa:
            if kv_size_multiplier not in (None, 1):
                raise ConfigError(
                    f"neuron.kv_size_multiplier: KV heads ({dims.kv_heads}) split evenly over tp={tp}; leave it unset"
                )
            mode: AttentionMode = "fused_mha" if fuse_qkv and dims.heads == dims.kv_heads else "separate"
            return cls(dims=dims, tp=tp, attention=mode, kv_multiplier=1, fuse_qkv=fuse_qkv)
        mult = kv_size_multiplier or max(1, tp // dims.kv_heads)
        kv_total = dims.kv_heads * mult
        if tp % mult or kv_total % tp or dims.heads % kv_total:
            raise ConfigError(
                f"parallel.tp: {tp} with {dims.kv_heads} KV heads needs KV replication, and kv_size_multiplier={mult} "
                f"does not give a whole number of KV heads per rank; use a tp that divides or is a multiple of "
                f"{dims.kv_heads}"
            )
        return cls(dims=dims, tp=tp, attention="gqa", kv_multiplier=mult, fuse_qkv=fuse_qkv)

    @property
    def q_rows_per_rank(self) -> int:
        return self.dims.heads * self.dims.head_dim // self.tp

    @property
    def kv_rows_per_rank(self) -> int:
        return self.dims.kv_heads * self.dims.head_dim * self.kv_multiplier // self.tp

    def fused_modules(self) -> dict[str, tuple[str, ...]]:
        """Fused projection -> Hugging Face projections, at this layout."""
        fused: dict[str, tuple[str, ...]] = {"gate_up_proj": GATE_UP}
        if self.attention in ("gqa", "fused_mha"):
            fused["qkv_proj"] = QKV
        return fused

    def tied_lora_groups(self) -> list[tuple[str, ...]]:
        """Projections whose LoRA A is one matrix on Trainium (fused layers have one LoRA A)."""
        return list(self.fused_modules().values())


# --------------------------------------------------------------------------------------------------
# GQA permutation and KV replication


def gqa_query_heads(tp: int, rank: int, heads: int, kv_heads: int, mult: int) -> np.ndarray:
    """Indices of the query heads that ``rank`` holds, in its local order.

    Each rank holds ``kv_heads*mult/tp`` KV heads; local KV slot j carries KV head
    ``(rank*kv_per_rank + j) mod kv_heads`` and the ``heads/(kv_heads*mult)`` query heads of that KV group
    at offset ``floor(rank*mult/tp)`` within the group (in units of the per-rank group size).
    """
    heads_per_rank = heads // tp
    kv_per_rank = kv_heads * mult // tp
    group = heads // kv_heads
    group_per_rank = heads_per_rank // kv_per_rank
    offset = (rank * mult // tp) * group_per_rank
    out = []
    for slot in range(kv_per_rank):
        kv = (rank * kv_per_rank + slot) % kv_heads
        out.append(np.arange(group_per_rank) + kv * group + offset)
    return np.concatenate(out)


def query_head_sources(layout: NeuronLayout) -> list[tuple[int, int]]:
    """For each original query head h (in order): (rank, local head index) where the checkpoint holds it."""
    where: dict[int, tuple[int, int]] = {}
    d = layout.dims
    for r in range(layout.tp):
        for local, h in enumerate(gqa_query_heads(layout.tp, r, d.heads, d.kv_heads, layout.kv_multiplier)):
            where[int(h)] = (r, local)
    return [where[h] for h in range(d.heads)]


def local_query_rows(full: Any, layout: NeuronLayout, rank: int) -> Any:
    """Rows (heads) of a query projection, or of its LoRA B, that ``rank`` holds under GQA (torch)."""
    import torch

    d = layout.dims
    idx = torch.as_tensor(gqa_query_heads(layout.tp, rank, d.heads, d.kv_heads, layout.kv_multiplier))
    return full.reshape(d.heads, d.head_dim, -1)[idx].reshape(-1, full.shape[-1])


def local_output_columns(full: Any, layout: NeuronLayout, rank: int) -> Any:
    """Columns (heads) of o_proj, or of its LoRA A, that ``rank`` holds under GQA (torch)."""
    return local_query_rows(full.t(), layout, rank).t()


def local_kv_rows(full: Any, layout: NeuronLayout, rank: int) -> Any:
    """Rows of a key/value projection (or LoRA B) on ``rank``: the KV heads replicated, then split (torch)."""
    return full.repeat(layout.kv_multiplier, 1).chunk(layout.tp, dim=0)[rank]


# --------------------------------------------------------------------------------------------------
# Key names


_KEY = re.compile(
    r"^(?P<prefix>(?:base_model\.model\.)?)(?P<module>.+?)\.(?P<proj>[A-Za-z_]+_proj|lm_head|embed_tokens)\."
    r"(?P<param>.+)$"
)


@dataclass(frozen=True)
class Key:
    """A parameter name split into its parts: ``{prefix}{module}.{proj}.{param}``.

    ``module`` is the parent path (``model.layers.3.self_attn``; empty for ``lm_head``), ``param`` what
    follows the projection (``weight``, ``bias``, ``base_layer.weight``, ``lora_A.weight``,
    ``lora_A.default.weight``, ``lora_embedding_A``, ...).
    """

    prefix: str
    module: str
    proj: str
    param: str

    def render(self) -> str:
        module = f"{self.module}." if self.module else ""
        return f"{self.prefix}{module}{self.proj}.{self.param}"

    def with_(self, **changes: str) -> Key:
        return Key(**{**self.__dict__, **changes})

    @classmethod
    def in_module(cls, module: str, proj: str, param: str = "weight") -> Key:
        """The key of projection ``proj`` inside ``module`` (which may carry PEFT's ``base_model.model.``)."""
        prefix = PEFT_PREFIX if module.startswith(PEFT_PREFIX) else ""
        return cls(prefix, module[len(prefix) :], proj, param)

    @property
    def lora_part(self) -> str | None:
        """``lora_A``/``lora_B``/``lora_embedding_A``/``lora_embedding_B`` or None for base parameters."""
        head = self.param.split(".", 1)[0]
        return head if head.startswith("lora_") else None

    @property
    def tensor_name(self) -> str:
        """The last component: ``weight``, ``bias``, ``weight_q``, ... (``lora_embedding_A`` for embeddings)."""
        return self.param.rsplit(".", 1)[-1]


def parse_key(name: str) -> Key | None:
    """Split a projection parameter name; None for parameters outside projections (norms, embeddings)."""
    if name.startswith("lm_head.") or name.startswith(f"{PEFT_PREFIX}lm_head."):
        prefix = PEFT_PREFIX if name.startswith(PEFT_PREFIX) else ""
        return Key(prefix, "", "lm_head", name[len(prefix) + len("lm_head.") :])
    m = _KEY.match(name)
    if m is None:
        return None
    return Key(m["prefix"], m["module"], m["proj"], m["param"])


def with_tensor_suffix(param: str, suffix: str) -> str:
    """``lora_B.weight`` + ``_q`` -> ``lora_B.weight_q`` (GQA layer parameter names)."""
    head, _, last = param.rpartition(".")
    return f"{head}.{last}{suffix}" if head else f"{last}{suffix}"


# --------------------------------------------------------------------------------------------------
# Writer: full tensors -> per-rank tensors under optimum-neuron names


def _split(t: Any, dim: int, tp: int, rank: int) -> Any:
    return t.chunk(tp, dim=dim)[rank].contiguous()


def _kind(proj: str) -> str | None:
    """The NxD layer kind of a projection; None for layers NxD does not parallelize."""
    if proj in COLUMN_PARALLEL:
        return "column"
    if proj in ROW_PARALLEL:
        return "row"
    if proj == EMBEDDING:
        return "embedding"
    return None


# THE partition table (NEURON_FORMAT.md §2.3, §2.5): for each NxD layer kind, the dimension each of its
# tensors is split on over tensor-parallel ranks, None where every rank holds the whole tensor. A tensor is
# named by its LoRA part, or by weight/bias for the base layer. The decoder projections split as the GPU
# path splits them (common/training/tensor_parallel.py); NxD adds its vocabulary-parallel embedding. The CPU-XLA trainer's sharding, the
# checkpoint writer and its metadata all read it; fused layers (gate_up, qkv) and GQA add their own rules.
PARTITION_TABLE: dict[str, dict[str, int | None]] = {
    **DECODER_SPLITS,  # type: ignore[dict-item]  # its keys are the Literal "column" / "row"
    "embedding": {"weight": 0, "lora_embedding_A": None, "lora_embedding_B": None},
}


def split_dim(key: Key) -> int | None:
    """The dimension NxD splits the unfused parameter ``key`` on, or None when it is replicated."""
    kind = _kind(key.proj)
    return None if kind is None else PARTITION_TABLE[kind][key.lora_part or key.tensor_name]


def _local_plain(key: Key, t: Any, tp: int, rank: int) -> Any:
    """A non-fused parameter on ``rank``, split as :data:`PARTITION_TABLE` says."""
    dim = split_dim(key)
    return t.contiguous() if dim is None else _split(t, dim, tp, rank)


def _same(tensors: list[Any], what: str) -> Any:
    import torch

    for other in tensors[1:]:
        if not torch.equal(tensors[0], other):
            raise ValueError(f"{what}: LoRA A of a fused layer must be one matrix (tie it in training)")
    return tensors[0]


def shard_state_dict(full: dict[str, Any], layout: NeuronLayout, rank: int) -> dict[str, Any]:
    """The tensors rank ``rank`` saves, under optimum-neuron names, from full Hugging Face/PEFT tensors.

    ``full`` is a model state dict (full fine-tuning) or a PEFT adapter state dict (adapter name removed).
    Tensors of a fused group must all be present. Raises ValueError on an unknown projection.
    """
    import torch

    tp = layout.tp
    out: dict[str, Any] = {}
    fused = layout.fused_modules()
    member_of = {proj: fused_name for fused_name, projs in fused.items() for proj in projs}
    groups: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for name, tensor in full.items():
        key = parse_key(name)
        if key is None:
            out[name] = tensor.contiguous()  # norms, rotary buffers: replicated
            continue
        if key.proj in member_of:
            groups.setdefault((key.prefix, key.module, member_of[key.proj], key.param), {})[key.proj] = tensor
        elif (
            key.proj == "o_proj"
            and layout.attention == "gqa"
            and key.lora_part != "lora_B"
            and key.tensor_name == "weight"
        ):
            out[name] = local_output_columns(tensor, layout, rank).contiguous()
        else:
            out[name] = _local_plain(key, tensor, tp, rank)
    for (prefix, module, fused_name, param), members in groups.items():
        projs = fused[fused_name]
        missing = [p for p in projs if p not in members]
        if missing:
            raise ValueError(
                f"{prefix}{module}.{missing[0]}.{param}: missing; {fused_name} fuses {', '.join(projs)}"
            )
        key = Key(prefix, module, fused_name, param)
        ordered = [members[p] for p in projs]
        part = key.lora_part
        if part == "lora_A":
            out[key.render()] = _same(ordered, key.render()).contiguous()
        elif fused_name == "qkv_proj" and layout.attention == "gqa":
            q, k, v = ordered
            pieces = [
                local_query_rows(q, layout, rank),
                local_kv_rows(k, layout, rank),
                local_kv_rows(v, layout, rank),
            ]
            if layout.fuse_qkv:
                out[key.with_(param=with_tensor_suffix(param, "_qkv")).render()] = torch.cat(
                    pieces
                ).contiguous()
            else:
                for suffix, piece in zip(("_q", "_k", "_v"), pieces):
                    out[key.with_(param=with_tensor_suffix(param, suffix)).render()] = piece.contiguous()
        else:
            # column fusion (gate_up, MHA qkv): rank r holds [a_r; b_r; ...]
            out[key.render()] = torch.cat([_split(t, 0, tp, rank) for t in ordered]).contiguous()
    return {name: _owning(t) for name, t in out.items()}


def _owning(t: Any) -> Any:
    """``t`` backed by a storage of exactly its own bytes.

    torch.save writes a tensor's whole storage, so a chunk that is still a view of the full tensor would
    put the full tensor in every rank's file (tp times the bytes; real NxD ranks never hold more).
    """
    import torch

    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------------
# Metadata: mp_metadata_pp_rank_0.json


def _tp_attrs(dim: int, stride: int, tp: int) -> dict[str, Any]:
    return {
        "tensor_model_parallel": True,
        "partition_dim": dim,
        "partition_stride": stride,
        "num_partitions": tp,
    }


NOT_PARALLEL = {"tensor_model_parallel": False}


def _new_parameter_entries(name: str, layout: NeuronLayout) -> dict[str, dict[str, Any]]:
    """optimum-neuron parameter name(s) and partition attributes for one model parameter."""
    tp = layout.tp
    key = parse_key(name)
    if key is None:
        return {name: dict(NOT_PARALLEL)}
    fused = {proj: f for f, projs in layout.fused_modules().items() for proj in projs}
    part = key.lora_part
    if key.proj in fused:
        fkey = key.with_(proj=fused[key.proj])
        if part == "lora_A":
            return {fkey.render(): dict(NOT_PARALLEL)}
        if fused[key.proj] == "qkv_proj" and layout.attention == "gqa":
            if layout.fuse_qkv:
                # NxD re-creates the fused parameter and its TP attributes are lost (a known quirk).
                return {fkey.with_(param=with_tensor_suffix(key.param, "_qkv")).render(): dict(NOT_PARALLEL)}
            suffix = {"q_proj": "_q", "k_proj": "_k", "v_proj": "_v"}[key.proj]
            return {fkey.with_(param=with_tensor_suffix(key.param, suffix)).render(): _tp_attrs(0, 1, tp)}
        # LoRA B of a fused layer is declared with stride 1 although it is laid out like the base weight.
        stride = 1 if part == "lora_B" else len(layout.fused_modules()[fused[key.proj]])
        return {fkey.render(): _tp_attrs(0, stride, tp)}
    dim = split_dim(key)
    return {name: dict(NOT_PARALLEL) if dim is None else _tp_attrs(dim, 1, tp)}


def _specs(
    layout: NeuronLayout, module_prefix: str, layer: int, lora_targets: set[str]
) -> list[dict[str, Any]]:
    d = layout.dims
    tp = layout.tp
    out = []
    attn = f"{module_prefix}model.layers.{layer}.self_attn"
    if layout.attention == "gqa":
        spec = {
            "gqa_qkv_projection_name": "qkv_proj",
            "query_projection_name": "q_proj",
            "key_projection_name": "k_proj",
            "value_projection_name": "v_proj",
            "output_projection_name": "o_proj",
            "num_attention_heads": d.heads,
            "num_key_value_heads": d.kv_heads,
            "kv_size_multiplier": layout.kv_multiplier,
            "q_output_size_per_partition": layout.q_rows_per_rank,
            "kv_output_size_per_partition": layout.kv_rows_per_rank,
            "fuse_qkv": layout.fuse_qkv,
            "bias": d.attention_bias,
            "tp_size": tp,
            "peft_type": "lora" if set(QKV) <= lora_targets else None,
        }
        out.append({"module_fully_qualified_name": attn, "specs": [["GQAQKVColumnParallelLinearSpec", spec]]})
    elif layout.attention == "fused_mha":
        spec = {
            "fused_linear_name": "qkv_proj",
            "linear_names": list(QKV),
            "bias": d.attention_bias,
            "fuse_axis": 0,
            "original_dims": [d.heads * d.head_dim] * 3,
            "tp_size": tp,
            "peft_type": "lora" if set(QKV) <= lora_targets else None,
        }
        out.append({"module_fully_qualified_name": attn, "specs": [["FusedLinearsSpec", spec]]})
    mlp = {
        "fused_linear_name": "gate_up_proj",
        "linear_names": list(GATE_UP),
        "bias": d.mlp_bias,
        "fuse_axis": 0,
        "original_dims": [d.intermediate, d.intermediate],
        "tp_size": tp,
        "peft_type": "lora" if set(GATE_UP) <= lora_targets else None,
    }
    out.append(
        {
            "module_fully_qualified_name": f"{module_prefix}model.layers.{layer}.mlp",
            "specs": [["FusedLinearsSpec", mlp]],
        }
    )
    return out


def parameter_metadata(
    parameter_names: list[str], layout: NeuronLayout, *, peft: bool, lora_targets: set[str] | None = None
) -> dict[str, Any]:
    """``mp_metadata_pp_rank_0.json`` for a model whose ``named_parameters()`` are ``parameter_names``.

    For a PEFT model the names carry the adapter name (``...lora_A.default.weight``) and ``base_layer``,
    like optimum-neuron's ``named_parameters`` of its PEFT model. Tied parameters appear once.
    """
    parameters: dict[str, dict[str, Any]] = {}
    for name in parameter_names:
        parameters.update(_new_parameter_entries(name, layout))
    prefix = PEFT_PREFIX if peft else ""
    specs = []
    for layer in range(layout.dims.layers):
        specs.extend(_specs(layout, prefix, layer, lora_targets or set()))
    return {"parameters": parameters, "model_weight_transformation_specs": specs}


def model_layout(cfg: RunConfig, config: Any) -> NeuronLayout:
    """NxD's layout of the model a transformers ``config`` describes, at the run's ``neuron.*`` settings
    (a ConfigError names the key when the model cannot be split that way)."""
    return NeuronLayout.for_model(
        ModelDims.from_config(config),
        cfg.parallel.tp,
        fuse_qkv=cfg.neuron.fuse_qkv,
        kv_size_multiplier=cfg.neuron.kv_size_multiplier,
    )
