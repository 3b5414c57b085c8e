"""GPU checkpoints: sharded, written by every rank at once, complete only when renamed into place.

``<train>/checkpoint-<step>/`` holds:

- ``model/``: a torch.distributed.checkpoint (DCP) folder of the *trained* parameters only (the LoRA
  adapter, or the whole model for full fine-tuning), keyed by their module names. Each rank writes its own
  shards; nothing is gathered to one rank, and frozen base weights are never written.
- ``optimizer/``: the AdamW state of those parameters, sharded the same way.
- ``trnft.json``: what ``consolidate`` needs without the trainer (:class:`CheckpointMeta`).
- ``trnft_state/state.json``: step, fingerprint, losses and validation history (what resume needs).
- the tokenizer files, then the ``done`` marker.

Everything is written into ``checkpoint-<step>.staging-<id>/`` and renamed when complete (by rank 0,
after every rank finished its shards), so an interrupted save never looks like a checkpoint. The shards
may be written in the background (:class:`BackgroundWriters`, ``fsdp.async_checkpoint``) while training
goes on; the rename still waits for every rank's writes. :class:`ShardedCheckpoints` is what the trainer
calls (resume, save, commit). A checkpoint
written on N ranks loads on any other number of ranks and tensor-parallel degree (DCP reshards).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import TrnftError
from ..io.hf_files import TOKENIZER_FILES, copy_present
from ..pipeline import checkpoints

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
META_FILE = "trnft.json"
DCP_METADATA = ".metadata"
META_FORMAT = 2


@dataclass(frozen=True)
class CheckpointMeta:
    """``trnft.json``: how to read the ``model/`` tensors back as a PEFT adapter or a Hugging Face model."""

    format: int
    mode: str  # lora | full
    base_model: str
    base_dtype: str
    model_config: dict[str, Any]
    peft_config: dict[str, Any] | None
    adapter_name: str | None

    def write(self, folder: Path) -> None:
        (folder / META_FILE).write_text(json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def read(cls, folder: Path) -> CheckpointMeta:
        path = folder / META_FILE
        if not path.is_file():
            raise TrnftError(
                f"{folder}: has no {META_FILE} (LoRA settings, model config); not a trnft GPU checkpoint"
            )
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise TrnftError(f"{path}: not valid JSON ({exc})") from exc
        if data.get("format") != META_FORMAT:
            raise TrnftError(f"{path}: format {data.get('format')!r}, this trnft reads format {META_FORMAT}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise TrnftError(f"{path}: {exc}") from exc


def is_gpu_checkpoint(folder: Path) -> bool:
    return (folder / MODEL_DIR / DCP_METADATA).is_file()


# --------------------------------------------------------------------------------------------------
# Saving and loading in the trainer (every rank)


def _state_dict_options(*, strict: bool = True) -> Any:
    """The trained parameters only (frozen base weights are never written); loading them leaves the
    frozen ones as they are, so it is not strict (the names are checked against the checkpoint first)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _trained_state(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state dicts of the trained parameters and their optimizer state (this rank's shards).

    ``ignore_frozen_params`` drops a frozen parameter under its first name only; a tied alias (GPT-2's
    ``lm_head.weight`` is ``wte.weight``) would stay, so every name of a frozen parameter is dropped here.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_state_dict_options())
    trained = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v for k, v in model_state.items() if k in trained}, optim_state


def save_sharded(
    staged: Path, model: Any, optimizer: Any, background: BackgroundWriters | None = None
) -> list[Any]:
    """Every rank writes its shards of the trained parameters and their optimizer state into ``staged``.

    Without ``background`` the writes are done when this returns ([] is returned). With it, this rank's
    shards are first copied to host memory (so training may change the parameters at once) and written by
    DCP's background threads; the futures returned resolve when the writes, and the coordinator's
    ``.metadata`` after every rank's, are on disk. Nothing here marks the checkpoint complete.
    """
    import torch.distributed.checkpoint as dcp

    model_state, optim_state = _trained_state(model, optimizer)
    targets = ((model_state, MODEL_DIR), (optim_state, OPTIMIZER_DIR))
    with warnings.catch_warnings():  # DCP's own use of the deprecated TypedStorage in torch 2.8
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        if background is None:
            for state, folder in targets:
                dcp.save(state, checkpoint_id=str(staged / folder))
            return []
        return [
            dcp.async_save(state, checkpoint_id=str(staged / folder), process_group=group)
            for (state, folder), group in zip(targets, background.groups, strict=True)
        ]


@dataclass(frozen=True)
class BackgroundWriters:
    """One gloo process group per DCP folder written in the background (model, optimizer), and one to ask
    whether they are done.

    DCP's background save plans and finishes with collectives from its own thread; two saves in flight on
    one group could interleave those collectives differently on different ranks, and the training
    collectives (NCCL on CUDA) must not share a group with another thread at all. A CPU (gloo) group is
    also what ``async_save`` requires. Create on every rank, in the same order (``new_group`` is collective).
    """

    groups: tuple[Any, Any]
    # The main thread's own gloo group for asking whether every rank's writes are done: a collective on
    # a writer's group would interleave with that writer thread's and hang.
    control: Any

    @classmethod
    def create(cls) -> BackgroundWriters:
        import torch.distributed as dist

        writers = (dist.new_group(backend="gloo"), dist.new_group(backend="gloo"))
        return cls(writers, dist.new_group(backend="gloo"))


def written(futures: list[Any]) -> bool:
    """Whether this rank's background writes have finished (without waiting); [] is finished."""
    return all(f.done() for f in futures)


def wait_written(futures: list[Any]) -> None:
    """Wait for this rank's background writes; a failed write raises here (TrnftError, naming it)."""
    for future in futures:
        try:
            future.result()
        except Exception as exc:  # the writer thread's error (disk full, permissions, ...)
            raise TrnftError(f"checkpoint: a background write failed ({type(exc).__name__}: {exc})") from exc


def load_sharded(folder: Path, model: Any, optimizer: Any) -> int:
    """Load a checkpoint's trained parameters and optimizer state into this rank's shards; returns the
    number of parameters restored. Raises TrnftError when the checkpoint does not match the model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_state, optim_state = _trained_state(model, optimizer)
    saved = set(tensor_names(folder))
    missing, unexpected = sorted(set(model_state) - saved), sorted(saved - set(model_state))
    if missing or unexpected:
        raise TrnftError(
            f"{folder}: does not match the model (missing {missing[:2]}, unexpected {unexpected[:2]}); "
            "was it written with other settings?"
        )
    dcp.load(model_state, checkpoint_id=str(folder / MODEL_DIR))
    dcp.load(optim_state, checkpoint_id=str(folder / OPTIMIZER_DIR))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=_state_dict_options(strict=False),
    )
    return len(model_state)


@dataclass(frozen=True)
class _InFlightSave:
    """A checkpoint whose shards are being written (``futures``: this rank's background writes)."""

    staged: Path
    step: int
    futures: list[Any]


class ShardedCheckpoints:
    """The FSDP2 trainer's checkpoints of one run, on every rank: resume, save, commit.

    Collective: every rank calls each method at the same point. Rank 0 (``is_main``) decides what to
    resume, creates and commits the staging folder and writes the files that are not shards; every rank
    writes its own shards. :meth:`save` starts a checkpoint; :meth:`commit_written` makes it visible
    (``done`` marker, rename, pruning) once every rank's shards are on disk, so a checkpoint appears whole or
    not at all. With ``background`` writers (``fsdp.async_checkpoint``) the shards are copied to host memory
    in :meth:`save` and written while training goes on; at most one save is in flight.
    """

    def __init__(
        self,
        train_dir: Path,
        *,
        fingerprint: str,
        keep: int,
        is_main: bool,
        tokenizer_dir: Path | None,
        log: Any,
        background: BackgroundWriters | None = None,
    ) -> None:
        self.train_dir, self.fingerprint, self.keep = train_dir, fingerprint, keep
        self.is_main, self.tokenizer_dir, self.log = is_main, tokenizer_dir, log
        self.background = background
        self._in_flight: _InFlightSave | None = None

    def resume(self, model: Any, optimizer: Any) -> tuple[Path, dict[str, Any]] | None:
        """Load the newest complete checkpoint of this run's settings (rank 0 picks it, every rank loads
        its shards); its folder and ``trnft_state/state.json``, or None to start from step 0."""
        import torch.distributed as dist

        box: list[str | None] = [None]
        if self.is_main:
            found = checkpoints.resume_point(self.train_dir, self.fingerprint, self.log)
            box = [str(found) if found else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return None
        folder = Path(box[0])
        state = checkpoint_state(folder)
        load_sharded(folder, model, optimizer)
        return folder, state

    def save(self, step: int, model: Any, optimizer: Any, meta: CheckpointMeta, state: dict[str, Any]) -> str:
        """Start checkpoint ``step``: every rank's shards, and on rank 0 ``trnft.json``, ``state`` (with the
        step and fingerprint added) as ``trnft_state/state.json`` and the tokenizer. Committed by
        :meth:`commit_written`; a save still in flight is committed first. Returns the folder's name."""
        import torch.distributed as dist

        self.commit_written(wait=True)
        box = [str(checkpoints.staging_dir(self.train_dir, step)) if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        staged = Path(box[0])
        if self.is_main:
            staged.mkdir(parents=True)
        dist.barrier()
        futures = save_sharded(staged, model, optimizer, self.background)
        if self.is_main:
            meta.write(staged)
            state_dir = staged / checkpoints.TRNFT_STATE
            state_dir.mkdir()
            record = {"step": step, "fingerprint": self.fingerprint, **state}
            (state_dir / "state.json").write_text(json.dumps(record, indent=1))
            if self.tokenizer_dir is not None:
                copy_present(TOKENIZER_FILES, [self.tokenizer_dir], staged)
        self._in_flight = _InFlightSave(staged, step, futures)
        return f"checkpoint-{step}"

    def commit_written(self, *, wait: bool) -> str | None:
        """Commit the checkpoint in flight once every rank has written it; the committed folder's name.

        ``wait=False`` (after each step) commits only when every rank's writes have already finished (a
        synchronous save's always have) and otherwise returns None at once; ``wait=True`` (before a new
        save, on a stop, at the end of training) waits for them.
        """
        import torch
        import torch.distributed as dist

        in_flight = self._in_flight
        if in_flight is None:
            return None
        if not wait and in_flight.futures:
            assert self.background is not None  # only background writes leave futures
            # One small CPU all-reduce per step, only while a save is in flight.
            finished = torch.tensor([int(written(in_flight.futures))])
            dist.all_reduce(finished, op=dist.ReduceOp.MIN, group=self.background.control)
            if not finished.item():
                return None
        wait_written(in_flight.futures)
        self._in_flight = None
        dist.barrier()  # every rank's shards are on disk
        if self.is_main:
            checkpoints.write_done(in_flight.staged)
            checkpoints.fault_point("save", in_flight.step)
            checkpoints.commit(self.train_dir, in_flight.staged, in_flight.step)
            checkpoints.prune(self.train_dir, self.keep, self.log)
        dist.barrier()
        return f"checkpoint-{in_flight.step}"


# --------------------------------------------------------------------------------------------------
# Reading in one process (consolidate)


def _metadata(folder: Path) -> Any:
    import torch.distributed.checkpoint as dcp

    model_dir = folder / MODEL_DIR
    if not (model_dir / DCP_METADATA).is_file():
        raise TrnftError(
            f"{model_dir}: no {DCP_METADATA}; the checkpoint's model shards are missing or incomplete"
        )
    try:
        return dcp.FileSystemReader(str(model_dir)).read_metadata()
    except Exception as exc:  # a truncated or foreign metadata file
        raise TrnftError(f"{model_dir}/{DCP_METADATA}: cannot be read ({type(exc).__name__}: {exc})") from exc


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> full shape of every tensor in a checkpoint's ``model/`` folder (from its metadata only)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {
        k: tuple(v.size)
        for k, v in _metadata(folder).state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


def tensor_names(folder: Path) -> list[str]:
    """The tensor names in a checkpoint's ``model/`` folder."""
    return list(tensor_shapes(folder))


def read_tensors(folder: Path, names: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    """``(name, full tensor)`` of the checkpoint's ``model/`` folder, one tensor in memory at a time."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _metadata(folder).state_dict_metadata
    reader_dir = str(folder / MODEL_DIR)
    for name in names if names is not None else tensor_names(folder):
        item = metadata[name]
        assert isinstance(item, TensorStorageMetadata), name
        one = {name: torch.empty(tuple(item.size), dtype=item.properties.dtype)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            try:
                dcp.load(one, storage_reader=dcp.FileSystemReader(reader_dir), no_dist=True)
            except Exception as exc:  # a shard file that is missing, truncated or corrupt
                raise TrnftError(
                    f"{reader_dir}: cannot read tensor {name} ({type(exc).__name__}: {exc})"
                ) from exc
        yield name, one[name]


def checkpoint_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / checkpoints.TRNFT_STATE / "state.json").read_text())
