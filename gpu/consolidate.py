"""Consolidate stage on the GPU path: a Lightning checkpoint -> the layout the Neuron consolidation writes.

Input: the newest complete ``checkpoint-<step>/lightning.ckpt`` of the train stage: one file (one device,
DDP, FSDP with a full state dict) or a folder (FSDP sharded state dict: torch.distributed.checkpoint
files plus Lightning's ``meta.pt``). Output:

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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trnft.common.config.adapter_config import ADAPTER_CONFIG_FILE, LoraSettings
from trnft.common.config.run_config import RunConfig
from trnft.common.errors import TrnftError
from trnft.common.io.hf_files import TOKENIZER_FILES, copy_present
from trnft.common.io.tensor_io import (
    DEFAULT_MAX_SHARD_BYTES,
    Array,
    PlannedTensor,
    parse_size,
    write_safetensors,
    write_sharded_model,
)
from trnft.common.pipeline import checkpoints
from trnft.common.pipeline.rundir import into_new_folder
from trnft.common.pipeline.stages import SPECS, StageContext, StageOutcome, StageResult, run_stage

ADAPTER_WEIGHTS = "adapter_model.safetensors"
META_KEY = "trnft"

# Checkpoint key -> PEFT saved key. The LightningModule holds the PeftModel as ``model``; PEFT's saved
# names drop the adapter name after lora_A/lora_B (and the ``.weight`` stays) or after lora_embedding_A/B.
LORA_NAME = re.compile(
    r"^model\.(?P<module>base_model\.model\..+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"\.(?P<adapter>[^.]+)(?P<param>\.weight)?$"
)
# Checkpoint key -> Hugging Face name for full fine-tuning: the module's own state-dict name.
FULL_NAME = re.compile(r"^model\.(?P<name>.+)$")

TORCH_TO_SAFETENSORS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    return run_stage(SPECS["consolidate"], cfg, _body, force=force, log=log)


# --------------------------------------------------------------------------------------------------
# Finding and reading the checkpoint


def is_lightning_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` (a run, train or checkpoint folder, or the ckpt itself) holds Lightning checkpoints."""
    p = Path(path)
    if p.name == checkpoints.LIGHTNING_CKPT:
        return p.exists()
    if (p / checkpoints.LIGHTNING_CKPT).exists():
        return True
    train_dir = p / "train" if (p / "train").is_dir() else p
    return any(
        (i.path / checkpoints.LIGHTNING_CKPT).exists() for i in checkpoints.list_checkpoints(train_dir)
    )


def resolve(path: str | Path, log: Callable[[str], None] = print) -> Path:
    """The checkpoint folder under a run dir, a train dir, a ``checkpoint-N`` dir or its ``lightning.ckpt``.

    Given several checkpoints, the newest complete one (with its ``done`` marker) is taken and named.
    """
    p = Path(path)
    if not p.exists():
        raise TrnftError(f"--checkpoint: {p} does not exist")
    if p.name == checkpoints.LIGHTNING_CKPT:
        p = p.parent
    if (p / checkpoints.LIGHTNING_CKPT).exists():
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


def read_checkpoint(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict of CPU tensors, trnft metadata) of a checkpoint folder's ``lightning.ckpt``."""
    import torch

    path = ckpt_dir / checkpoints.LIGHTNING_CKPT
    if path.is_file():
        try:
            # mmap: tensors are paged in as they are converted, not all at once
            data = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as exc:
            raise TrnftError(
                f"{path}: cannot be read as a Lightning checkpoint ({type(exc).__name__}: {exc})"
            ) from None
        state = data.get("state_dict")
        meta = data.get(META_KEY)
    else:
        meta_file = path / "meta.pt"
        if not meta_file.is_file():
            raise TrnftError(f"{path}: a sharded checkpoint folder without Lightning's meta.pt")
        meta = torch.load(meta_file, map_location="cpu", weights_only=False).get(META_KEY)
        state = _read_sharded_model(path)
    if meta is None:
        raise TrnftError(
            f"{path}: has no '{META_KEY}' entry (LoRA settings, model config); it was not written by trnft train"
        )
    if not state:
        raise TrnftError(f"{path}: holds no model weights")
    return state, meta


def _read_sharded_model(path: Path) -> dict[str, Any]:
    """The LightningModule state dict in a torch.distributed.checkpoint folder, loaded in one process.

    The whole model is held in memory (full fine-tuning only; LoRA checkpoints are single files).
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    # Lightning saves {"model": <LightningModule state dict>, "optimizer_0": ...}; DCP flattens the
    # nesting into "model.<key>". Allocate the model entries at their full size and let DCP fill them.
    model = {
        key[len("model.") :]: torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata)
    }
    nested = {"model": model}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(nested, storage_reader=reader, no_dist=True)
    return nested["model"]


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


def lora_tensors(state: dict[str, Any], meta: dict[str, Any]) -> list[PlannedTensor]:
    """PEFT-named adapter tensors, checked against the adapter config in the checkpoint."""
    config = meta["peft_config"]
    adapter = meta.get("adapter_name", "default")
    settings = LoraSettings.from_config(config)
    out: dict[str, Any] = {}
    parts: dict[str, set[str]] = {}
    for key, tensor in state.items():
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
        name = f"{m['module']}.{m['part']}{m['param'] or ''}"
        leaf = m["module"].rsplit(".", 1)[-1]
        r = settings.rank(m["module"])
        rank_dim = 0 if m["part"] in ("lora_A", "lora_embedding_A") else 1
        if tensor.ndim != 2 or tensor.shape[rank_dim] != r:
            raise TrnftError(
                f"checkpoint key {key}: shape {list(tensor.shape)} but adapter_config says r={r} for {leaf}"
            )
        out[name] = tensor
        parts.setdefault(m["module"], set()).add(m["part"].replace("embedding_", ""))
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


def full_tensors(state: dict[str, Any], meta: dict[str, Any]) -> list[PlannedTensor]:
    """Hugging Face-named tensors in the base dtype; a tied lm_head is left to the config (as HF saves it)."""
    dtype = meta.get("base_dtype", "bfloat16")
    tied = bool(meta["model_config"].get("tie_word_embeddings"))
    planned = []
    for key, tensor in sorted(state.items(), key=lambda kv: _natural(kv[0])):
        m = FULL_NAME.match(key)
        if m is None:
            raise TrnftError(f"checkpoint key {key}: not a weight of the model (expected 'model.<name>')")
        name = m["name"]
        if ".lora_" in name:
            raise TrnftError(f"checkpoint key {key}: a LoRA weight in a full fine-tuning checkpoint")
        if tied and name == "lm_head.weight":
            continue
        planned.append(PlannedTensor(name, TORCH_TO_SAFETENSORS[dtype], tuple(tensor.shape),
                                     lambda t=tensor: iter([_array(t, dtype)])))  # fmt: skip
    return planned


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def convert(ckpt_dir: Path, out: Path, *, max_shard_size: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Write the PEFT adapter or HF model of ``ckpt_dir`` into the existing, empty folder ``out``."""
    state, meta = read_checkpoint(ckpt_dir)
    mode = meta.get("mode")
    if mode == "lora":
        planned = lora_tensors(state, meta)
        write_safetensors(out / ADAPTER_WEIGHTS, planned)
        config = {**meta["peft_config"], "inference_mode": True}
        config["base_model_name_or_path"] = meta.get("base_model") or config.get("base_model_name_or_path")
        (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    elif mode == "full":
        planned = full_tensors(state, meta)
        write_sharded_model(out, planned, max_shard_size)
        model_config = {**meta["model_config"], "torch_dtype": meta.get("base_dtype", "bfloat16")}
        model_config.pop("dtype", None)
        (out / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
    else:
        raise TrnftError(f"{ckpt_dir}: unknown training mode {mode!r} in the checkpoint metadata")
    total = sum(t.nbytes for t in planned)
    log(f"consolidate: {mode} {len(planned)} tensors, {total / 1e6:.1f} MB, from {ckpt_dir.name} (Lightning)")
    return {"kind": mode, "tensors": len(planned), "bytes": total}


def standalone(args: Any, log: Callable[[str], None]) -> int:
    """``trnft consolidate --checkpoint PATH --output DIR`` for a Lightning checkpoint."""
    out = Path(args.output)
    max_size = parse_size(args.max_shard_size, "--max-shard-size")
    ckpt_dir = resolve(args.checkpoint, log)

    def work(staged: Path) -> None:
        convert(ckpt_dir, staged, max_shard_size=max_size, log=log)
        copy_present(TOKENIZER_FILES, [ckpt_dir], staged)

    into_new_folder(out, work)
    log(f"consolidate: wrote {out} from {ckpt_dir}")
    return 0


def _body(ctx: StageContext) -> StageOutcome:
    ckpt_dir = resolve(ctx.upstream_dir("train"), ctx.log)
    result = convert(ckpt_dir, ctx.out_dir, max_shard_size=DEFAULT_MAX_SHARD_BYTES, log=ctx.log)
    copy_present(TOKENIZER_FILES, [ctx.rundir.stage_dir("tokenize") / "tokenizer"], ctx.out_dir)
    return StageOutcome(
        summary=f"{result['kind']} from {ckpt_dir.name}: {result['tensors']} tensors, {result['bytes'] / 1e6:.1f} MB (Lightning)",
        figures={"checkpoint": ckpt_dir.name, **result},
        inputs=[{"name": "checkpoint", "path": str(ckpt_dir)}],
    )
