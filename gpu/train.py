"""Train stage on the GPU path: FSDP2 and tensor parallelism over standard torch.distributed.

Processes: ``gpu.devices`` per node (every GPU by default; on CPU, gloo processes). Under torchrun (the
Kubernetes PyTorchJob) the world comes from its environment; outside it, ``trnft train`` starts the
processes itself with torchrun's launcher. ``gpu.tp`` ranks form a tensor-parallel group and read the same
batch; data parallelism takes the rest (:mod:`trnft.gpu.parallel`).

The training math is the Neuron path's:

- the same batches: optimizer step ``s`` trains on :func:`~trnft.common.training.data.batch_indices` of
  ``s``; micro-batch ``m`` of it is split into contiguous per-data-parallel-rank slices;
- the same loss: summed token cross-entropy over the whole global batch divided by its supervised tokens
  (gradients are summed over ranks, not averaged), with packed samples kept apart for every attention
  implementation (:func:`forward_logits`);
- the same optimizer: AdamW with :func:`~trnft.common.training.optim.decay_groups` on parameters that keep
  their own shapes, warmup + cosine (:func:`~trnft.common.training.optim.lr_at`), clipping by the global
  gradient norm over every shard, fp32 trainable weights and optimizer state.

Dropout of micro-batch ``m`` of step ``s`` is seeded from (seed, s, m), so neither the layout nor a
resume changes what is drawn. Validation (``train.eval_steps``) runs ``train.eval_batches`` batches split
over the data-parallel ranks; every rank runs the same number of forward passes (a rank with no batch
left runs a discarded one), so sharded collectives never wait on a rank that stopped.

Checkpoints (:mod:`trnft.gpu.checkpoint`) are sharded and atomic; a restarted stage resumes from the
newest complete one written with the same settings: weights, optimizer moments, step; the data position
and dropout follow from the step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist

from trnft.common.config.run_config import RunConfig, dump_config
from trnft.common.errors import ConfigError, ProcessFailed, TrnftError
from trnft.common.exits import exit_code_of_process
from trnft.common.io.hf_files import TOKENIZER_FILES, copy_present, resolve_model_dir
from trnft.common.pipeline import checkpoints
from trnft.common.pipeline.figures import Figures
from trnft.common.pipeline.stages import SPECS, StageContext, StageOutcome, StageResult, run_stage
from trnft.common.training.data import (
    IGNORE_INDEX,
    TokenizedSplit,
    TokenizeOutput,
    batch_indices,
    segment_allowed,
    segment_attention_mask,
    step_seed,
    summed_token_loss,
)
from trnft.common.training.lora import ADAPTER, apply_lora, check_targets
from trnft.common.training.optim import decay_groups, global_batch, lr_at
from trnft.gpu import checkpoint as ckpt
from trnft.gpu import parallel


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    """The train stage: in this process (under torchrun, or one process), or in ``gpu.devices`` it starts.

    Everything that can be refused (upstream, layout, batch, targets, vocabulary) is refused first, in one
    line, before a process starts or a folder is made.
    """
    from trnft.common.pipeline.rundir import RunDir
    from trnft.common.pipeline.stages import current_manifest, upstream_manifests

    spec = SPECS["train"]
    done = None if force else current_manifest(spec, cfg)
    if done is not None:
        log(
            f"train: already complete ({done.get('finished_at')}, {done.get('summary', '')}); use --force to redo"
        )
        return StageResult(spec.name, True, done, RunDir(cfg.run.root).stage_dir(spec.name))
    nproc = _processes_to_start(cfg)
    world = int(os.environ["WORLD_SIZE"]) if _under_torchrun() else nproc
    rundir = RunDir(cfg.run.root)
    upstream_manifests(spec, cfg, rundir)
    check(cfg, TokenizeOutput(rundir.stage_dir("tokenize")), world)
    if nproc > 1:
        return _launch(cfg, nproc, force=force, log=log)
    return run_stage(spec, cfg, _body, force=force, log=log)


# --------------------------------------------------------------------------------------------------
# Where training runs


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_WORLD_SIZE" in os.environ


def _processes_to_start(cfg: RunConfig) -> int:
    """How many processes ``trnft train`` must start itself (1: train in this one)."""
    if _under_torchrun():
        return 1
    if device_type() == "cuda" and cfg.gpu.devices and cfg.gpu.devices > torch.cuda.device_count():
        raise ConfigError(
            f"gpu.devices: {cfg.gpu.devices} but this machine has {torch.cuda.device_count()} CUDA devices"
        )
    default = torch.cuda.device_count() if device_type() == "cuda" else 1
    return cfg.gpu.devices or default


def _launch(cfg: RunConfig, nproc: int, *, force: bool, log: Callable[[str], None]) -> StageResult:
    """Start ``nproc`` local processes with torchrun's launcher, each running this stage.

    A failed process makes this one fail with its exit code (a signal as 128 + its number, as a shell
    reports it), after the process's own error line.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from trnft.common.pipeline.rundir import RunDir

    spec = SPECS["train"]
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
        log(f"train: starting {nproc} {device_type()} processes (gpu.devices)")
        try:
            with _threads_per_process(nproc):
                elastic_launch(launch, sys.executable)(*argv)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            code = exit_code_of_process(failure.exitcode) or 1
            raise ProcessFailed(
                f"train: process {rank} of {nproc} exited with code {code}; its error is above", code
            ) from exc
    manifest = rundir.manifest(spec.name)
    if manifest is None:
        raise TrnftError(
            f"train: the {nproc} processes ended without writing {rundir.stage_dir('train')}/manifest.json"
        )
    return StageResult(spec.name, False, manifest, rundir.stage_dir(spec.name))


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


def attention_implementation(cfg: RunConfig, device: str) -> str:
    """flash_attention_2 on CUDA when flash_attn is installed (auto), else sdpa; or what the config says."""
    wanted = cfg.gpu.attn_implementation
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if wanted == "auto":
        return "flash_attention_2" if device == "cuda" and has_flash else "sdpa"
    if wanted == "flash_attention_2" and (device != "cuda" or not has_flash):
        raise ConfigError(
            "gpu.attn_implementation: flash_attention_2 needs CUDA and the flash_attn package; use auto or sdpa"
        )
    return wanted


def check(cfg: RunConfig, tokenized: TokenizeOutput, world: int) -> Any:
    """Refuse what cannot work before any weights load: layout, batch, targets, vocabulary, validation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if world % cfg.gpu.tp:
        raise ConfigError(
            f"gpu.tp: {cfg.gpu.tp} does not divide the {world} training processes; use a divisor of {world} "
            "or set gpu.devices"
        )
    global_batch(cfg.train, world // cfg.gpu.tp)
    try:
        config = AutoConfig.from_pretrained(
            cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a bad path or config
        raise TrnftError(
            f"model.name_or_path: cannot load the model config of {cfg.model.name_or_path!r} ({exc})"
        ) from exc
    parallel.check_tensor_parallel(config, cfg.gpu.tp)
    attention_implementation(cfg, device_type())
    if tokenized.info["vocab_size"] > config.vocab_size:
        raise TrnftError(
            f"model.name_or_path: the tokenizer has {tokenized.info['vocab_size']} tokens but the model's vocabulary "
            f"is {config.vocab_size}; retokenize with a pad token inside the vocabulary (dataset.pad_token)"
        )
    with torch.device("meta"):  # structure only: target names and decoder-layer classes, no weights
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.lora.enabled:
        check_targets(skeleton, cfg.lora.target_modules)
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
    if len(tokenized.split("train")) == 0:
        raise TrnftError("tokenize produced no training sequences; check the dataset and templates")
    return config


# --------------------------------------------------------------------------------------------------
# The forward pass on packed rows


def forward_logits(model: Any, batch: dict[str, Any], attn_implementation: str) -> Any:
    """Logits ``[B, S, V]`` of a batch of packed rows, each sample seeing only its own tokens.

    flash_attention_2 keeps samples apart only in a single row whose ``position_ids`` restart at every
    sample (transformers treats a batch of several rows as unpacked), so the ``B`` rows are flattened
    into one row of ``B * S`` tokens and the logits reshaped back. sdpa and eager get the block-diagonal
    causal mask of the segment ids, row by row.
    """
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    rows, length = input_ids.shape
    if attn_implementation == "flash_attention_2":
        logits = model(input_ids=input_ids.reshape(1, -1), position_ids=position_ids.reshape(1, -1)).logits
        return logits.reshape(rows, length, -1)
    if attn_implementation == "sdpa":
        mask = segment_allowed(batch["segment_ids"])
    else:
        mask = segment_attention_mask(batch["segment_ids"], dtype=torch.float32)
    return model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits


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
class GpuTrainFigures(Figures):
    KIND: ClassVar[str] = "train/gpu"

    backend: str  # fsdp2-<device>
    attention: str
    tp: int
    dp: int
    steps_this_run: int
    resumed_from: str | None
    start_step: int
    end_step: int
    stopped_early: bool
    first_loss: float | None
    final_loss: float | None
    losses: list[float]
    grad_norms: list[float]
    validation: list[ValidationLoss]
    tokens_per_second: float | None
    wall_s: float
    trainable_parameters: int  # whole-model count (every shard counted once)
    peak_host_rss_mb: float  # the largest of any rank's peak resident memory
    checkpoints_saved: list[str]
    final_checkpoint: str

    def summary(self) -> str:
        text = f"{self.end_step} steps"
        if self.losses:
            text += f", loss {self.losses[0]:.3f} -> {self.losses[-1]:.3f}"
        if self.stopped_early:
            text += " (early stop)"
        return text + f", {self.final_checkpoint}"


# --------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class _History:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    validation: list[ValidationLoss] = field(default_factory=list)


class GpuTrainer:
    """One rank's model shard, optimizer and data; ``step()`` runs one optimizer step on every rank."""

    def __init__(self, ctx: StageContext, world: parallel.World, tokenized: TokenizeOutput) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.world = world
        self.tokenized = tokenized
        self.split: TokenizedSplit = tokenized.split("train")
        train = self.cfg.train
        self.micro = train.micro_batch_size
        self.accumulation = train.gradient_accumulation_steps
        self.global_batch = global_batch(train, world.dp)
        self.attn = attention_implementation(self.cfg, world.device.type)
        self.step_count = 0
        self.history = _History()

    # -- set-up -----------------------------------------------------------------------------------

    def build(self) -> None:
        """The sharded model with its base weights and fresh LoRA, and the optimizer."""
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg, world = self.cfg, self.world
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
        base = model.get_base_model() if cfg.lora.enabled else model
        if cfg.gpu.activation_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        parallel.shard(
            model,
            world,
            parallel.ShardSettings(
                tp=cfg.gpu.tp,
                bf16=cfg.train.bf16,
                reshard_after_forward=cfg.gpu.reshard_after_forward,
                cpu_offload=cfg.gpu.cpu_offload,
            ),
        )
        parallel.materialize(model, world.device, buffers)
        parallel.load_base_weights(model, model_dir, world.device)
        if cfg.lora.enabled:
            parallel.init_lora_weights(model, cfg.train.seed, world.device)
        model.train()  # dropout on
        self.model = model
        self.model_config = config
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        train = cfg.train
        self.optimizer = torch.optim.AdamW(
            self._param_groups(), lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
            eps=train.adam_epsilon, foreach=True,
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

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable)  # DTensor.numel() is the whole tensor's

    def resume(self, checkpoint: Path) -> None:
        state = ckpt.checkpoint_state(checkpoint)
        ckpt.load_sharded(checkpoint, self.model, self.optimizer)
        self.step_count = int(state["step"])
        self.history = _History(
            list(state["losses"]),
            list(state.get("grad_norms", [])),
            [ValidationLoss(**v) for v in state.get("validation", [])],
        )

    # -- steps ------------------------------------------------------------------------------------

    def _device_batch(self, split: TokenizedSplit, rows: np.ndarray) -> dict[str, Any]:
        return {k: torch.from_numpy(v).to(self.world.device) for k, v in split.rows(rows).items()}

    def _rows(self, idx: np.ndarray, micro: int) -> np.ndarray:
        """This data-parallel rank's rows of micro-batch ``micro`` of a step's global batch."""
        per_pass = self.micro * self.world.dp
        start = micro * per_pass + self.world.dp_rank * self.micro
        return idx[start : start + self.micro]

    def step(self) -> tuple[float, float, int]:
        """One optimizer step; returns (loss, pre-clip gradient norm, non-pad tokens of all ranks)."""
        cfg, world = self.cfg, self.world
        train = cfg.train
        step = self.step_count
        idx = batch_indices(step, self.global_batch, len(self.split), train.seed)
        normaliser = float(max(1, self.split.supervised_tokens(idx)))
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, train)
        loss = torch.zeros((), dtype=torch.float32, device=world.device)
        tokens = 0
        for m in range(self.accumulation):
            rows = self._rows(idx, m)
            batch = self._device_batch(self.split, rows)
            tokens += int((batch["segment_ids"] != 0).sum())
            torch.manual_seed(micro_batch_seed(train.seed, step, m * world.dp + world.dp_rank))
            part = (
                summed_token_loss(forward_logits(self.model, batch, self.attn), batch["labels"]) / normaliser
            )
            part.backward()
            loss += part.detach()
        norm = parallel.grad_norm(self.trainable, world)
        dist.all_reduce(loss, group=world.dp_group)
        if not (math.isfinite(float(loss)) and math.isfinite(float(norm))):
            self.optimizer.zero_grad(set_to_none=True)
            what, value = (
                ("loss", float(loss)) if not math.isfinite(float(loss)) else ("gradient norm", float(norm))
            )
            raise TrnftError(
                f"train: step {step + 1} has a non-finite {what} ({value}); stopped before the update, nothing "
                "of this step is saved. Lower train.learning_rate or check the data"
            )
        if train.max_grad_norm > 0:
            coef = torch.clamp(train.max_grad_norm / (norm + 1e-6), max=1.0)
            for p in self.trainable:
                if p.grad is not None:
                    p.grad.mul_(coef)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        counted = torch.tensor(float(tokens), device=world.device)
        dist.all_reduce(counted, group=world.dp_group)
        self.step_count += 1
        self.history.losses.append(float(loss))
        self.history.grad_norms.append(float(norm))
        return float(loss), float(norm), int(counted)

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
                total = summed_token_loss(forward_logits(self.model, batch, self.attn), batch["labels"])
                if real:  # a rank with no batch left still runs one, so every collective has all ranks
                    totals[0] += total.double()
                    totals[1] += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.model.train()
        dist.all_reduce(totals, group=world.dp_group)
        loss = float(totals[0] / totals[1].clamp_min(1))
        self.history.validation.append(ValidationLoss(self.step_count, loss))
        return loss

    # -- checkpoints ------------------------------------------------------------------------------

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
        """Checkpoint the current step on every rank; rank 0 commits it. Returns its folder name."""
        world, train_dir, step = self.world, self.ctx.out_dir, self.step_count
        box = [str(checkpoints.staging_dir(train_dir, step)) if world.is_main else None]
        dist.broadcast_object_list(box, src=0)
        staged = Path(box[0])
        if world.is_main:
            staged.mkdir(parents=True)
        dist.barrier()
        ckpt.save_sharded(staged, self.model, self.optimizer)
        dist.barrier()  # every rank's shards are on disk
        if world.is_main:
            self.meta().write(staged)
            state_dir = staged / checkpoints.TRNFT_STATE
            state_dir.mkdir()
            state = {
                "step": step,
                "fingerprint": self.ctx.fingerprint,
                "losses": self.history.losses,
                "grad_norms": self.history.grad_norms,
                "validation": [{"step": v.step, "loss": v.loss} for v in self.history.validation],
                "layout": {"dp": world.dp, "tp": world.tp},
                "data_position": {"step": step, "rule": "optimizer step s trains on batch_indices(s)"},
            }
            (state_dir / "state.json").write_text(json.dumps(state, indent=1))
            copy_present(TOKENIZER_FILES, [self.tokenized.tokenizer_dir], staged)
            checkpoints.write_done(staged)
            checkpoints.fault_point("save", step)
            checkpoints.commit(train_dir, staged, step)
            checkpoints.prune(train_dir, self.cfg.train.keep_checkpoints, self.ctx.log)
        dist.barrier()
        return f"checkpoint-{step}"


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


@dataclass
class _Run:
    """What the loop counts while it runs."""

    start: int
    resumed_from: str | None
    saved: list[str] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    best_validation: float = math.inf
    without_improvement: int = 0
    wall: float = 0.0

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _resume_point(ctx: StageContext, world: parallel.World) -> Path | None:
    """Rank 0 picks the checkpoint (and clears leftovers); every rank gets its answer."""
    box = [None]
    if world.is_main:
        found = checkpoints.resume_point(ctx.out_dir, ctx.fingerprint, ctx.log)
        box = [str(found) if found else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] else None


def _setup(ctx: StageContext) -> tuple[GpuTrainer, _Run, _Scalars | None]:
    cfg = ctx.cfg
    ctx.verify_upstream("tokenize")
    world = parallel.start_world(cfg.gpu.tp, device_type())
    tokenized = TokenizeOutput(ctx.upstream_dir("tokenize"))
    trainer = GpuTrainer(ctx, world, tokenized)
    trainer.build()
    resume = _resume_point(ctx, world)
    if resume is not None:
        trainer.resume(resume)
    if world.is_main:
        kind = "LoRA" if cfg.lora.enabled else "full fine-tuning"
        ctx.log(
            f"train: FSDP2 on {world.size} {world.device.type} process(es) (dp {world.dp} x tp {world.tp}), {kind}, "
            f"{trainer.trainable_parameters():,} trained parameters, attention {trainer.attn}, "
            f"global batch {trainer.global_batch}"
            + (f", resuming {resume.name} at step {trainer.step_count}" if resume else "")
        )
    writer = _Scalars(ctx) if world.is_main else None
    return trainer, _Run(trainer.step_count, resume.name if resume else None), writer


def _train(ctx: StageContext, trainer: GpuTrainer, run: _Run, writer: _Scalars | None) -> None:
    train = ctx.cfg.train
    main = trainer.world.is_main
    t0 = time.perf_counter()
    while trainer.step_count < train.max_steps:
        started = time.perf_counter()
        loss, norm, tokens = trainer.step()
        step = trainer.step_count
        if step > run.start + 1:  # the first step includes start-up (allocations, kernels)
            run.tokens += tokens
            run.seconds += time.perf_counter() - started
        checkpoints.fault_point("step", step)
        if main and (step % train.logging_steps == 0 or step in (run.start + 1, train.max_steps)):
            lr = trainer.optimizer.param_groups[0]["lr"]
            ctx.log(
                f"train: step {step}/{train.max_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {norm:.3f} "
                f"tokens/s {run.rate():,.0f}"
            )
        if writer is not None:
            lr = trainer.optimizer.param_groups[0]["lr"]
            writer.add({"train/loss": loss, "train/learning_rate": lr, "train/grad_norm": norm}, step)
        if train.eval_steps and step % train.eval_steps == 0:
            _validate(ctx, trainer, run, writer)
        if step % train.save_steps == 0 or step == train.max_steps or run.stopped_early:
            run.saved.append(trainer.save())
            if main:
                ctx.log(f"train: saved {run.saved[-1]}")
        if main:
            ctx.rundir.write_progress("train", {"summary": f"step {step} of {train.max_steps}", "step": step})
        if run.stopped_early:
            break
    run.wall = time.perf_counter() - t0


def _validate(ctx: StageContext, trainer: GpuTrainer, run: _Run, writer: _Scalars | None) -> None:
    patience = ctx.cfg.train.early_stopping_patience
    loss = trainer.validate()
    if loss < run.best_validation:
        run.best_validation, run.without_improvement = loss, 0
    else:
        run.without_improvement += 1
    if trainer.world.is_main:
        ctx.log(f"train: step {trainer.step_count} validation loss {loss:.4f}")
    if writer is not None:
        writer.add({"val/loss": loss}, trainer.step_count)
    if patience and run.without_improvement >= patience:
        run.stopped_early = True
        if trainer.world.is_main:
            ctx.log(
                f"train: early stop at step {trainer.step_count}: {patience} validations without improvement"
            )


def _peak_rss_mb(world: parallel.World) -> float:
    peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, device=world.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return round(float(peak), 1)


def _report(ctx: StageContext, trainer: GpuTrainer, run: _Run) -> StageOutcome:
    world = trainer.world
    final = checkpoints.newest_complete(ctx.out_dir)
    if final is None or final.step != trainer.step_count:
        raise TrnftError(f"train: ended at step {trainer.step_count} without checkpoint-{trainer.step_count}")
    history = trainer.history
    figures = GpuTrainFigures(
        backend=f"fsdp2-{world.device.type}",
        attention=trainer.attn,
        tp=world.tp,
        dp=world.dp,
        steps_this_run=trainer.step_count - run.start,
        resumed_from=run.resumed_from,
        start_step=run.start,
        end_step=trainer.step_count,
        stopped_early=run.stopped_early,
        first_loss=history.losses[0] if history.losses else None,
        final_loss=history.losses[-1] if history.losses else None,
        losses=history.losses,
        grad_norms=history.grad_norms,
        validation=history.validation,
        tokens_per_second=round(run.rate(), 1) if run.seconds else None,
        wall_s=round(run.wall, 2),
        trainable_parameters=trainer.trainable_parameters(),
        peak_host_rss_mb=_peak_rss_mb(world),
        checkpoints_saved=run.saved,
        final_checkpoint=final.path.name,
    )
    layout = {"tp": world.tp, "dp": world.dp, "world": world.size, "global_batch": trainer.global_batch}
    return StageOutcome(summary=figures.summary(), figures=figures, layout=layout)


def _body(ctx: StageContext) -> StageOutcome:
    trainer, run, writer = _setup(ctx)
    try:
        _train(ctx, trainer, run, writer)
        return _report(ctx, trainer, run)
    finally:
        if writer is not None:
            writer.close()
        parallel.stop_world()


class _Scalars:
    """Rank 0's scalars: TensorBoard under ``<train>/tensorboard`` and, with ``gpu.wandb``, Weights & Biases."""

    def __init__(self, ctx: StageContext) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.board = SummaryWriter(log_dir=str(ctx.out_dir / "tensorboard"), flush_secs=30)
        self.wandb = None
        if ctx.cfg.gpu.wandb:
            try:
                import wandb

                self.wandb = wandb.init(
                    project="trnft", name=ctx.cfg.run.name, dir=str(ctx.out_dir), resume="allow"
                )
            except Exception as exc:  # W&B is optional (not installed, no credentials): say so, keep training
                ctx.log(
                    f"warning: gpu.wandb is on but W&B could not start ({exc}); logging to TensorBoard only"
                )

    def add(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.board.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        self.board.close()
        if self.wandb is not None:
            self.wandb.finish()
