"""A test-side writer of optimum-neuron checkpoints, written from NEURON_FORMAT.md alone.

Independent of trnft's own writer on purpose: fusion uses NxD's strided ``create_local_weight`` rule
(§2.3), GQA ranks are assigned from the interleaved list of KV replicas (§2.4), metadata dicts are spelled
out per era (§1.8). The consolidator is tested against what this writes.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trnft.neuron import nxd_format


@dataclass(frozen=True)
class Dims:
    hidden: int = 64
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 256
    layers: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self, tie: bool = False) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "num_hidden_layers": self.layers,
            "tie_word_embeddings": tie,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 128,
        }


def random_model(d: Dims, dtype=torch.bfloat16, seed=0, tie=False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hd = d.head_dim
    sd = {"model.embed_tokens.weight": torch.randn(d.vocab, d.hidden, generator=g)}
    for i in range(d.layers):
        p = f"model.layers.{i}"
        sd[f"{p}.self_attn.q_proj.weight"] = torch.randn(d.heads * hd, d.hidden, generator=g)
        sd[f"{p}.self_attn.k_proj.weight"] = torch.randn(d.kv_heads * hd, d.hidden, generator=g)
        sd[f"{p}.self_attn.v_proj.weight"] = torch.randn(d.kv_heads * hd, d.hidden, generator=g)
        sd[f"{p}.self_attn.o_proj.weight"] = torch.randn(d.hidden, d.heads * hd, generator=g)
        sd[f"{p}.mlp.gate_proj.weight"] = torch.randn(d.intermediate, d.hidden, generator=g)
        sd[f"{p}.mlp.up_proj.weight"] = torch.randn(d.intermediate, d.hidden, generator=g)
        sd[f"{p}.mlp.down_proj.weight"] = torch.randn(d.hidden, d.intermediate, generator=g)
        sd[f"{p}.input_layernorm.weight"] = torch.randn(d.hidden, generator=g)
        sd[f"{p}.post_attention_layernorm.weight"] = torch.randn(d.hidden, generator=g)
    sd["model.norm.weight"] = torch.randn(d.hidden, generator=g)
    sd["lm_head.weight"] = (
        sd["model.embed_tokens.weight"] if tie else torch.randn(d.vocab, d.hidden, generator=g)
    )
    return {k: v.to(dtype) for k, v in sd.items()}


MODULES = {  # projection -> (module, fan_out, fan_in) in units of Dims
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def random_adapter(
    d: Dims, targets, r=4, seed=1, tie_fused=("gate_proj", "up_proj")
) -> dict[str, torch.Tensor]:
    """A PEFT adapter state dict (saved names, fp32); projections in ``tie_fused`` share one LoRA A."""
    g = torch.Generator().manual_seed(seed)
    hd = d.head_dim
    shapes = {
        "q_proj": (d.heads * hd, d.hidden),
        "k_proj": (d.kv_heads * hd, d.hidden),
        "v_proj": (d.kv_heads * hd, d.hidden),
        "o_proj": (d.hidden, d.heads * hd),
        "gate_proj": (d.intermediate, d.hidden),
        "up_proj": (d.intermediate, d.hidden),
        "down_proj": (d.hidden, d.intermediate),
    }
    out = {}
    for i in range(d.layers):
        shared = None
        for proj in targets:
            fan_out, fan_in = shapes[proj]
            p = f"base_model.model.model.layers.{i}.{MODULES[proj]}.{proj}"
            if proj in tie_fused and shared is not None:
                a = shared
            else:
                a = torch.randn(r, fan_in, generator=g)
                if proj in tie_fused:
                    shared = a
            out[f"{p}.lora_A.weight"] = a
            out[f"{p}.lora_B.weight"] = torch.randn(fan_out, r, generator=g)
    return out


# -- NxD rules ----------------------------------------------------------------------------------------


def create_local_weight(full: torch.Tensor, dim: int, tp: int, rank: int, stride: int = 1) -> torch.Tensor:
    """§2.3: split ``full`` into chunks of (size/tp)/stride along ``dim``; rank r takes chunks r, r+tp, ..."""
    per_partition = full.shape[dim] // tp
    chunks = torch.split(full, per_partition // stride, dim=dim)
    return torch.cat(chunks[rank::tp], dim=dim).contiguous()


def gqa_ranks(d: Dims, tp: int, mult: int) -> list[list[int]]:
    """§2.4: the query heads each rank holds, from the interleaved list of KV replicas.

    The KV heads are replicated ``mult`` times in the order K0..K(n-1), K0..K(n-1), ...; the list is cut
    into ``tp`` equal parts; a slot holding the i-th replica of KV head k gets the i-th ``mult``-th of that
    head's query group.
    """
    replicas = [k for _ in range(mult) for k in range(d.kv_heads)]
    per_rank = len(replicas) // tp
    group = d.heads // d.kv_heads
    sub = group // mult
    seen = {k: 0 for k in range(d.kv_heads)}
    ranks = []
    for r in range(tp):
        heads = []
        for k in replicas[r * per_rank : (r + 1) * per_rank]:
            i = seen[k]
            seen[k] += 1
            heads += list(range(k * group + i * sub, k * group + (i + 1) * sub))
        ranks.append(heads)
    return ranks


def _rows_of_heads(w: torch.Tensor, heads: list[int], hd: int) -> torch.Tensor:
    return torch.cat([w[h * hd : (h + 1) * hd] for h in heads]).contiguous()


def _cols_of_heads(w: torch.Tensor, heads: list[int], hd: int) -> torch.Tensor:
    return torch.cat([w[:, h * hd : (h + 1) * hd] for h in heads], dim=1).contiguous()


def _kv_local(w: torch.Tensor, tp: int, rank: int, mult: int) -> torch.Tensor:
    return torch.cat([w] * mult).chunk(tp)[rank].contiguous()


# -- the writer ----------------------------------------------------------------------------------------


# optimum-neuron writes xser shards, and writing them needs torch-xla's TensorReference (the trn1 line);
# reading them does not. On the current line the writer's default is the plain encoding of the same files.
DEFAULT_ENCODING = "xser" if importlib.util.find_spec("torch_xla") is not None else "plain"


@dataclass
class Layout:
    era: str = "new"  # "new" | "old"
    tp: int = 2
    pp: int = 1
    encoding: str = DEFAULT_ENCODING  # "xser" | "plain"
    fuse_qkv: bool = False
    kv_multiplier: int | None = None


def _gqa(d: Dims, tp: int) -> bool:
    return d.kv_heads < tp or d.kv_heads % tp != 0


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p == "layers":
            return int(parts[i + 1])
    return None


def _stage_of(name: str, d: Dims, pp: int) -> int:
    """PP stages split layers evenly; the embedding is on stage 0, norm and lm_head on the last."""
    layer = _layer_of(name)
    if layer is None:
        return 0 if "embed_tokens" in name else pp - 1
    return layer * pp // d.layers


def write_full(path: Path, sd: dict[str, torch.Tensor], d: Dims, lay: Layout, tie: bool = False) -> Path:
    """A full fine-tuning checkpoint folder ``path`` (a checkpoint-N dir) with a ``shards`` tag."""
    tp = lay.tp
    gqa = _gqa(d, tp)
    mult = lay.kv_multiplier or max(1, tp // d.kv_heads)
    mha_fused = lay.era == "new" and lay.fuse_qkv and not gqa and d.heads == d.kv_heads
    hd = d.head_dim
    ranks = [[{} for _ in range(tp)] for _ in range(lay.pp)]
    params = [{} for _ in range(lay.pp)]  # NEW "parameters" / OLD "sharded_metadata" per stage
    specs = [[] for _ in range(lay.pp)]
    heads = gqa_ranks(d, tp, mult) if gqa else None

    def put(stage, name, local_per_rank, meta):
        for r in range(tp):
            ranks[stage][r][name] = local_per_rank[r]
        params[stage][name] = meta

    def tp_meta(dim, stride=1):
        if lay.era == "old":
            return {"kind": "sharded", "partition_dim": dim}
        return {
            "tensor_model_parallel": True,
            "partition_dim": dim,
            "partition_stride": stride,
            "num_partitions": tp,
        }

    none_meta = (
        {"kind": "tied", "partition_dim": None} if lay.era == "old" else {"tensor_model_parallel": False}
    )
    gqa_names = {}
    for i in range(d.layers):
        p = f"model.layers.{i}"
        st = _stage_of(p + ".x", d, lay.pp)
        q, k, v, o = (sd[f"{p}.self_attn.{x}_proj.weight"] for x in "qkvo")
        if gqa:
            qs = [_rows_of_heads(q, heads[r], hd) for r in range(tp)]
            ks = [_kv_local(k, tp, r, mult) for r in range(tp)]
            vs = [_kv_local(v, tp, r, mult) for r in range(tp)]
            if lay.fuse_qkv:
                put(
                    st,
                    f"{p}.self_attn.qkv_proj.weight_qkv",
                    [torch.cat([qs[r], ks[r], vs[r]]) for r in range(tp)],
                    none_meta if lay.era == "new" else tp_meta(0),
                )
            else:
                for x, locs in zip("qkv", (qs, ks, vs)):
                    put(st, f"{p}.self_attn.qkv_proj.weight_{x}", locs, tp_meta(0))
            put(
                st,
                f"{p}.self_attn.o_proj.weight",
                [_cols_of_heads(o, heads[r], hd) for r in range(tp)],
                tp_meta(1),
            )
            for x in "qkv":
                gqa_names[f"{p}.self_attn.{x}_proj.weight"] = (
                    f"{p}.self_attn.qkv_proj.weight_{x if not lay.fuse_qkv else 'qkv'}"
                )
            if lay.era == "new":
                specs[st].append({
                    "module_fully_qualified_name": f"{p}.self_attn",
                    "specs": [["GQAQKVColumnParallelLinearSpec", {
                        "gqa_qkv_projection_name": "qkv_proj", "query_projection_name": "q_proj", "key_projection_name": "k_proj",
                        "value_projection_name": "v_proj", "output_projection_name": "o_proj", "num_attention_heads": d.heads,
                        "num_key_value_heads": d.kv_heads, "kv_size_multiplier": mult,
                        "q_output_size_per_partition": d.heads * hd // tp, "kv_output_size_per_partition": d.kv_heads * hd * mult // tp,
                        "fuse_qkv": lay.fuse_qkv, "bias": False, "tp_size": tp, "peft_type": None}]],
                })  # fmt: skip
        elif mha_fused:
            fused = torch.cat([q, k, v])
            put(
                st,
                f"{p}.self_attn.qkv_proj.weight",
                [create_local_weight(fused, 0, tp, r, stride=3) for r in range(tp)],
                tp_meta(0, 3),
            )
            put(
                st,
                f"{p}.self_attn.o_proj.weight",
                [create_local_weight(o, 1, tp, r) for r in range(tp)],
                tp_meta(1),
            )
            specs[st].append({"module_fully_qualified_name": f"{p}.self_attn", "specs": [["FusedLinearsSpec", {
                "fused_linear_name": "qkv_proj", "linear_names": ["q_proj", "k_proj", "v_proj"], "bias": False, "fuse_axis": 0,
                "original_dims": [d.heads * hd] * 3, "tp_size": tp, "peft_type": None}]]})  # fmt: skip
        else:
            for x, w in zip("qkv", (q, k, v)):
                put(
                    st,
                    f"{p}.self_attn.{x}_proj.weight",
                    [create_local_weight(w, 0, tp, r) for r in range(tp)],
                    tp_meta(0),
                )
            put(
                st,
                f"{p}.self_attn.o_proj.weight",
                [create_local_weight(o, 1, tp, r) for r in range(tp)],
                tp_meta(1),
            )
        gate, up, down = (sd[f"{p}.mlp.{x}_proj.weight"] for x in ("gate", "up", "down"))
        if lay.era == "new":
            fused = torch.cat([gate, up])
            put(
                st,
                f"{p}.mlp.gate_up_proj.weight",
                [create_local_weight(fused, 0, tp, r, stride=2) for r in range(tp)],
                tp_meta(0, 2),
            )
            specs[st].append({"module_fully_qualified_name": f"{p}.mlp", "specs": [["FusedLinearsSpec", {
                "fused_linear_name": "gate_up_proj", "linear_names": ["gate_proj", "up_proj"], "bias": False, "fuse_axis": 0,
                "original_dims": [d.intermediate] * 2, "tp_size": tp, "peft_type": None}]]})  # fmt: skip
        else:
            for x, w in (("gate", gate), ("up", up)):
                put(
                    st,
                    f"{p}.mlp.{x}_proj.weight",
                    [create_local_weight(w, 0, tp, r) for r in range(tp)],
                    tp_meta(0),
                )
        put(
            st,
            f"{p}.mlp.down_proj.weight",
            [create_local_weight(down, 1, tp, r) for r in range(tp)],
            tp_meta(1),
        )
        for norm in ("input_layernorm", "post_attention_layernorm"):
            put(st, f"{p}.{norm}.weight", [sd[f"{p}.{norm}.weight"]] * tp, none_meta)
    put(
        0,
        "model.embed_tokens.weight",
        [create_local_weight(sd["model.embed_tokens.weight"], 0, tp, r) for r in range(tp)],
        tp_meta(0),
    )
    put(lay.pp - 1, "model.norm.weight", [sd["model.norm.weight"]] * tp, none_meta)
    lm = [create_local_weight(sd["lm_head.weight"], 0, tp, r) for r in range(tp)]
    if tie:
        for r in range(tp):  # state_dict() keeps the tied duplicate; named_parameters (the metadata) does not
            ranks[lay.pp - 1][r]["lm_head.weight"] = lm[r]
    else:
        put(lay.pp - 1, "lm_head.weight", lm, tp_meta(0))
    if lay.era == "new" and lay.pp > 1:
        # §6c: a PP rank's file may hold every stage's tensors; only its own stage's values are current.
        for st in range(lay.pp):
            for other in range(lay.pp):
                if other != st:
                    for r in range(tp):
                        for name, t in ranks[other][r].items():
                            ranks[st][r].setdefault(name, torch.zeros_like(t))
    tag = path / "shards"
    rank_list = [ranks[st][r] for st in range(lay.pp) for r in range(tp)]
    if lay.era == "new":
        meta = [
            {"parameters": params[st], "model_weight_transformation_specs": specs[st]} for st in range(lay.pp)
        ]
    else:
        gqa_meta = {}
        if gqa:
            gqa_meta = {
                "original_names_to_gqa_qkv_names": gqa_names,
                "output_projections_names": {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(d.layers)},
                "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads, "kv_size_multiplier": mult,
                "fuse_qkv": lay.fuse_qkv, "q_output_size_per_partition": d.heads * hd // tp,
                "kv_output_size_per_partition": d.kv_heads * hd * mult // tp,
            }  # fmt: skip
        meta = [{"sharded_metadata": params[st], "gqa_qkv_metadata": gqa_meta} for st in range(lay.pp)]
    nxd_format.write_tag(tag, rank_list, meta, encoding=lay.encoding, era=lay.era, pp_size=lay.pp)
    (path / "config.json").write_text(json.dumps(d.config(tie)))
    return path


def write_lora(
    path: Path, adapter: dict[str, torch.Tensor], d: Dims, lay: Layout, targets, r: int = 4
) -> Path:
    """A LoRA checkpoint: NEW ``adapter_default/adapter_shards`` or OLD root ``adapter_shards`` (§1.4, §1.6)."""
    tp = lay.tp
    gqa = _gqa(d, tp)
    mult = lay.kv_multiplier or max(1, tp // d.kv_heads)
    heads = gqa_ranks(d, tp, mult) if gqa else None
    hd = d.head_dim
    ranks = [{} for _ in range(tp)]
    params = {}
    specs = []
    P = "base_model.model.model.layers"

    def put(name, locs, meta_name, meta):
        for rr in range(tp):
            ranks[rr][name] = locs[rr]
        params[meta_name] = meta

    def with_adapter(name):  # NEW metadata names carry the adapter name after lora_A/lora_B
        head, _, tail = name.rpartition(".")
        return f"{head}.default.{tail}" if lay.era == "new" else name

    def tp_meta(dim):
        if lay.era == "old":
            return {"kind": "sharded", "partition_dim": dim}
        return {
            "tensor_model_parallel": True,
            "partition_dim": dim,
            "partition_stride": 1,
            "num_partitions": tp,
        }

    rep = {"kind": "tied", "partition_dim": None} if lay.era == "old" else {"tensor_model_parallel": False}
    for i in range(d.layers):
        for proj in targets:
            mod = f"{P}.{i}.{MODULES[proj]}.{proj}"
            a, b = adapter[f"{mod}.lora_A.weight"], adapter[f"{mod}.lora_B.weight"]
            if lay.era == "new" and proj in ("gate_proj", "up_proj"):
                continue  # written below as the fused gate_up_proj
            if lay.era == "new" and gqa and proj in ("q_proj", "k_proj", "v_proj"):
                continue  # written below as the GQA qkv_proj
            if proj == "o_proj" and gqa and lay.era == "new":
                locs = [_cols_of_heads(a, heads[rr], hd) for rr in range(tp)]
                put(f"{mod}.lora_A.weight", locs, with_adapter(f"{mod}.lora_A.weight"), tp_meta(1))
                put(f"{mod}.lora_B.weight", [b] * tp, with_adapter(f"{mod}.lora_B.weight"), rep)
            elif proj in ("o_proj", "down_proj"):
                put(
                    f"{mod}.lora_A.weight",
                    [create_local_weight(a, 1, tp, rr) for rr in range(tp)],
                    with_adapter(f"{mod}.lora_A.weight"),
                    tp_meta(1),
                )
                put(f"{mod}.lora_B.weight", [b] * tp, with_adapter(f"{mod}.lora_B.weight"), rep)
            else:
                put(f"{mod}.lora_A.weight", [a] * tp, with_adapter(f"{mod}.lora_A.weight"), rep)
                put(
                    f"{mod}.lora_B.weight",
                    [create_local_weight(b, 0, tp, rr) for rr in range(tp)],
                    with_adapter(f"{mod}.lora_B.weight"),
                    tp_meta(0),
                )
        if lay.era == "new" and {"gate_proj", "up_proj"} <= set(targets):
            mod = f"{P}.{i}.mlp"
            a = adapter[f"{mod}.gate_proj.lora_A.weight"]
            fused_b = torch.cat(
                [adapter[f"{mod}.gate_proj.lora_B.weight"], adapter[f"{mod}.up_proj.lora_B.weight"]]
            )
            put(
                f"{mod}.gate_up_proj.lora_A.weight",
                [a] * tp,
                f"{mod}.gate_up_proj.lora_A.default.weight",
                rep,
            )
            put(f"{mod}.gate_up_proj.lora_B.weight", [create_local_weight(fused_b, 0, tp, rr, stride=2) for rr in range(tp)],
                f"{mod}.gate_up_proj.lora_B.default.weight", tp_meta(0))  # fmt: skip
        if lay.era == "new":
            specs.append({"module_fully_qualified_name": f"{P}.{i}.mlp", "specs": [["FusedLinearsSpec", {
                "fused_linear_name": "gate_up_proj", "linear_names": ["gate_proj", "up_proj"], "bias": False, "fuse_axis": 0,
                "original_dims": [d.intermediate] * 2, "tp_size": tp,
                "peft_type": "lora" if {"gate_proj", "up_proj"} <= set(targets) else None}]]})  # fmt: skip
        if lay.era == "new" and gqa:
            mod = f"{P}.{i}.self_attn"
            if {"q_proj", "k_proj", "v_proj"} <= set(targets):
                a = adapter[f"{mod}.q_proj.lora_A.weight"]
                qb, kb, vb = (adapter[f"{mod}.{x}_proj.lora_B.weight"] for x in "qkv")
                put(f"{mod}.qkv_proj.lora_A.weight", [a] * tp, f"{mod}.qkv_proj.lora_A.default.weight", rep)
                for x, w in (("q", qb), ("k", kb), ("v", vb)):
                    locs = (
                        [_rows_of_heads(w, heads[rr], hd) for rr in range(tp)]
                        if x == "q"
                        else [_kv_local(w, tp, rr, mult) for rr in range(tp)]
                    )
                    put(
                        f"{mod}.qkv_proj.lora_B.weight_{x}",
                        locs,
                        f"{mod}.qkv_proj.lora_B.default.weight_{x}",
                        tp_meta(0),
                    )
            specs.append({"module_fully_qualified_name": mod, "specs": [["GQAQKVColumnParallelLinearSpec", {
                "gqa_qkv_projection_name": "qkv_proj", "query_projection_name": "q_proj", "key_projection_name": "k_proj",
                "value_projection_name": "v_proj", "output_projection_name": "o_proj", "num_attention_heads": d.heads,
                "num_key_value_heads": d.kv_heads, "kv_size_multiplier": mult, "q_output_size_per_partition": d.heads * hd // tp,
                "kv_output_size_per_partition": d.kv_heads * hd * mult // tp, "fuse_qkv": False, "bias": False, "tp_size": tp,
                "peft_type": "lora" if {"q_proj", "k_proj", "v_proj"} <= set(targets) else None}]]})  # fmt: skip
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": list(targets),
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny",
    }
    if lay.era == "new":
        adapter_dir = path / "adapter_default"
        tag = adapter_dir / "adapter_shards"
        meta = {"parameters": params, "model_weight_transformation_specs": specs}
    else:
        adapter_dir = path
        tag = path / "adapter_shards"
        meta = {"sharded_metadata": params, "gqa_qkv_metadata": {}}
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    nxd_format.write_tag(
        tag, ranks, meta, encoding=lay.encoding if lay.era == "new" else "plain", era=lay.era
    )
    return path
