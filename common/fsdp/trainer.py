"""Train stage of the FSDP2 + tensor-parallel trainer on Lightning (platforms ``gpu`` and ``neuron-native``).

A ``LightningModule`` (:class:`ShardedCausalLM`) trained by ``lightning.Trainer`` with
``ModelParallelStrategy``: FSDP2 ``fully_shard`` and DTensor tensor parallelism applied in
``configure_model`` on the strategy's ``(data_parallel, tensor_parallel)`` mesh. The device, the
process-group backend and the compile backend come from the platform's
:class:`~trnft.common.fsdp.platform.DevicePlatform` (CUDA/NCCL, Neuron/``neuron``, CPU/gloo); the
schedule, the non-finite refusal and the logging / validation / saving cadence from the one training
policy and step driver (:class:`~trnft.common.training.lightning_policy.PolicyCallback`).

Processes: ``fsdp.devices`` per node (every device by default; on CPU, gloo processes). Under torchrun (the
Kubernetes PyTorchJob) the world comes from its environment; outside it, ``trnft train`` starts the
processes itself with torchrun's launcher. ``parallel.tp`` ranks form a tensor-parallel group and read the same
batch; data parallelism takes the rest (:mod:`trnft.common.fsdp.parallel`).

The training math is the Neuron path's:

- the same batches: optimizer step ``s`` trains on :func:`~trnft.common.training.data.batch_indices` of
  ``s``; micro-batch ``m`` of it is split into contiguous per-data-parallel-rank slices;
- the same loss: summed token cross-entropy over the whole global batch divided by its supervised tokens
  (gradients are summed over ranks, not averaged), with packed samples kept apart for every attention
  implementation (:func:`forward_logits`);
- the same optimizer: AdamW with :func:`~trnft.common.training.optim.decay_groups` on parameters that keep
  their own shapes, the policy's warmup + cosine, clipping by the global gradient norm over every shard,
  fp32 trainable weights and optimizer state. Lightning runs in manual optimization: the module does the
  micro-batches of one optimizer step itself, so accumulation and the loss normalisation stay exact.

Dropout of micro-batch ``m`` of step ``s`` is seeded from (seed, s, m), so neither the layout nor a
resume changes what is drawn. Validation (``train.eval_steps``) runs ``train.eval_batches`` batches split
over the data-parallel ranks; every rank runs the same number of forward passes (a rank with no batch
left runs a discarded one), so sharded collectives never wait on a rank that stopped.

Checkpoints (:mod:`trnft.common.fsdp.checkpoint`) are sharded and atomic; a restarted stage resumes from
the newest complete one written with the same settings: weights, optimizer moments, step; the data
position and dropout follow from the step. Lightning's own checkpointing is off: its files would appear
before they are whole.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from .. import stop
from ..config.run_config import RunConfig, dump_config
from ..errors import ConfigError, ProcessFailed, TrnftError
from ..exits import exit_code_of_process
from ..io.hf_files import resolve_model_dir
from ..pipeline import checkpoints
from ..pipeline.platform_stages import TRAIN
from ..pipeline.stages import StageContext, StageOutcome, StageResult, run_stage
from ..training import chunked_loss, memory_plan
from ..training.data import (
    IGNORE_INDEX,
    TokenizedSplit,
    TokenizeOutput,
    batch_indices,
    document_causal_block_mask,
    packed_varlen,
    segment_allowed,
    segment_attention_mask,
    step_seed,
    summed_token_loss,
)
from ..training.driver import RunRecord, host_numbers
from ..training.lightning_policy import PolicyCallback
from ..training.lora import ADAPTER, apply_lora, check_targets
from ..training.model_check import check_model_takes_the_data
from ..training.optim import decay_groups, global_batch
from ..training.policy import TrainFigures
from ..training.recompute import checkpoint_layers
from . import checkpoint as ckpt
from . import parallel
from .platform import DevicePlatform

# How long a collective may wait for its peers before the process fails (and Kubernetes retries it).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)

# Lightning prints through its own "lightning" logger handler. Where torch_xla is installed (the XLA image,
# a development environment), Lightning imports it and torch_xla's import configures the root logger, so
# every Lightning line would print twice; Lightning's lines stay with Lightning's handler.
logging.getLogger("lightning").propagate = False


def run(
    cfg: RunConfig,
    platform: DevicePlatform,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
    graph_counter: Callable[[], int] | None = None,
) -> StageResult:
    """The train stage: in this process (under torchrun, or one process), or in ``fsdp.devices`` it starts.

    Everything that can be refused (upstream, layout, batch, targets, vocabulary) is refused first, in one
    line, before a process starts or a folder is made. ``graph_counter`` counts the graphs the device has
    compiled (native Neuron's cache), for ``train.on_recompile``; without one, torch.compile's own count
    (:func:`compiled_graphs`) is watched when the decoder blocks are compiled.
    """
    from ..pipeline.rundir import RunDir
    from ..pipeline.stages import current_manifest, upstream_manifests

    spec = TRAIN
    done = None if force else current_manifest(spec, cfg)
    if done is not None:
        log(
            f"train: already complete ({done.get('finished_at')}, {done.get('summary', '')}); use --force to redo"
        )
        return StageResult(spec.name, True, done, RunDir(cfg.run.root).stage_dir(spec.name))
    nproc = _processes_to_start(cfg, platform)
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else nproc
    rundir = RunDir(cfg.run.root)
    upstream_manifests(spec, cfg, rundir)
    check(
        cfg,
        TokenizeOutput(rundir.stage_dir("tokenize")),
        parallel.rank_layout(cfg, world, nodes=_nodes()),
        platform,
    )
    if nproc > 1:
        return _launch(cfg, nproc, platform, force=force, log=log)

    def body(ctx: StageContext) -> StageOutcome:
        return train(ctx, platform, graph_counter=graph_counter)

    return run_stage(spec, cfg, body, force=force, log=log)


# --------------------------------------------------------------------------------------------------
# Where training runs


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_WORLD_SIZE" in os.environ


def _nodes() -> int:
    """Nodes of this training job: torchrun's world over its processes per node (1 outside torchrun)."""
    if not under_torchrun():
        return 1
    return max(1, int(os.environ["WORLD_SIZE"]) // max(1, int(os.environ["LOCAL_WORLD_SIZE"])))


def _processes_to_start(cfg: RunConfig, platform: DevicePlatform) -> int:
    """How many processes ``trnft train`` must start itself (1: train in this one)."""
    if under_torchrun():
        return 1
    available = platform.count_devices()
    if platform.name != "cpu" and cfg.fsdp.devices and cfg.fsdp.devices > available:
        raise ConfigError(
            f"fsdp.devices: {cfg.fsdp.devices} but this machine has {available} {platform.name} devices"
        )
    default = available if platform.name != "cpu" else 1
    return cfg.fsdp.devices or default


def _launch(
    cfg: RunConfig, nproc: int, platform: DevicePlatform, *, force: bool, log: Callable[[str], None]
) -> StageResult:
    """Start ``nproc`` local processes with torchrun's launcher, each running this stage.

    A failed process makes this one fail with its exit code (a signal as 128 + its number, as a shell
    reports it), after the process's own error line.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from ..pipeline.rundir import RunDir

    spec = TRAIN
    rundir = RunDir(cfg.run.root)
    with tempfile.TemporaryDirectory(prefix="trnft-train-") as tmp:
        config_path = Path(tmp) / "run.yaml"
        config_path.write_text(dump_config(cfg))
        argv = [
            "-m",
            "trnft.common.cli",
            "train",
            "--config",
            str(config_path),
            *(["--force"] if force else []),
        ]
        launch = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=f"trnft-{os.getpid()}",
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",
            max_restarts=0,
            monitor_interval=1,
        )
        log(f"train: starting {nproc} {platform.name} processes (fsdp.devices)")
        try:
            grace = stop.workers_get_grace(stop.grace_seconds())
            with _threads_per_process(nproc), _workers_die_with_this_process(), grace:
                elastic_launch(launch, sys.executable)(*argv)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            code = exit_code_of_process(failure.exitcode) or 1
            raise ProcessFailed(
                f"train: process {rank} of {nproc} exited with code {code}; its error is above", code
            ) from exc
        except Exception as exc:
            signum = stop.signal_of_agent_exception(exc)
            if signum is None:
                raise
            raise stop.Stopped(signum, "the training processes saved the step they were in") from exc
    manifest = rundir.manifest(spec.name)
    if manifest is None:
        raise TrnftError(
            f"train: the {nproc} processes ended without writing {rundir.stage_dir('train')}/manifest.json"
        )
    return StageResult(spec.name, False, manifest, rundir.stage_dir(spec.name))


@contextlib.contextmanager
def _workers_die_with_this_process() -> Iterator[None]:
    """The started processes end when this one does, even by SIGKILL (they run in their own sessions)."""
    os.environ[stop.DIE_WITH_PARENT_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(stop.DIE_WITH_PARENT_ENV, None)


@contextlib.contextmanager
def _threads_per_process(nproc: int) -> Iterator[None]:
    """Split the CPU threads between the started processes (as torchrun does), unless the user chose."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"]


def compile_backend(cfg: RunConfig, platform: DevicePlatform) -> str | None:
    """The torch.compile backend of the decoder blocks (None: eager). auto compiles on CUDA only: the
    Neuron backend's compile path is not yet measured here, and the CPU always runs eager."""
    if platform.compile_backend is None or cfg.fsdp.compile == "off":
        return None
    if cfg.fsdp.compile == "auto" and platform.name != "cuda":
        return None
    return platform.compile_backend


def loss_chunk_tokens(
    cfg: RunConfig, platform: DevicePlatform, model: Any, model_type: str | None
) -> int | None:
    """Tokens per chunk of the chunked cross-entropy (:mod:`trnft.common.training.chunked_loss`), or None for
    the logits path: ``fsdp.chunked_loss`` where it applies; ``on`` where it does not is a config error."""
    wanted = cfg.fsdp.chunked_loss
    if wanted == "off" or (wanted == "auto" and platform.name == "neuron"):
        return None
    reason = chunked_loss.unchunkable_reason(model, model_type, cfg.parallel.tp)
    if reason is None:
        return cfg.fsdp.loss_chunk_tokens
    if wanted == "on":
        raise ConfigError(f"fsdp.chunked_loss: on, but {reason}; set fsdp.chunked_loss to auto or off")
    return None


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (Dynamo's ``unique_graphs`` count: a new
    shape or a graph break after the first step shows up as one more), for ``train.on_recompile`` where the
    decoder blocks are compiled (CUDA; the native Neuron device counts its NEFF cache instead)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def attention_implementation(cfg: RunConfig, device: str) -> str:
    """What ``fsdp.attn_implementation: auto`` means on ``device``, or what the config says.

    auto: on CUDA, flash_attention_2 when flash_attn is installed and training in bf16 (flash-attn has no
    fp32 kernels; its varlen kernel skips other samples' tokens), else flex_attention (a compiled kernel
    with the document-causal ``BlockMask``: no extra wheel, no dense mask); elsewhere sdpa (the CPU runs
    eager, and the Neuron device has no inductor kernels for FlexAttention).
    """
    wanted = cfg.fsdp.attn_implementation
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if wanted == "auto":
        if device == "cuda":
            return "flash_attention_2" if has_flash and cfg.train.bf16 else "flex_attention"
        return "sdpa"
    if wanted == "flex_attention" and device != "cuda":
        raise ConfigError(
            "fsdp.attn_implementation: flex_attention trains on CUDA only (torch has no FlexAttention backward "
            "on the CPU, and the Neuron device no inductor kernels for it); use auto or sdpa"
        )
    if wanted == "flash_attention_2" and (device != "cuda" or not has_flash):
        raise ConfigError(
            "fsdp.attn_implementation: flash_attention_2 needs CUDA and the flash_attn package; use auto or sdpa"
        )
    return wanted


def check(
    cfg: RunConfig, tokenized: TokenizeOutput, layout: parallel.RankLayout, platform: DevicePlatform
) -> Any:
    """Refuse what cannot work before any weights load: batch, targets, vocabulary, validation (the layout
    itself was checked when it was computed)."""
    from transformers import AutoModelForCausalLM

    global_batch(cfg.train, layout.dp)
    config = check_model_takes_the_data(cfg, tokenized)
    parallel.check_tensor_parallel(config, cfg.parallel.tp)
    attention_implementation(cfg, platform.device_type)
    with torch.device("meta"):  # structure only: target names and decoder-layer classes, no weights
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.lora.enabled:
        check_targets(skeleton, cfg.lora.target_modules, cfg.lora.r)
    parallel.decoder_layers(skeleton)
    if cfg.train.eval_steps and not tokenized.has_split("validation"):
        raise ConfigError(
            "train.eval_steps: validation is on but the tokenize stage wrote no validation split; "
            "set dataset.validation_ratio > 0 (and rerun tokenize) or train.eval_steps=0"
        )
    if cfg.train.eval_steps and len(tokenized.split("validation")) < cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.eval_steps: the validation split has {len(tokenized.split('validation'))} sequences, fewer "
            f"than one batch of train.micro_batch_size={cfg.train.micro_batch_size}; add validation data or set "
            "train.eval_steps=0"
        )
    return config


# --------------------------------------------------------------------------------------------------
# The forward pass on packed rows


def forward_logits(model: Any, batch: dict[str, Any], attn_implementation: str) -> Any:
    """Logits ``[B, S, V]`` of a batch of packed rows, each sample seeing only its own tokens
    (:func:`model_output`'s, as ``[B, S, V]`` whatever the attention)."""
    rows, length = batch["input_ids"].shape
    return model_output(model, batch, attn_implementation).logits.reshape(rows, length, -1)


def model_output(model: Any, batch: dict[str, Any], attn_implementation: str) -> Any:
    """The model's output for a batch of packed rows, each sample seeing only its own tokens.

    flash_attention_2 keeps samples apart only in a single row of concatenated samples, so the ``B`` rows
    are flattened into one row of ``B * S`` tokens and the logits reshaped back. The sample boundaries come
    with the batch (``cu_seq_lens`` and ``max_length``, from :func:`packed_varlen` on the host) and go to
    every layer's varlen kernel; without them transformers derives them from ``position_ids`` on the device
    in every layer, with a sync each time. flex_attention gets the same rule as a ``BlockMask`` (tiles no
    query may see are skipped, K/V heads are not repeated for GQA); sdpa and eager get it as the dense
    block-diagonal causal mask of the segment ids, row by row (no tile is skipped).
    """
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    if attn_implementation == "flash_attention_2":
        varlen: dict[str, Any] = {}
        if "cu_seq_lens" in batch:
            cu, longest = batch["cu_seq_lens"], batch["max_length"]
            varlen = {
                "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu,
                "max_length_q": longest,
                "max_length_k": longest,
            }
        flat = {"input_ids": input_ids.reshape(1, -1), "position_ids": position_ids.reshape(1, -1)}
        return model(**flat, **varlen)
    if attn_implementation == "flex_attention":
        mask = document_causal_block_mask(batch["segment_ids"])
    elif attn_implementation == "sdpa":
        mask = segment_allowed(batch["segment_ids"])
    else:
        mask = segment_attention_mask(batch["segment_ids"], dtype=torch.float32)
    return model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)


def micro_batch_seed(seed: int, step: int, micro: int) -> int:
    """Dropout seed of global micro-batch ``micro`` of step ``step``: the same on any layout and on resume."""
    return step_seed(seed, step) + (micro << 32)


# --------------------------------------------------------------------------------------------------
# Figures


@dataclass(frozen=True)
class ValidationLoss:
    step: int
    loss: float


@dataclass(frozen=True)
class ShardedTrainFigures(TrainFigures):
    """The FSDP2 trainer's figures (platforms gpu and neuron-native, on their device or the CPU)."""

    KIND: ClassVar[str] = "train/fsdp2"

    backend: str  # fsdp2-<device>: fsdp2-cuda, fsdp2-neuron, fsdp2-cpu
    attention: str
    compile_backend: str | None  # torch.compile backend of the decoder blocks; None: eager
    # train.activation_checkpointing as applied: choice, configured, device/budget GiB, estimated peaks
    recompute: dict[str, Any]
    loss_chunk_tokens: int | None  # fsdp.chunked_loss's chunk as applied; None: the loss from full logits
    tp: int
    dp: int
    stopped_early: bool
    grad_norms: list[float]
    validation: list[ValidationLoss]
    wall_s: float
    trainable_parameters: int  # whole-model count (every shard counted once)
    peak_host_rss_mb: float  # the largest of any rank's peak resident memory
    # The largest of any rank's peak allocated device memory (CUDA's allocator; None on other devices).
    peak_device_memory_mb: float | None
    # The device's persistent compile cache (native Neuron; None: no compile cache here): graphs in it at
    # the start, compiled in the first step (0: all of that step's graphs were cache hits), compiled after.
    graphs_in_cache_at_start: int | None
    graphs_compiled_first_step: int | None
    graphs_compiled_after_first_step: int | None


# --------------------------------------------------------------------------------------------------
# The Lightning module


@dataclass
class _History:
    # Host floats, and 0-d device tensors for the steps not read yet (see ShardedCausalLM.step_loss).
    losses: list[Any] = field(default_factory=list)
    grad_norms: list[Any] = field(default_factory=list)
    validation: list[ValidationLoss] = field(default_factory=list)

    def read(self) -> _History:
        """Every figure as a host float (one device-to-host transfer); called where a step is saved."""
        numbers = host_numbers(self.losses + self.grad_norms)
        self.losses, self.grad_norms = numbers[: len(self.losses)], numbers[len(self.losses) :]
        return self


class _Steps(torch.utils.data.Dataset):
    """The optimizer steps this run still has to train; item ``i`` is the step number (the batch follows
    from it through ``batch_indices``, so the data position needs no sampler state)."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __getitem__(self, i: int) -> int:
        return self.start + i


class ShardedCausalLM(L.LightningModule):
    """One rank's model shard, optimizer and data; each ``training_step`` is one optimizer step.

    Lightning calls ``configure_model`` once its process group and mesh exist (the model is built on the
    meta device there, sharded, then filled with this rank's slices), ``configure_optimizers`` after it,
    ``on_fit_start`` (resume) before the first batch. The policy callback sets the learning rate and
    checks the step before the update, and asks for validation and checkpoints.
    """

    def __init__(
        self,
        ctx: StageContext,
        platform: DevicePlatform,
        tokenized: TokenizeOutput,
        layout: parallel.RankLayout,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.platform = platform
        self.tokenized = tokenized
        self.split: TokenizedSplit = tokenized.split("train")
        train = self.cfg.train
        self.micro = train.micro_batch_size
        self.accumulation = train.gradient_accumulation_steps
        self.layout = layout
        self.global_batch = global_batch(train, layout.dp)
        self.attn = attention_implementation(self.cfg, platform.device_type)
        self.compile_backend = compile_backend(self.cfg, platform)
        self.step_count = 0
        # The step's global loss and gradient norm: 0-d device tensors where the optimizer skips a non-finite
        # step on the device (platform.fused_optimizer), host floats where the host checks them first.
        self.step_loss: Any = math.nan
        self.step_grad_norm: Any = math.nan
        self.skips_on_device = platform.fused_optimizer and not self.cfg.fsdp.cpu_offload
        self.step_tokens = 0
        self.history = _History()
        self.resumed_from: Path | None = None
        self.model: Any = None
        self.world: parallel.World | None = None
        self.loss_parallel = False  # set in configure_model: lm_head split along the vocabulary over tp
        self.chunk_tokens: int | None = None  # set in configure_model: the chunked loss's chunk, or None
        self.checkpointer: ckpt.ShardedCheckpoints | None = None  # set in configure_model (needs the world)

    @property
    def is_main(self) -> bool:
        return self.world is not None and self.world.is_main

    # -- set-up (Lightning hooks) -------------------------------------------------------------------

    def configure_model(self) -> None:
        """The sharded model with its base weights and fresh LoRA, on the strategy's mesh."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.model is not None:
            return
        cfg = self.cfg
        device = self.trainer.strategy.root_device
        assert self.device_mesh[parallel.DP_DIM].size() == self.layout.dp  # Lightning built our layout's mesh
        self.world = world = parallel.world_of(self.device_mesh, device, self.layout.replicate)
        self.checkpointer = ckpt.ShardedCheckpoints(
            self.ctx.out_dir,
            fingerprint=self.ctx.fingerprint,
            keep=cfg.train.keep_checkpoints,
            is_main=world.is_main,
            tokenizer_dir=self.tokenized.tokenizer_dir,
            log=self.ctx.log,
            background=ckpt.BackgroundWriters.create() if cfg.fsdp.async_checkpoint else None,
        )
        model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.revision)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        # Frozen base weights in model.dtype; trained weights are fp32 masters.
        dtype = getattr(torch, cfg.model.dtype) if cfg.lora.enabled else torch.float32
        with parallel.parameters_on_meta():
            model = AutoModelForCausalLM.from_config(
                config,
                dtype=dtype,
                attn_implementation=self.attn,
                trust_remote_code=cfg.model.trust_remote_code,
            )
            if cfg.lora.enabled:
                model = apply_lora(model, cfg, cfg.lora.target_modules)
        model.config.use_cache = False
        self.loss_parallel = cfg.parallel.tp > 1 and parallel.loss_parallel_head(model) is not None
        self.chunk_tokens = loss_chunk_tokens(cfg, self.platform, model, getattr(config, "model_type", None))
        self.recompute = self._recompute_plan(model, config, world)
        # Before shard(), which compiles each layer: the checkpoint is then inside the compiled call.
        checkpoint_layers(parallel.decoder_layers(model), self.recompute.choice)
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        settings = parallel.ShardSettings(
            tp=cfg.parallel.tp,
            bf16=cfg.train.bf16,
            reshard_after_forward=cfg.fsdp.reshard_after_forward,
            cpu_offload=cfg.fsdp.cpu_offload,
            compile_backend=self.compile_backend,
        )
        parallel.shard(model, world, settings)
        parallel.materialize(model, device, buffers, cpu_offload=cfg.fsdp.cpu_offload)
        parallel.load_base_weights(model, model_dir, device)
        if cfg.lora.enabled:
            parallel.init_lora_weights(model, cfg.train.seed, device)
        model.train()  # dropout on
        self.model = model
        self.model_config = config
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def _recompute_plan(self, model: Any, config: Any, world: parallel.World) -> memory_plan.RecomputePlan:
        """``train.activation_checkpointing`` (``auto``: from the memory estimate of this rank, the same on
        every rank: the smallest device memory over the ranks is the budget)."""
        cfg = self.cfg
        shape = memory_plan.shape_of(
            model, config, parallel.decoder_layers(model), cfg.lora.target_modules if cfg.lora.enabled else []
        )
        rank = memory_plan.RankSetup(
            tp=world.tp,
            shard_ranks=world.shard_ranks,
            micro_batch=cfg.train.micro_batch_size,
            sequence=cfg.dataset.max_seq_length,
            base_bytes=torch.finfo(getattr(torch, cfg.model.dtype)).bits // 8 if cfg.lora.enabled else 4,
            activation_bytes=2 if cfg.train.bf16 else 4,
            lora_dropout=cfg.lora.dropout if cfg.lora.enabled else 0.0,
            loss_parallel=self.loss_parallel,
            loss_chunk_tokens=self.chunk_tokens,
        )
        device_bytes = _device_memory_bytes(cfg, world)
        if device_bytes is not None:  # in MiB as float32: a type every device's collectives reduce
            smallest = torch.tensor([device_bytes / 2**20], dtype=torch.float32, device=world.device)
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
            device_bytes = int(smallest.item()) * 2**20
        return memory_plan.plan(cfg.train.activation_checkpointing, shape, rank, device_bytes)

    def configure_optimizers(self) -> Any:
        train = self.cfg.train
        # One fused kernel per parameter group (DTensor parameters included) where the device has it; it
        # also skips a non-finite step by itself (found_inf). Offloaded parameters keep foreach: their
        # found_inf would have to come back from the device to the host, a wait.
        fused = self.skips_on_device
        return torch.optim.AdamW(
            self._param_groups(), lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
            eps=train.adam_epsilon, **({"fused": True} if fused else {"foreach": True}),
        )  # fmt: skip

    def _param_groups(self) -> list[dict[str, Any]]:
        """Decay groups, each split by device mesh (foreach updates run per group of one mesh)."""
        from torch.distributed.tensor import DTensor

        groups = []
        for group in decay_groups(self.model.named_parameters(), self.cfg.train.weight_decay):
            by_mesh: dict[Any, list[Any]] = {}
            for p in group["params"]:
                by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
            groups += [{**group, "params": params} for params in by_mesh.values()]
        return groups

    def on_fit_start(self) -> None:
        """Resume from the newest complete checkpoint of these settings (rank 0 decides, all ranks load)."""
        assert self.checkpointer is not None
        found = self.checkpointer.resume(self.model, self._optimizer())
        if found is None:
            return
        self.resumed_from, state = found
        self.step_count = int(state["step"])
        self.history = _History(
            list(state["losses"]),
            list(state.get("grad_norms", [])),
            [ValidationLoss(**v) for v in state.get("validation", [])],
        )

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(
            _Steps(self.step_count, self.cfg.train.max_steps), batch_size=None, shuffle=False, num_workers=0
        )

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable)  # DTensor.numel() is the whole tensor's

    def _optimizer(self) -> torch.optim.Optimizer:
        optimizer: Any = self.optimizers()  # one optimizer here (Lightning's type also allows a list)
        return getattr(optimizer, "optimizer", optimizer)  # the LightningOptimizer's wrapped optimizer

    # -- one optimizer step -------------------------------------------------------------------------

    def _device_batch(self, split: TokenizedSplit, rows: np.ndarray) -> dict[str, Any]:
        host = split.rows(rows)
        if self.attn == "flash_attention_2":
            host["cu_seq_lens"], longest = packed_varlen(host["position_ids"])
        if self.chunk_tokens is not None:  # on the host: the device is never asked how many there are
            host["loss_positions"], host["loss_targets"] = chunked_loss.supervised_positions(host["labels"])
        batch: dict[str, Any] = {k: self._to_device(v) for k, v in host.items()}
        if self.attn == "flash_attention_2":
            batch["max_length"] = longest
        return batch

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the device. To a CUDA device from pinned memory without blocking: a copy from
        pageable memory makes the host wait for the device's queue first."""
        tensor = torch.from_numpy(array)
        if self.world.device.type != "cuda":
            return tensor.to(self.world.device)
        return tensor.pin_memory().to(self.world.device, non_blocking=True)

    def _rows(self, idx: np.ndarray, micro: int) -> np.ndarray:
        """This data-parallel rank's rows of micro-batch ``micro`` of a step's global batch."""
        per_pass = self.micro * self.world.dp
        start = micro * per_pass + self.world.dp_rank * self.micro
        return idx[start : start + self.micro]

    def _token_loss(self, batch: dict[str, Any]) -> Any:
        """Summed cross-entropy of a batch (a replicated DTensor under loss parallelism): from the logits,
        or chunk by chunk inside the model's forward where the chunked loss is on."""
        if self.chunk_tokens is None:
            return summed_token_loss(forward_logits(self.model, batch, self.attn), batch["labels"])
        head = self.model.get_output_embeddings()
        positions, targets = batch["loss_positions"], batch["loss_targets"]
        with chunked_loss.head_returns_loss(head, positions, targets, self.chunk_tokens):
            return model_output(self.model, batch, self.attn).logits

    def _loss_scope(self) -> contextlib.AbstractContextManager[None]:
        """Where logits sharded along the vocabulary may meet the cross-entropy (and its backward)."""
        if not self.loss_parallel:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def training_step(self, step_number: Any, batch_idx: int) -> None:
        """Optimizer step ``step_count``: every micro-batch forward and backward, the global loss and
        gradient norm, clipping, then the update (inside which the policy sets the learning rate and refuses
        a non-finite step)."""
        world, train = self.world, self.cfg.train
        step = self.step_count
        assert int(step_number) == step, (int(step_number), step)
        idx = batch_indices(step, self.global_batch, len(self.split), train.seed)
        normaliser = float(max(1, self.split.supervised_tokens(idx)))
        loss = torch.zeros((), dtype=torch.float32, device=world.device)
        for m in range(self.accumulation):
            rows = self._rows(idx, m)
            batch = self._device_batch(self.split, rows)
            torch.manual_seed(micro_batch_seed(train.seed, step, m * world.dp + world.dp_rank))
            with self._loss_scope():  # the backward too: loss parallelism has its own gradient
                part = self._token_loss(batch) / normaliser
                self.manual_backward(part)
            loss += _local(part.detach())
        norm = parallel.grad_norm(self.trainable, world)
        dist.all_reduce(loss, group=world.dp_group)
        optimizer = self.optimizers()
        if self.skips_on_device:
            # Nothing here waits for the device: clipping a non-finite norm gives non-finite gradients,
            # whose update the fused kernel skips (found_inf); the step driver reads the figures later.
            self.step_loss, self.step_grad_norm = loss, norm
            fused: Any = self._optimizer()  # torch.optim.AdamW reads found_inf (as GradScaler sets it)
            fused.found_inf = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
            if train.max_grad_norm > 0:
                parallel.clip_gradients(self.trainable, world, train.max_grad_norm, norm)
        else:
            self.step_loss, self.step_grad_norm = float(loss), float(norm)
            if train.max_grad_norm > 0 and math.isfinite(self.step_grad_norm):
                parallel.clip_gradients(self.trainable, world, train.max_grad_norm, norm)
        try:
            optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)
        # Counted on the host from the global batch's rows every rank knows: no device sync, no collective.
        self.step_tokens = self.split.tokens(idx)
        self.step_count += 1
        self.history.losses.append(self.step_loss)
        self.history.grad_norms.append(self.step_grad_norm)

    # -- validation and checkpoints (asked for by the policy) ---------------------------------------

    def validate(self) -> float:
        """Mean token loss over ``train.eval_batches`` validation batches, split over the data-parallel ranks."""
        world = self.world
        split = self.tokenized.split("validation")
        batches = min(self.cfg.train.eval_batches, len(split) // self.micro)  # >= 1 (check)
        totals = torch.zeros(2, dtype=torch.float64, device=world.device)  # summed loss, supervised tokens
        self.model.eval()
        with torch.no_grad():
            for i in range(math.ceil(batches / world.dp)):
                b = i * world.dp + world.dp_rank
                real = b < batches
                rows = np.arange(self.micro) + (b if real else 0) * self.micro
                batch = self._device_batch(split, rows)
                with self._loss_scope():
                    total = _local(self._token_loss(batch))
                if real:  # a rank with no batch left still runs one, so every collective has all ranks
                    totals[0] += total.double()
                    totals[1] += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.model.train()
        dist.all_reduce(totals, group=world.dp_group)
        loss = float(totals[0] / totals[1].clamp_min(1))
        self.history.validation.append(ValidationLoss(self.step_count, loss))
        return loss

    def meta(self) -> ckpt.CheckpointMeta:
        cfg = self.cfg
        peft_config = None
        if cfg.lora.enabled:
            peft_config = _jsonable(self.model.peft_config[ADAPTER].to_dict())
            peft_config["base_model_name_or_path"] = cfg.model.name_or_path
        return ckpt.CheckpointMeta(
            format=ckpt.META_FORMAT,
            mode="lora" if cfg.lora.enabled else "full",
            base_model=cfg.model.name_or_path,
            base_dtype=cfg.model.dtype,
            model_config=self.model_config.to_dict(),
            peft_config=peft_config,
            adapter_name=ADAPTER if cfg.lora.enabled else None,
        )

    def save(self) -> str:
        """Checkpoint the current step (every rank); committed by :meth:`commit_written`, which the step
        driver calls right after (see :class:`~trnft.common.fsdp.checkpoint.ShardedCheckpoints`)."""
        assert self.checkpointer is not None and self.world is not None
        history = self.history.read()
        state = {
            "losses": history.losses,
            "grad_norms": history.grad_norms,
            "validation": [{"step": v.step, "loss": v.loss} for v in history.validation],
            "layout": {"dp": self.world.dp, "tp": self.world.tp},
            "data_position": {"step": self.step_count, "rule": "optimizer step s trains on batch_indices(s)"},
        }
        return self.checkpointer.save(self.step_count, self.model, self._optimizer(), self.meta(), state)

    def commit_written(self, *, wait: bool) -> str | None:
        """Commit the checkpoint in flight once every rank has written it (collective); its name."""
        assert self.checkpointer is not None
        return self.checkpointer.commit_written(wait=wait)


def _local(value: Any) -> Any:
    """A replicated DTensor's value as a plain tensor (the same on every rank); a tensor as it is."""
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


def _jsonable(value: Any) -> Any:
    """A PEFT config dict as JSON values (sets become sorted lists, enums their values)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        return value.value
    return value


# --------------------------------------------------------------------------------------------------
# The stage: set up, train, report


def _lightning_trainer(
    platform: DevicePlatform,
    layout: parallel.RankLayout,
    local_size: int,
    callbacks: list[Any],
    loggers: list[Any],
) -> L.Trainer:
    """``lightning.Trainer`` on ``ModelParallelStrategy`` for this platform's device and process group."""
    strategy = platform.lightning_strategy(
        data_parallel_size=layout.dp,
        tensor_parallel_size=layout.tp,
        save_distributed_checkpoint=True,
        process_group_backend=platform.process_group_backend,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return L.Trainer(
        accelerator=platform.lightning_accelerator(),
        devices=local_size,
        num_nodes=layout.world // local_size,
        strategy=strategy,
        precision="32-true",  # FSDP2's MixedPrecisionPolicy casts (train.bf16); Lightning must not autocast
        max_epochs=1,  # one pass over the remaining steps (the dataset of step numbers)
        max_steps=-1,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,  # trnft's checkpoints appear whole or not at all
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,  # validation is the policy's (every rank runs the same passes)
        use_distributed_sampler=False,  # every rank reads its own rows of the step's global batch
        log_every_n_steps=1,  # the policy logs at the run's own steps; Lightning's interval is not used
        default_root_dir=None,
        gradient_clip_val=None,
    )


def _loggers(ctx: StageContext) -> list[Any]:
    """TensorBoard under ``<train>/tensorboard`` and, with ``fsdp.wandb``, Weights & Biases (rank 0 writes)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers: list[Any] = [
        TensorBoardLogger(save_dir=str(ctx.out_dir), name="tensorboard", version="", default_hp_metric=False)
    ]
    if ctx.cfg.fsdp.wandb:
        if importlib.util.find_spec("wandb") is None:
            ctx.log("warning: fsdp.wandb is on but wandb is not installed; logging to TensorBoard only")
        else:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(project="trnft", name=ctx.cfg.run.name, save_dir=str(ctx.out_dir)))
    return loggers


@contextlib.contextmanager
def _quiet_about_the_step_dataset() -> Iterator[None]:
    """Lightning advises worker processes for a DataLoader without any; ours yields step numbers, the rows
    are read from memory-mapped arrays in the step itself. Only this warning, only during this fit."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        yield


def train(
    ctx: StageContext, platform: DevicePlatform, *, graph_counter: Callable[[], int] | None = None
) -> StageOutcome:
    """The stage body on every rank: verify the upstream, fit, report."""
    cfg = ctx.cfg
    ctx.verify_upstream("tokenize")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    layout = parallel.rank_layout(cfg, world_size, nodes=_nodes())
    # Lightning's launcher calls torch.set_num_threads() when OMP_NUM_THREADS is unset; that pins MKL's
    # thread count and changes CPU summation order (one process then trains measurably differently from
    # the same run before Lightning). Naming the count torch already uses keeps torch's own threading.
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    tokenized = TokenizeOutput(ctx.upstream_dir("tokenize"))
    module = ShardedCausalLM(ctx, platform, tokenized, layout)
    record = RunRecord(start=0, resumed_from=None)
    if graph_counter is None and module.compile_backend is not None:
        graph_counter = compiled_graphs  # recompiles are watched wherever something is compiled
    policy = PolicyCallback(ctx, record, graph_counter=graph_counter)
    started = _Started(ctx, module, record)
    trainer = _lightning_trainer(platform, layout, local_size, [started, policy], _loggers(ctx))
    t0 = time.perf_counter()
    finished = False
    try:
        with _quiet_about_the_step_dataset():
            trainer.fit(module)
        if record.stopped_by:
            raise stop.Stopped(record.stopped_by, f"{record.saved[-1]} saved; the rerun resumes there")
        wall = time.perf_counter() - t0
        outcome = _report(ctx, module, record, wall)
        finished = True
        return outcome
    finally:
        if dist.is_initialized():
            if finished:
                # Every rank leaves the group together: on torch 2.14 a gloo rank that tears its group down
                # while a peer is still reporting can abort at exit ("terminate called without an active
                # exception", seen with one thread per rank). After a failure a peer may never arrive.
                dist.barrier()
            dist.destroy_process_group()


class _Started(L.Callback):
    """After resume (``on_fit_start``), before the first step: record where the run starts and say so."""

    def __init__(self, ctx: StageContext, module: ShardedCausalLM, record: RunRecord) -> None:
        self.ctx, self.module, self.record = ctx, module, record

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        module, record = self.module, self.record
        record.start = module.step_count
        record.resumed_from = module.resumed_from.name if module.resumed_from else None
        if module.is_main:
            cfg, world = self.ctx.cfg, module.world
            kind = "LoRA" if cfg.lora.enabled else "full fine-tuning"
            self.ctx.log(
                f"train: FSDP2 on Lightning, {world.size} {module.platform.name} process(es) "
                f"(dp {world.dp} x tp {world.tp}), {kind}, {module.trainable_parameters():,} trained "
                f"parameters, attention {module.attn}, compile {module.compile_backend or 'off'}, "
                f"{module.recompute.summary()}, "
                + (
                    f"chunked loss ({module.chunk_tokens} tokens a chunk), "
                    if module.chunk_tokens
                    else "loss from full logits, "
                )
                + ("loss parallel over tp, " if module.loss_parallel else "")
                + f"global batch {module.global_batch}"
                + (f", resuming {record.resumed_from} at step {record.start}" if record.resumed_from else "")
            )


def _device_memory_bytes(cfg: RunConfig, world: parallel.World) -> int | None:
    """Memory one rank has: the CUDA device's, one Neuron process's HBM (the instance table), or this
    machine's share per local process on the CPU; None when unknown."""
    if world.device.type == "cuda":
        return int(torch.cuda.get_device_properties(world.device).total_memory)
    if world.device.type == "cpu":
        return memory_plan.host_memory_bytes() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    from ..cluster.instances import instance

    found = instance(cfg.cluster.instance_type)
    gib = found.neuron_core_memory_gib(cfg.neuron.logical_nc_config) if found else None
    return int(gib * memory_plan.GIB) if gib else None


def _peak_device_memory_mb(world: parallel.World) -> float | None:
    """The largest peak of allocated device memory over the ranks, through ``torch.accelerator`` (CUDA and
    TorchNeuron both report there); None on the CPU or where the device does not report."""
    if world.device.type == "cpu":
        return None
    try:
        allocated = torch.accelerator.max_memory_allocated(world.device)
    except (RuntimeError, NotImplementedError, AttributeError):  # a backend without memory statistics
        return None
    peak = torch.tensor(allocated / 2**20, device=world.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return round(float(peak), 1)


def _peak_rss_mb(world: parallel.World) -> float:
    peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, device=world.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return round(float(peak), 1)


def _report(ctx: StageContext, module: ShardedCausalLM, record: RunRecord, wall: float) -> StageOutcome:
    world = module.world
    final = checkpoints.newest_complete(ctx.out_dir)
    if final is None or final.step != module.step_count:
        raise TrnftError(f"train: ended at step {module.step_count} without checkpoint-{module.step_count}")
    history = module.history.read()
    figures = ShardedTrainFigures(
        backend=f"fsdp2-{world.device.type}",
        attention=module.attn,
        compile_backend=module.compile_backend,
        recompute=module.recompute.to_json(),
        loss_chunk_tokens=module.chunk_tokens,
        tp=world.tp,
        dp=world.dp,
        steps_this_run=module.step_count - record.start,
        resumed_from=record.resumed_from,
        start_step=record.start,
        end_step=module.step_count,
        stopped_early=record.stopped_early,
        first_loss=history.losses[0] if history.losses else None,
        final_loss=history.losses[-1] if history.losses else None,
        losses=history.losses,
        grad_norms=history.grad_norms,
        validation=history.validation,
        tokens_per_second=round(record.rate(), 1) if record.seconds else None,
        wall_s=round(wall, 2),
        trainable_parameters=module.trainable_parameters(),
        peak_host_rss_mb=_peak_rss_mb(world),
        peak_device_memory_mb=_peak_device_memory_mb(world),
        checkpoints_saved=record.saved,
        final_checkpoint=final.path.name,
        graphs_in_cache_at_start=record.graphs_at_start,
        graphs_compiled_first_step=record.graphs_first_step,
        graphs_compiled_after_first_step=record.graphs_after_first_step,
    )
    layout = {
        "tp": world.tp,
        "dp": world.dp,
        "replicate": world.replicate,
        "loss_parallel": module.loss_parallel,
        "world": world.size,
        "global_batch": module.global_batch,
    }
    return StageOutcome(summary=figures.summary(), figures=figures, layout=layout)
