"""Merge stage (shared by both platforms): base model + LoRA adapter -> one Hugging Face model.

W' = W + s * (B @ A), computed in float32 and cast back to the base dtype, where s = lora_alpha / r
(lora_alpha / sqrt(r) with ``use_rslora``), per-module r and alpha from ``rank_pattern`` /
``alpha_pattern``, the delta transposed for ``fan_in_fan_out`` layers and for embeddings
(``lora_embedding_A`` [r, V], ``lora_embedding_B`` [H, r]); ``lora_B.bias`` is added to the base bias and
``modules_to_save`` / ``base_layer`` tensors saved in the adapter replace the base tensor.

Adapter names map to base names through a grammar and a table (optional ``base_model.model.`` prefix,
optional adapter name such as ``.default``, PEFT's on-disk names and the OLD sample's ``model.safetensors``
layout), never by string replacement. The merge refuses to guess: an adapter tensor that binds to no base
tensor, binds twice, lacks its A or B partner, has another rank than adapter_config says, a module the
config targets without adapter tensors, an unsupported adapter (DoRA, non-LoRA types) -- each is one
line naming the key. After merging, every targeted module must have changed.

Streaming and bounded memory: the base model is read shard by shard from memory-mapped safetensors and
written row block by row block; no torch import. The output (safetensors shards + index, config,
generation config, tokenizer) loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .config.adapter_config import (
    ADAPTER_CONFIG_FILE,
    LoraSettings,
    check_merge_settings,
    read_adapter_config,
)
from .config.run_config import RunConfig
from .errors import TrnftError
from .io.hf_files import MODEL_CONFIG_FILES, TOKENIZER_FILES, copy_present, resolve_model_dir
from .io.tensor_io import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX,
    Array,
    PlannedTensor,
    SafetensorsFile,
    SafetensorsModel,
    from_f32,
    open_safetensors_model,
    parse_size,
    row_blocks,
    to_f32,
    write_sharded_model,
)
from .pipeline import inputs
from .pipeline.figures import Figures
from .pipeline.registry import StageSpec
from .pipeline.rundir import into_new_folder
from .pipeline.stages import StageContext, StageOutcome, StageResult, run_stage

ROW_BLOCK_BYTES = 32 << 20

# Adapter key grammar: [base_model.model.]<module>.<part>[.<adapter>][.<param>]
_ADAPTER_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|base_layer|modules_to_save)"
    r"(?:\.(?P<adapter>(?!weight$|bias$)[A-Za-z0-9_]+))?(?:\.(?P<param>weight|bias))?$"
)


class Role(NamedTuple):
    """What an adapter tensor is to its base module: its kind and the base parameter it binds to."""

    kind: str  # A, B, bias, embA, embB, base, replace
    param: str  # weight or bias of the base module

    def __str__(self) -> str:
        return self.kind if self.kind in ("A", "B", "bias", "embA", "embB") else f"{self.kind} {self.param}"


LORA_A, LORA_B, LORA_BIAS = Role("A", "weight"), Role("B", "weight"), Role("bias", "bias")
EMBEDDING_A, EMBEDDING_B = Role("embA", "weight"), Role("embB", "weight")
# (part, param) of an adapter tensor -> its role
ROLES: dict[tuple[str, str | None], Role] = {
    ("lora_A", "weight"): LORA_A,
    ("lora_B", "weight"): LORA_B,
    ("lora_B", "bias"): LORA_BIAS,
    ("lora_embedding_A", None): EMBEDDING_A,
    ("lora_embedding_B", None): EMBEDDING_B,
    # PEFT saves the base embedding next to its LoRA (save_embedding_layers): the W the delta is added to
    ("base_layer", "weight"): Role("base", "weight"),
    ("base_layer", "bias"): Role("base", "bias"),
    # modules_to_save: a full trained copy that replaces the base tensor
    ("modules_to_save", "weight"): Role("replace", "weight"),
    ("modules_to_save", "bias"): Role("replace", "bias"),
}
SUPPORTED_PEFT_TYPES = ("LORA",)


SPEC = StageSpec(
    name="merge",
    help="Merge the adapter into the base model (streaming, base dtype).",
    needs=lambda cfg: ("consolidate",),
    config_keys=lambda cfg: ("model.name_or_path", "model.revision", "model.dtype", "lora.enabled"),
    inputs=inputs.base_model_inputs,
    offline=True,
)


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    """The merge stage: base model + ``<root>/consolidate`` -> ``<root>/merge``."""
    return run_stage(SPEC, cfg, _body, force=force, log=log)


# --------------------------------------------------------------------------------------------------
# Reading the adapter


@dataclass
class ModuleUpdate:
    """Everything the adapter says about one base module."""

    module: str
    tensors: dict[Role, tuple[str, Any]] = field(default_factory=dict)  # role -> (adapter key, lazy source)

    def of_kind(self, kind: str) -> list[tuple[Role, tuple[str, Any]]]:
        return [(role, source) for role, source in self.tensors.items() if role.kind == kind]


@dataclass
class Adapter:
    config: dict[str, Any]
    updates: dict[str, ModuleUpdate]
    files: list[SafetensorsFile]


def _adapter_files(adapter_dir: Path) -> list[Path]:
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (adapter_dir / name).is_file():
            return [adapter_dir / name]
    if (adapter_dir / INDEX).is_file():  # the OLD sample writes model.safetensors.index.json shards
        index = json.loads((adapter_dir / INDEX).read_text())
        return [adapter_dir / f for f in sorted(set(index["weight_map"].values()))]
    if (adapter_dir / "adapter_model.bin").is_file():
        raise TrnftError(
            f"{adapter_dir}/adapter_model.bin: only safetensors adapters are merged; save with safe_serialization"
        )
    raise TrnftError(f"{adapter_dir}: no adapter_model.safetensors (or model.safetensors) found")


# PEFT writes a ``modules_to_save`` copy under the module's own name: [base_model.model.]<module>.<param>
_SAVED_MODULE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<param>weight|bias)$")


def _saved_module_key(key: str, saved_modules: list[str]) -> dict[str, str] | None:
    """The parts of a ``modules_to_save`` tensor key (a module listed in adapter_config), or None."""
    m = _SAVED_MODULE_KEY.match(key)
    if m is None or not any(
        m["module"] == name or m["module"].endswith(f".{name}") for name in saved_modules
    ):
        return None
    return {"module": m["module"], "part": "modules_to_save", "param": m["param"]}


def read_adapter(adapter_dir: Path, log: Callable[[str], None] | None = None) -> Adapter:
    """Parse and check an adapter folder; every tensor must bind to a module role exactly once."""
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    config = read_adapter_config(adapter_dir, log)
    check_merge_settings(config, config_path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise TrnftError(
            f"{config_path}: peft_type {peft_type} is not supported; only LoRA adapters are merged"
        )
    if config.get("use_dora"):
        raise TrnftError(
            f"{config_path}: use_dora is set; DoRA adapters (magnitude vectors) are not supported by this merge"
        )
    files = [SafetensorsFile(p) for p in _adapter_files(adapter_dir)]
    saved_modules = config.get("modules_to_save") or []
    updates: dict[str, ModuleUpdate] = {}
    for f in files:
        for key in f.names():
            m = _ADAPTER_KEY.match(key) or _saved_module_key(key, saved_modules)
            if m is None:
                raise TrnftError(
                    f"{f.path.name}: adapter key {key} is not a LoRA tensor name (<module>.lora_A.weight, "
                    "<module>.lora_B.weight, <module>.lora_embedding_A, ...); it would be dropped, so nothing is merged"
                )
            part, param = m["part"], m["param"]
            if part == "lora_magnitude_vector":
                raise TrnftError(f"{key}: DoRA magnitude vectors are not supported by this merge")
            role = ROLES.get((part, param))
            if role is None:
                raise TrnftError(f"{key}: {part} with {param or 'no parameter'} is not a known LoRA tensor")
            update = updates.setdefault(m["module"], ModuleUpdate(m["module"]))
            if role in update.tensors:
                raise TrnftError(
                    f"{key}: a second {role} for module {m['module']} (also {update.tensors[role][0]})"
                )
            update.tensors[role] = (key, f)
    if not updates:
        raise TrnftError(f"{adapter_dir}: the adapter holds no tensors")
    for update in updates.values():
        roles = set(update.tensors)
        for a, b in ((LORA_A, LORA_B), (EMBEDDING_A, EMBEDDING_B)):
            if (a in roles) != (b in roles):
                have, missing = (a, b) if a in roles else (b, a)
                raise TrnftError(
                    f"{update.tensors[have][0]}: no matching {missing} tensor for module {update.module}"
                )
    return Adapter(config=config, updates=updates, files=files)


def scaling(config: dict[str, Any], module: str) -> tuple[int, float]:
    """(r, scale) of ``module`` from an adapter config."""
    settings = LoraSettings.from_config(config)
    return settings.rank(module), settings.scale(module)


def _targets(config: dict[str, Any]) -> set[str] | None:
    targets = config.get("target_modules")
    if targets is None or isinstance(targets, str):
        return None  # "all-linear" or a regex: coverage is checked through the tensors only
    return set(targets)


# --------------------------------------------------------------------------------------------------
# The base model


# --------------------------------------------------------------------------------------------------
# Planning the merged tensors


@dataclass
class Binding:
    """How one base tensor changes."""

    base_name: str
    update: ModuleUpdate
    kind: str  # "linear" | "embedding" | "bias" | "replace"
    scale: float = 1.0
    fan_in_fan_out: bool = False


def bind(adapter: Adapter, base: SafetensorsModel) -> dict[str, Binding]:
    """Base tensor name -> how it changes; every adapter tensor binds to exactly one base tensor."""
    config = adapter.config
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    bindings: dict[str, Binding] = {}

    def base_for(update: ModuleUpdate, param: str, key: str) -> str:
        name = f"{update.module}.{param}"
        if name not in base.where:
            raise TrnftError(
                f"adapter key {key}: the base model has no tensor {name}; the adapter does not fit this model"
            )
        if name in bindings and bindings[name].update is not update:
            raise TrnftError(f"adapter key {key}: {name} is already bound to {bindings[name].update.module}")
        return name

    def pair(role_a: Role, role_b: Role, update: ModuleUpdate) -> tuple:
        """A's key, A's and B's shapes, (r, scale), and the bound base tensor's name and shape."""
        key_a, file_a = update.tensors[role_a]
        key_b, file_b = update.tensors[role_b]
        r, s = scaling(config, update.module)
        name = base_for(update, "weight", key_a)
        return key_a, file_a.info(key_a)[1], file_b.info(key_b)[1], r, s, name, base.info(name)[1]

    for update in adapter.updates.values():
        if LORA_A in update.tensors:
            key_a, shape_a, shape_b, r, s, name, w_shape = pair(LORA_A, LORA_B, update)
            out_f, in_f = (w_shape[1], w_shape[0]) if fan_in_fan_out else (w_shape[0], w_shape[1])
            if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != r or shape_b[1] != r:
                raise TrnftError(
                    f"adapter key {key_a}: rank {shape_a[0] if shape_a else '?'} (B: {list(shape_b)}) but adapter_config "
                    f"says r={r} for {update.module}"
                )
            if shape_a[1] != in_f or shape_b[0] != out_f:
                raise TrnftError(
                    f"adapter key {key_a}: LoRA shapes A {list(shape_a)}, B {list(shape_b)} do not fit {name} {list(w_shape)}"
                )
            bindings[name] = Binding(name, update, "linear", s, fan_in_fan_out)
        if EMBEDDING_A in update.tensors:
            key_a, shape_a, shape_b, r, s, name, w_shape = pair(EMBEDDING_A, EMBEDDING_B, update)
            if shape_a != (r, w_shape[0]) or shape_b != (w_shape[1], r):
                raise TrnftError(
                    f"adapter key {key_a}: embedding LoRA A {list(shape_a)}, B {list(shape_b)} do not fit {name} "
                    f"{list(w_shape)} with r={r}"
                )
            bindings[name] = Binding(name, update, "embedding", s)
        if LORA_BIAS in update.tensors:
            key, _ = update.tensors[LORA_BIAS]
            name = base_for(update, "bias", key)
            bindings[name] = Binding(name, update, "bias", scaling(config, update.module)[1])
        for role, (key, f) in update.of_kind("base"):
            name = f"{update.module}.{role.param}"
            if name in base.where and f.info(key)[1] != base.info(name)[1]:
                raise TrnftError(
                    f"adapter key {key}: the saved base layer is {list(f.info(key)[1])} but the base model's {name} is "
                    f"{list(base.info(name)[1])} (a resized vocabulary is not supported)"
                )
        for role, (key, f) in update.of_kind("replace"):
            name = base_for(update, role.param, key)
            if f.info(key)[1] != base.info(name)[1]:
                raise TrnftError(
                    f"adapter key {key}: shape {list(f.info(key)[1])} but the base {name} is {list(base.info(name)[1])}"
                )
            if name in bindings:
                raise TrnftError(f"adapter key {key}: {name} is both replaced and updated by the adapter")
            bindings[name] = Binding(name, update, "replace")
    targets = _targets(config)
    if targets:
        covered = {u.module.rsplit(".", 1)[-1] for u in adapter.updates.values()}
        leaves = {k.rsplit(".", 2)[-2] for k in base.where if k.count(".") >= 2}
        for target in sorted(targets - covered):
            if target in leaves:
                raise TrnftError(
                    f"adapter_config.json targets {target} but the adapter has no LoRA tensors for any {target} module "
                    "(missing adapter keys)"
                )
    return bindings


def _merged_blocks(
    base_file: SafetensorsFile, binding: Binding, out_dtype: str, norms: list[float]
) -> Iterator[Array]:
    """The merged tensor in row blocks: W[rows] + s * delta[rows], in float32, cast to ``out_dtype``.

    W is the base model's tensor, or the base layer the adapter saved for this module (embeddings).
    ``norms`` accumulates [sum W^2, sum (s * delta)^2] for the report.
    """
    update = binding.update
    param = binding.base_name.rsplit(".", 1)[1]
    if Role("base", param) in update.tensors:
        key, f = update.tensors[Role("base", param)]
        w = f.tensor(key)
    else:
        w = base_file.tensor(binding.base_name)
    if binding.kind == "replace":
        key, f = update.tensors[Role("replace", param)]
        yield from _cast_blocks(f.tensor(key), out_dtype)
        return
    if binding.kind == "bias":
        key, f = update.tensors[LORA_BIAS]
        base, delta = to_f32(w), binding.scale * to_f32(f.tensor(key))
        norms[0] += float(np.vdot(base, base))
        norms[1] += float(np.vdot(delta, delta))
        yield from_f32(base + delta, out_dtype)
        return
    if binding.kind == "linear":
        key_a, fa = update.tensors[LORA_A]
        key_b, fb = update.tensors[LORA_B]
        a, b = to_f32(fa.tensor(key_a)), to_f32(fb.tensor(key_b))  # A [r, in], B [out, r]
        # delta = B @ A is [out, in]; a fan_in_fan_out weight is stored [in, out] and gets delta.T
        left, right = (a.T, b.T) if binding.fan_in_fan_out else (b, a)
    else:
        key_a, fa = update.tensors[EMBEDDING_A]
        key_b, fb = update.tensors[EMBEDDING_B]
        a, b = to_f32(fa.tensor(key_a)), to_f32(fb.tensor(key_b))  # A [r, V], B [H, r]
        left, right = a.T, b.T  # delta = (B @ A).T = A.T @ B.T, [V, H]
    rows = w.shape[0]
    step = max(1, ROW_BLOCK_BYTES // max(1, w.data.shape[1] * 4))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = to_f32(w.with_data(w.data[start:stop]))
        delta = left[start:stop] @ right
        delta *= binding.scale
        norms[0] += float(np.vdot(block, block))
        norms[1] += float(np.vdot(delta, delta))
        block += delta
        del delta
        yield from_f32(block, out_dtype)


def _cast_blocks(a: Array, out_dtype: str) -> Iterator[Array]:
    if a.dtype == out_dtype:
        yield a
    else:
        yield from_f32(to_f32(a), out_dtype)


@dataclass
class MergeReport:
    tensors: int = 0
    merged: dict[str, int] = field(default_factory=dict)  # kind -> count
    unchanged: list[str] = field(default_factory=list)
    max_relative_change: float = 0.0
    bytes: int = 0


def plan_merge(adapter: Adapter, base: SafetensorsModel, report: MergeReport) -> list[PlannedTensor]:
    """Every output tensor, base order and dtype; merged ones computed in row blocks when written."""
    bindings = bind(adapter, base)
    planned = []
    for f in base.files:
        for name in f.names():
            dtype, shape = f.info(name)
            binding = bindings.get(name)
            if binding is None:
                planned.append(PlannedTensor(name, dtype, shape, _copied(f, name)))
                continue
            report.merged[binding.kind] = report.merged.get(binding.kind, 0) + 1
            planned.append(PlannedTensor(name, dtype, shape, _checked(f, binding, dtype, report)))
    report.tensors = len(planned)
    report.bytes = sum(t.nbytes for t in planned)
    return planned


def _copied(f: SafetensorsFile, name: str) -> Callable[[], Iterator[Array]]:
    """An untouched tensor in row blocks; its mapped pages are dropped once written."""

    def produce() -> Iterator[Array]:
        yield from row_blocks(f.tensor(name), ROW_BLOCK_BYTES)
        f.release()

    return produce


def _checked(
    f: SafetensorsFile, binding: Binding, dtype: str, report: MergeReport
) -> Callable[[], Iterator[Array]]:
    """Produce the merged blocks and record whether the tensor changed at all in the output dtype."""

    def produce() -> Iterator[Array]:
        base = f.tensor(binding.base_name)
        offset = 0
        changed = False
        norms = [0.0, 0.0]  # sum W^2, sum delta^2 (fp32, before rounding)
        for block in _merged_blocks(f, binding, dtype, norms):
            rows = block.data.shape[0] if block.data.ndim else 1
            original = base.with_data(base.data[offset : offset + rows]) if block.data.ndim else base
            # "changed" is judged on what is written: a delta below the output dtype's resolution is no change
            if not changed and not np.array_equal(block.data, original.data):
                changed = True
            offset += rows
            yield block
        if not changed and binding.kind != "replace":
            report.unchanged.append(binding.base_name)
        if norms[0] > 0:
            report.max_relative_change = max(report.max_relative_change, math.sqrt(norms[1] / norms[0]))
        f.release()

    return produce


def merge(
    base_dir: Path,
    adapter_dir: Path,
    out: Path,
    *,
    max_shard_size: int,
    tokenizer_dir: Path | None,
    log: Callable[[str], None],
) -> MergeReport:
    """Merge into ``out`` (an empty folder). Raises TrnftError on any mismatch; ``out`` is then partial,
    so callers write into a staging folder."""
    adapter = read_adapter(adapter_dir, log)
    base = open_safetensors_model(base_dir)
    report = MergeReport()
    planned = plan_merge(adapter, base, report)
    write_sharded_model(out, planned, max_shard_size)
    if report.unchanged:
        raise TrnftError(
            f"merge: {len(report.unchanged)} targeted tensor(s) are identical to the base after merging (first: "
            f"{report.unchanged[0]}); the adapter's update is zero or below the base dtype's resolution"
        )
    copy_present(MODEL_CONFIG_FILES, [base_dir], out, overwrite=True)
    tokenizer_from = (
        tokenizer_dir if tokenizer_dir and (tokenizer_dir / "tokenizer_config.json").is_file() else base_dir
    )
    copy_present(TOKENIZER_FILES, [tokenizer_from, adapter_dir, base_dir], out, overwrite=True)
    log(
        f"merge: {report.tensors} tensors ({', '.join(f'{n} {k}' for k, n in sorted(report.merged.items()))} merged), "
        f"{report.bytes / 1e6:.1f} MB, largest relative change {report.max_relative_change:.2e}"
    )
    return report


def standalone(args: Any, log: Callable[[str], None]) -> int:
    """``trnft merge --base DIR --adapter DIR --output DIR [--max-shard-size 5GB]``."""
    base, adapter, out = Path(args.base), Path(args.adapter), Path(args.output)
    for key, folder in (("--base", base), ("--adapter", adapter)):
        if not folder.is_dir():
            raise TrnftError(f"{key}: {folder} is not a folder")
    size = parse_size(args.max_shard_size, "--max-shard-size")
    into_new_folder(
        out,
        lambda staged: merge(base, adapter, staged, max_shard_size=size, tokenizer_dir=None, log=log),
        log=log,
    )
    log(f"merge: wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------------
# The stage


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass(frozen=True)
class MergeFigures(Figures):
    KIND: ClassVar[str] = "merge"

    mode: str  # lora (merged into the base) | full (the consolidated model as is)
    tensors: int | None  # written tensors (not counted for full fine-tuning: the files are linked)
    merged: dict[str, int]  # binding kind -> tensors
    bytes: int
    max_relative_change: float  # the largest ||merged - base|| / ||base|| of a merged tensor

    def summary(self) -> str:
        if self.mode == "full":
            return "full fine-tuning: the consolidated model, no adapter to merge"
        return f"{sum(self.merged.values())} tensors merged of {self.tensors}, {self.bytes / 1e6:.1f} MB"


def _body(ctx: StageContext) -> StageOutcome:
    cfg = ctx.cfg
    consolidated = ctx.upstream_dir("consolidate")
    tokenizer_dir = ctx.rundir.stage_dir("tokenize") / "tokenizer"
    ctx.verify_upstream("consolidate")
    base_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.revision)
    if not cfg.lora.enabled:
        # Full fine-tuning: the consolidated model is the result; link its files, add config and tokenizer.
        for p in consolidated.iterdir():
            if p.name != "manifest.json" and p.is_file():
                _link_or_copy(p, ctx.out_dir / p.name)
        copy_present(MODEL_CONFIG_FILES, [base_dir], ctx.out_dir)
        copy_present(TOKENIZER_FILES, [tokenizer_dir], ctx.out_dir, overwrite=True)
        files = [p for p in ctx.out_dir.iterdir() if p.name.endswith(".safetensors")]
        figures = MergeFigures("full", None, {}, sum(p.stat().st_size for p in files), 0.0)
        return StageOutcome(summary=figures.summary(), figures=figures)
    report = merge(
        base_dir,
        consolidated,
        ctx.out_dir,
        max_shard_size=DEFAULT_MAX_SHARD_BYTES,
        tokenizer_dir=tokenizer_dir,
        log=ctx.log,
    )
    figures = MergeFigures("lora", report.tensors, report.merged, report.bytes, report.max_relative_change)
    return StageOutcome(
        summary=figures.summary(),
        figures=figures,
        inputs=[
            {"name": "base_model", "path": str(base_dir)},
            {"name": "adapter", "path": str(consolidated)},
        ],
    )
