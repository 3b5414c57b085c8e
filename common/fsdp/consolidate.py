"""Consolidate stage on the GPU path: a sharded GPU checkpoint -> the layout the Neuron consolidation writes.

Input: the newest complete ``checkpoint-<step>/`` of the train stage (:mod:`trnft.common.fsdp.checkpoint`): the
trained tensors in a torch.distributed.checkpoint folder, written by any number of ranks, plus
``trnft.json``. It is read in one process, one tensor at a time. Output:

- LoRA: ``adapter_model.safetensors`` with PEFT's saved names (``base_model.model.<module>.lora_A.weight``,
  adapter name removed) and ``adapter_config.json``, both from the checkpoint itself: the LoRA settings
  are what training used, never command-line values;
- full fine-tuning: Hugging Face safetensors shards in the base model's dtype with
  ``model.safetensors.index.json`` and the model's ``config.json``;

plus the tokenizer files. Checkpoint names map to output names through :data:`LORA_NAME` and
:data:`FULL_NAME`; a key that matches neither, a LoRA A without its B, or a rank that disagrees with the
adapter config fails with one line naming the key, and nothing is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..config.adapter_config import ADAPTER_CONFIG_FILE, LoraSettings, adapter_config_text
from ..config.run_config import RunConfig
from ..errors import TrnftError
from ..io.hf_files import TOKENIZER_FILES, copy_present
from ..io.tensor_io import (
    DEFAULT_MAX_SHARD_BYTES,
    Array,
    PlannedTensor,
    parse_size,
    write_safetensors,
    write_sharded_model,
)
from ..pipeline import checkpoints
from ..pipeline.figures import Figures
from ..pipeline.platform_stages import CONSOLIDATE
from ..pipeline.rundir import into_new_folder
from ..pipeline.stages import StageContext, StageOutcome, StageResult, run_stage
from .checkpoint import CheckpointMeta, is_gpu_checkpoint, read_tensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Trained parameter name -> PEFT saved name: the PeftModel's own names, with the adapter name after
# lora_A / lora_B removed (the ``.weight`` stays).
LORA_NAME = re.compile(
    r"^(?P<module>base_model\.model\..+)\.(?P<part>lora_A|lora_B)\.(?P<adapter>[^.]+)(?P<param>\.weight)$"
)
# Trained parameter name -> Hugging Face name for full fine-tuning: the model's own state-dict names.
FULL_NAME = re.compile(r"^(?P<name>(?!base_model\.)[A-Za-z_][\w.]*)$")

TORCH_TO_SAFETENSORS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    return run_stage(CONSOLIDATE, cfg, _body, force=force, log=log)


# --------------------------------------------------------------------------------------------------
# Finding the checkpoint


def holds_gpu_checkpoints(path: str | Path) -> bool:
    """Whether ``path`` (a run, train or checkpoint folder) holds GPU checkpoints."""
    p = Path(path)
    if is_gpu_checkpoint(p):
        return True
    train_dir = p / "train" if (p / "train").is_dir() else p
    return any(is_gpu_checkpoint(i.path) for i in checkpoints.list_checkpoints(train_dir))


def resolve(path: str | Path, log: Callable[[str], None] = print) -> Path:
    """The checkpoint folder of a run dir, a train dir or a ``checkpoint-N`` dir.

    Given several checkpoints, the newest complete one (with its ``done`` marker) is taken and named.
    """
    p = Path(path)
    if not p.exists():
        raise TrnftError(f"--checkpoint: {p} does not exist")
    if is_gpu_checkpoint(p):
        info = checkpoints.inspect_checkpoint(p)
        if not info.complete:
            raise TrnftError(f"{p}: incomplete checkpoint ({info.reason}); use an older complete checkpoint")
        return p
    train_dir = p / "train" if (p / "train").is_dir() else p
    newest = checkpoints.newest_complete(train_dir)
    if newest is None:
        raise TrnftError(f"{train_dir}: no complete checkpoint-<step> folder (each needs its 'done' marker)")
    log(f"consolidate: using {newest.path.name}, the newest complete checkpoint in {train_dir}")
    return newest.path


# --------------------------------------------------------------------------------------------------
# Converting


def _array(tensor: Any, dtype: str | None = None) -> Array:
    """A torch tensor as a tensor_io Array (``dtype``: the torch dtype name to cast to first)."""
    import torch

    t = tensor.detach()
    if dtype is not None and str(t.dtype).removeprefix("torch.") != dtype:
        t = t.to(getattr(torch, dtype))
    name = str(t.dtype).removeprefix("torch.")
    if name not in TORCH_TO_SAFETENSORS:
        raise TrnftError(f"tensor of dtype {name} cannot be written (only float32, bfloat16, float16)")
    t = t.contiguous()
    data = t.view(torch.int16).numpy().view(np.uint16) if name == "bfloat16" else t.numpy()
    return Array(data, TORCH_TO_SAFETENSORS[name])


def lora_tensors(ckpt_dir: Path, meta: CheckpointMeta) -> list[PlannedTensor]:
    """PEFT-named adapter tensors, checked against the adapter config in the checkpoint."""
    config = meta.peft_config or {}
    adapter = meta.adapter_name or "default"
    settings = LoraSettings.from_config(config)
    out: dict[str, Any] = {}
    parts: dict[str, set[str]] = {}
    for key, tensor in read_tensors(ckpt_dir):
        m = LORA_NAME.match(key)
        if m is None:
            raise TrnftError(
                f"checkpoint key {key}: not a LoRA tensor of adapter {adapter!r}; a LoRA checkpoint holds only "
                "lora_A/lora_B weights"
            )
        if m["adapter"] != adapter:
            raise TrnftError(
                f"checkpoint key {key}: adapter {m['adapter']!r}, the checkpoint's config is {adapter!r}"
            )
        r = settings.rank(m["module"])
        rank_dim = 0 if m["part"] == "lora_A" else 1
        if tensor.ndim != 2 or tensor.shape[rank_dim] != r:
            leaf = m["module"].rsplit(".", 1)[-1]
            raise TrnftError(
                f"checkpoint key {key}: shape {list(tensor.shape)} but adapter_config says r={r} for {leaf}"
            )
        out[f"{m['module']}.{m['part']}{m['param']}"] = tensor
        parts.setdefault(m["module"], set()).add(m["part"])
    for module, have in sorted(parts.items()):
        if have != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - have).pop()
            raise TrnftError(f"checkpoint: {module} has no {missing} weight (the checkpoint is incomplete)")
    targets = set(config.get("target_modules") or [])
    trained = {module.rsplit(".", 1)[-1] for module in parts}
    for target in sorted(targets - trained):
        raise TrnftError(
            f"checkpoint: adapter_config targets {target} but the checkpoint has no LoRA weights for it"
        )
    return [
        PlannedTensor(n, TORCH_TO_SAFETENSORS[str(t.dtype).removeprefix("torch.")], tuple(t.shape),
                      lambda t=t: iter([_array(t)]))
        for n, t in sorted(out.items(), key=lambda kv: _natural(kv[0]))
    ]  # fmt: skip


def full_tensors(ckpt_dir: Path, meta: CheckpointMeta) -> list[PlannedTensor]:
    """Hugging Face-named tensors in the base dtype, each read from the checkpoint only when it is written;
    a tied lm_head is left to the config (as Hugging Face saves it)."""
    from .checkpoint import tensor_shapes

    dtype = meta.base_dtype
    tied = bool(meta.model_config.get("tie_word_embeddings"))
    planned = []
    for key, shape in sorted(tensor_shapes(ckpt_dir).items(), key=lambda kv: _natural(kv[0])):
        if FULL_NAME.match(key) is None or ".lora_" in key:
            raise TrnftError(
                f"checkpoint key {key}: not a weight of the model (expected its Hugging Face name)"
            )
        if tied and key == "lm_head.weight":
            continue

        def produce(key: str = key) -> Any:
            ((_, tensor),) = list(read_tensors(ckpt_dir, [key]))
            return iter([_array(tensor, dtype)])

        planned.append(PlannedTensor(key, TORCH_TO_SAFETENSORS[dtype], shape, produce))
    return planned


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class GpuConsolidateFigures(Figures):
    KIND: ClassVar[str] = "consolidate/gpu"

    checkpoint: str
    kind: str  # lora | full
    tensors: int
    bytes: int

    def summary(self) -> str:
        return (
            f"{self.kind} from {self.checkpoint}: {self.tensors} tensors, {self.bytes / 1e6:.1f} MB (FSDP2)"
        )


def convert(
    ckpt_dir: Path, out: Path, *, max_shard_size: int, log: Callable[[str], None]
) -> GpuConsolidateFigures:
    """Write the PEFT adapter or HF model of ``ckpt_dir`` into the existing, empty folder ``out``."""
    meta = CheckpointMeta.read(ckpt_dir)
    if meta.mode == "lora":
        planned = lora_tensors(ckpt_dir, meta)
        write_safetensors(out / ADAPTER_WEIGHTS, planned)
        config = {**(meta.peft_config or {}), "inference_mode": True}
        config["base_model_name_or_path"] = meta.base_model or config.get("base_model_name_or_path")
        (out / ADAPTER_CONFIG_FILE).write_text(adapter_config_text(config))
    elif meta.mode == "full":
        planned = full_tensors(ckpt_dir, meta)
        write_sharded_model(out, planned, max_shard_size)
        model_config = {**meta.model_config, "torch_dtype": meta.base_dtype}
        model_config.pop("dtype", None)
        (out / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
    else:
        raise TrnftError(f"{ckpt_dir}: unknown training mode {meta.mode!r} in the checkpoint metadata")
    total = sum(t.nbytes for t in planned)
    log(f"consolidate: {meta.mode} {len(planned)} tensors, {total / 1e6:.1f} MB, from {ckpt_dir.name}")
    return GpuConsolidateFigures(ckpt_dir.name, meta.mode, len(planned), total)


def standalone(args: Any, log: Callable[[str], None]) -> int:
    """``trnft consolidate --checkpoint PATH --output DIR`` for a GPU checkpoint."""
    out = Path(args.output)
    max_size = parse_size(args.max_shard_size, "--max-shard-size")
    ckpt_dir = resolve(args.checkpoint, log)

    def work(staged: Path) -> None:
        convert(ckpt_dir, staged, max_shard_size=max_size, log=log)
        copy_present(TOKENIZER_FILES, [ckpt_dir], staged)

    into_new_folder(out, work, log=log)
    log(f"consolidate: wrote {out} from {ckpt_dir}")
    return 0


def _body(ctx: StageContext) -> StageOutcome:
    ckpt_dir = resolve(ctx.upstream_dir("train"), ctx.log)
    ctx.verify_upstream("train", ckpt_dir.name)
    figures = convert(ckpt_dir, ctx.out_dir, max_shard_size=DEFAULT_MAX_SHARD_BYTES, log=ctx.log)
    copy_present(TOKENIZER_FILES, [ctx.rundir.stage_dir("tokenize") / "tokenizer"], ctx.out_dir)
    return StageOutcome(
        summary=figures.summary(), figures=figures, inputs=[{"name": "checkpoint", "path": str(ckpt_dir)}]
    )
