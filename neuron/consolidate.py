"""Consolidate stage: an optimum-neuron sharded checkpoint -> a PEFT adapter or HF safetensors model.

Reads both checkpoint eras: NEW (optimum-neuron 0.3+/0.4.x: ``shards/`` or ``adapter_<name>/adapter_shards/``
with ``mp_metadata_pp_rank_P.json`` and transformation specs) and OLD (0.0.x/0.1.0: ``shards/`` or a root
``adapter_shards/`` with ``mp_metadata_pp_rank_P.pt``), plain and xser shards, any TP, PP > 1, fused
``gate_up_proj`` and MHA ``qkv_proj``, GQA ``qkv_proj`` (``weight_q/k/v`` or ``weight_qkv``) with KV replication
and the query / o_proj head permutation, and LoRA A/B sharding per layer type (a fused LoRA A is written to
each unfused module exactly, never averaged).

How it is bounded in memory: every output tensor is planned first (name, dtype, shape and the input slices
it is made of, from the pickles only), then produced in row blocks straight from memory-mapped inputs and
written to a safetensors file whose header was computed up front; input pages are released after each
tensor. Peak memory is one row block, not the model. No torch is imported.

It verifies: every input tensor consumed exactly once, all ranks present with the same keys and shapes,
output shapes consistent with the model config when one is at hand. Any failure is one line naming the
file, key or tensor, and nothing is left in the output.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..common.config.adapter_config import (
    ADAPTER_CONFIG_FILE,
    LoraSettings,
    adapter_config_text,
    module_of,
    read_adapter_config,
)
from ..common.config.run_config import RunConfig
from ..common.errors import TrnftError
from ..common.io.hf_files import MODEL_CONFIG_FILES, TOKENIZER_FILES, copy_present
from ..common.io.tensor_io import (
    DEFAULT_MAX_SHARD_BYTES,
    ITEMSIZE,
    Array,
    LazyTensor,
    PlannedTensor,
    parse_size,
    row_blocks,
    to_f32,
    write_safetensors,
    write_sharded_model,
)
from ..common.pipeline import checkpoints
from ..common.pipeline.figures import Figures
from ..common.pipeline.platform_stages import CONSOLIDATE
from ..common.pipeline.rundir import into_new_folder
from ..common.pipeline.stages import StageContext, StageOutcome, StageResult, run_stage
from . import nxd_format
from .nxd_format import ShardSet, open_shard_set
from .parallel_layout import Key, ModelDims, NeuronLayout, parse_key, query_head_sources

ADAPTER_WEIGHTS = "adapter_model.safetensors"
BLOCK_BYTES = 32 << 20


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    """The consolidate stage: newest complete checkpoint of ``<root>/train`` -> ``<root>/consolidate``."""
    return run_stage(CONSOLIDATE, cfg, _body, force=force, log=log)


# --------------------------------------------------------------------------------------------------
# Finding what to consolidate


@dataclass
class Source:
    """One thing to consolidate: a model (``shards``) or one adapter."""

    kind: str  # "full" | "lora"
    shards: ShardSet
    checkpoint_dir: Path | None
    adapter_name: str | None = None
    adapter_config: dict[str, Any] | None = None
    files_dir: Path | None = None  # where config/tokenizer files may be found

    @property
    def output_subdir(self) -> str:
        return "" if self.adapter_name in (None, "default") else self.adapter_name


def _sources_in_checkpoint(ckpt: Path) -> list[Source]:
    sources = []
    for adapter_dir in sorted(p for p in ckpt.glob("adapter_*") if (p / "adapter_shards").is_dir()):
        name = adapter_dir.name[len("adapter_") :]
        sources.append(
            Source(
                "lora",
                open_shard_set(adapter_dir / "adapter_shards"),
                ckpt,
                name,
                read_adapter_config(adapter_dir),
                ckpt,
            )
        )
    if (ckpt / "adapter_shards").is_dir():  # OLD layout: the default adapter's config at the root
        sources.append(
            Source(
                "lora",
                open_shard_set(ckpt / "adapter_shards"),
                ckpt,
                "default",
                read_adapter_config(ckpt),
                ckpt,
            )
        )
    if (ckpt / "shards").is_dir():
        sources.append(Source("full", open_shard_set(ckpt / "shards"), ckpt, files_dir=ckpt))
    if not sources:
        raise TrnftError(f"{ckpt}: no shards/, adapter_shards/ or adapter_<name>/adapter_shards/ folder")
    return sources


def resolve(path: str | Path, log: Callable[[str], None] = print) -> tuple[list[Source], Path]:
    """Sources under a run dir, a train dir, a ``checkpoint-N`` dir or a ``shards``/``adapter_shards`` dir.

    Given a folder of several checkpoints, the newest with its ``done`` marker is taken (and named).
    """
    p = Path(path)
    if not p.exists():
        raise TrnftError(f"--checkpoint: {p} does not exist")
    if p.name in (nxd_format.MODEL_SHARDS, nxd_format.ADAPTER_SHARDS) and (p / "model").is_dir():
        ckpt = (
            p.parent
            if checkpoints.CHECKPOINT_DIR.match(p.parent.name) or p.parent.name.startswith("adapter_")
            else None
        )
        if p.name == nxd_format.MODEL_SHARDS:
            return [Source("full", open_shard_set(p), ckpt, files_dir=p.parent)], p
        adapter_dir = p.parent
        if adapter_dir.name.startswith("adapter_"):  # NEW: adapter_<name>/adapter_shards
            name = adapter_dir.name[len("adapter_") :]
            return [
                Source(
                    "lora",
                    open_shard_set(p),
                    adapter_dir.parent,
                    name,
                    read_adapter_config(adapter_dir),
                    adapter_dir.parent,
                )
            ], p
        return [
            Source(
                "lora",
                open_shard_set(p),
                p.parent,
                "default",
                read_adapter_config(p.parent),
                p.parent,
            )
        ], p
    if checkpoints.CHECKPOINT_DIR.match(p.name):
        info = checkpoints.inspect_checkpoint(p)
        if not info.complete:
            raise TrnftError(f"{p}: incomplete checkpoint ({info.reason}); use an older complete checkpoint")
        return _sources_in_checkpoint(p), p
    train_dir = p / "train" if (p / "train").is_dir() else p
    listed = checkpoints.list_checkpoints(train_dir)
    if not listed:
        raise TrnftError(
            f"{p}: no checkpoint-<step> folders (give a run dir, a train dir, a checkpoint or a shards dir)"
        )
    newest = checkpoints.newest_complete(train_dir)
    if newest is None:
        raise TrnftError(f"{train_dir}: no complete checkpoint ({listed[-1].path.name}: {listed[-1].reason})")
    skipped = [i for i in listed if i.step > newest.step]
    for info in skipped:
        log(f"consolidate: skipping {info.path.name} ({info.reason})")
    log(f"consolidate: using {newest.path.name}, the newest complete checkpoint in {train_dir}")
    return _sources_in_checkpoint(newest.path), newest.path


# --------------------------------------------------------------------------------------------------
# Producers: output tensors as row blocks of input slices


@dataclass(frozen=True)
class Piece:
    """Rows ``start:stop`` (and optionally columns ``col_start:col_stop``) of one input tensor."""

    tensor: LazyTensor
    start: int
    stop: int
    col_start: int | None = None
    col_stop: int | None = None

    @property
    def cols(self) -> int:
        full = self.tensor.shape[1] if len(self.tensor.shape) > 1 else 0
        if self.col_start is None:
            return full
        assert self.col_stop is not None  # set together with col_start
        return self.col_stop - self.col_start

    def read(self, start: int | None = None, stop: int | None = None) -> Array:
        a = self.tensor.read_rows(self.start if start is None else start, self.stop if stop is None else stop)
        if self.col_start is not None:
            a = a.with_data(a.data[:, self.col_start : self.col_stop])
        return a


def stack_rows(pieces: list[Piece]) -> Callable[[], Iterator[Array]]:
    """Output = the pieces one below the other (concatenation on dim 0)."""

    assert all(p.col_start is None for p in pieces)

    def produce() -> Iterator[Array]:
        for piece in pieces:
            yield from row_blocks(piece.read(), BLOCK_BYTES)

    return produce


# How far two tensor-parallel ranks' copies of a replicated tensor may be apart: bf16's relative spacing
# (2^-7), elementwise, relative to the larger of the two values. Copies trained as one model are equal (the
# same summed gradient and update on every rank); copies that trained apart differ at the scale of the
# tensor itself.
REPLICA_RTOL = 2.0**-7


def replica_difference(first: Array, other: Array) -> tuple[float, float] | None:
    """(largest absolute difference, the value it is relative to) where ``other`` departs from ``first``
    by more than :data:`REPLICA_RTOL`; None when they agree."""
    a, b = to_f32(first), to_f32(other)
    gap = np.abs(a - b)
    scale = np.maximum(np.abs(a), np.abs(b))
    bad = gap > REPLICA_RTOL * scale
    if not bad.any():
        return None
    worst = int(np.argmax(np.where(bad, gap, -1.0)))
    return float(gap.flat[worst]), float(np.abs(a).max())


def replicated_rows(key: str, lazies: list[LazyTensor], rows: int) -> Callable[[], Iterator[Array]]:
    """Rank 0's copy of a tensor every tensor-parallel rank holds whole, in row blocks, each block checked
    against the same rows of every other rank's copy: a checkpoint whose ranks trained different copies
    (each rank's own slice of the sequence) is refused, naming the tensor, instead of exporting rank 0's."""
    row_bytes = max(1, lazies[0].nbytes // max(1, rows)) if rows else 1
    step = max(1, BLOCK_BYTES // row_bytes)

    def produce() -> Iterator[Array]:
        for a in range(0, max(rows, 1), step):
            b = min(rows, a + step)
            first = lazies[0].read_rows(a, b) if rows else lazies[0].read()
            for rank, other in enumerate(lazies[1:], start=1):
                found = replica_difference(first, other.read_rows(a, b) if rows else other.read())
                if found is not None:
                    gap, largest = found
                    raise TrnftError(
                        f"{key}: tensor-parallel rank {rank}'s copy differs from rank 0's by up to {gap:.3g} "
                        f"(rank 0's largest value is {largest:.3g}; bf16 rounding allows {REPLICA_RTOL:.3g} "
                        "relative): the ranks trained different copies of this replicated tensor, so no "
                        "single one is the trained model; retrain with this trnft (it sums their gradients "
                        "under sequence parallelism)"
                    )
            yield first

    return produce


def join_columns(pieces: list[Piece], rows: int) -> Callable[[], Iterator[Array]]:
    """Output = the pieces side by side (concatenation on dim 1), produced in row blocks."""
    row_bytes = sum(p.cols for p in pieces) * ITEMSIZE[pieces[0].tensor.dtype]
    step = max(1, BLOCK_BYTES // max(1, row_bytes))

    def produce() -> Iterator[Array]:
        for a in range(0, rows, step):
            b = min(rows, a + step)
            blocks = [p.read(p.start + a, p.start + b) for p in pieces]
            yield blocks[0].with_data(np.concatenate([blk.data for blk in blocks], axis=1))

    return produce


# --------------------------------------------------------------------------------------------------
# Planning


@dataclass
class Plan:
    outputs: list[PlannedTensor] = field(default_factory=list)
    consumed: dict[tuple[int, str], str] = field(default_factory=dict)  # (pp, input key) -> output name
    notes: list[str] = field(default_factory=list)

    def consume(self, pp: int, key: str, rule: str) -> None:
        """Record that ``rule`` turns input ``key`` into output; an input may be turned once only."""
        if (pp, key) in self.consumed:
            raise TrnftError(
                f"{key}: claimed twice ({self.consumed[(pp, key)]} and {rule}); the checkpoint metadata is inconsistent"
            )
        self.consumed[(pp, key)] = rule

    def add(
        self, name: str, dtype: str, shape: tuple[int, ...], produce: Callable[[], Iterator[Array]]
    ) -> None:
        if any(o.name == name for o in self.outputs):
            raise TrnftError(
                f"consolidate: two inputs produce {name}; the checkpoint holds a parameter twice"
            )
        self.outputs.append(PlannedTensor(name, dtype, tuple(shape), produce))


class Planner:
    """Plans the output tensors of one source."""

    def __init__(self, source: Source, *, tie_word_embeddings: bool | None) -> None:
        self.source = source
        self.shards = source.shards
        self.adapter = source.adapter_name if source.kind == "lora" else None
        self.tie = tie_word_embeddings
        self.plan = Plan()

    # -- inputs --------------------------------------------------------------------------------------

    def lazies(self, pp: int, key: str) -> list[LazyTensor]:
        """The tensor ``key`` on every TP rank of stage ``pp``; all ranks must have it, same dtype."""
        out = []
        for tp in range(self.shards.tp_size):
            f = self.shards.file(tp, pp)
            if not f.has(key):
                raise TrnftError(f"{f.path}: missing tensor {key}, which rank 0 of the same stage has")
            out.append(f.lazy(key))
        if len({t.dtype for t in out}) != 1:
            raise TrnftError(f"{key}: dtype differs across TP ranks ({[t.dtype for t in out]})")
        return out

    def same_shapes(self, key: str, lazies: list[LazyTensor]) -> tuple[int, ...]:
        shapes = {t.shape for t in lazies}
        if len(shapes) != 1:
            detail = ", ".join(f"rank {r}: {list(t.shape)}" for r, t in enumerate(lazies))
            raise TrnftError(f"{key}: shape differs across TP ranks ({detail})")
        return lazies[0].shape

    # -- generic rule ------------------------------------------------------------------------------

    def generic(self, pp: int, key: str, parallel: bool, dim: int | None) -> None:
        lazies = self.lazies(pp, key)
        shape = self.same_shapes(key, lazies)
        name = key  # plain parameters keep their names (adapter tensors are saved without the adapter name)
        self.plan.consume(pp, key, f"{'split' if parallel else 'replicated'} {key}")
        dtype = lazies[0].dtype
        if not shape:
            self.plan.add(name, dtype, shape, replicated_rows(key, lazies, 0))
            return
        if not parallel:
            self.plan.add(name, dtype, shape, replicated_rows(key, lazies, shape[0]))
            return
        assert dim is not None
        if dim == 0 or len(shape) == 1:
            out_shape = (shape[0] * len(lazies), *shape[1:])
            self.plan.add(name, dtype, out_shape, stack_rows([Piece(t, 0, shape[0]) for t in lazies]))
        elif dim == 1:
            out_shape = (shape[0], shape[1] * len(lazies), *shape[2:])
            self.plan.add(
                name, dtype, out_shape, join_columns([Piece(t, 0, shape[0]) for t in lazies], shape[0])
            )
        else:
            raise TrnftError(f"{key}: partition_dim {dim} is not supported (0 or 1)")

    # -- fused linears (gate_up, MHA qkv) ---------------------------------------------------------

    def fused(
        self, pp: int, key: Key, linears: list[str], dims: list[int], fuse_axis: int, lora: bool
    ) -> None:
        """Unfuse a fused column-parallel weight (or its LoRA B): each rank holds [a_r; b_r; ...]."""
        name = key.render()
        lazies = self.lazies(pp, name)
        shape = self.same_shapes(name, lazies)
        tp = len(lazies)
        self.plan.consume(pp, name, f"unfuse {name}")
        if fuse_axis != 0:
            if lora:
                raise TrnftError(
                    f"{name}: LoRA on a row-fused layer is not supported (optimum-neuron cannot save it either)"
                )
            per = [d // tp for d in dims]
            offsets = np.cumsum([0, *per])
            for i, linear in enumerate(linears):
                pieces = [Piece(t, 0, shape[0], int(offsets[i]), int(offsets[i + 1])) for t in lazies]
                self.plan.add(
                    key.with_(proj=linear).render(),
                    lazies[0].dtype,
                    (shape[0], dims[i]),
                    join_columns(pieces, shape[0]),
                )
            return
        # A fused LoRA B is laid out like the base weight ([a_r; b_r] per rank) although its metadata says
        # stride 1; the spec's original_dims decide the split either way.
        per = [d // tp for d in dims]
        if sum(per) != shape[0]:
            raise TrnftError(
                f"{name}: {shape[0]} rows per rank, but the spec's original_dims {dims} / tp {tp} give {sum(per)}"
            )
        offsets = np.cumsum([0, *per])
        for i, linear in enumerate(linears):
            pieces = [Piece(t, int(offsets[i]), int(offsets[i + 1])) for t in lazies]
            self.plan.add(
                key.with_(proj=linear).render(), lazies[0].dtype, (dims[i], *shape[1:]), stack_rows(pieces)
            )

    def duplicate_lora_a(self, pp: int, key: Key, linears: list[str]) -> None:
        """One LoRA A of a fused layer -> the same matrix for each unfused projection (exact)."""
        name = key.render()
        lazies = self.lazies(pp, name)
        shape = self.same_shapes(name, lazies)
        self.plan.consume(pp, name, f"one LoRA A of {name}")
        for linear in linears:
            self.plan.add(
                key.with_(proj=linear).render(),
                lazies[0].dtype,
                shape,
                replicated_rows(name, lazies, shape[0]),
            )

    # -- GQA qkv ---------------------------------------------------------------------------------

    def gqa(self, pp: int, module: Key, spec: dict[str, Any], param: str, present: set[str]) -> None:
        """Un-permute queries, keep the first KV replica; ``param`` is ``weight``/``bias`` or ``lora_B.weight``."""
        tp = self.shards.tp_size
        if spec["tp_size"] != tp:
            raise TrnftError(
                f"{module.prefix}{module.module}: the spec says tp_size {spec['tp_size']}, the checkpoint has {tp} ranks"
            )
        heads, kv_heads, mult = (
            spec["num_attention_heads"],
            spec["num_key_value_heads"],
            spec["kv_size_multiplier"],
        )
        q_pp, kv_pp = spec["q_output_size_per_partition"], spec["kv_output_size_per_partition"]
        head_dim = q_pp * tp // heads
        layout = NeuronLayout(
            dims=ModelDims(hidden=0, heads=heads, kv_heads=kv_heads, head_dim=head_dim, intermediate=0, vocab=0, layers=0),
            tp=tp, attention="gqa", kv_multiplier=mult, fuse_qkv=spec["fuse_qkv"],
        )  # fmt: skip
        qkv = module.with_(proj=spec["gqa_qkv_projection_name"])
        head, _, last = param.rpartition(".")
        prefix = f"{head}." if head else ""
        fused_name = qkv.with_(param=f"{prefix}{last}_qkv").render()
        if fused_name in present:
            lazies = self.lazies(pp, fused_name)
            self.same_shapes(fused_name, lazies)
            sources = {"q": (lazies, 0), "k": (lazies, q_pp), "v": (lazies, q_pp + kv_pp)}
            self.plan.consume(pp, fused_name, f"GQA {fused_name}")
        else:
            sources = {}
            for part in ("q", "k", "v"):
                name = qkv.with_(param=f"{prefix}{last}_{part}").render()
                if name not in present:
                    raise TrnftError(
                        f"{name}: missing; the GQA layer {qkv.render()} saves q, k and v together"
                    )
                lazies = self.lazies(pp, name)
                self.same_shapes(name, lazies)
                sources[part] = (lazies, 0)
                self.plan.consume(pp, name, f"GQA {name}")
        per_head = head_dim
        q_lazies, q_off = sources["q"]
        rest = q_lazies[0].shape[1:]
        q_pieces = [
            Piece(q_lazies[r], q_off + local * per_head, q_off + (local + 1) * per_head)
            for r, local in query_head_sources(layout)
        ]
        out = {}
        out[spec["query_projection_name"]] = (q_pieces, (heads * head_dim, *rest))
        kv_rows = (
            kv_heads * head_dim
        )  # the first replica: ranks 0.. in order until the original rows are covered
        for part, proj in (("k", spec["key_projection_name"]), ("v", spec["value_projection_name"])):
            lazies, off = sources[part]
            pieces, need, r = [], kv_rows, 0
            while need > 0:
                take = min(kv_pp, need)
                pieces.append(Piece(lazies[r], off, off + take))
                need -= take
                r += 1
            out[proj] = (pieces, (kv_rows, *rest))
        for proj, (pieces, shape) in out.items():
            self.plan.add(
                module.with_(proj=proj, param=param).render(), q_lazies[0].dtype, shape, stack_rows(pieces)
            )

    def gqa_output_columns(self, pp: int, key: Key, spec: dict[str, Any]) -> None:
        """o_proj weight or its LoRA A: concatenate ranks on dim 1, then undo the head permutation."""
        name = key.render()
        lazies = self.lazies(pp, name)
        shape = self.same_shapes(name, lazies)
        tp = len(lazies)
        heads, kv_heads, mult = (
            spec["num_attention_heads"],
            spec["num_key_value_heads"],
            spec["kv_size_multiplier"],
        )
        head_dim = shape[1] * tp // heads
        layout = NeuronLayout(
            dims=ModelDims(hidden=0, heads=heads, kv_heads=kv_heads, head_dim=head_dim, intermediate=0, vocab=0, layers=0),
            tp=tp, attention="gqa", kv_multiplier=mult, fuse_qkv=False,
        )  # fmt: skip
        pieces = [
            Piece(lazies[r], 0, shape[0], local * head_dim, (local + 1) * head_dim)
            for r, local in query_head_sources(layout)
        ]
        self.plan.consume(pp, name, f"GQA columns of {name}")
        self.plan.add(name, lazies[0].dtype, (shape[0], heads * head_dim), join_columns(pieces, shape[0]))

    # -- the whole source ----------------------------------------------------------------------------

    def run(self) -> Plan:
        if self.shards.era == "new":
            self._plan_new()
        else:
            self._plan_old()
        return self.plan

    def _strip_adapter(self, name: str) -> str | None:
        """A NEW metadata name of this adapter -> the key it is saved under; None for other adapters."""
        key = parse_key(name)
        if key is None or key.lora_part is None:
            return name
        parts = key.param.split(".")
        if len(parts) < 2 or parts[1] != self.adapter:
            return None
        return key.with_(param=".".join([parts[0], *parts[2:]])).render()

    def _plan_new(self) -> None:
        owned: dict[str, tuple[int, dict[str, Any]]] = {}
        for pp, meta in enumerate(self.shards.metadata):
            if "parameters" not in meta:
                raise TrnftError(
                    f"{self.shards.root}: metadata of stage {pp} has no 'parameters' (not optimum-neuron >= 0.3)"
                )
            for name, attrs in meta["parameters"].items():
                key = self._strip_adapter(name) if self.adapter else name
                if key is not None and key not in owned:
                    owned[key] = (pp, attrs)
        for pp, meta in enumerate(self.shards.metadata):
            present = {k for k in self.shards.file(0, pp).names() if owned.get(k, (pp, None))[0] == pp}
            for module_specs in meta.get("model_weight_transformation_specs", []):
                module = module_specs["module_fully_qualified_name"]
                for cls_name, fields in module_specs["specs"]:
                    self._apply_spec(pp, module, cls_name, dict(fields), present)
            for key in sorted(present):
                if (pp, key) in self.plan.consumed:
                    continue
                if key not in owned:
                    self._unknown(pp, key)
                    continue
                attrs = owned[key][1]
                self.generic(pp, key, bool(attrs.get("tensor_model_parallel")), attrs.get("partition_dim"))

    def _apply_spec(
        self, pp: int, module: str, cls_name: str, spec: dict[str, Any], present: set[str]
    ) -> None:
        """Apply a transformation spec to the tensors of it that are present (base or LoRA), nothing else."""
        mkey = Key.in_module(module, proj="")  # the module itself; each branch names its projection
        if cls_name == "FusedLinearsSpec":
            fused = mkey.with_(proj=spec["fused_linear_name"])
            linears, dims = list(spec["linear_names"]), [int(d) for d in spec["original_dims"]]
            axis = (
                spec["fuse_axis"]
                if spec["fuse_axis"] in (0, 1)
                else {"column": 0, "row": 1}[spec["fuse_axis"]]
            )
            for param in ("weight", "bias"):
                if fused.with_(param=param).render() in present:
                    self.fused(pp, fused.with_(param=param), linears, dims, axis, lora=False)
                if fused.with_(param=f"lora_B.{param}").render() in present:
                    self.fused(pp, fused.with_(param=f"lora_B.{param}"), linears, dims, axis, lora=True)
                if fused.with_(param=f"lora_A.{param}").render() in present:
                    if axis != 0:
                        raise TrnftError(f"{fused.render()}: LoRA on a row-fused layer is not supported")
                    self.duplicate_lora_a(pp, fused.with_(param=f"lora_A.{param}"), linears)
        elif cls_name == "GQAQKVColumnParallelLinearSpec":
            qkv = mkey.with_(proj=spec["gqa_qkv_projection_name"])
            out = mkey.with_(proj=spec["output_projection_name"])
            for param in ("weight", "bias"):
                if any(qkv.with_(param=f"{param}_{s}").render() in present for s in ("q", "k", "v", "qkv")):
                    self.gqa(pp, mkey, spec, param, present)
                if any(
                    qkv.with_(param=f"lora_B.{param}_{s}").render() in present for s in ("q", "k", "v", "qkv")
                ):
                    self.gqa(pp, mkey, spec, f"lora_B.{param}", present)
                if qkv.with_(param=f"lora_A.{param}").render() in present:
                    self.duplicate_lora_a(
                        pp,
                        qkv.with_(param=f"lora_A.{param}"),
                        [spec[f"{p}_projection_name"] for p in ("query", "key", "value")],
                    )
            if out.with_(param="weight").render() in present:
                self.gqa_output_columns(pp, out.with_(param="weight"), spec)
            if out.with_(param="lora_A.weight").render() in present:
                self.gqa_output_columns(pp, out.with_(param="lora_A.weight"), spec)
        else:
            raise TrnftError(
                f"{module}: unknown transformation spec {cls_name}; this consolidator knows FusedLinearsSpec and GQAQKVColumnParallelLinearSpec"
            )

    def _unknown(self, pp: int, key: str) -> None:
        k = parse_key(key)
        if k is not None and k.proj == "lm_head" and self.tie is not False:
            # Tied to the embedding: named_parameters lists it once (under embed_tokens); HF re-ties on load.
            self.plan.consume(pp, key, "tied to the embedding")
            self.plan.notes.append(f"{key}: tied to the embedding, not written")
            return
        raise TrnftError(
            f"{self.shards.file(0, pp).path}: tensor {key} is not described by the checkpoint's metadata"
        )

    def _plan_old(self) -> None:
        for pp, meta in enumerate(self.shards.metadata):
            sharded = meta.get("sharded_metadata", {})
            gqa = meta.get("gqa_qkv_metadata") or {}
            present = set(self.shards.file(0, pp).names())
            gqa_names = set((gqa.get("original_names_to_gqa_qkv_names") or {}).values())
            if gqa_names and self.source.kind == "lora":
                raise TrnftError(
                    f"{self.shards.root}: an optimum-neuron <= 0.2 LoRA adapter of a GQA model; that version did not save "
                    "the q/k/v LoRA weights of GQA layers nor un-permute o_proj, so it cannot be consolidated correctly; "
                    "retrain with optimum-neuron >= 0.3"
                )
            if gqa_names:
                self._plan_old_gqa(pp, gqa, gqa_names, present)
            for key in sorted(present):
                if (pp, key) in self.plan.consumed:
                    continue
                entry = sharded.get(key)
                k = parse_key(key)
                if k is not None and k.proj == "lm_head" and self.tie:
                    # optimum-neuron 0.1.0 wrote rank 0's slice of a tied lm_head; the right value is the embedding.
                    self._unknown(pp, key)
                elif entry is not None and entry.get("kind") == "sharded":
                    self.generic(pp, key, True, entry.get("partition_dim"))
                else:  # "tied" means not TP-split; names missing from the map are replicated too
                    self.generic(pp, key, False, None)

    def _plan_old_gqa(self, pp: int, gqa: dict[str, Any], gqa_names: set[str], present: set[str]) -> None:
        """OLD GQA layers: the same math as the NEW spec, with facts from ``gqa_qkv_metadata``."""
        base = {
            "gqa_qkv_projection_name": "qkv_proj",
            "query_projection_name": "q_proj",
            "key_projection_name": "k_proj",
            "value_projection_name": "v_proj",
            "output_projection_name": "o_proj",
            "num_attention_heads": gqa["num_attention_heads"],
            "num_key_value_heads": gqa["num_key_value_heads"],
            "kv_size_multiplier": gqa["kv_size_multiplier"],
            "tp_size": self.shards.tp_size,
            "fuse_qkv": bool(gqa.get("fuse_qkv", False)),
        }
        modules = sorted({k.module for k in map(parse_key, gqa_names) if k is not None})
        for module in modules:
            mkey = Key.in_module(module, proj="")
            spec = dict(base)
            if "q_output_size_per_partition" in gqa:
                spec["q_output_size_per_partition"] = gqa["q_output_size_per_partition"]
                spec["kv_output_size_per_partition"] = gqa["kv_output_size_per_partition"]
            elif spec["fuse_qkv"]:
                raise TrnftError(
                    f"{module}.qkv_proj: fused GQA weights but no per-partition sizes in the metadata"
                )
            else:
                spec["q_output_size_per_partition"] = self.lazies(pp, f"{module}.qkv_proj.weight_q")[0].shape[
                    0
                ]
                spec["kv_output_size_per_partition"] = self.lazies(pp, f"{module}.qkv_proj.weight_k")[
                    0
                ].shape[0]
            for param in ("weight", "bias"):
                if any(f"{module}.qkv_proj.{param}_{s}" in present for s in ("q", "k", "v", "qkv")):
                    self.gqa(pp, mkey, spec, param, present)
        for o_name in sorted(gqa.get("output_projections_names") or ()):
            if o_name in present:
                key = parse_key(o_name)
                assert key is not None
                self.gqa_output_columns(pp, key, base)

    def verify_consumed(self) -> None:
        for pp in range(self.shards.pp_size):
            keys = set(self.shards.file(0, pp).names())
            owned_elsewhere = {k for (p, k) in self.plan.consumed if p != pp}
            left = sorted(k for k in keys if (pp, k) not in self.plan.consumed and k not in owned_elsewhere)
            if left:
                raise TrnftError(
                    f"{self.shards.file(0, pp).path}: {len(left)} tensor(s) were not consolidated (first: {left[0]})"
                )


# --------------------------------------------------------------------------------------------------
# Shape checks against the model config


def expected_shapes(outputs: list[PlannedTensor], dims: ModelDims, lora: LoraSettings | None) -> list[str]:
    """Problems: outputs whose shape disagrees with the model config (LoRA ranks from adapter_config)."""
    io = {
        "q_proj": (dims.hidden, dims.heads * dims.head_dim),
        "k_proj": (dims.hidden, dims.kv_heads * dims.head_dim),
        "v_proj": (dims.hidden, dims.kv_heads * dims.head_dim),
        "o_proj": (dims.heads * dims.head_dim, dims.hidden),
        "gate_proj": (dims.hidden, dims.intermediate),
        "up_proj": (dims.hidden, dims.intermediate),
        "down_proj": (dims.intermediate, dims.hidden),
        "lm_head": (dims.hidden, dims.vocab),
    }
    problems = []
    for t in outputs:
        key = parse_key(t.name)
        if key is None:
            continue
        if key.proj == "embed_tokens":
            want = {"weight": (dims.vocab, dims.hidden), "base_layer.weight": (dims.vocab, dims.hidden)}.get(
                key.param
            )
            if key.lora_part == "lora_embedding_A" and lora:
                want = (lora.rank(module_of(t.name)), dims.vocab)
            if key.lora_part == "lora_embedding_B" and lora:
                want = (dims.hidden, lora.rank(module_of(t.name)))
        elif key.proj in io:
            fan_in, fan_out = io[key.proj]
            part = key.lora_part
            if part == "lora_A" and lora:
                want = (lora.rank(module_of(t.name)), fan_in)
            elif part == "lora_B" and lora:
                want = (fan_out, lora.rank(module_of(t.name)))
            elif part is None and key.tensor_name == "weight":
                want = (fan_out, fan_in)
            elif part is None and key.tensor_name == "bias":
                want = (fan_out,)
            else:
                want = None
        else:
            want = None
        if want is not None and tuple(t.shape) != tuple(want):
            problems.append(
                f"{t.name}: consolidated shape {list(t.shape)} but the model config implies {list(want)}"
            )
    return problems


def model_dims_from(path: Path | None) -> ModelDims | None:
    if path is None or not (path / "config.json").is_file():
        return None
    raw = json.loads((path / "config.json").read_text())

    class _Cfg:
        def __init__(self, d: dict[str, Any]) -> None:
            self.__dict__.update(d)

    try:
        return ModelDims.from_config(_Cfg(raw))
    except (AttributeError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------------
# Writing


def _release_after(planned: PlannedTensor, shards: ShardSet) -> PlannedTensor:
    """Release the input pages once a tensor has been written, so memory stays at one tensor's worth."""

    def produce() -> Iterator[Array]:
        try:
            yield from planned.produce()
        finally:
            for f in shards.iter_files():
                f.release()

    return PlannedTensor(planned.name, planned.dtype, planned.shape, produce)


def consolidate_source(
    source: Source, out: Path, *, max_shard_size: int, model_dir: Path | None, log: Callable[[str], None]
) -> SourceFigures:
    """Plan, verify and write one source into ``out`` (which exists and is empty)."""
    dims = model_dims_from(source.files_dir) or model_dims_from(model_dir)
    planner = Planner(source, tie_word_embeddings=dims.tie_word_embeddings if dims else None)
    plan = planner.run()
    planner.verify_consumed()
    outputs = sorted(plan.outputs, key=lambda t: _natural(t.name))
    if dims is not None:
        problems = expected_shapes(
            outputs, dims, LoraSettings.from_config(source.adapter_config) if source.adapter_config else None
        )
        if problems:
            raise TrnftError(f"{problems[0]} ({len(problems)} shape problem(s))")
    folders = [f for f in (source.files_dir, model_dir) if f is not None]
    # an adapter folder holds no base-model config
    names = TOKENIZER_FILES if source.kind == "lora" else (*MODEL_CONFIG_FILES, *TOKENIZER_FILES)
    copied = copy_present(names, folders, out)
    if source.kind == "lora":
        assert source.adapter_config is not None
        write_safetensors(out / ADAPTER_WEIGHTS, [_release_after(t, source.shards) for t in outputs])
        (out / ADAPTER_CONFIG_FILE).write_text(adapter_config_text(source.adapter_config))
    else:
        write_sharded_model(out, [_release_after(t, source.shards) for t in outputs], max_shard_size)
    total = sum(t.nbytes for t in outputs)
    log(
        f"consolidate: {source.kind} {source.adapter_name or ''} {len(outputs)} tensors, {total / 1e6:.1f} MB, "
        f"from TP={source.shards.tp_size} x PP={source.shards.pp_size} {source.shards.era.upper()} "
        f"{source.shards.encoding} shards".replace("  ", " ")
    )
    return SourceFigures(
        kind=source.kind,
        adapter=source.adapter_name,
        tensors=len(outputs),
        bytes=total,
        tp=source.shards.tp_size,
        pp=source.shards.pp_size,
        era=source.shards.era,
        encoding=source.shards.encoding,
        copied_files=copied,
        notes=plan.notes,
    )


@dataclass(frozen=True)
class SourceFigures:
    """One consolidated model or adapter: what it holds and which NxD layout it came from."""

    kind: str  # model | adapter
    adapter: str | None
    tensors: int
    bytes: int
    tp: int
    pp: int
    era: str  # old | new (optimum-neuron's two layouts)
    encoding: str  # plain | xser
    copied_files: list[str]
    notes: list[str]


@dataclass(frozen=True)
class NeuronConsolidateFigures(Figures):
    KIND: ClassVar[str] = "consolidate/neuron"

    checkpoint: str
    sources: list[SourceFigures]

    def summary(self) -> str:
        first = self.sources[0]
        return (
            f"{first.kind} from {self.checkpoint}: {first.tensors} tensors, {first.bytes / 1e6:.1f} MB "
            f"(TP={first.tp}, {first.era.upper()} {first.encoding})"
        )


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def load_checkpoint_tensors(checkpoint: Path) -> dict[str, Array]:
    """Every consolidated tensor of a checkpoint's model or default adapter, in memory (used by resume)."""
    sources = [s for s in _sources_in_checkpoint(checkpoint) if s.adapter_name in (None, "default")]
    if len(sources) != 1:
        raise TrnftError(f"{checkpoint}: expected one model or default adapter, found {len(sources)}")
    planner = Planner(sources[0], tie_word_embeddings=None)
    plan = planner.run()
    planner.verify_consumed()
    out = {}
    for t in plan.outputs:
        blocks = [np.ascontiguousarray(b.data) for b in t.produce()]
        data = (
            np.concatenate([b.reshape(-1) for b in blocks]).reshape(t.shape) if blocks else np.empty(t.shape)
        )
        out[t.name] = Array(data, t.dtype)
    for f in sources[0].shards.iter_files():
        f.release()
    return out


def consolidate_into(
    sources: list[Source],
    out: Path,
    *,
    max_shard_size: int,
    model_dir: Path | None,
    log: Callable[[str], None],
) -> list[SourceFigures]:
    results = []
    for source in sources:
        target = out / source.output_subdir if source.output_subdir else out
        target.mkdir(parents=True, exist_ok=True)
        results.append(
            consolidate_source(source, target, max_shard_size=max_shard_size, model_dir=model_dir, log=log)
        )
    return results


def standalone(args: Any, log: Callable[[str], None]) -> int:
    """``trnft consolidate --checkpoint PATH --output DIR [--max-shard-size 5GB]``."""
    out = Path(args.output)
    max_size = parse_size(args.max_shard_size, "--max-shard-size")
    sources, where = resolve(args.checkpoint, log)
    into_new_folder(
        out,
        lambda staged: consolidate_into(sources, staged, max_shard_size=max_size, model_dir=None, log=log),
        log=log,
    )
    log(f"consolidate: wrote {out} from {where}")
    return 0


# --------------------------------------------------------------------------------------------------
# The stage


def _body(ctx: StageContext) -> StageOutcome:
    cfg = ctx.cfg
    train_dir = ctx.upstream_dir("train")
    sources, checkpoint = resolve(train_dir, ctx.log)
    ctx.verify_upstream("train", checkpoint.name)
    model_dir = Path(cfg.model.name_or_path) if Path(cfg.model.name_or_path).is_dir() else None
    results = consolidate_into(
        sources, ctx.out_dir, max_shard_size=DEFAULT_MAX_SHARD_BYTES, model_dir=model_dir, log=ctx.log
    )
    copy_present(TOKENIZER_FILES, [ctx.rundir.stage_dir("tokenize") / "tokenizer"], ctx.out_dir)
    figures = NeuronConsolidateFigures(checkpoint.name, results)
    return StageOutcome(
        summary=figures.summary(),
        figures=figures,
        inputs=[{"name": "checkpoint", "path": str(checkpoint)}],
        layout={"tp": results[0].tp, "pp": results[0].pp},
    )
