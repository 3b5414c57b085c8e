"""Train stage on the GPU path: a LightningModule over the tokenize stage's arrays.

This module imports torch and Lightning; only the GPU train stage (and its tests) import it.

Placement (``gpu.strategy``): FSDP over CUDA devices, DDP over gloo for several CPU processes, or one
device. Under ``torchrun`` (the Kubernetes PyTorchJob) the world comes from its environment; without it,
``gpu.devices`` processes are started by Lightning. The training math is the Neuron path's:

- the same batches: optimizer step ``s`` trains on :func:`~trnft.common.data.batch_indices` of ``s``,
  micro-batch ``m`` of it split into contiguous per-rank slices (the XLA trainer's "data" mesh axis);
- the same loss: summed token cross-entropy over the whole global batch divided by its supervised tokens
  (not a mean of per-micro-batch means), with the segment mask so packed samples never see each other;
- the same optimizer: AdamW with :func:`~trnft.common.optim.decay_groups`, warmup + cosine
  (:func:`~trnft.common.optim.lr_at`), global gradient-norm clipping (FSDP's own ``clip_grad_norm_``
  under FSDP, where a local clip would see only a shard), fp32 trainable weights and optimizer state.

Checkpoints are ``<train>/checkpoint-<step>/lightning.ckpt`` (a file; a sharded folder for full
fine-tuning under FSDP), written into a staging folder and renamed when complete (``done`` marker). LoRA
checkpoints hold the adapter weights only; every checkpoint carries the LoRA settings and model config
that ``consolidate`` needs. A restarted stage resumes from the newest complete checkpoint: weights,
optimizer, scheduler, step; the data position and dropout follow from the step.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from trnft.common.config.run_config import RunConfig
from trnft.common.errors import ConfigError, TrnftError
from trnft.common.io.hf_files import TOKENIZER_FILES, copy_present
from trnft.common.pipeline import checkpoints
from trnft.common.pipeline.stages import SPECS, StageContext, StageOutcome, StageResult, run_stage
from trnft.common.training.data import (
    IGNORE_INDEX,
    TokenizeOutput,
    batch_indices,
    segment_allowed,
    segment_attention_mask,
    step_seed,
    summed_token_loss,
)
from trnft.common.training.lora import ADAPTER, apply_lora, check_targets
from trnft.common.training.optim import decay_groups, global_batch, lr_at

# What consolidate reads from a checkpoint besides the weights (LoRA settings, model config, base).
CHECKPOINT_META_KEY = "trnft"


def run(cfg: RunConfig, *, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    return run_stage(SPECS["train"], cfg, _body, force=force, log=log)


# --------------------------------------------------------------------------------------------------
# Placement


@dataclass(frozen=True)
class Placement:
    """Where the LightningModule runs: accelerator, strategy, processes."""

    accelerator: str  # "cuda" | "cpu"
    strategy: str  # "fsdp" | "ddp" | "single"
    devices: int  # per node
    num_nodes: int

    @property
    def world(self) -> int:
        return self.devices * self.num_nodes


def placement(cfg: RunConfig) -> Placement:
    """The placement for this process's environment; ConfigError for impossible requests."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:  # under torchrun
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
        num_nodes = max(1, int(os.environ["WORLD_SIZE"]) // devices)
    else:
        devices = cfg.gpu.devices or (torch.cuda.device_count() if cuda else 1)
        num_nodes = 1
    if cuda and cfg.gpu.devices and cfg.gpu.devices > torch.cuda.device_count():
        raise ConfigError(
            f"gpu.devices: {cfg.gpu.devices} but this machine has {torch.cuda.device_count()} CUDA devices"
        )
    world = devices * num_nodes
    strategy = cfg.gpu.strategy
    if strategy == "auto":
        strategy = ("fsdp" if cuda else "ddp") if world > 1 else "single"
    if strategy == "fsdp" and not cuda:
        raise ConfigError(
            "gpu.strategy: fsdp needs CUDA devices (Lightning's FSDP refuses the CPU); use ddp or single here"
        )
    if strategy == "single" and world > 1:
        raise ConfigError(f"gpu.strategy: single runs one process, but {world} were started; use ddp or fsdp")
    return Placement("cuda" if cuda else "cpu", strategy, devices, num_nodes)


def attention_implementation(cfg: RunConfig, accelerator: str) -> str:
    """flash_attention_2 on CUDA when flash_attn is installed (auto), else sdpa; or what the config says."""
    wanted = cfg.gpu.attn_implementation
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if wanted == "auto":
        return "flash_attention_2" if accelerator == "cuda" and has_flash else "sdpa"
    if wanted == "flash_attention_2" and (accelerator != "cuda" or not has_flash):
        raise ConfigError(
            "gpu.attn_implementation: flash_attention_2 needs CUDA and the flash_attn package; use auto or sdpa"
        )
    return wanted


def decoder_layer_classes(model: Any) -> set[type]:
    """The model's own block classes (``_no_split_modules``), found among its modules by name.

    FSDP wraps and activation-checkpoints these; nothing is imported by name, so any family works.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise TrnftError(
            f"model.name_or_path: {type(model).__name__} declares no decoder-layer class (_no_split_modules), "
            "so FSDP cannot wrap it per layer; use gpu.strategy=ddp"
        )
    return classes


# --------------------------------------------------------------------------------------------------
# Data


class StepBatches:
    """Micro-batches of this rank from optimizer step ``start`` on: item ``i`` is micro-batch
    ``i % accumulation`` of step ``start + i // accumulation`` (map-style, so resuming needs only ``start``).

    The length is that of a whole run (``max_steps`` steps), not of what is left: a resumed Lightning loop
    restores its batch count within the epoch and would otherwise end the epoch early and restart this
    loader from its first item, training on steps it has already seen.
    """

    def __init__(self, tokenized: TokenizeOutput, cfg: RunConfig, start: int, rank: int, world: int) -> None:
        self.split = tokenized.split("train")
        self.train = cfg.train
        self.start = start
        self.rank = rank
        self.world = world
        self.accumulation = cfg.train.gradient_accumulation_steps
        self.global_batch = global_batch(cfg.train, world)
        self.per_pass = cfg.train.micro_batch_size * world  # sequences per forward pass, all ranks

    def __len__(self) -> int:
        return self.train.max_steps * self.accumulation

    def __getitem__(self, i: int) -> dict[str, Any]:
        step, micro = divmod(i, self.accumulation)
        step += self.start
        idx = batch_indices(step, self.global_batch, len(self.split), self.train.seed)
        pass_rows = idx[micro * self.per_pass : (micro + 1) * self.per_pass]
        per_rank = self.train.micro_batch_size
        mine = pass_rows[self.rank * per_rank : (self.rank + 1) * per_rank]
        batch = {k: torch.from_numpy(v) for k, v in self.split.rows(mine).items()}
        batch["normaliser"] = torch.tensor(float(max(1, self.split.supervised_tokens(idx))))
        batch["tokens"] = torch.tensor(int((np.asarray(self.split.segment_ids[mine]) != 0).sum()))
        batch["step"] = torch.tensor(step)
        return batch


class ValidationBatches:
    """The validation split in order, ``micro_batch_size`` sequences per batch, batches dealt to ranks."""

    def __init__(self, tokenized: TokenizeOutput, cfg: RunConfig, rank: int, world: int) -> None:
        self.split = tokenized.split("validation")
        self.size = cfg.train.micro_batch_size
        self.batches = [
            b for b in range(len(self.split) // self.size) if b % world == rank
        ]  # whole batches only: static shapes

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        b = self.batches[i]
        rows = np.arange(b * self.size, (b + 1) * self.size)
        return {k: torch.from_numpy(v) for k, v in self.split.rows(rows).items()}


# --------------------------------------------------------------------------------------------------
# The LightningModule


class CausalLMModule(pl.LightningModule):
    """A Hugging Face causal LM (PEFT LoRA or full) trained with the shared loss and schedule."""

    def __init__(self, cfg: RunConfig, attn_implementation: str, world: int, fingerprint: str) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_implementation = attn_implementation
        self.world = world
        self.fingerprint = fingerprint
        self.model: Any = None
        self.trainable: set[str] = set()
        self.strict_loading = False  # LoRA checkpoints hold the adapter only; see on_load_checkpoint
        self.history: list[float] = []
        self.val_history: list[dict[str, float]] = []
        self.grad_norm = 0.0
        self._step_loss = None
        self._val_sum = None
        self._val_tokens = None

    # -- model ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # LoRA init; the same rule as the XLA trainer
        # Frozen base weights in model.dtype; trainable weights are always fp32 masters.
        dtype = getattr(torch, cfg.model.dtype) if cfg.lora.enabled else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model.name_or_path, revision=cfg.model.revision, dtype=dtype,
            attn_implementation=self.attn_implementation, trust_remote_code=cfg.model.trust_remote_code,
            low_cpu_mem_usage=True,
        )  # fmt: skip
        model.config.use_cache = False
        if cfg.lora.enabled:
            model = apply_lora(model, cfg, cfg.lora.target_modules)
        model.train()  # from_pretrained returns eval mode (dropout off)
        self.trainable = {f"model.{n}" for n, p in model.named_parameters() if p.requires_grad}
        self.model = model

    # -- steps ---------------------------------------------------------------------------
    def _loss_sum(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        if self.attn_implementation == "flash_attention_2":
            pass  # varlen kernels find the packed samples from the restarting position_ids
        elif self.attn_implementation == "sdpa":
            kwargs["attention_mask"] = segment_allowed(batch["segment_ids"])
        else:
            kwargs["attention_mask"] = segment_attention_mask(batch["segment_ids"], dtype=torch.float32)
        total = summed_token_loss(self.model(**kwargs).logits, batch["labels"])
        return total, (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.cfg.train.gradient_accumulation_steps == 0:
            # Dropout of step s is a function of s alone, so a resumed run draws what the original did.
            torch.manual_seed(step_seed(self.cfg.train.seed, int(batch["step"])))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        total, _ = self._loss_sum(batch)
        part = total / batch["normaliser"]
        self._step_loss = part.detach() if self._step_loss is None else self._step_loss + part.detach()
        # Lightning divides by the accumulation and DDP/FSDP average over ranks; the sum over all
        # micro-batches and ranks of total/normaliser is the global-batch loss we want the gradient of.
        return part * (self.cfg.train.gradient_accumulation_steps * self.world)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        loss = self.trainer.strategy.reduce(self._step_loss, reduce_op="sum")
        self._step_loss = None
        self.history.append(float(loss))
        self.log("train/loss", float(loss), on_step=True, on_epoch=False, sync_dist=False)

    def configure_gradient_clipping(self, optimizer: Any, *_: Any, **__: Any) -> None:
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        wrapped = self.trainer.strategy.model
        if hasattr(wrapped, "clip_grad_norm_"):  # FSDP: the norm over every rank's shard
            norm = wrapped.clip_grad_norm_(max_norm)
        else:
            params = [p for p in self.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.grad_norm = float(norm)
        self.log("train/grad_norm", self.grad_norm, on_step=True, on_epoch=False, sync_dist=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        total, count = self._loss_sum(batch)
        self._val_sum = total.detach() if self._val_sum is None else self._val_sum + total.detach()
        self._val_tokens = count if self._val_tokens is None else self._val_tokens + count

    def on_validation_epoch_end(self) -> None:
        if self._val_sum is None:
            return
        total = self.trainer.strategy.reduce(self._val_sum.float(), reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_tokens.float(), reduce_op="sum")
        self._val_sum = self._val_tokens = None
        loss = float(total / count.clamp_min(1))
        self.val_history.append({"step": int(self.trainer.global_step), "loss": loss})
        self.log("val_loss", loss, on_step=False, on_epoch=True, sync_dist=False)

    # -- optimizer -----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        train = self.cfg.train
        groups = decay_groups(self.named_parameters(), train.weight_decay)
        optimizer = torch.optim.AdamW(
            groups, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon,
            fused=self.device.type == "cuda",
        )  # fmt: skip
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_lr_factor, train=train))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.cfg.lora.enabled and "state_dict" in checkpoint:
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if k in self.trainable
            }
        checkpoint[CHECKPOINT_META_KEY] = self.checkpoint_meta()

    def checkpoint_meta(self) -> dict[str, Any]:
        cfg = self.cfg
        base = self.model.get_base_model() if cfg.lora.enabled else self.model
        meta = {
            "format": 1,
            "mode": "lora" if cfg.lora.enabled else "full",
            "base_model": cfg.model.name_or_path,
            "base_dtype": cfg.model.dtype,
            "model_config": base.config.to_dict(),
            "module_prefix": "model.",
            "fingerprint": self.fingerprint,
            "losses": list(self.history),
            "validation": list(self.val_history),
        }
        if cfg.lora.enabled:
            peft_cfg = self.model.peft_config[ADAPTER]
            meta["adapter_name"] = ADAPTER
            meta["peft_config"] = _jsonable(peft_cfg.to_dict())
        return meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if state is not None:  # FSDP loads weights itself and pops them before this hook
            missing = sorted(self.trainable - set(state))
            if missing:
                raise TrnftError(
                    f"checkpoint lacks trained weight {missing[0]} (and {len(missing) - 1} more)"
                )
        meta = checkpoint.get(CHECKPOINT_META_KEY, {})
        self.history = list(meta.get("losses", []))
        self.val_history = list(meta.get("validation", []))


def _lr_factor(step: int, *, train: Any) -> float:
    return lr_at(step, train) / train.learning_rate


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
# Callbacks: atomic checkpoints and progress lines


class AtomicCheckpoints(pl.Callback):
    """``checkpoint-<step>`` every ``train.save_steps`` steps and at the end, staged then renamed."""

    def __init__(self, ctx: StageContext, tokenizer_dir: Path) -> None:
        self.ctx = ctx
        self.tokenizer_dir = tokenizer_dir
        self.saved: list[str] = []
        self.last_step = -1

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.last_step = trainer.global_step  # the resumed step is saved already

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *_: Any) -> None:
        step = trainer.global_step
        if step == self.last_step:
            return  # inside an accumulation window
        self.last_step = step
        every = self.ctx.cfg.train.save_steps
        if step % every == 0 or step == self.ctx.cfg.train.max_steps:
            self.save(trainer, pl_module, step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        step = trainer.global_step
        if (
            step > 0
            and f"checkpoint-{step}" not in self.saved
            and not (self.ctx.out_dir / f"checkpoint-{step}").exists()
        ):
            self.save(trainer, pl_module, step)  # stopped early: keep what was trained

    def save(self, trainer: Any, pl_module: Any, step: int) -> None:
        train_dir = self.ctx.out_dir
        main = trainer.is_global_zero
        staged = Path(trainer.strategy.broadcast(str(checkpoints.staging_dir(train_dir, step))))
        if main:
            staged.mkdir(parents=True)
        trainer.strategy.barrier("trnft-save-start")
        trainer.save_checkpoint(staged / checkpoints.LIGHTNING_CKPT)
        trainer.strategy.barrier("trnft-save-written")
        if main:
            state_dir = staged / checkpoints.TRNFT_STATE
            state_dir.mkdir()
            state = {
                "step": step,
                "fingerprint": self.ctx.fingerprint,
                "losses": pl_module.history,
                "validation": pl_module.val_history,
                "data_position": {"step": step, "rule": "optimizer step s trains on batch_indices(s)"},
            }
            (state_dir / "state.json").write_text(json.dumps(state, indent=1))
            copy_present(TOKENIZER_FILES, [self.tokenizer_dir], staged)
            checkpoints.write_done(staged)
            checkpoints.fault_point("save", step)
            checkpoints.commit(train_dir, staged, step)
            checkpoints.prune(train_dir, self.ctx.cfg.train.keep_checkpoints, self.ctx.log)
            self.ctx.log(f"train: saved checkpoint-{step}")
        self.saved.append(f"checkpoint-{step}")
        trainer.strategy.barrier("trnft-save-done")


class StepLines(pl.Callback):
    """The Neuron path's progress line every ``train.logging_steps`` steps; tokens/s; progress file."""

    def __init__(self, ctx: StageContext, start: int) -> None:
        self.ctx = ctx
        self.start = start
        self.tokens = 0
        self.seconds = 0.0
        self.window_tokens = 0
        self._t0 = None
        self.last_step = start

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        self.window_tokens += int(batch["tokens"])

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *_: Any) -> None:
        step = trainer.global_step
        if step == self.last_step:
            return
        self.last_step = step
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        tokens = int(trainer.strategy.reduce(_as_tensor(self.window_tokens, pl_module), reduce_op="sum"))
        self._t0, self.window_tokens = None, 0
        if step > self.start + 1:  # the first step includes start-up (allocations, kernels)
            self.tokens += tokens
            self.seconds += elapsed
        cfg = self.ctx.cfg
        if trainer.is_global_zero:
            if step % cfg.train.logging_steps == 0 or step in (self.start + 1, cfg.train.max_steps):
                rate = self.tokens / self.seconds if self.seconds else 0.0
                lr = trainer.optimizers[0].param_groups[0]["lr"]
                loss = pl_module.history[-1] if pl_module.history else float("nan")
                self.ctx.log(
                    f"train: step {step}/{cfg.train.max_steps} loss {loss:.4f} lr {lr:.2e} "
                    f"grad_norm {pl_module.grad_norm:.3f} tokens/s {rate:,.0f}"
                )
            self.ctx.rundir.write_progress(
                "train", {"summary": f"step {step} of {cfg.train.max_steps}", "step": step}
            )


def _as_tensor(value: int, module: Any) -> Any:
    return torch.tensor(float(value), device=module.device)


# --------------------------------------------------------------------------------------------------
# The stage


def check(cfg: RunConfig, tokenized: TokenizeOutput, world: int) -> Any:
    """Refuse what cannot work before any weights load: batch, targets, vocabulary, validation split."""
    from transformers import AutoConfig, AutoModelForCausalLM

    global_batch(cfg.train, world)
    try:
        config = AutoConfig.from_pretrained(
            cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception as exc:
        raise TrnftError(
            f"model.name_or_path: cannot load the model config of {cfg.model.name_or_path!r} ({exc})"
        ) from None
    if tokenized.info["vocab_size"] > config.vocab_size:
        raise TrnftError(
            f"model.name_or_path: the tokenizer has {tokenized.info['vocab_size']} tokens but the model's vocabulary "
            f"is {config.vocab_size}; retokenize with a pad token inside the vocabulary (dataset.pad_token)"
        )
    with torch.device("meta"):  # structure only: target names and decoder-layer classes, no weights
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.lora.enabled:
        check_targets(skeleton, cfg.lora.target_modules)
    if cfg.train.eval_steps and not tokenized.has_split("validation"):
        raise ConfigError(
            "train.eval_steps: validation is on but the tokenize stage wrote no validation split; "
            "set dataset.validation_ratio > 0 (and rerun tokenize) or train.eval_steps=0"
        )
    if len(tokenized.split("train")) == 0:
        raise TrnftError("tokenize produced no training sequences; check the dataset and templates")
    return skeleton


def wrap_policy(layers: set[type], *, lora: bool) -> Callable[..., bool]:
    """FSDP auto-wrap: one unit per decoder layer and, with LoRA, one per LoRA A/B leaf.

    Separate units keep frozen and trainable weights out of one flat parameter (each unit is sharded,
    gathered and, for the LoRA ones, reduced on its own).
    """
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    def trainable_leaf(module: Any) -> bool:
        weight = getattr(module, "weight", None)
        return lora and not list(module.children()) and weight is not None and weight.requires_grad

    return functools.partial(
        _or_policy,
        policies=[
            functools.partial(lambda_auto_wrap_policy, lambda_fn=trainable_leaf),
            functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers),
        ],
    )


def _strategy(cfg: RunConfig, where: Placement, skeleton: Any) -> Any:
    if where.strategy == "single":
        return "auto"
    if where.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo" if where.accelerator == "cpu" else "nccl")
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    layers = decoder_layer_classes(skeleton)
    policy = wrap_policy(layers, lora=cfg.lora.enabled)
    bf16 = cfg.train.bf16
    return FSDPStrategy(
        auto_wrap_policy=policy,
        activation_checkpointing_policy=layers if cfg.gpu.activation_checkpointing else None,
        sharding_strategy=cfg.gpu.sharding_strategy,
        cpu_offload=cfg.gpu.cpu_offload,
        mixed_precision=MixedPrecision(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.bfloat16
        )
        if bf16
        else None,
        # LoRA: the full state dict is filtered to the adapter before it is written (on_save_checkpoint).
        state_dict_type="full" if cfg.lora.enabled else "sharded",
        use_orig_params=True,
        limit_all_gathers=True,
    )


def _loggers(cfg: RunConfig, train_dir: Path, log: Callable[[str], None]) -> list[Any]:
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers: list[Any] = [TensorBoardLogger(save_dir=str(train_dir), name="tensorboard", version="")]
    if cfg.gpu.wandb:
        try:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(project="trnft", name=cfg.run.name, save_dir=str(train_dir)))
        except Exception as exc:  # W&B is optional; the run goes on with TensorBoard
            log(f"warning: gpu.wandb is on but W&B could not start ({exc}); logging to TensorBoard only")
    return loggers


def _quiet_lightning() -> None:
    """Keep Lightning's banner lines and known-harmless warnings out of the stage log."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (
        r".*defined a `validation_step` but have no `val_dataloader`.*",
        r".*resuming from a checkpoint that ended before the epoch ended.*",
        r".*does not have many workers which may be a bottleneck.*",
        r".*`training_step` returned `None`.*",
    ):
        warnings.filterwarnings("ignore", message=message)


def _body(ctx: StageContext) -> StageOutcome:
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor

    _quiet_lightning()
    cfg, log = ctx.cfg, ctx.log
    where = placement(cfg)
    tokenized = TokenizeOutput(ctx.upstream_dir("tokenize"))
    skeleton = check(cfg, tokenized, where.world)
    attn = attention_implementation(cfg, where.accelerator)
    train_dir = ctx.out_dir
    if ctx.is_main:
        resume = checkpoints.resume_point(train_dir, ctx.fingerprint, log)
    else:
        newest = checkpoints.newest_complete(train_dir)
        resume = newest.path if newest else None
    start = json.loads((resume / checkpoints.TRNFT_STATE / "state.json").read_text())["step"] if resume else 0

    module = CausalLMModule(cfg, attn, where.world, ctx.fingerprint)
    saver = AtomicCheckpoints(ctx, tokenized.tokenizer_dir)
    lines = StepLines(ctx, start)
    callbacks: list[Any] = [LearningRateMonitor(logging_interval="step"), saver, lines]
    accumulation = cfg.train.gradient_accumulation_steps
    validate = cfg.train.eval_steps > 0
    if validate and cfg.train.early_stopping_patience:
        callbacks.append(
            EarlyStopping(monitor="val_loss", mode="min", patience=cfg.train.early_stopping_patience,
                          check_on_train_epoch_end=False)
        )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="gpu" if where.accelerator == "cuda" else "cpu",
        devices=where.devices,
        num_nodes=where.num_nodes,
        strategy=_strategy(cfg, where, skeleton),
        precision="bf16-mixed" if cfg.train.bf16 else "32-true",
        max_steps=cfg.train.max_steps,
        accumulate_grad_batches=accumulation,
        logger=_loggers(cfg, train_dir, log),
        callbacks=callbacks,
        log_every_n_steps=cfg.train.logging_steps,
        val_check_interval=cfg.train.eval_steps * accumulation if validate else 1.0,
        check_val_every_n_epoch=None if validate else 1,
        limit_val_batches=cfg.train.eval_batches if validate else 0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=str(train_dir),
    )
    rank, world = trainer.global_rank, trainer.world_size
    from torch.utils.data import DataLoader

    train_loader = DataLoader(StepBatches(tokenized, cfg, start, rank, world), batch_size=None, shuffle=False)
    val_loader = (
        DataLoader(ValidationBatches(tokenized, cfg, rank, world), batch_size=None, shuffle=False)
        if validate
        else None
    )
    if ctx.is_main:
        kind = "LoRA" if cfg.lora.enabled else "full fine-tuning"
        log(
            f"train: Lightning {where.strategy} on {where.world} {where.accelerator} process(es), {kind}, "
            f"attention {attn}, global batch {global_batch(cfg.train, world)}"
            + (f", resuming {resume.name} at step {start}" if resume else "")
        )
    t0 = time.perf_counter()
    trainer.fit(
        module,
        train_dataloaders=train_loader,
        val_dataloaders=val_loader,
        ckpt_path=str(resume / checkpoints.LIGHTNING_CKPT) if resume else None,
    )
    wall = time.perf_counter() - t0
    final = checkpoints.newest_complete(train_dir)
    stopped_early = trainer.global_step < cfg.train.max_steps
    if final is None or final.step != trainer.global_step:
        raise TrnftError(
            f"train: ended at step {trainer.global_step} without checkpoint-{trainer.global_step}"
        )
    losses = module.history
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    figures = {
        "backend": f"lightning-{where.strategy}-{where.accelerator}",
        "attention": attn,
        "steps_this_run": trainer.global_step - start,
        "resumed_from": resume.name if resume else None,
        "start_step": start,
        "end_step": trainer.global_step,
        "stopped_early": stopped_early,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "validation": module.val_history,
        "tokens_per_second": round(lines.tokens / lines.seconds, 1) if lines.seconds else None,
        "wall_s": round(wall, 2),
        "trainable_parameters": trainable,
        "checkpoints_saved": saver.saved,
        "final_checkpoint": final.path.name,
    }
    layout = {
        "strategy": where.strategy,
        "accelerator": where.accelerator,
        "world": world,
        "global_batch": global_batch(cfg.train, world),
    }
    summary = f"{trainer.global_step} steps"
    if losses:
        summary += f", loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    if stopped_early:
        summary += f" (early stop, patience {cfg.train.early_stopping_patience})"
    summary += f", {final.path.name}"
    return StageOutcome(summary=summary, figures=figures, layout=layout)
