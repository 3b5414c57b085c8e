"""Trainium backend: optimum-neuron 0.4.5's own ``NeuronTrainer`` on trnft's data, schedule and checkpoints.

Every Neuron SDK import stays inside these functions (optimum-neuron's training modules import
neuronx_distributed at import time). What trnft adds to optimum-neuron's trainer (:class:`_TrnftNeuronTrainer`):

- **batch order**: each data-parallel rank reads exactly its slice of trnft's global batch of every step
  (:func:`trnft.common.data.batch_indices`), through a ``DistributedSampler`` subclass that the
  accelerator keeps as it is (it only replaces samplers that are not distributed ones);
- **loss**: token cross-entropy summed over the micro-batch and divided by the supervised tokens of the
  *global* batch times the data-parallel size, so the averaged gradient is the gradient of trnft's loss
  (sum over the global batch / its supervised tokens), as on the CPU and GPU paths;
- **schedule and decay**: trnft's warmup + cosine (:func:`trnft.common.optim.lr_at`) and decay rule;
- **checkpoints**: optimum-neuron writes each checkpoint into ``checkpoint-<step>.staging-trn/``; trnft adds
  ``trnft_state/`` (every tensor/pipeline rank's optimizer moments, which optimum-neuron 0.4.5 does not save
  under model parallelism, and ``state.json`` written last) and renames the folder into place;
- **resume**: a restarted run loads each rank's own adapter (or model) shard as saved (fused, sharded,
  exactly the tensors optimum-neuron wrote, no consolidation), the optimizer moments, continues at the
  saved step with the scheduler at that step and the data stream at that step's batch.
  What cannot be restored is named in the log and the manifest (``not_restored``): the XLA RNG state
  (LoRA dropout masks after a resume differ from an uninterrupted run).

optimum-neuron 0.4.5 facts this relies on are pinned in ``tests/neuron/test_optimum_neuron_contract.py``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..common import stop
from ..common.config.run_config import RunConfig
from ..common.errors import ConfigError, TrnftError
from ..common.pipeline import checkpoints
from ..common.pipeline.stages import StageContext, StageOutcome
from ..common.tokenize import TokenizeFigures
from ..common.training.data import (
    TokenizedSplit,
    TokenizeOutput,
    batch_indices,
    segment_allowed,
)
from ..common.training.optim import global_batch
from ..common.training.policy import Cadence, TrainFigures

ADAPTER = "default"
# A fixed staging name: every rank of every node must agree on it without talking to each other.
STAGING_SUFFIX = f"{checkpoints.STAGING}trn"
NOT_RESTORED = ["xla_rng_state"]
# NxD's NKI flash-attention kernel refuses other sequence lengths.
FLASH_SEQUENCE_MULTIPLE = 2048


# --------------------------------------------------------------------------------------------------
# Settings: every key either reaches optimum-neuron or is refused here with one line


def check_settings(cfg: RunConfig) -> None:
    """Refuse settings the Trainium path cannot honour (one line each, before anything runs)."""
    t, n, d = cfg.train, cfg.neuron, cfg.dataset
    from ..common.cluster.instances import instance
    from ..common.training.model_check import base_model_config
    from . import fused_groups, memory

    config = base_model_config(cfg)
    if cfg.lora.enabled:
        from .parallel_layout import model_layout

        fused_groups.check(cfg.lora.target_modules, model_layout(cfg, config))
        fused_groups.check_frozen_fused_gqa(model_layout(cfg, config), lora=True)
    if t.activation_checkpointing == "selective":
        raise ConfigError(
            "train.activation_checkpointing: selective is the FSDP2 trainer's (gpu, neuron-native); "
            "optimum-neuron recomputes whole layers, so use full or off for neuron.backend=trainium"
        )
    memory.check(cfg, config, instance(cfg.cluster.instance_type))
    if t.on_recompile == "fail":
        raise ConfigError(
            "train.on_recompile: optimum-neuron does not report graph compilations to trnft, so 'fail' cannot be "
            "honoured on neuron.backend=trainium; use warn or ignore (the compile stage fills the cache)"
        )
    if n.attention == "flash":
        if d.packing:
            raise ConfigError(
                "dataset.packing: NxD's flash-attention kernel applies a plain causal mask, so packed samples "
                "would attend to each other; set dataset.packing=false (padded rows) or neuron.attention=eager"
            )
        if d.max_seq_length % FLASH_SEQUENCE_MULTIPLE:
            raise ConfigError(
                f"dataset.max_seq_length: NxD's flash-attention kernel needs a multiple of "
                f"{FLASH_SEQUENCE_MULTIPLE}, got {d.max_seq_length}; change it or set neuron.attention=eager"
            )


def training_arguments(cfg: RunConfig, output_dir: Path, *, logging_steps: int | None = None) -> Any:
    """NeuronTrainingArguments carrying every trnft setting that optimum-neuron has a place for.

    The run's :class:`~trnft.common.training.policy.Cadence` as the HF trainer's flow applies it: a save
    every ``save_steps`` and at the last step, a loss logged every ``logging_steps`` (averaged over the
    steps since the last one; HF's flow does not add the first and last step as the other trainers' log
    lines do). ``train.eval_steps`` and early stopping are refused on this platform (:mod:`.backend`).
    """
    from optimum.neuron import NeuronTrainingArguments

    t, n = cfg.train, cfg.neuron
    cadence = Cadence.of(t)
    return NeuronTrainingArguments(
        output_dir=str(output_dir),
        max_steps=cadence.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        warmup_steps=t.warmup_steps,
        bf16=t.bf16,
        # bf16 as autocast, not optimum-neuron's FULL_BF16 (which, without ZeRO-1, casts the trained weights
        # and so the Adam moments to bf16): trained weights, their gradients (accumulated over micro-batches)
        # and the optimizer state stay fp32, matmuls run in bf16 -- what the other platforms keep.
        use_autocast=t.bf16,
        seed=t.seed,
        # optimum-neuron enables it on the model (torch_xla's checkpoint) when pipeline parallelism is off.
        gradient_checkpointing=t.activation_checkpointing in ("full", "auto"),  # auto is full here
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps",
        save_steps=cadence.save_steps,
        save_total_limit=None,  # trnft prunes (checkpoints.prune keeps train.keep_checkpoints complete ones)
        logging_steps=logging_steps or cadence.logging_steps,
        report_to=["tensorboard"],
        logging_dir=str(output_dir / "tensorboard"),
        tensor_parallel_size=cfg.parallel.tp,
        pipeline_parallel_size=cfg.parallel.pp,
        kv_size_multiplier=n.kv_size_multiplier,
        fuse_qkv=n.fuse_qkv,
        use_xser=n.checkpoint_format == "xser",
        # The packed-sample mask of neuron.attention=eager is an input; only the flash kernel masks by itself.
        recompute_causal_mask=n.attention == "flash",
        # trnft saves the optimizer moments per tensor/pipeline rank itself; ZeRO-1 would shard them over DP.
        zero_1=False,
        # ... so optimum-neuron must not save them too (full fine-tuning at tp > 1 wrote them twice).
        save_only_model=True,
        dataloader_drop_last=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        # Never upload compiled graphs to the Hugging Face Hub cache from a training job.
        skip_cache_push=True,
    )


def attn_implementation(cfg: RunConfig) -> str:
    """The attention optimum-neuron's Trainium examples use (NKI flash attention), or eager for packing."""
    return "flash_attention_2" if cfg.neuron.attention == "flash" else "eager"


# --------------------------------------------------------------------------------------------------
# Data: trnft's batch order, split over data-parallel ranks


def rank_sequence_order(
    num_sequences: int,
    *,
    seed: int,
    micro_batch: int,
    accumulation: int,
    dp_size: int,
    dp_rank: int,
    start_step: int,
    steps: int,
) -> np.ndarray:
    """The sequence indices data-parallel rank ``dp_rank`` reads, micro-batch after micro-batch.

    Optimizer step ``s`` trains on ``batch_indices(s)``; its micro-batch ``m`` is the slice
    ``[m * micro_batch * dp, (m + 1) * micro_batch * dp)`` and rank ``r`` takes the ``r``-th
    ``micro_batch`` of it: the same split the CPU-XLA trainer shards over its data-parallel devices.
    """
    global_batch = micro_batch * accumulation * dp_size
    per_step = micro_batch * dp_size
    out = []
    for step in range(start_step, start_step + steps):
        idx = batch_indices(step, global_batch, num_sequences, seed)
        for m in range(accumulation):
            lo = m * per_step + dp_rank * micro_batch
            out.append(idx[lo : lo + micro_batch])
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def global_supervised_tokens(split: TokenizedSplit, cfg: RunConfig, dp_size: int, step: int) -> int:
    """Supervised (loss-bearing) tokens of optimizer step ``step``'s global batch."""
    size = global_batch(cfg.train, dp_size)
    return split.supervised_tokens(batch_indices(step, size, len(split), cfg.train.seed))


class PackedSequences:
    """Rows of a tokenized split as model inputs, in the order of :func:`rank_sequence_order`.

    With ``neuron.attention=eager`` each row carries the additive 4-D mask that keeps packed samples
    apart (optimum-neuron passes a 4-D ``attention_mask`` through unchanged when it does not recompute the
    causal mask); with flash attention rows hold one padded sample each (see :func:`check_settings`).
    """

    def __init__(self, split: TokenizedSplit, order: np.ndarray, *, segment_mask: bool, dtype: Any) -> None:
        self.split = split
        self.order = order
        self.segment_mask = segment_mask
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        rows = self.split.rows([int(self.order[i])])  # int64 arrays
        item = {name: torch.from_numpy(rows[name][0]) for name in ("input_ids", "labels", "position_ids")}
        if self.segment_mask:
            allowed = segment_allowed(torch.from_numpy(rows["segment_ids"]))[0]
            blocked = torch.full(allowed.shape, torch.finfo(self.dtype).min, dtype=self.dtype)
            item["attention_mask"] = torch.where(allowed, torch.zeros((), dtype=self.dtype), blocked)
        return item


def ordered_sampler(order_length: int) -> Any:
    """A sampler the accelerator leaves alone (it is a DistributedSampler) that reads 0, 1, 2, ... in order."""
    from torch.utils.data.distributed import DistributedSampler

    class _InOrder(DistributedSampler):
        def __init__(self) -> None:  # no process group needed: the order is already this rank's own
            self.num_samples = order_length
            self.total_size = order_length
            self.epoch = 0
            self.shuffle = False

        def __iter__(self) -> Iterator[int]:
            return iter(range(order_length))

        def __len__(self) -> int:
            return order_length

    return _InOrder()


# --------------------------------------------------------------------------------------------------
# Model, resume state


@dataclass(frozen=True)
class ResumeState:
    """What a restarted run continues from."""

    checkpoint: Path
    step: int


def read_resume_state(checkpoint: Path | None) -> ResumeState | None:
    if checkpoint is None:
        return None
    state = json.loads((checkpoint / checkpoints.TRNFT_STATE / "state.json").read_text())
    return ResumeState(checkpoint, int(state["step"]))


def _rank_shard_tensors(tag_dir: Path, tp: int, pp: int) -> dict[str, Any]:
    """This rank's tensors exactly as optimum-neuron saved them (fused and TP-sharded), as torch tensors."""
    from .nxd_format import open_shard_set
    from .xla_trainer import to_torch

    shard = open_shard_set(tag_dir).file(tp, pp)
    return {name: to_torch(shard.lazy(name).read()) for name in shard.names()}


def load_rank_weights(model: Any, checkpoint: Path, *, lora: bool, tp_rank: int, pp_rank: int) -> int:
    """Load this rank's saved shard into the (not yet prepared) model; returns the tensors loaded.

    LoRA: the adapter shard goes through PEFT's own state-dict loader, then optimum-neuron's
    ``get_peft_model_state_dict`` must give back exactly the saved tensors (names, shapes, values).
    Full fine-tuning: ``load_state_dict(strict=True)`` of the model shard.
    """
    import torch

    if lora:
        from optimum.neuron.peft.utils.save_and_load import get_peft_model_state_dict
        from peft import set_peft_model_state_dict

        saved = _rank_shard_tensors(checkpoint / f"adapter_{ADAPTER}" / "adapter_shards", tp_rank, pp_rank)
        result = set_peft_model_state_dict(model, saved, adapter_name=ADAPTER)
        if getattr(result, "unexpected_keys", None):
            raise TrnftError(
                f"{checkpoint}: adapter tensors the model does not have: {result.unexpected_keys[:3]}"  # type: ignore[attr-defined]
            )
        back = {
            k: v.detach().cpu() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()
        }
        if set(back) != set(saved):
            missing = sorted(set(back) - set(saved))[:3]
            raise TrnftError(f"{checkpoint}: adapter shard lacks {missing}; it does not belong to this model")
        for name, tensor in saved.items():
            if back[name].shape != tensor.shape or not torch.equal(back[name].to(tensor.dtype), tensor):
                raise TrnftError(f"{checkpoint}: {name} did not load exactly (shape {tuple(tensor.shape)})")
        return len(saved)
    saved = _rank_shard_tensors(checkpoint / "shards", tp_rank, pp_rank)
    model.load_state_dict(saved, strict=True)
    return len(saved)


def build_model(cfg: RunConfig, args: Any) -> Any:
    """optimum-neuron's training model, with LoRA when enabled. Everything drawn while building it (LoRA's
    initial A matrices) comes from ``train.seed``, the same on every rank and in every run."""
    import torch
    import torch_xla.core.xla_model as xm
    from optimum.neuron.models.training import NeuronModelForCausalLM
    from transformers import set_seed

    set_seed(cfg.train.seed)
    xm.set_rng_state(cfg.train.seed)  # the device generator too (set_seed does not reach it)
    # LoRA: the frozen base in model.dtype (PEFT makes the adapters fp32 over a bf16 base); full
    # fine-tuning: the trained weights are fp32 masters, as on the other platforms.
    dtype = getattr(torch, cfg.model.dtype) if cfg.lora.enabled else torch.float32
    model = NeuronModelForCausalLM.from_pretrained(
        cfg.model.name_or_path,
        args.trn_config,
        torch_dtype=dtype,
        attn_implementation=attn_implementation(cfg),
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if not cfg.lora.enabled:
        return model
    from optimum.neuron.peft import get_peft_model

    from ..common.training.lora import peft_config

    peft_model = get_peft_model(model, peft_config(cfg, cfg.lora.target_modules))
    _seed_lora_a(peft_model, cfg.train.seed, _fused_modules(cfg))
    flag_sequence_sharded_lora_factors(peft_model)
    return peft_model


def sequence_sharded_lora_factors(model: Any) -> list[tuple[str, Any]]:
    """(name, parameter) of every LoRA factor that is replicated over the tensor-parallel group but, under
    sequence parallelism, sees only this rank's slice of the sequence: the A of a column-parallel target
    (its input is the sequence-sharded activation; the base layer gathers it, A does not) and the B (and
    bias) of a row-parallel one (it runs after the base's reduce-scatter). Each rank computes its slice's
    part of the gradient; the sum over the group is the gradient of the model that is exported."""
    from neuronx_distributed.parallel_layers.layers import RowParallelLinear

    found = []
    for module_name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if (
            base is None
            or not hasattr(module, "lora_A")
            or not getattr(base, "sequence_parallel_enabled", False)
        ):
            continue
        factors = module.lora_B if isinstance(base, RowParallelLinear) else module.lora_A
        for adapter, factor in factors.items():
            for param_name, param in factor.named_parameters():
                if param.requires_grad and not getattr(param, "tensor_model_parallel", False):
                    found.append(
                        (
                            f"{module_name}.{'lora_B' if factors is module.lora_B else 'lora_A'}.{adapter}.{param_name}",
                            param,
                        )
                    )
    return found


def flag_sequence_sharded_lora_factors(model: Any) -> list[str]:
    """Mark :func:`sequence_sharded_lora_factors` ``sequence_parallel_enabled``, NxD's flag for a replicated
    parameter fed by sequence-sharded activations (its RMSNorm weights and a row-parallel bias carry it,
    NxD v2.26.0 ``modules/rms_norm.py``, ``parallel_layers/layers.py``), so optimum-neuron's optimizer
    sums their gradients over the tensor-parallel group before the step
    (``optimum/neuron/accelerate/optimizer.py`` ``allreduce_sequence_parallel_gradients``). Without it each
    tp rank trains its own copy and the exported adapter (rank 0's) is not the trained model. Returns the
    names flagged."""
    flagged = sequence_sharded_lora_factors(model)
    for _, param in flagged:
        param.sequence_parallel_enabled = True
    return [name for name, _ in flagged]


def _fused_modules(cfg: RunConfig) -> dict[str, tuple[str, ...]]:
    from transformers import AutoConfig

    from .parallel_layout import model_layout

    config = AutoConfig.from_pretrained(
        cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    return model_layout(cfg, config).fused_modules()


def _seed_lora_a(model: Any, seed: int, fused: dict[str, tuple[str, ...]]) -> None:
    """Draw every LoRA A from ``train.seed`` and its tensor name (PEFT's kaiming-uniform init, as the FSDP2
    trainer and the CPU-XLA rehearsal draw it; a fused layer's A by its first projection's name,
    :func:`~trnft.common.training.lora.lora_seed_name`, so the rehearsal's tied A is the same matrix).
    optimum-neuron's LoRA layers draw A from a generator that neither transformers' set_seed nor
    torch-xla's RNG state reaches: two seeds gave the same adapter.

    A tensor-parallel LoRA A (the A of a row-parallel layer, split along its input) is drawn whole and this
    rank keeps its contiguous part, so the adapter is the same at every tp.
    """
    import torch
    from neuronx_distributed.parallel_layers import parallel_state

    from ..common.training.lora import lora_init, lora_seed_name

    tp, rank = (
        parallel_state.get_tensor_model_parallel_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." not in name:
                continue
            split = tp > 1 and getattr(param, "tensor_model_parallel", False)
            if split and getattr(param, "partition_stride", 1) != 1:
                raise TrnftError(f"{name}: a strided tensor-parallel LoRA A is not supported")
            shape = list(param.shape)
            if split:
                shape[param.partition_dim] *= tp
            full = lora_init(lora_seed_name(name, fused), tuple(shape), seed)
            if split:
                full = torch.chunk(full, tp, dim=param.partition_dim)[rank]
            param.copy_(full.to(param.device, param.dtype))


# --------------------------------------------------------------------------------------------------
# The trainer


def trainer_class() -> type:
    """optimum-neuron's NeuronTrainer with trnft's batches, loss normalisation, schedule and checkpoints."""
    import torch
    import torch_xla.core.xla_model as xm
    from neuronx_distributed.parallel_layers import parallel_state
    from optimum.neuron import NeuronTrainer

    from ..common.training.optim import wants_decay
    from ..common.training.policy import lr_factor, refuse_non_finite

    class _TrnftNeuronTrainer(NeuronTrainer):
        def __init__(self, *args: Any, trnft: _RunPlan, **kwargs: Any) -> None:
            self.trnft = trnft
            super().__init__(*args, **kwargs)

        # Data ------------------------------------------------------------------------------------
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return ordered_sampler(len(self.train_dataset))

        def get_batch_samples(self, epoch_iterator, num_batches, device=None, prefetch_size=None):
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device, prefetch_size)
            plan = self.trnft
            tokens = global_supervised_tokens(plan.split, plan.cfg, plan.dp_size, self.state.global_step)
            # Gradients are averaged over data-parallel ranks, so each rank divides by tokens / dp.
            return batches, max(tokens, 1) / plan.dp_size

        # Optimizer and schedule -------------------------------------------------------------------
        def get_decay_parameter_names(self, model: Any) -> list[str]:
            return [n for n, p in model.named_parameters() if wants_decay(n, p.ndim)]

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                train, start = self.trnft.cfg.train, self.trnft.start_step
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer if optimizer is not None else self.optimizer,
                    lambda s: lr_factor(start + s, train),
                )
            return self.lr_scheduler

        def setup_training(self, *args: Any, **kwargs: Any) -> None:
            super().setup_training(*args, **kwargs)
            resume = self.trnft.resume
            if resume is None:
                return
            self.state.global_step = resume.step
            self.global_step_last_logged = resume.step
            path = _optimizer_file(resume.checkpoint, _tp_pp())
            if path.is_file():
                self.optimizer.load_state_dict(torch.load(path, weights_only=True))
                self.trnft.restored.append("optimizer_moments")
            else:
                self.trnft.log(f"train: {path} is missing; optimizer moments start from zero")
            self.trnft.restored += ["step", "lr_schedule", "data_position", "weights"]

        # Numbers ----------------------------------------------------------------------------------
        def log(self, logs: dict[str, float], *args: Any) -> None:
            """Stop at the first logged non-finite loss or gradient norm (every rank logs the same reduced
            values, so every rank stops), before any checkpoint of that state is written."""
            refuse_non_finite(self.state.global_step, logs.get("loss"), logs.get("grad_norm"))
            super().log(logs, *args)

        def report_and_save_summary_metrics(self) -> None:
            """optimum-neuron writes training_summary_metrics.json into the train folder from every rank;
            rank 0 alone writes it (the other ranks' copies raced on one file)."""
            if xm.is_master_ordinal(local=False):
                super().report_and_save_summary_metrics()

        def maybe_save_checkpoint(self) -> None:
            """Refuse a non-finite step at every optimizer step, not only at logging steps.

            optimum-neuron calls this after every micro-batch. Once per finished optimizer step a step closure
            reads the step's global gradient norm (the same on every rank, so every rank stops) and this rank's
            running loss after the graph has run (no new graph is traced); it is added before the save
            closure this call may add, so a non-finite state is refused before it can be checkpointed.
            """
            step, plan = self.state.global_step, self.trnft
            if step > plan.checked_step:
                plan.checked_step = step
                xm.add_step_closure(_refuse_non_finite_step, (step, self.running_loss, self.grad_norm))
                checkpoints.fault_point("step", step)
                # A stop signal on any rank (over gloo, outside the device graph): every rank saves this
                # step and leaves the loop; train() then exits 128 + N.
                signum = stop.agreed_stop(group=plan.stop_group)
                if signum and step < plan.cfg.train.max_steps:
                    plan.stopped_by = signum
                    self.control.should_save = True
                    self.control.should_training_stop = True
            super().maybe_save_checkpoint()

        # Checkpoints ------------------------------------------------------------------------------
        def _save_checkpoint(self) -> None:
            from optimum.neuron.utils.misc import is_precompilation

            if is_precompilation():
                return
            plan, step = self.trnft, self.state.global_step
            staged = plan.train_dir / f"checkpoint-{step}{STAGING_SUFFIX}"
            if xm.is_master_ordinal(local=False):
                shutil.rmtree(staged, ignore_errors=True)
                staged.mkdir(parents=True)
            xm.rendezvous("trnft_checkpoint_staged")
            self.save_model(str(staged), _internal_call=True)
            if parallel_state.get_data_parallel_rank() == 0:
                target = _optimizer_file(staged, _tp_pp())
                target.parent.mkdir(parents=True, exist_ok=True)
                cpu_state = _to_cpu(self.optimizer.state_dict())
                torch.save(cpu_state, target)
            xm.rendezvous("trnft_checkpoint_written")
            if xm.is_master_ordinal(local=False):
                torch.save(self.lr_scheduler.state_dict(), staged / "scheduler.pt")
                self.state.save_to_json(str(staged / "trainer_state.json"))
                checkpoints.fault_point("save", step)
                state = {
                    "step": step,
                    "fingerprint": plan.fingerprint,
                    "backend": "trainium",
                    "layout": {"tp": plan.cfg.parallel.tp, "pp": plan.cfg.parallel.pp, "dp": plan.dp_size},
                    "data_position": {"step": step, "consumed_sequences": step * plan.global_batch},
                    "not_restored_on_resume": NOT_RESTORED,
                }
                (staged / checkpoints.TRNFT_STATE / "state.json").write_text(json.dumps(state, indent=1))
                checkpoints.commit(plan.train_dir, staged, step)
                checkpoints.prune(plan.train_dir, plan.cfg.train.keep_checkpoints, plan.log)
                plan.saved.append(f"checkpoint-{step}")
                plan.log(f"train: saved checkpoint-{step}")
            xm.rendezvous("trnft_checkpoint_committed")

    return _TrnftNeuronTrainer


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def agreed_resume_point(ctx: StageContext) -> Path | None:
    """The checkpoint every rank resumes from: rank 0 decides, after removing what an interrupted run (or
    ``--force``) left, and the other ranks receive its answer instead of looking for themselves while rank 0
    may still be deleting. The answer travels over a gloo group of the job's process group."""
    import torch.distributed as dist

    box: list[str | None] = [None]
    if ctx.is_main:
        found = checkpoints.resume_point(ctx.out_dir, ctx.fingerprint, ctx.log)
        box = [str(found) if found else None]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        group = dist.new_group(backend="gloo")
        dist.broadcast_object_list(box, src=0, group=group)
        dist.destroy_process_group(group)
    return Path(box[0]) if box[0] else None


def _gloo_world() -> Any:
    """A gloo group of every rank (collective: every rank calls it), or None in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.new_group(backend="gloo")
    return None


def _refuse_non_finite_step(step: int, running_loss: Any, grad_norm: Any) -> None:
    """The policy's refusal on device values of one optimizer step (a step closure: they are computed)."""
    from ..common.training.policy import refuse_non_finite

    loss = float(running_loss.detach().to("cpu").item()) if running_loss is not None else None
    norm = grad_norm.detach().to("cpu").item() if hasattr(grad_norm, "detach") else grad_norm
    refuse_non_finite(step, loss, norm)


def _tp_pp() -> tuple[int, int]:
    from neuronx_distributed.parallel_layers import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()


def _optimizer_file(checkpoint: Path, ranks: tuple[int, int]) -> Path:
    tp, pp = ranks
    return checkpoint / checkpoints.TRNFT_STATE / f"optimizer_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt"


def _to_cpu(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


@dataclass
class _RunPlan:
    """What the trainer subclass needs from trnft; lists are filled while it runs."""

    cfg: RunConfig
    split: TokenizedSplit
    train_dir: Path
    fingerprint: str
    dp_size: int
    start_step: int
    resume: ResumeState | None
    log: Callable[[str], None]
    saved: list[str]
    restored: list[str]
    checked_step: int = 0  # the last optimizer step whose loss and gradient norm were checked
    stop_group: Any = None  # a gloo group of every rank for the stop-signal agreement (None: one process)
    stopped_by: int = 0  # the stop signal that ended the run after saving, 0 when none did

    @property
    def global_batch(self) -> int:
        return global_batch(self.cfg.train, self.dp_size)


def _dataset(
    cfg: RunConfig, split: TokenizedSplit, dp_size: int, dp_rank: int, start: int, steps: int
) -> Any:
    import torch

    t = cfg.train
    order = rank_sequence_order(
        len(split),
        seed=t.seed,
        micro_batch=t.micro_batch_size,
        accumulation=t.gradient_accumulation_steps,
        dp_size=dp_size,
        dp_rank=dp_rank,
        start_step=start,
        steps=steps,
    )
    dtype = torch.bfloat16 if t.bf16 else torch.float32
    return PackedSequences(split, order, segment_mask=cfg.neuron.attention == "eager", dtype=dtype)


def train(ctx: StageContext) -> StageOutcome:
    """Train (or resume) under torchrun with optimum-neuron; every rank runs this."""
    cfg = ctx.cfg
    log = ctx.log if ctx.is_main else _quiet  # one copy of every line, not one per rank
    check_settings(cfg)
    from neuronx_distributed.parallel_layers import parallel_state

    tokenized = TokenizeOutput(ctx.upstream_dir("tokenize"))
    split = tokenized.split("train")
    args = training_arguments(cfg, ctx.out_dir)  # starts the process group and NxD's parallel state
    resume = read_resume_state(agreed_resume_point(ctx))
    start = resume.step if resume else 0
    dp_size, dp_rank = parallel_state.get_data_parallel_size(), parallel_state.get_data_parallel_rank()
    global_batch(cfg.train, dp_size)  # train.global_batch_size, when set, must match this layout
    plan = _RunPlan(cfg, split, ctx.out_dir, ctx.fingerprint, dp_size, start, resume, log, [], [])
    model = build_model(cfg, args)
    if resume is not None:
        tp_rank, pp_rank = _tp_pp()
        count = load_rank_weights(
            model, resume.checkpoint, lora=cfg.lora.enabled, tp_rank=tp_rank, pp_rank=pp_rank
        )
        log(f"train: resuming from {resume.checkpoint.name} at step {start} ({count} tensors of this rank)")
        log(
            f"train: not restored on resume: {', '.join(NOT_RESTORED)} (LoRA dropout masks differ from an uninterrupted run)"
        )
    dataset = _dataset(cfg, split, dp_size, dp_rank, start, cfg.train.max_steps - start)
    trainer = trainer_class()(model=model, args=args, train_dataset=dataset, trnft=plan)
    plan.stop_group = _gloo_world()
    previous = stop.install_cooperative_keeping()  # a stop signal ends the run after its step, saved
    try:
        trainer.train()  # returns None in every optimum-neuron 0.4.x release; figures come from the state
    finally:
        stop.restore(previous)
    if plan.stopped_by:
        step = trainer.state.global_step
        log(f"train: {stop.signal.Signals(plan.stopped_by).name} received; stopping after step {step} "
            f"with checkpoint-{step} saved")  # fmt: skip
        raise stop.Stopped(plan.stopped_by, f"checkpoint-{step} saved; the rerun resumes there")
    logged = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    final = checkpoints.newest_complete(ctx.out_dir)
    if ctx.is_main and (final is None or final.step != cfg.train.max_steps):
        raise TrnftError(
            f"train: ended at step {trainer.state.global_step} without checkpoint-{cfg.train.max_steps}"
        )
    losses = [loss for _, loss in logged]
    figures = TrainiumTrainFigures(
        steps_this_run=trainer.state.global_step - start,
        resumed_from=resume.checkpoint.name if resume else None,
        start_step=start,
        end_step=trainer.state.global_step,
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        losses=losses,
        loss_steps=[step for step, _ in logged],
        tokens_per_second=None,  # optimum-neuron's own rates are in training_summary_metrics.json
        checkpoints_saved=plan.saved,
        final_checkpoint=final.path.name if final else "",  # "" only on ranks that did not look
        restored_on_resume=sorted(set(plan.restored)),
        not_restored_on_resume=NOT_RESTORED if resume else [],
        non_pad_token_fraction=TokenizeFigures.of(ctx.upstream["tokenize"]).train.non_pad_fraction,
        optimum_neuron=effective_settings(args, trainer),
    )
    return StageOutcome(
        summary=figures.summary(),
        figures=figures,
        layout={
            "tp": cfg.parallel.tp,
            "pp": cfg.parallel.pp,
            "dp": dp_size,
            "global_batch": plan.global_batch,
        },
    )


@dataclass(frozen=True)
class OptimumNeuronSettings:
    """What optimum-neuron actually ran with, read back from its own objects."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    kv_size_multiplier: int | None
    fuse_qkv: bool
    use_xser: bool
    sequence_parallel_enabled: bool
    recompute_causal_mask: bool
    attn_implementation: str
    zero_1: bool
    save_steps: int
    logging_steps: int
    gradient_checkpointing: bool  # read back from the model: train.activation_checkpointing reached it
    mixed_precision: str  # optimum-neuron's mode: NO, AUTOCAST_BF16 (train.bf16) or FULL_BF16 (never chosen)
    trained_dtypes: list[str]  # dtypes of the trained parameters after training
    optimizer_state_dtypes: list[str]  # dtypes of the Adam moments after training
    save_only_model: bool  # optimum-neuron saves no optimizer state (trnft saves it once, per rank)


@dataclass(frozen=True)
class TrainiumTrainFigures(TrainFigures):
    """optimum-neuron's NeuronTrainer run. Its losses are what it logs: the mean loss since the previous
    logging step, at the steps in ``loss_steps`` (every step with ``train.logging_steps: 1``)."""

    KIND: ClassVar[str] = "train/trainium"

    loss_steps: list[int]
    restored_on_resume: list[str]
    not_restored_on_resume: list[str]
    # As the tokenize stage measured it: padded rows (flash attention) carry far fewer real tokens.
    non_pad_token_fraction: float
    optimum_neuron: OptimumNeuronSettings

    def summary(self) -> str:
        return super().summary().replace(" steps", " steps on Trainium", 1)


def effective_settings(args: Any, trainer: Any) -> OptimumNeuronSettings:
    """What optimum-neuron actually ran with, read back from its own objects (for the manifest): the
    trainer's model and optimizer after training, so the dtypes are the ones it trained in."""
    trn = args.trn_config
    trained = trainer.model
    base = trained.get_base_model() if hasattr(trained, "get_base_model") else trained
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    moments = {
        str(value.dtype).removeprefix("torch.")
        for state in optimizer.state.values()
        for key, value in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    }
    return OptimumNeuronSettings(
        tensor_parallel_size=trn.tensor_parallel_size,
        pipeline_parallel_size=trn.pipeline_parallel_size,
        data_parallel_size=trn.data_parallel_size,
        kv_size_multiplier=trn.kv_size_multiplier,
        fuse_qkv=trn.fuse_qkv,
        use_xser=trn.use_xser,
        sequence_parallel_enabled=trn.sequence_parallel_enabled,
        recompute_causal_mask=trn.recompute_causal_mask,
        attn_implementation=base.config._attn_implementation,
        zero_1=args.zero_1,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        gradient_checkpointing=bool(getattr(base, "is_gradient_checkpointing", False)),
        mixed_precision=trainer.accelerator.mixed_precision_config.mode.value,
        trained_dtypes=sorted(
            {str(p.dtype).removeprefix("torch.") for p in trained.parameters() if p.requires_grad}
        ),
        optimizer_state_dtypes=sorted(moments),
        save_only_model=args.save_only_model,
    )


def precompile(cfg: RunConfig, log: Callable[[str], None]) -> None:
    """Under neuron_parallel_compile: the graphs of the real run for ``train.compile_steps`` steps, nothing saved.

    The loss-logging graph runs at every ``logging_steps``; the trial run logs at its last step at the latest,
    so that graph is in the cache before training reaches its first logging step.
    """
    from neuronx_distributed.parallel_layers import parallel_state

    from ..common.pipeline.rundir import RunDir

    check_settings(cfg)
    steps = cfg.train.compile_steps
    tokenized = TokenizeOutput(RunDir(cfg.run.root).stage_dir("tokenize"))
    split = tokenized.split("train")
    scratch = Path(cfg.run.root) / ".trnft" / "precompile"
    args = training_arguments(cfg, scratch, logging_steps=min(cfg.train.logging_steps, steps))
    args.max_steps = steps
    dp_size, dp_rank = parallel_state.get_data_parallel_size(), parallel_state.get_data_parallel_rank()
    plan = _RunPlan(cfg, split, scratch, "precompile", dp_size, 0, None, log, [], [])
    dataset = _dataset(cfg, split, dp_size, dp_rank, 0, steps)
    trainer = trainer_class()(model=build_model(cfg, args), args=args, train_dataset=dataset, trnft=plan)
    trainer.train()
    logged = [e["step"] for e in trainer.state.log_history if "loss" in e]
    if not logged:
        raise TrnftError("precompile: the loss-logging graph was not traced; training would compile it later")
    log(f"precompile: traced {steps} steps, loss logged at step(s) {logged} (its graph is cached too)")
