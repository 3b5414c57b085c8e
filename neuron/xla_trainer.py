"""The CPU-XLA training backend: the Trainium training step rehearsed on torch-xla's CPU device.

Same data, LoRA config, optimizer, schedule and checkpoint writer as on Trainium, with tensor and data
parallelism through torch-xla SPMD over ``neuron.cpu_devices`` virtual devices on a ``(data, model)`` mesh:
weights are annotated the way NxD shards them (column-parallel q/k/v/gate/up/lm_head on dim 0, row-parallel
o/down on dim 1, the embedding on the vocabulary, LoRA A/B per layer type) and each batch is split on
``data``. LoRA A of fused layers (gate/up, and q/k/v when optimum-neuron builds a GQA qkv layer) is one
shared matrix, as on Trainium, and checkpoints are written in optimum-neuron 0.4.x's sharded layout.

Static graphs: every step runs the same two graphs (one micro-batch forward/backward, one optimizer
update). Everything that changes per step (learning rate, bias corrections, the token count the loss is
normalised by) reaches the device as one small tensor, and the RNG is reseeded per step, so no graph is
compiled after the first step and a resumed run draws the same dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..common.config.run_config import LORA_DEFAULT_TARGETS, RunConfig
from ..common.errors import TrnftError
from ..common.io.hf_files import TOKENIZER_FILES, copy_present
from ..common.io.tensor_io import Array
from ..common.pipeline import checkpoints
from ..common.training.data import (
    TokenizeOutput,
    batch_indices,
    segment_attention_mask,
    step_seed,
    summed_token_loss,
)
from ..common.training.driver import FinishedStep
from ..common.training.lora import ADAPTER, apply_lora, seed_lora_a, tie_lora_a
from ..common.training.model_check import check_model_takes_the_data
from ..common.training.optim import global_batch, lr_at, wants_decay
from . import fused_groups, nxd_format
from .parallel_layout import (
    NeuronLayout,
    model_layout,
    parameter_metadata,
    parse_key,
    shard_state_dict,
    split_dim,
)

SUPPORTED_TARGETS = tuple(LORA_DEFAULT_TARGETS)  # the projections of a Llama-style decoder layer


def init_runtime(devices: int) -> None:
    """Start torch-xla on ``devices`` virtual CPU devices in SPMD mode (once per process).

    The device count is read when the runtime starts, so it must be set before anything touches an XLA
    device; a process that already started with another count is refused.
    """
    os.environ["PJRT_DEVICE"] = "CPU"
    os.environ["CPU_NUM_DEVICES"] = str(devices)
    import torch_xla.runtime as xr

    xr.use_spmd()
    actual = xr.global_runtime_device_count()
    if actual != devices:
        raise TrnftError(
            f"neuron.cpu_devices: torch-xla already runs with {actual} CPU devices in this process, not {devices}; "
            "start a new process (trnft train runs one per stage)"
        )


def training_targets(cfg: RunConfig, layout: NeuronLayout) -> list[str]:
    """LoRA targets as Trainium trains them; fused layers must be targeted whole (optimum-neuron's rule)."""
    targets = list(dict.fromkeys(cfg.lora.target_modules))
    unsupported = [t for t in targets if t not in SUPPORTED_TARGETS]
    if unsupported:
        raise TrnftError(
            f"lora.target_modules: {unsupported[0]!r} is not supported by the Trainium trainer; "
            f"use the projections {', '.join(SUPPORTED_TARGETS)}"
        )
    fused_groups.check(targets, layout)  # also refused before any stage runs (trnft.neuron.backend)
    return targets


# --------------------------------------------------------------------------------------------------
# Optimizer with a static graph


class StaticAdamW:
    """AdamW (decoupled weight decay, global-norm clipping) whose update is the same graph every step.

    State tensors are created up front and annotated with their parameter's sharding; per-step values
    come in one device tensor ``[lr, lr / bias_correction1, sqrt(bias_correction2), tokens]``.
    """

    def __init__(
        self, named: list[tuple[str, Any]], cfg: RunConfig, like: Callable[[Any, Any], None]
    ) -> None:
        import torch

        t = cfg.train
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.decay = [t.weight_decay if wants_decay(n, p.ndim) else 0.0 for n, p in named]
        self.beta1, self.beta2, self.eps, self.max_norm = (
            t.adam_beta1,
            t.adam_beta2,
            t.adam_epsilon,
            t.max_grad_norm,
        )
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            p.grad = torch.zeros_like(p)
            for tensor in (p.grad, m, v):
                like(tensor, p)

    def step(self, scalars: Any) -> Any:
        """Clip, update and zero the gradients; returns the pre-clip global gradient norm (lazy)."""
        import torch

        lr, step_size, bc2_sqrt = scalars[0], scalars[1], scalars[2]
        norms = torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in self.params])
        total = torch.linalg.vector_norm(norms)
        coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0) if self.max_norm > 0 else None
        with torch.no_grad():
            for p, m, v, wd in zip(self.params, self.exp_avg, self.exp_avg_sq, self.decay):
                g = p.grad if coef is None else p.grad * coef
                if wd:
                    p.mul_(1.0 - lr * wd)
                m.mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
                v.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
                p.sub_(step_size * m / (v.sqrt() / bc2_sqrt + self.eps))
                p.grad.zero_()
        return total

    def state_on_cpu(self) -> dict[str, dict[str, Any]]:
        return {
            n: {"exp_avg": host_copy(m), "exp_avg_sq": host_copy(v)}
            for n, m, v in zip(self.names, self.exp_avg, self.exp_avg_sq)
        }

    def load(self, state: dict[str, dict[str, Any]]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise TrnftError(
                f"optimizer state of the checkpoint lacks {missing[0]} ({len(missing)} parameters)"
            )
        with __import__("torch").no_grad():
            for n, m, v in zip(self.names, self.exp_avg, self.exp_avg_sq):
                m.copy_(state[n]["exp_avg"].to(m.device))
                v.copy_(state[n]["exp_avg_sq"].to(v.device))


# --------------------------------------------------------------------------------------------------
# The trainer


class XlaTrainer:
    """Builds the sharded model and runs training steps; one instance per process."""

    def __init__(self, cfg: RunConfig, tokenized: TokenizeOutput, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.tokenized = tokenized
        self.log = log
        self.split = tokenized.split("train")
        self.tp = cfg.parallel.tp
        self.devices = cfg.neuron.cpu_devices
        self.dp = self.devices // self.tp
        self.micro = cfg.train.micro_batch_size * self.dp  # sequences per forward pass, all DP ranks
        self.global_batch = global_batch(cfg.train, self.dp)
        self.step = 0
        self.history: list[float] = []

    # -- setup ------------------------------------------------------------------------------------

    def check(self) -> None:
        """Everything that can be refused without starting XLA: model and data, layout, LoRA targets."""
        cfg = self.cfg
        config = check_model_takes_the_data(cfg, self.tokenized)
        self.model_config = config
        self.layout = model_layout(cfg, config)
        self.targets = training_targets(cfg, self.layout) if cfg.lora.enabled else []

    def setup(self, *, cache_dir: str | None = None, resume: Path | None = None) -> None:
        """Model, LoRA, sharding and optimizer; weights/optimizer/step from ``resume`` when given."""
        import torch
        from transformers import AutoModelForCausalLM

        self.check()
        cfg = self.cfg
        base_dtype = getattr(torch, cfg.model.dtype) if cfg.lora.enabled else torch.float32
        torch.manual_seed(cfg.train.seed)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model.name_or_path, revision=cfg.model.revision, dtype=base_dtype, attn_implementation="eager",
            trust_remote_code=cfg.model.trust_remote_code,
        )  # fmt: skip
        model.config.use_cache = False
        if cfg.lora.enabled:
            model = apply_lora(model, cfg, self.targets, self.layout.tied_lora_groups())
            seed_lora_a(model, cfg.train.seed)
        state = None
        if resume is not None:
            state = self._restore_weights(model, resume)

        init_runtime(self.devices)
        import torch_xla
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            xr.initialize_cache(cache_dir, readonly=False)
        self.device = torch_xla.device()
        model.to(self.device)
        if cfg.lora.enabled:
            # Moving to XLA creates new Parameter objects per module, which unties shared LoRA A; tie again.
            tie_lora_a(model, self.layout.tied_lora_groups())
        self.mesh = xs.Mesh(np.arange(self.devices), (self.dp, self.tp), ("data", "model"))
        for name, param in model.named_parameters():
            spec = self._partition_spec(name, tuple(param.shape))
            if spec is not None:
                xs.mark_sharding(param, self.mesh, spec)
        model.train()
        self.model = model
        self.compute_dtype = base_dtype
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = StaticAdamW(named, cfg, self._shard_like)
        if state is not None:
            self.optimizer.load(state["optimizer"])
            self.step = state["step"]
            self.history = list(state["losses"])
        torch_xla.sync()
        trainable = sum(p.numel() for _, p in named)
        self.log(
            f"train: {type(model).__name__} on {self.devices} XLA CPU devices, mesh data={self.dp} x model={self.tp}, "
            f"attention {self.layout.attention}, {trainable:,} trainable parameters, global batch {self.global_batch}"
        )

    def _partition_spec(self, name: str, shape: tuple[int, ...]) -> tuple | None:
        """NxD's sharding of a parameter as a mesh spec, or None to keep it replicated."""
        if self.tp == 1:
            return None
        key = parse_key(name)
        if key is None:
            return None
        dim = split_dim(key)
        if dim is None or dim >= len(shape):
            return None
        spec = tuple("model" if i == dim else None for i in range(len(shape)))
        # K/V under GQA are replicated on Trainium; an uneven split is only a placement choice here.
        return spec if shape[dim] % self.tp == 0 else None

    def _shard_like(self, tensor: Any, param: Any) -> None:
        import torch_xla

        sharding = torch_xla._XLAC._get_xla_sharding_spec(param)
        if sharding and sharding != "{replicated}":
            torch_xla._XLAC._xla_mark_sharding(tensor, torch_xla._XLAC._get_xla_op_sharding(param))

    # -- steps ------------------------------------------------------------------------------------

    def _loss(self, batch: dict[str, Any], normaliser: Any) -> Any:
        import torch

        mask = segment_attention_mask(batch["segment_ids"], dtype=self.compute_dtype)
        with torch.autocast(
            "xla", dtype=torch.bfloat16, enabled=self.cfg.train.bf16 and not self.cfg.lora.enabled
        ):
            logits = self.model(
                input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]
            ).logits
        return summed_token_loss(logits, batch["labels"]) / normaliser

    def _device_batch(self, rows: np.ndarray) -> dict[str, Any]:
        import torch
        import torch_xla.distributed.spmd as xs

        out = {}
        for name, array in self.split.rows(rows).items():
            t = torch.from_numpy(array).to(self.device)
            if self.dp > 1:
                xs.mark_sharding(t, self.mesh, ("data", None))
            out[name] = t
        return out

    def train_step(self) -> FinishedStep:
        """One optimizer step (``gradient_accumulation_steps`` micro-batches); advances ``self.step``."""
        import torch
        import torch_xla
        import torch_xla.core.xla_model as xm

        t0 = time.perf_counter()
        train = self.cfg.train
        step = self.step
        idx = batch_indices(step, self.global_batch, len(self.split), train.seed)
        tokens = int((np.asarray(self.split.segment_ids[idx]) != 0).sum())
        supervised = max(1, self.split.supervised_tokens(idx))
        lr = lr_at(step, train)
        bc1 = 1.0 - train.adam_beta1 ** (step + 1)
        bc2 = 1.0 - train.adam_beta2 ** (step + 1)
        # One transfer of everything that changes per step (scalars 0 and 1 would be folded into constants).
        scalars = torch.tensor([lr, lr / bc1, math.sqrt(bc2), float(supervised)], dtype=torch.float32).to(
            self.device
        )
        xm.set_rng_state(step_seed(train.seed, step), self.device)
        losses = []
        for m in range(train.gradient_accumulation_steps):
            batch = self._device_batch(idx[m * self.micro : (m + 1) * self.micro])
            loss = self._loss(batch, scalars[3])
            loss.backward()
            torch_xla.sync()
            losses.append(loss)
        grad_norm = self.optimizer.step(scalars)
        torch_xla.sync()
        loss_value = float(sum(x.item() for x in losses))
        self.step += 1
        self.history.append(loss_value)
        return FinishedStep(
            step=step + 1,
            loss=loss_value,
            grad_norm=float(grad_norm.item()),
            tokens=tokens,
            seconds=time.perf_counter() - t0,
        )

    # -- checkpoints --------------------------------------------------------------------------------

    def save(self, train_dir: Path, fingerprint: str, tokenizer_dir: Path | None) -> Path:
        """Write ``checkpoint-<step>`` in optimum-neuron 0.4.x's layout plus what resume needs, atomically.

        The NxD shards come first, then trnft's resume state (optimizer moments, step, losses), then the
        HF-style trainer state and the tokenizer; ``checkpoints.atomic_checkpoint`` adds the markers and
        renames the folder into place.
        """
        import torch
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops()
        ranks, metadata = self._weight_shards()
        optimizer = self.optimizer.state_on_cpu()
        with checkpoints.atomic_checkpoint(train_dir, self.step) as staged:
            tag = self._write_model_files(staged)
            nxd_format.write_tag(tag, ranks, metadata, encoding=self.cfg.neuron.checkpoint_format)
            checkpoints.fault_point("save", self.step)
            state_dir = staged / checkpoints.TRNFT_STATE
            state_dir.mkdir()
            torch.save(optimizer, state_dir / "optimizer.pt")
            (state_dir / "state.json").write_text(json.dumps(self._resume_state(fingerprint), indent=1))
            (staged / "trainer_state.json").write_text(json.dumps(self._trainer_state(), indent=1))
            if tokenizer_dir is not None:
                copy_present(TOKENIZER_FILES, [tokenizer_dir], staged)
        return train_dir / f"checkpoint-{self.step}"

    def _weight_shards(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The trained weights (the adapter with LoRA) split per TP rank as NxD does, and their metadata."""
        names = [n for n, _ in self.model.named_parameters()]
        if self.cfg.lora.enabled:
            from peft import get_peft_model_state_dict

            on_cpu = {n: host_copy(t) for n, t in self.model.state_dict().items() if "lora_" in n}
            weights = get_peft_model_state_dict(self.model, state_dict=on_cpu, adapter_name=ADAPTER)
            metadata = parameter_metadata(names, self.layout, peft=True, lora_targets=set(self.targets))
        else:
            weights = {n: host_copy(t) for n, t in self.model.state_dict().items()}
            metadata = parameter_metadata(names, self.layout, peft=False)
        return [shard_state_dict(weights, self.layout, r) for r in range(self.layout.tp)], metadata

    def _write_model_files(self, staged: Path) -> Path:
        """The configs optimum-neuron writes beside its shards; returns the shard tag folder to fill."""
        layout = self.layout
        if self.cfg.lora.enabled:
            import copy

            adapter_dir = staged / f"adapter_{ADAPTER}"
            adapter_dir.mkdir()
            peft_cfg = copy.deepcopy(self.model.peft_config[ADAPTER])
            peft_cfg.base_model_name_or_path = self.cfg.model.name_or_path
            peft_cfg.inference_mode = True  # as PEFT writes a saved adapter's config
            peft_cfg.save_pretrained(adapter_dir)
            return adapter_dir / nxd_format.ADAPTER_SHARDS
        self.model.config.save_pretrained(staged)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(staged)
        trn_config = {
            "tensor_parallel_size": layout.tp,
            "pipeline_parallel_size": 1,
            "fuse_qkv": layout.fuse_qkv,
            "kv_size_multiplier": layout.kv_multiplier,
            "use_xser": self.cfg.neuron.checkpoint_format == "xser",
        }
        (staged / "trn_config.json").write_text(json.dumps(trn_config, indent=2))
        return staged / nxd_format.MODEL_SHARDS

    def _resume_state(self, fingerprint: str) -> dict[str, Any]:
        """``trnft_state/state.json``: the step, the losses so far and the rules that make resume exact."""
        layout = self.layout
        return {
            "step": self.step,
            "fingerprint": fingerprint,
            "losses": self.history,
            "layout": {
                "tp": layout.tp,
                "dp": self.dp,
                "attention": layout.attention,
                "kv_multiplier": layout.kv_multiplier,
            },
            "rng": {
                "seed": self.cfg.train.seed,
                "rule": "the XLA RNG is reseeded to seed*1000003+step before every step",
            },
            "data_position": {
                "step": self.step,
                "global_batch": self.global_batch,
                "consumed_sequences": self.step * self.global_batch,
            },
        }

    def _trainer_state(self) -> dict[str, Any]:
        """``trainer_state.json`` as the HF trainer writes it (step and loss history)."""
        return {
            "global_step": self.step,
            "max_steps": self.cfg.train.max_steps,
            "log_history": [{"step": i + 1, "loss": x} for i, x in enumerate(self.history)],
        }

    def _restore_weights(self, model: Any, checkpoint: Path) -> dict[str, Any]:
        """Load trainable weights from the checkpoint's shards (through the consolidator) and its state."""
        import torch

        from .consolidate import load_checkpoint_tensors

        state = json.loads((checkpoint / checkpoints.TRNFT_STATE / "state.json").read_text())
        tensors = load_checkpoint_tensors(checkpoint)
        # Every name, tied aliases included (a fused layer's LoRA A is one parameter under two names).
        params = dict(model.named_parameters(remove_duplicate=False))
        if self.cfg.lora.enabled:
            wanted = {n for n in params if "lora_" in n}
            loaded = {}
            for name, array in tensors.items():
                key = parse_key(name)
                assert key is not None and key.lora_part, name
                head, _, rest = key.param.partition(".")
                loaded[key.with_(param=f"{head}.{ADAPTER}.{rest}").render()] = array
        else:
            wanted = set(params)
            loaded = dict(tensors)
            if (
                "lm_head.weight" not in loaded
                and "lm_head.weight" in wanted
                and model.config.tie_word_embeddings
            ):
                wanted.discard("lm_head.weight")
        missing = sorted(wanted - set(loaded))
        unexpected = sorted(set(loaded) - set(params))
        if missing or unexpected:
            raise TrnftError(
                f"{checkpoint}: does not match the model (missing {missing[:2]}, unexpected {unexpected[:2]}); "
                "was it written with other settings?"
            )
        with torch.no_grad():
            for name, array in loaded.items():
                params[name].copy_(to_torch(array))
        state["optimizer"] = torch.load(
            checkpoint / checkpoints.TRNFT_STATE / "optimizer.pt", weights_only=True
        )
        return state


def host_copy(tensor: Any) -> Any:
    """A CPU copy of an XLA tensor assembled from its device shards.

    ``tensor.cpu()`` on an SPMD-sharded tensor compiles a gather graph per tensor; reading the local
    shards compiles nothing, so saving a checkpoint adds no graphs to the run.
    """
    import torch
    from torch_xla.distributed.spmd import XLAShardedTensor

    full = torch.empty(tuple(tensor.shape), dtype=tensor.dtype)
    for shard in XLAShardedTensor(tensor.detach()).local_shards:
        index = shard.indices
        if index is Ellipsis or index == ...:
            return shard.data.clone()
        full[tuple(index)] = shard.data
    return full


def to_torch(a: Array) -> Any:
    import torch

    if a.dtype == "BF16":
        return torch.from_numpy(np.ascontiguousarray(a.data).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a.data))


def compile_count() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def persistent_cache_counters() -> dict[str, int]:
    import torch_xla.debug.metrics as met

    names = ("PersistentCacheHit", "PersistentCacheMiss", "PersistentCacheDeserializeFailure")
    return {n: int(met.counter_value(n) or 0) for n in names if n in met.counter_names()}
