"""The NxD sharded-checkpoint container, as neuronx_distributed.trainer.save_checkpoint writes it.

A *tag* folder (``shards/`` for a model, ``adapter_shards/`` for an adapter) holds:

- ``checkpoint`` (written first) and ``done`` (written last) markers, each containing ``1``;
- ``model/dp_rank_00_tp_rank_TT_pp_rank_PP.pt``: one state dict per (tensor, pipeline) rank, encoded
  - *plain*: an ordinary ``torch.save`` of ``{name: tensor}``, or
  - *xser*: the same dict with every tensor replaced by ``torch_xla``'s ``TensorReference(tid)``, the tensors
    in ``<file>.tensors/tensor_<tid>.pt`` and ``<file>.info.pt`` = ``{tid: {dtype, shape, ...}}``;
- ``mp_metadata_pp_rank_P.json`` (optimum-neuron >= 0.3) or ``.pt`` (older) with partition facts.

Reading needs neither torch nor torch_xla (:mod:`trnft.common.io.tensor_io`) and never loads more than the
tensor asked for: files are memory-mapped, xser tensors are one file each. Writing uses torch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import TrnftError
from ..common.io.tensor_io import LazyTensor, TensorRef, TorchFile, load_pickle_only

MODEL_SHARDS = "shards"
ADAPTER_SHARDS = "adapter_shards"
SHARD_FILE = re.compile(
    r"^dp_rank_(?P<dp>\d+)(?:_ep_rank_(?P<ep>\d+))?_tp_rank_(?P<tp>\d+)_pp_rank_(?P<pp>\d+)\.pt$"
)


def shard_file_name(tp_rank: int, pp_rank: int, dp_rank: int = 0) -> str:
    return f"dp_rank_{dp_rank:02d}_tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:02d}.pt"


def read_metadata_json(path: Path) -> dict[str, Any]:
    """``mp_metadata_pp_rank_P.json``; one line naming the file when it is empty, unreadable or not a JSON
    object (a checkpoint cut off while being written)."""
    fix = "the checkpoint is incomplete; consolidate an earlier one, or rerun train to write it again"
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise TrnftError(f"{path}: cannot be read ({exc.strerror}); {fix}") from exc
    if not text.strip():
        raise TrnftError(f"{path}: empty ({len(text)} bytes); {fix}")
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrnftError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:80]}); {fix}") from exc
    if not isinstance(value, dict):
        raise TrnftError(f"{path}: holds a JSON {type(value).__name__}, not the metadata object; {fix}")
    return value


def metadata_file_name(pp_rank: int, era: str = "new") -> str:
    return f"mp_metadata_pp_rank_{pp_rank}.{'json' if era == 'new' else 'pt'}"


# -- writing ------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_marker(path: Path) -> None:
    path.write_text("1")
    _fsync_file(path)


def save_plain(path: Path, tensors: Mapping[str, Any]) -> None:
    import torch

    torch.save({k: v.contiguous() for k, v in tensors.items()}, path)
    _fsync_file(path)


def save_xser(path: Path, tensors: Mapping[str, Any]) -> None:
    """Write an xser shard: reference dict, one file per tensor, and the info file."""
    import torch
    from torch_xla.utils.serialization import (
        TensorReference,  # writing needs the real class (pickle identity)
    )

    folder = Path(f"{path}.tensors")
    folder.mkdir(parents=True, exist_ok=False)
    refs, info = {}, {}
    for tid, (name, tensor) in enumerate(tensors.items()):
        tensor_path = folder / f"tensor_{tid}.pt"
        torch.save(tensor.contiguous(), tensor_path)
        _fsync_file(tensor_path)
        refs[name] = TensorReference(tid)
        info[tid] = {"dtype": tensor.dtype, "shape": tensor.shape, "expert_model_parallel": False}
    torch.save(info, f"{path}.info.pt")
    torch.save(refs, path)
    _fsync_file(path)


def save_shard(path: Path, tensors: Mapping[str, Any], encoding: str) -> None:
    if encoding == "xser":
        save_xser(path, tensors)
    elif encoding == "plain":
        save_plain(path, tensors)
    else:
        raise ValueError(f"unknown shard encoding {encoding!r}")


def write_tag(
    tag_dir: Path,
    rank_tensors: list[Mapping[str, Any]],
    metadata: dict[str, Any] | list[dict[str, Any]],
    *,
    encoding: str,
    era: str = "new",
    pp_size: int = 1,
) -> None:
    """Write a complete tag folder the way NxD does: ``checkpoint`` marker, rank files, metadata, ``done``.

    ``rank_tensors`` is indexed ``pp * tp_size + tp``; ``metadata`` is one dict (PP=1) or one per stage.
    """
    import torch

    tag_dir.mkdir(parents=True, exist_ok=True)
    write_marker(tag_dir / "checkpoint")
    (tag_dir / "model").mkdir(exist_ok=True)
    tp_size = len(rank_tensors) // pp_size
    for i, tensors in enumerate(rank_tensors):
        pp, tp = divmod(i, tp_size)
        save_shard(tag_dir / "model" / shard_file_name(tp, pp), tensors, encoding)
    metas = metadata if isinstance(metadata, list) else [metadata]
    for pp, meta in enumerate(metas):
        path = tag_dir / metadata_file_name(pp, era)
        if era == "new":
            path.write_text(json.dumps(meta, indent=4))
        else:
            torch.save(meta, path)
    write_marker(tag_dir / "done")


# -- reading ------------------------------------------------------------------------------------------


def _declared_tp(metadata: list[dict[str, Any]]) -> int | None:
    """The TP size NEW metadata states (``num_partitions`` of split parameters, ``tp_size`` of specs)."""
    sizes = set()
    for meta in metadata:
        for attrs in (meta.get("parameters") or {}).values():
            if attrs.get("tensor_model_parallel") and "num_partitions" in attrs:
                sizes.add(int(attrs["num_partitions"]))
        for module in meta.get("model_weight_transformation_specs") or []:
            for _, fields in module.get("specs", []):
                if "tp_size" in fields:
                    sizes.add(int(fields["tp_size"]))
    return max(sizes) if sizes else None


@dataclass
class ShardFile:
    """One rank's state dict, opened lazily; tensors are read one at a time."""

    path: Path
    tp: int
    pp: int
    dp: int = 0
    _entries: dict[str, Any] | None = field(default=None, repr=False)
    _files: dict[str, TorchFile] = field(default_factory=dict, repr=False)

    @property
    def xser(self) -> bool:
        return Path(f"{self.path}.tensors").is_dir()

    def _load(self) -> dict[str, Any]:
        if self._entries is None:
            try:
                if self.xser:
                    entries = load_pickle_only(self.path)
                else:
                    tf = TorchFile(self.path)
                    self._files[""] = tf
                    entries = tf.load()
            except TrnftError:
                raise
            except Exception as exc:  # corrupt or truncated file: say which one
                raise TrnftError(f"{self.path}: cannot read shard ({type(exc).__name__}: {exc})") from exc
            if not isinstance(entries, dict):
                raise TrnftError(f"{self.path}: holds a {type(entries).__name__}, not a state dict")
            self._entries = dict(entries)
        return self._entries

    def names(self) -> list[str]:
        """The tensor names of this rank's state dict."""
        return list(self._load())

    def has(self, name: str) -> bool:
        return name in self._load()

    def lazy(self, name: str) -> LazyTensor:
        """The tensor ``name`` of this rank, not yet read."""
        entries = self._load()
        if name not in entries:
            raise TrnftError(f"{self.path}: has no tensor {name}")
        value = entries[name]
        if isinstance(value, TensorRef):
            tensor_path = Path(f"{self.path}.tensors") / f"tensor_{value.tid}.pt"
            if not tensor_path.is_file():
                raise TrnftError(
                    f"{tensor_path}: missing tensor file of {name} (xser shard {self.path.name})"
                )
            tf = self._files.get(tensor_path.name)
            if tf is None:
                tf = self._files[tensor_path.name] = TorchFile(tensor_path)
            value = tf.load()
        if not isinstance(value, LazyTensor):
            raise TrnftError(f"{self.path}: entry {name} is a {type(value).__name__}, not a tensor")
        return value

    def release(self) -> None:
        """Give back the memory of what was read (pages of mapped files)."""
        for tf in self._files.values():
            tf.release()


@dataclass
class ShardSet:
    """A tag folder: its rank files and metadata."""

    root: Path
    files: dict[tuple[int, int], ShardFile]
    tp_size: int
    pp_size: int
    metadata: list[dict[str, Any]]
    era: str  # "new" (json metadata, optimum-neuron >= 0.3) or "old" (.pt metadata)

    @property
    def encoding(self) -> str:
        return "xser" if any(f.xser for f in self.files.values()) else "plain"

    def file(self, tp: int, pp: int) -> ShardFile:
        return self.files[(tp, pp)]

    def iter_files(self) -> Iterator[ShardFile]:
        return iter(self.files[k] for k in sorted(self.files))


def open_shard_set(root: str | Path, *, require_done: bool = True) -> ShardSet:
    """Open a ``shards``/``adapter_shards`` folder and check it is complete.

    Raises:
        TrnftError: no ``done`` marker, no shard files, a missing rank, or missing metadata.
    """
    root = Path(root)
    if require_done and not (root / "done").is_file():
        raise TrnftError(
            f"{root}: no 'done' marker, so this checkpoint was not completely saved; use an older complete checkpoint"
        )
    model_dir = root / "model"
    if not model_dir.is_dir():
        raise TrnftError(f"{root}: no model/ folder with shard files")
    files: dict[tuple[int, int], ShardFile] = {}
    for p in sorted(model_dir.iterdir()):
        m = SHARD_FILE.match(p.name)
        if m is None:
            continue
        if int(m["dp"]) != 0:
            continue  # model shards are written by data-parallel rank 0 only
        if m["ep"] is not None and int(m["ep"]) != 0:
            raise TrnftError(f"{p}: expert-parallel checkpoints are not supported")
        files[(int(m["tp"]), int(m["pp"]))] = ShardFile(p, int(m["tp"]), int(m["pp"]))
    if not files:
        raise TrnftError(f"{model_dir}: no dp_rank_*_tp_rank_*_pp_rank_*.pt shard files")
    tp_size = 1 + max(tp for tp, _ in files)
    pp_size = 1 + max(pp for _, pp in files)
    missing = [(tp, pp) for tp in range(tp_size) for pp in range(pp_size) if (tp, pp) not in files]
    if missing:
        names = ", ".join(shard_file_name(tp, pp) for tp, pp in missing[:4])
        raise TrnftError(f"{model_dir}: missing rank files {names} (expected TP={tp_size} x PP={pp_size})")
    metadata, eras = [], set()
    for pp in range(pp_size):
        json_path, pt_path = root / metadata_file_name(pp, "new"), root / metadata_file_name(pp, "old")
        if json_path.is_file():
            metadata.append(read_metadata_json(json_path))
            eras.add("new")
        elif pt_path.is_file():
            metadata.append(load_pickle_only(pt_path))  # plain dicts and sets, written by optimum-neuron
            eras.add("old")
        else:
            raise TrnftError(
                f"{root}: missing {metadata_file_name(pp)} (partition facts of pipeline stage {pp})"
            )
    if len(eras) != 1:
        raise TrnftError(f"{root}: mixes .json and .pt metadata files")
    declared = _declared_tp(metadata)
    if declared is not None and declared != tp_size:
        names = ", ".join(shard_file_name(tp, pp) for tp in range(tp_size, declared) for pp in range(pp_size))
        raise TrnftError(
            f"{model_dir}: missing rank files {names} (the metadata says TP={declared}, the folder has {tp_size} rank(s))"
            if declared > tp_size
            else f"{model_dir}: {tp_size} TP ranks but the metadata says TP={declared}"
        )
    return ShardSet(
        root=root, files=files, tp_size=tp_size, pp_size=pp_size, metadata=metadata, era=eras.pop()
    )
