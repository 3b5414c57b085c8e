"""Trainium backend: a thin adapter that drives optimum-neuron 0.4.x's trainer on trnft's tokenized data.

Every Neuron SDK import stays inside these functions (optimum-neuron's training modules import
neuronx_distributed at import time). What it does:

- ``NeuronModelForCausalLM`` (optimum-neuron's custom modeling: NxD tensor/pipeline parallel, fused
  gate_up and GQA qkv layers) with ``neuron.tp`` / ``neuron.pp``, bf16 when ``train.bf16``;
- LoRA through optimum-neuron's PEFT integration with the run's LoraConfig;
- ``NeuronTrainer`` over the packed sequences of the tokenize stage, in trnft's batch order
  (:func:`trnft.common.data.batch_indices`), with the same schedule and optimizer settings;
- checkpoints are optimum-neuron's own (the layout the consolidator reads), one every ``train.save_steps``;
- restart is resume: optimum-neuron 0.4.5 refuses ``resume_from_checkpoint``, so the newest complete
  checkpoint is consolidated and its adapter loaded with PEFT's state-dict loader before training, and
  the data order skips the steps already done.

Not verified on Trainium hardware in this repository (no device was available); the CPU-XLA backend
exercises the same data, LoRA layout and checkpoint format.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trnft.common import checkpoints
from trnft.common.config import RunConfig
from trnft.common.data import TokenizeOutput, batch_indices
from trnft.common.errors import TrnftError
from trnft.common.stages import StageContext, StageOutcome


def _preflight() -> None:
    from trnft.neuron.preflight import run as preflight

    problems = preflight()
    if problems:
        raise TrnftError(f"Neuron preflight: {problems[0]}")


def _training_arguments(cfg: RunConfig, output_dir: Path, max_steps: int) -> Any:
    from optimum.neuron import NeuronTrainingArguments

    t = cfg.train
    return NeuronTrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": t.min_lr},
        bf16=t.bf16,
        seed=t.seed,
        save_steps=t.save_steps,
        save_total_limit=t.keep_checkpoints,
        logging_steps=t.logging_steps,
        report_to=["tensorboard"],
        logging_dir=str(output_dir / "tensorboard"),
        tensor_parallel_size=cfg.neuron.tp,
        pipeline_parallel_size=cfg.neuron.pp,
        dataloader_drop_last=True,
        remove_unused_columns=False,
    )


class _OrderedSequences:
    """The packed training sequences in trnft's batch order, starting after ``start_step`` steps."""

    def __init__(
        self, tokenized: TokenizeOutput, global_batch: int, seed: int, start_step: int, steps: int
    ) -> None:
        import numpy as np

        self.split = tokenized.split("train")
        order = [
            batch_indices(s, global_batch, len(self.split), seed)
            for s in range(start_step, start_step + steps)
        ]
        self.order = np.concatenate(order) if order else np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        rows = self.split.rows([int(self.order[i])])
        return {k: torch.from_numpy(v[0]) for k, v in rows.items() if k != "segment_ids"}


def _model_and_adapter(cfg: RunConfig, args: Any, resume: Path | None) -> Any:
    import torch
    from optimum.neuron.models.training import NeuronModelForCausalLM

    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    model = NeuronModelForCausalLM.from_pretrained(cfg.model.name_or_path, args.trn_config, torch_dtype=dtype)
    if not cfg.lora.enabled:
        return model
    from optimum.neuron.peft import get_peft_model
    from peft import set_peft_model_state_dict

    from trnft.common.lora import peft_config

    model = get_peft_model(model, peft_config(cfg, cfg.lora.target_modules))
    if resume is not None:
        from trnft.neuron.consolidate import load_checkpoint_tensors
        from trnft.neuron.xla_trainer import to_torch

        adapter = {name: to_torch(a) for name, a in load_checkpoint_tensors(resume).items()}
        result = set_peft_model_state_dict(model, adapter)
        if result.unexpected_keys:
            raise TrnftError(f"{resume}: adapter keys the model does not have: {result.unexpected_keys[:3]}")
    return model


def train(ctx: StageContext) -> StageOutcome:
    """Train (or resume) on Trainium under torchrun; every rank runs this."""
    from optimum.neuron import NeuronTrainer

    from trnft.common.optim import global_batch

    _preflight()
    cfg = ctx.cfg
    tokenized = TokenizeOutput(ctx.upstream_dir("tokenize"))
    from trnft.common.checkpoints import resume_point

    if ctx.is_main:
        resume_path = resume_point(ctx.out_dir, ctx.fingerprint, ctx.log)
    else:
        newest = checkpoints.newest_complete(ctx.out_dir)
        resume_path = newest.path if newest else None
    done = json.loads((resume_path / "trainer_state.json").read_text())["global_step"] if resume_path else 0
    remaining = cfg.train.max_steps - done
    args = _training_arguments(cfg, ctx.out_dir, remaining)
    dataset = _OrderedSequences(
        tokenized, global_batch(cfg.train, _data_parallel(args)), cfg.train.seed, done, remaining
    )
    model = _model_and_adapter(cfg, args, resume_path)
    trainer = NeuronTrainer(model=model, args=args, train_dataset=dataset)
    result = trainer.train()
    final = checkpoints.newest_complete(ctx.out_dir)
    return StageOutcome(
        summary=f"{cfg.train.max_steps} steps on Trainium, final loss {result.training_loss:.3f}",
        figures={
            "backend": "trainium",
            "resumed_from": resume_path.name if resume_path else None,
            "final_checkpoint": final.path.name if final else None,
        },
        layout={"tp": cfg.neuron.tp, "pp": cfg.neuron.pp},
    )


def _data_parallel(args: Any) -> int:
    """Data-parallel ranks of the NxD layout (the same for precompilation and training)."""
    return int(getattr(args.trn_config, "data_parallel_size", 1) or 1)


def precompile(cfg: RunConfig, log: Callable[[str], None]) -> None:
    """Under neuron_parallel_compile: the same training for ``train.compile_steps`` steps, nothing saved."""
    from optimum.neuron import NeuronTrainer

    from trnft.common.optim import global_batch
    from trnft.common.rundir import RunDir

    tokenized = TokenizeOutput(RunDir(cfg.run.root).stage_dir("tokenize"))
    scratch = Path(cfg.run.root) / ".trnft" / "precompile"
    args = _training_arguments(cfg, scratch, cfg.train.compile_steps)
    dataset = _OrderedSequences(
        tokenized, global_batch(cfg.train, _data_parallel(args)), cfg.train.seed, 0, cfg.train.compile_steps
    )
    NeuronTrainer(model=_model_and_adapter(cfg, args, None), args=args, train_dataset=dataset).train()
    log(f"precompile: traced {cfg.train.compile_steps} steps")
